"""Training datasets: images assigned to buckets, an epoch plan of one-bucket batches, samples.

A :class:`BucketDataset` holds one ``[[datasets]]`` entry; a :class:`DatasetGroup` several.
Indexing takes a :class:`SampleKey` (which sample, for which epoch/step/slot) so every random
choice of a sample (flip, crop, colour, caption shuffling and dropout) is drawn from a generator
seeded by the key: results are identical for a seed whatever the number of DataLoader workers,
and an interrupted epoch can be resumed exactly (see :mod:`library.data.sampler`).

The plan of an epoch follows kohya: every image is put ``num_repeats`` times into its bucket,
each bucket is shuffled and cut into batches of ``batch_size``, and the batches of all buckets
(and all datasets) are shuffled together. Each batch therefore holds one bucket.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from library.config.dataset_params import Blueprint, DatasetParams, SubsetParams
from library.data import images as img_ops
from library.data.buckets import BucketManager, adjust_min_max_bucket_reso, fixed_resolution_manager, format_histogram
from library.data.captions import process_caption
from library.data.latent_file import load_latent_file
from library.data.subsets import ImageEntry, SubsetScan, balance_reg_repeats, scan_subset
from library.errors import DatasetError
from library.utils.ratios import ceil_of, exact

logger = logging.getLogger(__name__)

Reso = tuple[int, int]


class SampleKey(NamedTuple):
    """What the batch sampler passes to ``dataset[...]``.

    ``index``: the sample; ``epoch``: 1-based epoch; ``step``: global optimizer step (token
    warm-up); ``slot``: position in the epoch plan (so repeats of one image differ).
    """

    index: int
    epoch: int = 1
    step: int = 0
    slot: int = 0


@dataclass
class Sample:
    """One image of a dataset, with its bucket and (after caching) its latents."""

    entry: ImageEntry
    subset: SubsetParams
    original_size: Reso
    bucket_reso: Reso
    resized_size: Reso
    latents: torch.Tensor | None = None  # [4, h/8, w/8], unscaled
    latents_flipped: torch.Tensor | None = None
    alpha_mask: torch.Tensor | None = None  # [H, W] at bucket resolution
    latents_path: Path | None = None  # disk cache


def _cached_sizes(scans: list[SubsetScan]) -> dict[str, Reso]:
    """``cache_info``: the sizes of images unchanged since their folder's cache was written."""
    known: dict[str, Reso] = {}
    for sc in scans:
        if sc.info_cache is None:
            continue
        for e in sc.entries:
            size = sc.info_cache.size(e.path)
            if size is not None:
                known[str(e.path)] = size
        logger.info("cache_info: %d of %d image sizes from %s", sum(str(e.path) in known for e in sc.entries),
                    len(sc.entries), sc.info_cache.path)
    return known


def _update_info_caches(scans: list[SubsetScan], sizes: dict[str, Reso]) -> None:
    """Rewrite each ``cache_info`` folder's cache when anything in it changed (all of its images)."""
    for sc in scans:
        cache = sc.info_cache
        if cache is None:
            continue
        items = []
        for e in sc.entries:
            size = sizes.get(str(e.path)) or cache.size(e.path)
            if size is None:  # not in this split (validation_split) or an unused reg image
                try:
                    size = img_ops.image_size(e.path)
                except DatasetError:
                    continue  # a bad image (skip_bad_images) is looked at again next time
            items.append((e.path, e.caption, e.caption_path, size))
        cache.save(items)


def _read_sizes(entries: list[ImageEntry], skip_bad_images: bool, known: dict[str, Reso] | None = None
                ) -> list[tuple[ImageEntry, Reso]]:
    """``(entry, (w, h))`` for each readable image; ``known`` sizes (cache_info) are not re-read."""
    out = []
    for entry in entries:
        try:
            size = entry.size or (known or {}).get(str(entry.path)) or img_ops.image_size(entry.path)
            if skip_bad_images:
                img_ops.load_image(entry.path)  # a full decode finds truncated files now, not mid-training
        except DatasetError as e:
            if not skip_bad_images:
                raise
            logger.warning("skipping bad image: %s", e)
            continue
        out.append((entry, size))
    return out


def _bucket_manager(params: DatasetParams, declared: list[Reso | None]) -> tuple[BucketManager, bool]:
    if declared and all(s is not None for s in declared):
        # fine-tuning metadata with train_resolution (prepare_buckets_latents.py): those are the buckets
        manager = BucketManager(False, None, None, None, None)
        manager.set_predefined_resos(sorted(set(declared)))  # type: ignore[arg-type]
        return manager, True
    if params.resolution is None:
        raise DatasetError("resolution is not set; pass --resolution or set resolution in the dataset config")
    if not params.enable_bucket:
        return fixed_resolution_manager(tuple(params.resolution)), False
    lo, hi = adjust_min_max_bucket_reso(params.min_bucket_reso, params.max_bucket_reso, params.bucket_reso_steps)
    manager = BucketManager(params.bucket_no_upscale, tuple(params.resolution), lo, hi, params.bucket_reso_steps)
    if not params.bucket_no_upscale:
        manager.make_buckets()
    return manager, True


def _covering_size(size: Reso, bucket: Reso) -> Reso:
    """``size`` scaled (aspect kept) so that it covers ``bucket``: the side that would fall short matches."""
    w, h = size
    scale = bucket[1] / h if w / h > bucket[0] / bucket[1] else bucket[0] / w
    return max(bucket[0], int(w * scale + 0.5)), max(bucket[1], int(h * scale + 0.5))


def _split_entries(entries: list[ImageEntry], params: DatasetParams, split: str, seed: int) -> list[ImageEntry]:
    """kohya's ``validation_split``: each subset's images are shuffled with ``validation_seed`` (the
    training seed when unset) and the last ``validation_split`` share is held out for validation.
    Regularization images are never held out."""
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', not {split!r}")
    share = params.validation_split or 0.0
    if share <= 0:
        return entries if split == "train" else []
    if entries and entries[0].is_reg:
        return entries if split == "train" else []
    order = list(entries)
    random.Random(params.validation_seed if params.validation_seed is not None else seed).shuffle(order)
    # one count, exact: kohya computes the two sides separately in floats, so they can overlap by an image
    n_train = ceil_of(1 - exact(share), len(order))
    return order[:n_train] if split == "train" else order[n_train:]


class BucketDataset(torch.utils.data.Dataset):
    """One dataset (a ``[[datasets]]`` entry): its samples, buckets and per-sample loading.

    Args:
        params: the dataset's options.
        scans: one scan per subset (errors must already have been raised).
        seed: the training seed (epoch plans and augmentation derive from it).
        skip_bad_images: drop unreadable images with a warning instead of failing.
        split: "train", or "validation" for the images ``validation_split`` holds out.
    """

    def __init__(self, params: DatasetParams, scans: list[SubsetScan], seed: int = 0, skip_bad_images: bool = False,
                 split: str = "train"):
        self.params = params
        self.seed = seed
        self.split = split
        self.max_train_steps: int | None = None  # set by the trainer before loading starts (token warm-up)
        subset_of: dict[int, SubsetParams] = {}
        train: list[ImageEntry] = []
        reg: list[ImageEntry] = []
        seen_dirs: set[tuple] = set()
        for scan in scans:
            ident = (scan.subset.kind, scan.subset.image_dir, scan.subset.metadata_file, scan.subset.conditioning_data_dir)
            if ident in seen_dirs:  # kohya ignores a repeated subset too
                logger.warning("ignoring duplicated subset %s (the first one is used)", scan.where)
                continue
            seen_dirs.add(ident)
            for e in _split_entries(scan.entries, params, split, seed):
                (reg if e.is_reg else train).append(e)
                subset_of[id(e)] = scan.subset
        self.num_train_images = sum(e.num_repeats for e in train)
        self.num_reg_images = sum(e.num_repeats for e in reg)
        used_reg = balance_reg_repeats(self.num_train_images, reg)
        for old, new in zip(reg, used_reg):
            subset_of[id(new)] = subset_of[id(old)]
        if reg:
            logger.info("%d train images with repeats, %d reg images", self.num_train_images, self.num_reg_images)
            if self.num_train_images < self.num_reg_images:
                logger.warning("there are more reg images than train images; some reg images are not used")
        entries = train + used_reg
        if not train and reg and split == "train":
            raise DatasetError(f"the dataset has {len(reg)} regularization images but no training images; "
                               "check --train_data_dir (folders named N_name with images) or the subsets' image_dir")
        if not entries:
            raise DatasetError(f"the {split} split of the dataset has no images"
                               + (" (raise validation_split)" if split == "validation" else ""))
        used_scans = [sc for sc in scans if any(id(e) in subset_of for e in sc.entries)]
        sized = _read_sizes(entries, skip_bad_images, _cached_sizes(used_scans))
        _update_info_caches(used_scans, {str(e.path): s for e, s in sized})
        if not sized:
            raise DatasetError("the dataset has no usable images")
        self.bucket_manager, self.enable_bucket = _bucket_manager(self.params, [e.bucket for e, _ in sized])
        self.samples: list[Sample] = []
        for entry, size in sized:
            if entry.bucket is not None and self.bucket_manager.predefined_resos:
                bucket, resized = entry.bucket, _covering_size(size, entry.bucket)  # the metadata's bucket
            else:
                bucket, resized, _ = self.bucket_manager.select_bucket(*size)
            self.samples.append(Sample(entry, subset_of[id(entry)], tuple(size), tuple(bucket), tuple(resized)))
        logger.info("buckets (images x repeats):\n%s", format_histogram(self.bucket_counts()))

    def bucket_counts(self, with_repeats: bool = True) -> dict[Reso, int]:
        counts: Counter = Counter()
        for s in self.samples:
            counts[s.bucket_reso] += s.entry.num_repeats if with_repeats else 1
        return dict(counts)

    def kohya_metadata(self) -> dict[str, Any]:
        """What kohya records about a dataset in a trained network's metadata.

        Returns:
            ``bucket_info`` (``{"buckets": {i: {"resolution": [w, h], "count": n}}, "mean_img_ar_error": x}``
            or None without bucketing), ``tag_frequency`` (``{folder or JSON name: {tag: count}}``) and
            ``dataset_dirs`` (``{folder name: {"n_repeats": r, "img_count": n}}``).
        """
        bucket_info = None
        if self.enable_bucket:
            counts = self.bucket_counts()
            errors = [abs(s.bucket_reso[0] / s.bucket_reso[1] - s.original_size[0] / s.original_size[1])
                      for s in self.samples]
            bucket_info = {"buckets": {i: {"resolution": list(r), "count": counts[r]} for i, r in enumerate(sorted(counts))},
                           "mean_img_ar_error": float(np.mean(errors))}
        tags: dict[str, dict[str, int]] = {}
        dirs: dict[str, dict[str, int]] = {}
        for s in self.samples:
            name = Path(s.subset.metadata_file or s.subset.image_dir or "").name
            freq = tags.setdefault(name, {})
            for tag in s.entry.caption.split(","):  # kohya counts comma-separated tags, lower-cased
                if tag.strip():
                    freq[tag.strip().lower()] = freq.get(tag.strip().lower(), 0) + 1
            d = dirs.setdefault(name, {"n_repeats": s.subset.num_repeats, "img_count": 0})
            d["img_count"] += 1
        return {"bucket_info": bucket_info, "tag_frequency": tags, "dataset_dirs": dirs}

    @property
    def batch_size(self) -> int:
        return self.params.batch_size

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The batches of ``epoch`` (lists of sample indices, one bucket each), in training order."""
        rng = random.Random(f"sdtk-plan/{self.seed}/{epoch}")
        by_bucket: dict[Reso, list[int]] = {}
        for i, s in enumerate(self.samples):
            by_bucket.setdefault(s.bucket_reso, []).extend([i] * s.entry.num_repeats)
        batches = []
        for reso in sorted(by_bucket):
            items = by_bucket[reso]
            rng.shuffle(items)
            batches += [items[j : j + self.batch_size] for j in range(0, len(items), self.batch_size)]
        rng.shuffle(batches)
        return batches

    def num_batches(self) -> int:
        return sum(-(-n // self.batch_size) for n in self.bucket_counts().values())

    def __len__(self) -> int:
        return len(self.samples)

    def _rng(self, key: SampleKey) -> random.Random:
        return random.Random(f"sdtk-sample/{self.seed}/{key.epoch}/{key.slot}/{key.index}")

    def __getitem__(self, key: SampleKey | int) -> dict[str, Any]:
        """One sample as a dict (see :func:`collate` for the batch layout)."""
        key = SampleKey(key) if isinstance(key, int) else key
        sample = self.samples[key.index]
        subset, entry = sample.subset, sample.entry
        rng = self._rng(key)
        flip = bool(subset.flip_aug) and rng.random() < 0.5
        interpolation = subset.resize_interpolation or self.params.resize_interpolation
        out: dict[str, Any] = {"image": None, "latents": None, "alpha_mask": None, "conditioning_image": None}
        if sample.latents is not None or sample.latents_path is not None:
            out.update(self._cached(sample, flip))
            original, ltrb = out.pop("original_size"), out.pop("crop_ltrb")
            target = (out["latents"].shape[2] * 8, out["latents"].shape[1] * 8)
        else:
            prep = img_ops.prepare_image(
                entry.path, bucket_reso=sample.bucket_reso, resized_size=sample.resized_size, rng=rng,
                alpha_mask=subset.alpha_mask, random_crop=subset.random_crop, use_color_aug=subset.color_aug,
                flip=flip, face_crop_aug_range=subset.face_crop_aug_range, enable_bucket=self.enable_bucket,
                interpolation=interpolation)
            out["image"] = img_ops.to_tensor(prep.image)
            out["alpha_mask"] = None if prep.alpha_mask is None else torch.from_numpy(prep.alpha_mask)
            original, ltrb = prep.original_size, prep.crop_ltrb
            target = sample.bucket_reso
        left, top, right = ltrb[0], ltrb[1], ltrb[2]
        if flip:  # kohya: the crop's left edge as seen in the mirrored image
            left = target[0] - right
        if entry.cond_path is not None:
            cond = img_ops.load_image(entry.cond_path)
            cond = img_ops.crop_to_conditioning(cond, sample.resized_size, sample.bucket_reso, flip, interpolation)
            out["conditioning_image"] = img_ops.to_tensor(cond)
        caption = process_caption(entry.caption, subset, epoch=key.epoch, step=key.step,
                                  max_steps=self.max_train_steps, rng=rng)
        out.update(
            caption=caption, image_key=entry.key, is_reg=entry.is_reg,
            loss_weight=self.params.prior_loss_weight if entry.is_reg else 1.0,
            network_multiplier=self.params.network_multiplier,
            original_size_hw=(int(original[1]), int(original[0])), crop_top_left=(int(top), int(left)),
            target_size_hw=(int(target[1]), int(target[0])), flipped=flip,
        )
        return out

    def _cached(self, sample: Sample, flip: bool) -> dict[str, Any]:
        if sample.latents is not None:
            latents = sample.latents_flipped if flip else sample.latents
            mask = sample.alpha_mask
            meta = {"original_size": sample.original_size, "crop_ltrb": img_ops.kohya_crop_ltrb(sample.bucket_reso,
                                                                                                sample.original_size)}
        else:
            cached = load_latent_file(sample.latents_path, flip)
            latents, mask = cached["latents"], cached["alpha_mask"]
            meta = {"original_size": cached["original_size"], "crop_ltrb": cached["crop_ltrb"]}
        if latents is None:
            raise DatasetError(f"no flipped latents cached for {sample.entry.path}; re-run caching with flip_aug")
        if mask is not None and flip:
            mask = torch.flip(mask, [1])
        return {"latents": latents, "alpha_mask": mask, **meta}


class DatasetGroup(torch.utils.data.Dataset):
    """Several datasets trained together; a sample index is global across them.

    The epoch plan holds every dataset's batches, shuffled together, so a batch never mixes
    datasets (or buckets).
    """

    def __init__(self, datasets: list[BucketDataset], seed: int = 0):
        if not datasets:
            raise DatasetError("no datasets to train on")
        self.datasets = datasets
        self.seed = seed
        self.offsets = list(np.cumsum([0] + [len(d) for d in datasets])[:-1])

    @property
    def num_train_images(self) -> int:
        return sum(d.num_train_images for d in self.datasets)

    @property
    def num_reg_images(self) -> int:
        return sum(d.num_reg_images for d in self.datasets)

    def set_max_train_steps(self, max_train_steps: int) -> None:
        """Total steps, for fractional ``token_warmup_step``; call before building the DataLoader."""
        for d in self.datasets:
            d.max_train_steps = max_train_steps

    def num_batches(self) -> int:
        return sum(d.num_batches() for d in self.datasets)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        batches = [[int(off) + i for i in b] for d, off in zip(self.datasets, self.offsets) for b in d.epoch_batches(epoch)]
        random.Random(f"sdtk-group/{self.seed}/{epoch}").shuffle(batches)
        return batches

    def samples(self) -> list[Sample]:
        return [s for d in self.datasets for s in d.samples]

    def locate(self, index: int) -> tuple[BucketDataset, int]:
        for d, off in zip(reversed(self.datasets), reversed(self.offsets)):
            if index >= off:
                return d, index - int(off)
        raise IndexError(index)

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets)

    def __getitem__(self, key: SampleKey | int) -> dict[str, Any]:
        key = SampleKey(key) if isinstance(key, int) else key
        dataset, local = self.locate(key.index)
        return dataset[key._replace(index=local)]


def _stack_or_none(items: list) -> torch.Tensor | None:
    return None if items[0] is None else torch.stack(items).contiguous().float()


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack per-sample dicts into the batch the trainer consumes.

    Returns:
        ``images`` [B,3,H,W] in [-1,1] or None (latents cached); ``latents`` [B,4,H/8,W/8]
        (unscaled) or None; ``captions`` list[str]; ``loss_weights`` [B]; ``original_sizes_hw``,
        ``crop_top_lefts``, ``target_sizes_hw`` LongTensor [B,2]; ``alpha_masks`` [B,H,W] or None;
        ``network_multipliers`` [B]; ``conditioning_images`` [B,3,H,W] or None; ``image_keys``
        list[str]; ``is_reg`` BoolTensor [B]; ``flipped`` list[bool].
    """
    masks = [s["alpha_mask"] for s in samples]
    if any(m is not None for m in masks):
        h, w = samples[0]["target_size_hw"]
        masks = [torch.ones(h, w) if m is None else m for m in masks]  # kohya: no alpha -> fully opaque
        alpha = torch.stack(masks).float()
    else:
        alpha = None
    return {
        "images": _stack_or_none([s["image"] for s in samples]),
        "latents": _stack_or_none([s["latents"] for s in samples]),
        "captions": [s["caption"] for s in samples],
        "loss_weights": torch.tensor([s["loss_weight"] for s in samples], dtype=torch.float32),
        "original_sizes_hw": torch.tensor([s["original_size_hw"] for s in samples], dtype=torch.long),
        "crop_top_lefts": torch.tensor([s["crop_top_left"] for s in samples], dtype=torch.long),
        "target_sizes_hw": torch.tensor([s["target_size_hw"] for s in samples], dtype=torch.long),
        "alpha_masks": alpha,
        "network_multipliers": torch.tensor([s["network_multiplier"] for s in samples], dtype=torch.float32),
        "conditioning_images": _stack_or_none([s["conditioning_image"] for s in samples]),
        "image_keys": [s["image_key"] for s in samples],
        "is_reg": torch.tensor([s["is_reg"] for s in samples], dtype=torch.bool),
        "flipped": [s["flipped"] for s in samples],
    }


def scan_blueprint(blueprint: Blueprint) -> list[list[SubsetScan]]:
    """Scan every subset of every dataset (errors collected, not raised)."""
    return [[scan_subset(s) for s in d.subsets] for d in blueprint.datasets]


def build_dataset_group(blueprint: Blueprint, *, seed: int = 0, skip_bad_images: bool = False,
                        split: str = "train") -> DatasetGroup:
    """Scan, check and bucket all datasets of a blueprint.

    ``split="validation"`` builds the held-out images of datasets with ``validation_split`` > 0
    (datasets without it are left out).

    Raises:
        DatasetError: listing every problem found in every subset (missing folders, empty
            folders, undecodable or empty caption files, missing fine-tuning images, missing
            conditioning images, bad repeats), before any image is decoded.
    """
    all_scans = scan_blueprint(blueprint)
    problems = [f"{scan.where}: {e}" if not e.startswith(scan.where) else e
                for scans in all_scans for scan in scans for e in scan.errors]
    if problems:
        raise DatasetError(problems[0] if len(problems) == 1 else
                           f"{len(problems)} problems in the dataset:\n" + "\n".join(f"  - {p}" for p in problems))
    for scans in all_scans:
        for scan in scans:
            for w in scan.warnings:
                logger.warning("%s: %s", scan.where, w)
    datasets = [BucketDataset(p, scans, seed=seed, skip_bad_images=skip_bad_images, split=split)
                for p, scans in zip(blueprint.datasets, all_scans)
                if split == "train" or (p.validation_split or 0) > 0]
    return DatasetGroup(datasets, seed=seed)

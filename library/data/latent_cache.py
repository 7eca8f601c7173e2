"""Latent caching: encode every training image once with the VAE (``--cache_latents``), in memory
or on disk (``--cache_latents_to_disk``).

Disk caches are safetensors files next to each image, named ``<image stem>_<W>x<H>_sdtk.safetensors``
(``W x H`` = the bucket). Tensors: ``latents`` ``[4, H/8, W/8]`` float32, unscaled (as kohya caches
them; the trainer multiplies by the VAE scaling factor), ``latents_flipped`` when the subset uses
``flip_aug``, ``alpha_mask`` ``[H, W]`` when it uses ``alpha_mask``. The safetensors metadata records
what produced the file (:func:`expected_metadata`): format version, source image name, byte size and
modification time, bucket, resized size, original size, crop box, flip, alpha mask, resize
interpolation and a VAE fingerprint. A file whose record differs from what the current settings
would produce is *stale* and is rebuilt; ``--skip_cache_check`` trusts any existing file instead.
Files are written atomically (temporary file + rename), so an interrupted run leaves no half file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass
from typing import Any

import torch

from library.data import images as img_ops
from library.data.dataset import DatasetGroup, Sample
from library.data.latent_file import FORMAT, cache_file_for, cache_is_valid
from library.data.latent_file import load_latent_file  # noqa: F401  (re-exported, the reader of these files)
from library.errors import DatasetError
from library.utils.atomic import save_safetensors
from library.utils.sampling import sample_elements

logger = logging.getLogger(__name__)


def vae_fingerprint(vae: Any) -> str:
    """A short id of a VAE: its config and a fixed sample of every weight tensor (rounded to fp16,
    so the same weights loaded in fp32 or fp16 match, while another VAE — e.g. an fp16-fixed one —
    does not)."""
    h = hashlib.sha256()
    config = dict(getattr(vae, "config", {}) or {})
    h.update(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, t in vae.state_dict().items():
            h.update(name.encode() + str(tuple(t.shape)).encode())
            h.update(sample_elements(t).to(torch.float16).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def expected_metadata(sample: Sample, vae_id: str, interpolation: str | None = None) -> dict[str, str]:
    """What a valid cache file of ``sample`` must record (``interpolation``: the effective
    ``resize_interpolation``, None for the default)."""
    st = sample.entry.path.stat()
    crop = img_ops.kohya_crop_ltrb(sample.bucket_reso, sample.original_size)
    return {
        "format": FORMAT,
        "source": sample.entry.path.name,
        "source_bytes": str(st.st_size),
        "source_mtime_ns": str(st.st_mtime_ns),
        "bucket_reso": f"{sample.bucket_reso[0]}x{sample.bucket_reso[1]}",
        "resized_size": f"{sample.resized_size[0]}x{sample.resized_size[1]}",
        "original_size": json.dumps(list(sample.original_size)),
        "crop_ltrb": json.dumps([float(c) for c in crop]),
        "flip": "1" if sample.subset.flip_aug else "0",
        "alpha_mask": "1" if sample.subset.alpha_mask else "0",
        "interpolation": interpolation or "default",
        "vae": vae_id,
    }


def check_cacheable(group: DatasetGroup) -> None:
    """kohya's rule: latents cannot be cached when an image changes every epoch.

    Raises:
        DatasetError: a subset uses ``random_crop`` or ``color_aug``.
    """
    bad = sorted({f"{s.subset.image_dir or s.subset.metadata_file} ({', '.join(o for o in ('random_crop', 'color_aug') if getattr(s.subset, o))})"
                  for s in group.samples() if s.subset.random_crop or s.subset.color_aug})
    if bad:
        raise DatasetError("latents cannot be cached with random_crop or color_aug (the image changes every time it is "
                           "loaded); turn those options off or drop --cache_latents. Subsets: " + "; ".join(bad))


@dataclass
class CacheStats:
    """How many images were encoded, and how many valid disk caches were reused."""

    encoded: int = 0
    reused: int = 0


def _batches(todo: list[Sample], vae_batch_size: int) -> list[list[Sample]]:
    """One bucket (and the same flip/alpha options) per VAE batch, at most ``vae_batch_size`` images."""
    groups: dict[tuple, list[Sample]] = {}
    for s in todo:
        groups.setdefault((s.bucket_reso[0] * s.bucket_reso[1], s.bucket_reso, bool(s.subset.flip_aug),
                           bool(s.subset.alpha_mask)), []).append(s)
    out = []
    for k in sorted(groups):
        items = groups[k]
        out += [items[i : i + vae_batch_size] for i in range(0, len(items), vae_batch_size)]
    return out


def _encode(vae: Any, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    param = next(vae.parameters())
    with torch.no_grad():
        dist = vae.encode(x.to(param.device, param.dtype)).latent_dist
        return dist.sample(generator=generator).float().cpu()


def _check_finite(latents: torch.Tensor, sample: Sample) -> None:
    if not torch.isfinite(latents).all():
        raise DatasetError(
            f"the VAE produced NaN/inf latents for {sample.entry.path}. The SD/SDXL VAE overflows in fp16: "
            "use --no_half_vae, or an fp16-fixed VAE via --vae (e.g. madebyollin's sdxl-vae-fp16-fix)"
        )


def cache_latents(
    group: DatasetGroup,
    vae: Any,
    *,
    vae_batch_size: int = 1,
    to_disk: bool = False,
    skip_cache_check: bool = False,
    rebuild: bool = False,
    seed: int = 0,
    progress: bool = False,
) -> CacheStats:
    """Encode every image of ``group`` (one bucket per VAE batch) and attach the latents to its samples.

    Args:
        group: the datasets; afterwards each sample has ``latents`` (memory) or ``latents_path`` (disk).
        vae: a diffusers ``AutoencoderKL`` (on its device and dtype).
        vae_batch_size: images per encoder call.
        to_disk: write ``*_sdtk.safetensors`` next to the images and reuse valid ones.
        skip_cache_check: trust existing cache files without checking what produced them.
        rebuild: re-encode even valid cache files (kohya's cache tool without ``--skip_existing``).
        seed: seed of the latent sampling noise (the cache is reproducible).
        progress: show a tqdm bar.

    Raises:
        DatasetError: ``random_crop``/``color_aug`` in use, an unreadable image, or NaN latents.
    """
    from tqdm import tqdm

    check_cacheable(group)
    vae_id = vae_fingerprint(vae)
    stats = CacheStats()
    todo: list[Sample] = []
    interp: dict[int, str | None] = {}  # resize interpolation of each sample (subset, else dataset option)
    enable_bucket: dict[int, bool] = {}
    for dataset in group.datasets:
        for s in dataset.samples:
            interp[id(s)] = s.subset.resize_interpolation or dataset.params.resize_interpolation
            enable_bucket[id(s)] = dataset.enable_bucket
            if to_disk:
                s.latents_path = cache_file_for(s.entry.path, s.bucket_reso)
                expected = expected_metadata(s, vae_id, interp[id(s)])
                if not rebuild and cache_is_valid(s.latents_path, expected, skip_cache_check):
                    stats.reused += 1
                    continue
            todo.append(s)
    generator = torch.Generator().manual_seed(seed)
    for batch in tqdm(_batches(todo, max(1, vae_batch_size)), desc="caching latents", disable=not progress):
        prepared = [img_ops.prepare_image(
            s.entry.path, bucket_reso=s.bucket_reso, resized_size=s.resized_size, rng=random.Random(0),
            alpha_mask=s.subset.alpha_mask, face_crop_aug_range=s.subset.face_crop_aug_range,
            enable_bucket=enable_bucket[id(s)], interpolation=interp[id(s)],
        ) for s in batch]
        x = torch.stack([img_ops.to_tensor(p.image) for p in prepared])
        latents = _encode(vae, x, generator)
        flipped = _encode(vae, torch.flip(x, dims=[3]), generator) if batch[0].subset.flip_aug else [None] * len(batch)
        for s, p, lat, lat_f in zip(batch, prepared, latents, flipped):
            _check_finite(lat, s)
            if lat_f is not None:
                _check_finite(lat_f, s)
            mask = None if p.alpha_mask is None else torch.from_numpy(p.alpha_mask)
            if to_disk:
                tensors = {"latents": lat}
                if lat_f is not None:
                    tensors["latents_flipped"] = lat_f
                if mask is not None:
                    tensors["alpha_mask"] = mask
                meta = expected_metadata(s, vae_id, interp[id(s)])
                meta["image_size"] = json.dumps(list(p.original_size))  # as decoded; not part of the check
                save_safetensors(tensors, s.latents_path, metadata=meta)
            else:
                s.latents, s.latents_flipped, s.alpha_mask = lat.clone(), None if lat_f is None else lat_f.clone(), mask
            stats.encoded += 1
    logger.info("latents: %d images encoded, %d valid disk caches reused", stats.encoded, stats.reused)
    return stats

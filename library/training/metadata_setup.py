"""Assemble a run's metadata from the session (datasets, hashes) and add modelspec per save."""

from __future__ import annotations

import json
import os
from typing import Any

from library.training.metadata import build_training_metadata, minimum_metadata, per_save_metadata


def dataset_metadata(group: Any, args: Any, world: int) -> dict[str, str]:
    """kohya's dataset keys: image counts, ``ss_datasets``, ``ss_tag_frequency``, ``ss_dataset_dirs``."""
    datasets, tag_frequency, dirs = [], {}, {}
    for d in group.datasets:
        p = d.params
        subsets = []
        for sub in p.subsets:
            image_dir = os.path.basename(os.path.normpath(sub.image_dir)) if sub.image_dir else None
            count = sum(1 for s in d.samples if s.subset is sub)
            subsets.append({"img_count": count, "num_repeats": sub.num_repeats, "color_aug": bool(sub.color_aug),
                            "flip_aug": bool(sub.flip_aug), "random_crop": bool(sub.random_crop),
                            "shuffle_caption": bool(sub.shuffle_caption), "keep_tokens": sub.keep_tokens,
                            "caption_prefix": sub.caption_prefix, "caption_suffix": sub.caption_suffix,
                            "image_dir": image_dir, "is_reg": bool(getattr(sub, "is_reg", False)),
                            "class_tokens": getattr(sub, "class_tokens", None)})
            if image_dir and not getattr(sub, "is_reg", False):
                dirs[image_dir] = {"n_repeats": sub.num_repeats, "img_count": count}
        freq = getattr(d, "tag_frequency", None) or _tag_frequency(d)
        for k, v in freq.items():
            tag_frequency.setdefault(k, v)
        datasets.append({
            "is_dreambooth": str(getattr(p.kind, "value", p.kind)) == "dreambooth",
            "batch_size_per_device": p.batch_size // max(1, world), "num_train_images": d.num_train_images,
            "num_reg_images": d.num_reg_images, "resolution": list(p.resolution) if p.resolution else None,
            "enable_bucket": bool(p.enable_bucket), "min_bucket_reso": p.min_bucket_reso,
            "max_bucket_reso": p.max_bucket_reso, "tag_frequency": freq,
            "bucket_info": {"buckets": {str(i): {"resolution": list(r), "count": c}
                                        for i, (r, c) in enumerate(sorted(d.bucket_counts().items()))}},
            "subsets": subsets,
        })
    return {
        "ss_num_train_images": str(group.num_train_images),
        "ss_num_reg_images": str(group.num_reg_images),
        "ss_datasets": json.dumps(datasets),
        "ss_tag_frequency": json.dumps(tag_frequency),
        "ss_dataset_dirs": json.dumps(dirs),
        "ss_total_batch_size": str(args.train_batch_size * world * args.gradient_accumulation_steps),
    }


def _tag_frequency(d: Any) -> dict[str, dict[str, int]]:
    """Per image folder, how often each comma-separated tag occurs in the captions (kohya's count)."""
    out: dict[str, dict[str, int]] = {}
    for s in d.samples:
        folder = os.path.basename(os.path.normpath(s.subset.image_dir or "")) or "metadata"
        counts = out.setdefault(folder, {})
        for tag in (s.entry.caption or "").split(","):
            tag = tag.strip()
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return out


def model_hashes(args: Any) -> dict[str, str]:
    """``ss_sd_model_hash`` / ``ss_new_sd_model_hash`` (and the VAE's) for single files, as kohya."""
    from library.models.hashes import calculate_sha256, model_hash

    out = {}
    for key, path in (("sd_model", args.pretrained_model_name_or_path), ("vae", args.vae)):
        if path and os.path.isfile(path):
            out[f"ss_{key}_hash"] = model_hash(path)
            out[f"ss_new_{key}_hash"] = calculate_sha256(path)
    return out


def build_session_metadata(t: Any, s: Any, optimizer_text: str) -> dict[str, str]:
    a = s.args
    session_id, started_at = t.started()
    te_lr = a.text_encoder_lr
    if isinstance(te_lr, (list, tuple)):
        te_lr = te_lr[0] if len(te_lr) == 1 else (list(te_lr) or None)
    md = build_training_metadata(
        a, session_id=session_id, started_at=started_at,
        base_model_version=s.family.base_model_version(s.model.family.v2, s.v_prediction),
        optimizer_text=optimizer_text, text_encoder_lr=te_lr, net_kwargs=s.net_kwargs,
        num_epochs=s.num_epochs, num_batches_per_epoch=s.plan.batches_per_epoch,
        dataset_info=dataset_metadata(s.group, a, s.accelerator.num_processes),
        model_hashes=model_hashes(a) if a.pretrained_model_name_or_path else {})
    md["ss_max_train_steps"] = str(s.max_train_steps)
    # the model decides, not the flags: an SD2 folder loaded without --v2 is still SD2
    md["ss_v2"] = str(s.model.family.v2)
    md.update({k: str(v) for k, v in t.session_metadata_extra().items()})
    return md


def metadata_for_save(s: Any, steps: int, epoch: int) -> dict[str, str]:
    """What goes into one saved file: ss_* (or the minimum with ``--no_metadata``) plus modelspec."""
    from library.models.modelspec import build_modelspec

    a = s.args
    base = per_save_metadata(s.metadata, steps, epoch)
    md = minimum_metadata(base) if a.no_metadata else base
    resolution = a.resolution
    if not resolution and s.group.datasets and s.group.datasets[0].params.resolution:
        resolution = tuple(s.group.datasets[0].params.resolution)
    md.update(build_modelspec(
        s.model.family, v_parameterization=s.v_prediction, lora=True, resolution=resolution,
        title=a.metadata_title or a.output_name, author=a.metadata_author, description=a.metadata_description,
        license=a.metadata_license, tags=a.metadata_tags,
        timesteps=(a.min_timestep or 0, a.max_timestep or 1000) if (a.min_timestep is not None or a.max_timestep is not None)
        else None, clip_skip=a.clip_skip))
    return md

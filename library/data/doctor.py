"""The dataset doctor: every check of ``tools/check_dataset.py``, returning a plain-data report.

Nothing here raises for problems in the data; they become entries of the report (``errors``
make the tool exit 1, ``warnings`` do not). See ``docs/dataset_guide.md`` for each check.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from library.config.dataset_params import Blueprint, DatasetParams
from library.data import images as img_ops
from library.data.buckets import format_histogram
from library.data.dataset import _bucket_manager, _covering_size
from library.data.subsets import SubsetScan, balance_reg_repeats, scan_subset
from library.errors import DatasetError

logger = logging.getLogger(__name__)


@dataclass
class Thresholds:
    """Warning thresholds of the caption-embedding diversity check (per text encoder)."""

    similar_pair: float = 0.95  # a pair of captions is "highly similar" at or above this cosine
    max_mean_similarity: tuple[float, float] = (0.80, 0.90)  # TE1, TE2
    max_similar_share: tuple[float, float] = (0.05, 0.85)
    min_diversity: tuple[float, float] = (0.08, 0.02)


@dataclass
class Report:
    """The doctor's findings (``as_dict`` is the ``--json`` output)."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    datasets: list[dict] = field(default_factory=list)
    unreadable: list[dict] = field(default_factory=list)
    duplicates: list[list[str]] = field(default_factory=list)
    small_images: list[dict] = field(default_factory=list)
    captions: dict = field(default_factory=dict)
    embeddings: list[dict] | None = None

    def as_dict(self) -> dict:
        return {"ok": not self.errors, **{k: getattr(self, k) for k in (
            "errors", "warnings", "notes", "datasets", "unreadable", "duplicates", "small_images", "captions",
            "embeddings")}}


def _subset_record(scan: SubsetScan, effective: int) -> dict:
    s = scan.subset
    return {
        "kind": s.kind, "where": scan.where, "image_dir": s.image_dir, "is_reg": s.is_reg,
        "images": len(scan.entries), "num_repeats": s.num_repeats, "effective_images": effective,
        "class_tokens": s.class_tokens, "keep_tokens": s.keep_tokens,
        "missing_captions": [str(p) for p in scan.missing_captions],
        "orphan_captions": [str(p) for p in scan.orphan_captions],
        "missing_conditioning": [str(p) for p in scan.missing_conditioning],
        "orphan_conditioning": [str(p) for p in scan.orphan_conditioning],
        "missing_images": scan.missing_images, "errors": scan.errors, "warnings": scan.warnings,
    }


def _check_dataset(index: int, params: DatasetParams, report: Report, strict: bool, hashes: dict[str, list[str]],
                   sizes: dict[str, tuple[int, int]]) -> list[tuple[Any, Any]]:
    """Scan one dataset's subsets, decode every image, assign buckets. Returns (entry, subset) pairs."""
    scans = [scan_subset(s) for s in params.subsets]
    train_total = sum(e.num_repeats for sc in scans for e in sc.entries if not e.is_reg)
    reg = [e for sc in scans for e in sc.entries if e.is_reg]
    reg_used = {id(old): new for old, new in zip(reg, balance_reg_repeats(train_total, reg))}
    record: dict[str, Any] = {"index": index, "kind": params.kind, "resolution": params.resolution,
                              "enable_bucket": params.enable_bucket, "batch_size": params.batch_size, "subsets": []}
    pairs = []
    for sc in scans:
        eff = sum((reg_used[id(e)].num_repeats if id(e) in reg_used else 0) if e.is_reg else e.num_repeats
                  for e in sc.entries)
        record["subsets"].append(_subset_record(sc, eff))
        report.errors += [f"{sc.where}: {e}" for e in sc.errors]
        unpaired = [(sc.orphan_captions, "caption files without an image"),
                    (sc.missing_captions, "images without a caption file"),
                    (sc.orphan_conditioning, "conditioning images without a training image")]
        for paths, what in unpaired:
            if paths:
                msg = f"{sc.where}: {len(paths)} {what}"
                (report.errors if strict else report.warnings).append(msg + (" (--strict)" if strict else ""))
        pairs += [(reg_used.get(id(e), e), sc.subset) for e in sc.entries]
    images = []
    for entry, subset in pairs:
        key = str(entry.path)
        if key not in sizes:
            try:
                img_ops.load_image(entry.path)  # a full decode: corrupt files fail here, not in training
                sizes[key] = img_ops.image_size(entry.path)  # EXIF-aware, equals the decoded size
                hashes.setdefault(hashlib.sha256(entry.path.read_bytes()).hexdigest(), []).append(key)
            except DatasetError as e:
                report.unreadable.append({"path": key, "error": str(e)})
                report.errors.append(str(e))
                continue
        images.append((entry, subset, entry.size or sizes[key]))
    record["images"] = []
    if params.resolution is None and not all(e.bucket for e, _, _ in images):
        report.errors.append(f"dataset {index}: resolution is not set; pass --resolution or set it in the config")
    elif images:
        manager, _ = _bucket_manager(params, [e.bucket for e, _, _ in images])
        counts: Counter = Counter()
        for entry, subset, size in images:
            if entry.bucket is not None and manager.predefined_resos:  # the metadata's train_resolution
                bucket, resized = entry.bucket, _covering_size(size, entry.bucket)
            else:
                bucket, resized, _ = manager.select_bucket(*size)
            scale = img_ops.scale_factor(size, resized)
            record["images"].append({"path": str(entry.path), "key": entry.key, "original_size": list(size),
                                     "bucket": list(bucket), "resized_size": list(resized), "scale": round(scale, 4),
                                     "num_repeats": entry.num_repeats, "is_reg": entry.is_reg})
            counts[tuple(bucket)] += entry.num_repeats
            if scale > 1.0:
                report.small_images.append({"path": str(entry.path), "original_size": list(size),
                                            "bucket": list(bucket), "scale": round(scale, 3)})
        record["buckets"] = [{"resolution": list(r), "count": n} for r, n in sorted(counts.items())]
        record["histogram"] = format_histogram(dict(counts))
    report.datasets.append(record)
    return [(e, s) for e, s, _ in images]


def _tag_split(caption: str, sep: str) -> list[str]:
    return [t.strip() for t in caption.split("\n")[0].split(sep) if t.strip()]


def check_captions(pairs: list[tuple[Any, Any]], report: Report, tokenizer: Any | None, max_token_length: int | None,
                   top_tags: int = 100) -> None:
    """Token limits, tag frequency and keep_tokens/class-token coverage."""
    limit = max_token_length or 75
    info: dict[str, Any] = {"token_limit": limit, "tokenizer": tokenizer is not None, "over_limit": [],
                            "tag_frequency": [], "keep_tokens": [], "class_tokens": []}
    freq: Counter = Counter()
    by_subset: dict[int, tuple[Any, list]] = {}
    for entry, subset in pairs:
        caption = entry.caption.split("\n")[0]
        for tag in _tag_split(caption, subset.caption_separator):
            freq[tag.lower()] += 1
        by_subset.setdefault(id(subset), (subset, []))[1].append(entry)
        if tokenizer is not None:
            full = " ".join(filter(None, [subset.caption_prefix, caption, subset.caption_suffix]))
            ids = tokenizer(full, truncation=False, add_special_tokens=False).input_ids
            if len(ids) > limit:
                info["over_limit"].append({"path": str(entry.path), "tokens": len(ids), "over": len(ids) - limit,
                                           "cut": tokenizer.decode(ids[limit:]).strip()})
    if tokenizer is None:
        report.notes.append("caption token lengths not checked: no tokenizer (pass --tokenizer_cache_dir or "
                            "--pretrained_model_name_or_path)")
    if info["over_limit"]:
        report.warnings.append(f"{len(info['over_limit'])} captions are longer than {limit} tokens; the end is cut "
                               "(raise --max_token_length to 150/225 or shorten them)")
    info["tag_frequency"] = freq.most_common(top_tags)
    for subset, entries in by_subset.values():
        if subset.keep_tokens > 0:
            prefixes = Counter(tuple(_tag_split(e.caption, subset.caption_separator)[: subset.keep_tokens])
                               for e in entries)
            prefix, n = prefixes.most_common(1)[0]
            other = [str(e.path) for e in entries
                     if tuple(_tag_split(e.caption, subset.caption_separator)[: subset.keep_tokens]) != prefix]
            info["keep_tokens"].append({"subset": subset.image_dir or subset.metadata_file, "keep_tokens":
                                        subset.keep_tokens, "prefix": ", ".join(prefix), "captions": len(entries),
                                        "starting_with_prefix": n, "others": other})
            if other:
                report.warnings.append(f"{subset.image_dir or subset.metadata_file}: {n} of {len(entries)} captions "
                                       f"start with the keep_tokens={subset.keep_tokens} prefix '{', '.join(prefix)}'; "
                                       f"{len(other)} do not")
        if subset.class_tokens:
            have = sum(subset.class_tokens.lower() in e.caption.lower() for e in entries)
            info["class_tokens"].append({"subset": subset.image_dir, "class_tokens": subset.class_tokens,
                                         "captions": len(entries), "containing": have})
    report.captions = info


def find_duplicates(hashes: dict[str, list[str]], report: Report) -> None:
    report.duplicates = [sorted(set(p)) for p in hashes.values() if len(set(p)) > 1]
    if report.duplicates:
        report.warnings.append(f"{len(report.duplicates)} groups of byte-identical images "
                               f"({sum(len(d) for d in report.duplicates)} files)")


def examine(blueprint: Blueprint, *, strict: bool = False, tokenizer: Any = None,
            max_token_length: int | None = None) -> tuple[Report, list[tuple[Any, Any]]]:
    """Run every check except the embedding diversity. Returns the report and (entry, subset) pairs."""
    report = Report()
    hashes: dict[str, list[str]] = {}
    sizes: dict[str, tuple[int, int]] = {}
    pairs = []
    for i, params in enumerate(blueprint.datasets):
        pairs += _check_dataset(i, params, report, strict, hashes, sizes)
    if report.small_images:
        report.warnings.append(f"{len(report.small_images)} images are smaller than their bucket and will be upscaled")
    find_duplicates(hashes, report)
    check_captions(pairs, report, tokenizer, max_token_length)
    return report, pairs


def caption_embeddings(text_encoder: Any, tokenizer: Any, captions: list[str], batch_size: int = 32) -> "torch.Tensor":
    """Unit-length caption embeddings ``[N, D]`` of one text encoder.

    The embedding is the encoder's pooled output: ``text_embeds`` (the projected EOS state) for
    encoders with a projection (SDXL's TE2), else ``pooler_output`` (the final-norm EOS state).
    """
    import torch

    param = next(text_encoder.parameters())
    out = []
    with torch.no_grad():
        for i in range(0, len(captions), batch_size):
            ids = tokenizer(captions[i : i + batch_size], padding="max_length", truncation=True,
                            max_length=tokenizer.model_max_length, return_tensors="pt").input_ids.to(param.device)
            res = text_encoder(ids)
            emb = getattr(res, "text_embeds", None)
            emb = res.pooler_output if emb is None else emb
            out.append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu())
    return torch.cat(out)


def similarity_stats(emb: "torch.Tensor", similar_pair: float) -> dict[str, float]:
    """Pairwise cosine statistics of unit embeddings ``[N, D]`` (N >= 2).

    Returns:
        ``mean_similarity`` (mean cosine over all pairs i < j), ``similar_share`` (share of those
        pairs with cosine >= ``similar_pair``) and ``diversity_index``: the mean, over captions,
        of the cosine distance ``1 - cos`` to the caption's nearest other caption.
    """
    import torch

    n = emb.shape[0]
    sim = emb @ emb.T
    iu = torch.triu_indices(n, n, offset=1)
    pairs = sim[iu[0], iu[1]]
    nearest = sim.clone().fill_diagonal_(-2.0).max(dim=1).values
    return {"captions": n, "mean_similarity": round(pairs.mean().item(), 4),
            "similar_share": round((pairs >= similar_pair).float().mean().item(), 4),
            "diversity_index": round((1.0 - nearest).clamp(min=0).mean().item(), 4)}


def check_diversity(text_encoders: list, tokenizers: list, captions: list[str], thresholds: Thresholds,
                    report: Report, max_captions: int = 4000) -> None:
    """Caption-embedding diversity per text encoder, with warnings at the thresholds."""
    import random

    captions = [c.split("\n")[0] for c in captions]
    if len(captions) < 2:
        report.notes.append("caption diversity not checked: fewer than 2 captions")
        return
    if len(captions) > max_captions:  # the pairwise matrix grows quadratically
        captions = random.Random(0).sample(captions, max_captions)
        report.notes.append(f"caption diversity computed on a fixed sample of {max_captions} captions")
    report.embeddings = []
    for i, (te, tok) in enumerate(zip(text_encoders, tokenizers)):
        t = min(i, 1)
        stats = {"encoder": f"te{i + 1}", **similarity_stats(caption_embeddings(te, tok, captions), thresholds.similar_pair)}
        warn = []
        if stats["mean_similarity"] >= thresholds.max_mean_similarity[t]:
            warn.append(f"mean pairwise similarity {stats['mean_similarity']:.3f} >= {thresholds.max_mean_similarity[t]}")
        if stats["similar_share"] > thresholds.max_similar_share[t]:
            warn.append(f"{stats['similar_share']:.1%} of caption pairs are highly similar (cos >= "
                        f"{thresholds.similar_pair}) > {thresholds.max_similar_share[t]:.0%}")
        if stats["diversity_index"] < thresholds.min_diversity[t]:
            warn.append(f"diversity index {stats['diversity_index']:.3f} < {thresholds.min_diversity[t]}")
        stats["warnings"] = warn
        report.embeddings.append(stats)
        report.warnings += [f"captions look alike to {stats['encoder'].upper()}: {w}; vary the captions so the "
                            "model learns what differs between images" for w in warn]

"""The dataset doctor: check a dataset before spending GPU hours on it.

    python tools/check_dataset.py --train_data_dir data --resolution 1024 --enable_bucket
    python tools/check_dataset.py --dataset_config ds.toml --json > report.json
    python tools/check_dataset.py --dataset_config ds.toml --pretrained_model_name_or_path sdxl.safetensors

Reports per-subset image counts and repeats; images without captions and captions without
images (file by file); unreadable or truncated images; byte-identical duplicates; images that
would be upscaled into their bucket; the bucket histogram and each image's bucket; captions
over the token limit; tag frequency; keep_tokens / class-token coverage; and, with a model,
caption-embedding diversity per text encoder. Exit status 1 when there are errors (unreadable
images, missing folders or files, undecodable captions; unpaired files with --strict), else 0.
See docs/dataset_guide.md for every check and threshold.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.data.cli_args import add_dataset_arguments, dataset_args_mapping  # noqa: E402
from library.errors import SdtkError  # noqa: E402

logger = logging.getLogger("check_dataset")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataset_arguments(p)
    p.add_argument("--json", action="store_true", help="print a machine-readable JSON report on stdout")
    p.add_argument("--strict", action="store_true",
                   help="unpaired files (captions without images, images without captions, unpaired conditioning "
                        "images) are errors")
    p.add_argument("--pretrained_model_name_or_path", default=None,
                   help="base model: enables the caption-embedding diversity check (and gives the tokenizer)")
    p.add_argument("--v2", action="store_true", help="the model / tokenizer is SD2.x")
    p.add_argument("--tokenizer_cache_dir", default=None, help="kohya tokenizer cache folder (token-length check)")
    t = p.add_argument_group("diversity thresholds (warnings)")
    t.add_argument("--similar_pair_threshold", type=float, default=0.95, help="cosine at which two captions count as highly similar")
    t.add_argument("--te1_max_mean_similarity", type=float, default=0.80, help="warn when TE1's mean similarity >= this")
    t.add_argument("--te1_max_similar_share", type=float, default=0.05, help="warn when TE1's share of similar pairs > this")
    t.add_argument("--te1_min_diversity", type=float, default=0.08, help="warn when TE1's diversity index < this")
    t.add_argument("--te2_max_mean_similarity", type=float, default=0.90, help="warn when TE2's mean similarity >= this")
    t.add_argument("--te2_max_similar_share", type=float, default=0.85, help="warn when TE2's share of similar pairs > this")
    t.add_argument("--te2_min_diversity", type=float, default=0.02, help="warn when TE2's diversity index < this")
    return p


def _tokenizer_only(args: argparse.Namespace):
    """A CLIP tokenizer from --tokenizer_cache_dir (kohya layout, or a tokenizer folder itself), offline."""
    from library.models.families import Family
    from library.models.tokenizers import load_tokenizers

    if args.tokenizer_cache_dir is None:
        return None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the doctor never downloads
    try:
        return load_tokenizers(Family.SD2 if args.v2 else Family.SD1, None, args.tokenizer_cache_dir)[0]
    except SdtkError:
        from transformers import CLIPTokenizer

        try:
            return CLIPTokenizer.from_pretrained(args.tokenizer_cache_dir, local_files_only=True)
        except (OSError, ValueError):
            return None


def run(args: argparse.Namespace):
    """Build the blueprint and run every check; returns the report."""
    from library.config.dataset_config import build_blueprint_for_args
    from library.data import doctor

    blueprint = build_blueprint_for_args(dataset_args_mapping(args))
    model = None
    if args.pretrained_model_name_or_path:
        from library.models.loading import load_models

        model = load_models(args.pretrained_model_name_or_path, v2=args.v2, tokenizer_cache_dir=args.tokenizer_cache_dir)
        tokenizer = model.tokenizers[0]
    else:
        tokenizer = _tokenizer_only(args)
    max_len = next((d.max_token_length for d in blueprint.datasets if d.max_token_length), None)
    report, pairs = doctor.examine(blueprint, strict=args.strict, tokenizer=tokenizer, max_token_length=max_len)
    if model is not None:
        th = doctor.Thresholds(args.similar_pair_threshold,
                               (args.te1_max_mean_similarity, args.te2_max_mean_similarity),
                               (args.te1_max_similar_share, args.te2_max_similar_share),
                               (args.te1_min_diversity, args.te2_min_diversity))
        doctor.check_diversity(model.text_encoders, model.tokenizers, [e.caption for e, _ in pairs], th, report)
    else:
        report.notes.append("caption-embedding diversity not checked (pass --pretrained_model_name_or_path)")
    return report


def _section(lines: list[str], title: str, items: list[str], limit: int = 50) -> None:
    if items:
        lines.append(f"  {title} ({len(items)}):")
        lines += [f"    {x}" for x in items[:limit]]
        if len(items) > limit:
            lines.append(f"    ... and {len(items) - limit} more (see --json)")


def format_text(report) -> str:
    """A human-readable report."""
    lines = ["sdtk dataset doctor", ""]
    for ds in report.datasets:
        res = "x".join(map(str, ds["resolution"])) if ds["resolution"] else "?"
        lines.append(f"dataset {ds['index']}: {ds['kind']}, resolution {res}, "
                     f"bucketing {'on' if ds['enable_bucket'] else 'off'}, batch size {ds['batch_size']}")
        for s in ds["subsets"]:
            lines.append(f"  subset {s['where']}{' (reg)' if s['is_reg'] else ''}: {s['images']} images x "
                         f"{s['num_repeats']} repeats -> {s['effective_images']} per epoch")
            _section(lines, "images without a caption file", s["missing_captions"])
            _section(lines, "caption files without an image", s["orphan_captions"])
            _section(lines, "images without a conditioning image", s["missing_conditioning"])
            _section(lines, "conditioning images without a training image", s["orphan_conditioning"])
            _section(lines, "metadata entries without an image", s["missing_images"])
        if ds.get("histogram"):
            lines.append("  buckets (images x repeats):")
            lines += ["    " + x for x in ds["histogram"].splitlines()]
            lines.append("  each image's bucket:")
            for im in sorted(ds["images"], key=lambda x: (x["bucket"], x["path"])):
                up = f"  (upscaled x{im['scale']:.2f})" if im["scale"] > 1 else ""
                lines.append(f"    {im['bucket'][0]}x{im['bucket'][1]}  <- {im['original_size'][0]}x"
                             f"{im['original_size'][1]}  {im['path']}{up}")
        lines.append("")
    _section(lines, "unreadable images", [f"{u['path']}: {u['error']}" for u in report.unreadable])
    _section(lines, "byte-identical duplicates", [" = ".join(d) for d in report.duplicates])
    _section(lines, "images smaller than their bucket (upscaled)",
             [f"{s['path']}: {s['original_size'][0]}x{s['original_size'][1]} -> bucket {s['bucket'][0]}x{s['bucket'][1]}"
              f" (x{s['scale']})" for s in report.small_images])
    cap = report.captions
    if cap:
        _section(lines, f"captions over {cap['token_limit']} tokens",
                 [f"{o['path']}: {o['tokens']} tokens, {o['over']} over; cut: \"{o['cut']}\"" for o in cap["over_limit"]])
        _section(lines, "most frequent tags", [f"{n:6d}  {t}" for t, n in cap["tag_frequency"]], limit=20)
        for k in cap["keep_tokens"]:
            lines.append(f"  keep_tokens={k['keep_tokens']} in {k['subset']}: {k['starting_with_prefix']} of "
                         f"{k['captions']} captions start with '{k['prefix']}'")
            _section(lines, "captions starting otherwise", k["others"], limit=20)
        for c in cap["class_tokens"]:
            lines.append(f"  class tokens '{c['class_tokens']}' in {c['subset']}: in {c['containing']} of "
                         f"{c['captions']} captions")
    for e in report.embeddings or []:
        lines.append(f"  {e['encoder'].upper()}: {e['captions']} captions, mean similarity {e['mean_similarity']:.3f}, "
                     f"highly similar pairs {e['similar_share']:.1%}, diversity index {e['diversity_index']:.3f}")
    lines.append("")
    for title, items in (("errors", report.errors), ("warnings", report.warnings), ("notes", report.notes)):
        _section(lines, title, items, limit=100)
    lines.append(f"result: {len(report.errors)} errors, {len(report.warnings)} warnings")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.json else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        report = run(args)
    except SdtkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report.as_dict(), indent=2, ensure_ascii=False, default=list))
    else:
        print(format_text(report))
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())

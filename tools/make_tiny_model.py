"""Build a tiny random-weight SD1 / SD2 / SDXL model (real module names, tiny widths) for tests and demos.

    python tools/make_tiny_model.py --family sdxl --format single_file --out tiny_sdxl.safetensors
    python tools/make_tiny_model.py --family sdxl --full_size --out sdxl_random.safetensors

A single file gets its tokenizer(s) in a kohya-style tokenizer cache folder next to it
(``<out stem>_tokenizers/``; pass it with ``--tokenizer_cache_dir``). A diffusers folder holds them itself.

``--full_size`` builds the real architecture instead (SD1.5, SD2.x, SDXL base, with the real 49,408-token
text encoders; see library/models/random_full.py) as a single file the way one is downloaded: fp16 (or
``--precision``), no tokenizer folder (sdtk finds its bundled CLIP tokenizers itself). SDXL needs about
7.6 GB of memory and 7 GB of disk, and takes about a minute on two CPU cores.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.errors import SdtkError  # noqa: E402
from library.models.families import Family  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=[f.value for f in Family], required=True, help="model family")
    p.add_argument("--format", choices=["diffusers", "single_file"], default="diffusers", help="output layout")
    p.add_argument("--out", required=True, help="output folder (diffusers) or .safetensors file (single_file)")
    p.add_argument("--seed", type=int, default=0, help="weights are deterministic for a seed")
    p.add_argument("--v_parameterization", action="store_true", help="mark the model as v-prediction")
    p.add_argument("--full_size", action="store_true",
                   help="the real full-size architecture with random weights, always a .safetensors single file "
                        "(--format is not used)")
    p.add_argument("--precision", choices=["fp16", "bf16", "float"], default="fp16",
                   help="weight precision of a --full_size file")
    return p


def make_tiny_model(family: Family, fmt: str, out: str | Path, seed: int = 0, v_parameterization: bool = False) -> Path:
    """Build and save a tiny model; returns the path written."""
    from library.models.saving import save_diffusers, save_single_file
    from library.models.tiny import tiny_loaded_model
    from library.models.tokenizers import save_tokenizer_cache

    model = tiny_loaded_model(family, seed=seed, v_prediction=v_parameterization)
    out = Path(out)
    if fmt == "diffusers":
        save_diffusers(model, out)
    else:
        if out.suffix != ".safetensors":
            out = out.with_suffix(".safetensors")
        save_single_file(model, out)
        save_tokenizer_cache(model.tokenizers, family, tokenizer_dir_for(out))
    return out


def tokenizer_dir_for(single_file: Path) -> Path:
    return single_file.parent / f"{single_file.stem}_tokenizers"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.full_size:
        return _main_full_size(args)
    try:
        out = make_tiny_model(Family(args.family), args.format, args.out, args.seed, args.v_parameterization)
    except SdtkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote tiny {args.family} model to {out}")
    if args.format == "single_file":
        print(f"tokenizers: {tokenizer_dir_for(out)} (pass with --tokenizer_cache_dir)")
    return 0


def _main_full_size(args: argparse.Namespace) -> int:
    import logging

    from library.models.random_full import write_random_full_checkpoint

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    if out.suffix != ".safetensors":
        print(f"error: --full_size writes a single .safetensors file; got --out {out}", file=sys.stderr)
        return 1
    try:
        write_random_full_checkpoint(Family(args.family), out, args.v_parameterization, args.precision, args.seed)
    except SdtkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote random full-size {args.family} model to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

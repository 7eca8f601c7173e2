"""Convert a Stable Diffusion model between a single file (original layout) and a diffusers folder.

kohya's tool, with kohya's flags, for SD1.x, SD2.x and SDXL, fully offline:

    # single file -> diffusers folder (tokenizers from --reference_model or --tokenizer_cache_dir)
    python tools/convert_diffusers20_original_sd.py model.safetensors out_folder --use_safetensors \\
        --tokenizer_cache_dir tokenizers/
    # diffusers folder -> single file, saved as fp16
    python tools/convert_diffusers20_original_sd.py model_folder model.safetensors --save_precision_as fp16
    # single file -> single file (precision change, or .ckpt -> .safetensors with --allow_pickle)
    python tools/convert_diffusers20_original_sd.py model.ckpt model.safetensors --allow_pickle

``model_to_save`` ending in ``.safetensors`` or ``.ckpt`` is a single file; anything else is a
diffusers folder. The family is detected from the weights; ``--v1`` / ``--v2`` are checked against
it. Without a precision flag, tensors keep the source's dtype (kohya writes float32), so a
conversion is lossless. Output is written atomically: an existing output is replaced only once
the new one is complete.
"""

from __future__ import annotations

import argparse
import ast
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.errors import ModelLoadError, ModelSaveError, SdtkError  # noqa: E402

logger = logging.getLogger("convert_diffusers20_original_sd")

FILE_SUFFIXES = (".safetensors", ".ckpt")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--v1", action="store_true", help="the model is SD1.x (checked; the family is detected anyway)")
    p.add_argument("--v2", action="store_true", help="the model is SD2.x (checked; the family is detected anyway)")
    p.add_argument("--unet_use_linear_projection", action="store_true",
                   help="SD2 U-Net with use_linear_projection=true in the diffusers config (sdtk always writes SD2 "
                        "this way, matching stabilityai's models; kept for kohya compatibility)")
    p.add_argument("--fp16", action="store_true", help="save as fp16 (same as --save_precision_as fp16)")
    p.add_argument("--bf16", action="store_true", help="save as bf16 (same as --save_precision_as bf16)")
    p.add_argument("--float", action="store_true", help="save as float32 (same as --save_precision_as float)")
    p.add_argument("--save_precision_as", default="no", choices=["fp16", "bf16", "float"],
                   help="save precision; default: keep the source's precision")
    p.add_argument("--epoch", type=int, default=0, help="epoch recorded in a .ckpt output")
    p.add_argument("--global_step", type=int, default=0, help="global_step recorded in a .ckpt output")
    p.add_argument("--metadata", default=None,
                   help='metadata for a single-file output, as a Python/JSON dict, e.g. \'{"name": "my_model"}\'')
    p.add_argument("--variant", default=None, help="diffusers variant to load (not supported by sdtk)")
    p.add_argument("--reference_model", default=None,
                   help="local diffusers folder to copy tokenizer(s) and scheduler config from when saving as diffusers")
    p.add_argument("--use_safetensors", action="store_true",
                   help="save a diffusers folder with .safetensors weights (default: .bin, as kohya)")
    p.add_argument("--tokenizer_cache_dir", default=None,
                   help="folder with tokenizers in kohya's layout (<dir>/openai_clip-vit-large-patch14, ...)")
    p.add_argument("--v_parameterization", action="store_true",
                   help="the model predicts v (SD2 768-v and fine-tunes): recorded in the output's scheduler config")
    p.add_argument("--allow_pickle", action="store_true",
                   help="allow reading a .ckpt (pickle) input; only for files from a source you trust")
    p.add_argument("model_to_load", help="single file (.safetensors/.ckpt) or diffusers folder")
    p.add_argument("model_to_save", help="single file (.safetensors/.ckpt) or diffusers folder (no such suffix)")
    return p


def save_precision(args: argparse.Namespace) -> str | None:
    """kohya's precision flags -> one of fp16/bf16/float, or None (keep the source's dtypes)."""
    chosen = [name for name, on in (("fp16", args.fp16), ("bf16", args.bf16), ("float", args.float)) if on]
    if args.save_precision_as != "no":
        chosen.append(args.save_precision_as)
    if len(set(chosen)) > 1:
        raise ModelSaveError(f"conflicting precision flags ({', '.join(sorted(set(chosen)))}); give only one")
    return chosen[0] if chosen else None


def parse_metadata(text: str | None) -> dict[str, str]:
    """``--metadata``: a Python or JSON dict literal (kohya evaluates it; sdtk only parses literals)."""
    if text is None:
        return {}
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError) as e:
        raise ModelSaveError(f"--metadata is not a dict literal ({e.__class__.__name__}): {text!r}") from e
    if not isinstance(value, dict):
        raise ModelSaveError(f'--metadata must be a dict such as \'{{"name": "my_model"}}\', not {type(value).__name__}')
    return {str(k): v if isinstance(v, str) else str(v) for k, v in value.items()}


def check_output(path: Path, as_file: bool) -> None:
    """Fail before any loading when the output cannot be written (nothing is created on failure)."""
    if as_file and path.is_dir():
        raise ModelSaveError(f"{path} is an existing folder; a single-file output needs a file path")
    if not as_file and path.exists() and not path.is_dir():
        raise ModelSaveError(
            f"{path} is an existing file; a diffusers output is a folder (end the path in .safetensors/.ckpt "
            "for a single file)"
        )
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ModelSaveError(f"cannot write {path}: folder {parent} is not writable; choose another output path")


def check_flags(args: argparse.Namespace) -> None:
    if args.variant is not None:
        raise ModelLoadError(
            f"--variant {args.variant} is not supported: sdtk loads the default weights of a diffusers folder. "
            "Copy the variant's files to the default names (without the variant suffix) first"
        )
    if args.v1 and args.v2:
        raise ModelLoadError("--v1 and --v2 both given; give at most one (the family is detected from the weights)")
    if args.reference_model is not None and not Path(args.reference_model).is_dir():
        raise ModelLoadError(
            f"--reference_model {args.reference_model}: not a local diffusers folder (sdtk never downloads models)"
        )


def _detect_family(path: Path, allow_pickle: bool):
    from library.models.checkpoint import CheckpointReader
    from library.models.loading import _diffusers_family, detect_family_from_keys

    if path.is_dir():
        if not (path / "unet" / "config.json").exists():
            raise ModelLoadError(f"{path} is not a diffusers model folder (unet/config.json not found)")
        return _diffusers_family(path)
    return detect_family_from_keys(CheckpointReader(path, allow_pickle=allow_pickle).keys(), str(path))


def find_tokenizers(family, source: Path, reference: str | None, cache_dir: str | None) -> list:
    """Tokenizers for a diffusers output: source folder, --reference_model, --tokenizer_cache_dir, hub if online."""
    from library.models.tokenizers import load_tokenizers

    folder = source if source.is_dir() else (Path(reference) if reference else None)
    try:
        return load_tokenizers(family, folder, cache_dir)
    except ModelLoadError as e:
        raise ModelLoadError(f"{e}; for this tool, --reference_model <diffusers folder> also works") from e


def _check_family_flags(family, args: argparse.Namespace, path: str) -> None:
    from library.models.families import Family

    if args.v1 and family is not Family.SD1:
        raise ModelLoadError(f"{path} is an {family.pretty} model but --v1 was given; drop --v1")
    if args.unet_use_linear_projection and family is not Family.SD2:
        logger.warning("--unet_use_linear_projection only applies to SD2.x models; ignored")


def _apply_reference_scheduler(model, reference: str | None) -> None:
    import json

    if reference is None:
        return
    sched = Path(reference) / "scheduler" / "scheduler_config.json"
    if sched.exists():
        cfg = json.loads(sched.read_text())
        cfg.pop("_class_name", None)
        cfg.pop("_diffusers_version", None)
        model.scheduler_config = cfg


def convert(args: argparse.Namespace) -> Path:
    """Run the conversion described by parsed ``args``; returns the output path."""
    from library.models.loading import check_vocabularies, load_models
    from library.models.saving import precision_dtype, save_diffusers, save_single_file

    check_flags(args)
    src, out = Path(args.model_to_load), Path(args.model_to_save)
    as_file = out.suffix.lower() in FILE_SUFFIXES
    check_output(out, as_file)
    metadata = parse_metadata(args.metadata)
    dtype = precision_dtype(save_precision(args))
    if not src.exists():
        raise ModelLoadError(f"{src}: no such file or folder")

    family = _detect_family(src, args.allow_pickle)
    _check_family_flags(family, args, str(src))
    tokenizers = None if as_file else find_tokenizers(family, src, args.reference_model, args.tokenizer_cache_dir)
    # Reading straight into the save dtype keeps memory at one copy; None keeps each tensor's own dtype.
    model = load_models(str(src), v2=args.v2, v_parameterization=args.v_parameterization,
                        allow_pickle=args.allow_pickle, dtype=dtype, with_tokenizers=False)
    if model.v_parameterization:  # load_models does not yet update a config embedded in the file
        model.scheduler_config["prediction_type"] = "v_prediction"
        model.model_config.setdefault("scheduler", {})["prediction_type"] = "v_prediction"
    if as_file:
        save_single_file(model, out, dtype, metadata, epoch=args.epoch, global_step=args.global_step)
    else:
        if metadata:
            logger.warning("--metadata is only written into single-file outputs; ignored for a diffusers folder")
        if args.unet_use_linear_projection and not model.unet.config.get("use_linear_projection", False):
            raise ModelSaveError("--unet_use_linear_projection: converting a conv-projection SD2 U-Net is not supported")
        model.tokenizers = tokenizers
        try:
            check_vocabularies(model, str(src))
        except ModelLoadError as e:
            raise ModelLoadError(f"{e}; for this tool, --reference_model <diffusers folder> also works") from e
        _apply_reference_scheduler(model, args.reference_model)
        save_diffusers(model, out, dtype, use_safetensors=args.use_safetensors)
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        out = convert(args)
    except SdtkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # disk full, permissions changing under us, ...
        print(f"error: cannot write {args.model_to_save}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Print the metadata of a ``.safetensors`` file (model or LoRA) as JSON.

    python tools/show_metadata.py model.safetensors
    python tools/show_metadata.py --model model.safetensors      # kohya's spelling

Metadata values are strings in the file; those holding JSON objects or lists (``sdtk.model_config``,
``ss_tag_frequency``, ``ss_dataset_dirs``, ...) are parsed so the output is one JSON document.
Only the header is read, so this is instant even for multi-GB files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.errors import ModelLoadError, SdtkError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_path", nargs="?", default=None, help="the .safetensors file")
    p.add_argument("--model", default=None, help="the .safetensors file (kohya's flag; same as the positional path)")
    p.add_argument("--raw", action="store_true", help="print values exactly as stored (do not parse JSON values)")
    return p


def _parse_value(value: str):
    """Parse a metadata value that holds a JSON object or list; leave every other string as it is."""
    text = value.strip()
    if text[:1] in ("{", "["):
        try:
            return json.loads(text)
        except ValueError:
            return value
    return value


def read_metadata(path: str | Path, parse_json: bool = True) -> dict:
    """The ``__metadata__`` of a safetensors file (``{}`` when it has none).

    Raises:
        ModelLoadError: the file is missing, not ``.safetensors``, or not a readable safetensors file.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: file not found")
    if path.is_dir() or path.suffix.lower() != ".safetensors":
        raise ModelLoadError(f"{path}: not a .safetensors file; only safetensors files carry metadata")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise ModelLoadError(
            f"{path} is not a readable safetensors file ({str(e).splitlines()[0][:120]}); it may be truncated"
        ) from e
    return {k: _parse_value(v) for k, v in meta.items()} if parse_json else dict(meta)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path = args.model or args.model_path
    try:
        if path is None or (args.model and args.model_path and args.model != args.model_path):
            raise ModelLoadError("give exactly one model path (positional, or --model)")
        meta = read_metadata(path, parse_json=not args.raw)
    except SdtkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not meta:
        print(f"{path}: no metadata", file=sys.stderr)
    print(json.dumps(meta, indent=4, sort_keys=True, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())

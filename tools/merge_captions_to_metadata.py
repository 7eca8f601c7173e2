"""Build or update a fine-tuning metadata JSON from caption files (kohya's finetune tool of the same name).

    python tools/merge_captions_to_metadata.py train_images meta_cap.json --caption_extension .caption

For each image in ``train_data_dir`` the caption file ``<stem><caption_extension>`` becomes the
image's ``"caption"`` in ``out_json`` (keyed by the file stem, or the full path with
``--full_path``). An existing ``out_json`` (or ``--in_json``) is read first and updated, so
captions and tags (``merge_dd_tags_to_metadata.py``) can be merged into one file. Images without
a caption file are listed and left out; the file is written atomically.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.errors import SdtkError  # noqa: E402


def build_parser(field: str = "caption", default_ext: str = ".caption", description: str | None = None
                 ) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description or __doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("train_data_dir", help="folder of training images")
    p.add_argument("out_json", help="metadata JSON to write")
    p.add_argument("--in_json", default=None, help="metadata to start from (default: out_json when it exists)")
    p.add_argument("--caption_extension", default=default_ext, help=f"{field} file extension (default {default_ext})")
    if field == "caption":
        p.add_argument("--caption_extention", default=None, help=argparse.SUPPRESS)  # kohya's old misspelling
    p.add_argument("--full_path", action="store_true", help="key images by full path (several folders in one JSON)")
    p.add_argument("--recursive", action="store_true", help="also look in subfolders (needs --full_path)")
    p.add_argument("--debug", action="store_true", help=f"print each image key and {field}")
    return p


def merge_into_metadata(args: argparse.Namespace, field: str) -> tuple[dict, list[Path]]:
    """Read ``<stem><ext>`` of every image into ``metadata[key][field]``; returns (metadata, images without a file)."""
    from library.data.captions import read_caption_file
    from library.data.images import is_image_file

    if args.recursive and not args.full_path:
        raise SdtkError("--recursive needs --full_path (stems of different folders may clash)")
    root = Path(args.train_data_dir)
    if not root.is_dir():
        raise SdtkError(f"train_data_dir {root} is not a folder")
    pattern = root.rglob("*") if args.recursive else root.iterdir()
    images = sorted(p for p in pattern if p.is_file() and is_image_file(p))
    if not images:
        raise SdtkError(f"no images found in {root}")
    in_json = args.in_json or (args.out_json if Path(args.out_json).is_file() else None)
    metadata: dict = {}
    if in_json:
        try:
            metadata = json.loads(Path(in_json).read_text(encoding="utf-8-sig"))
        except (OSError, ValueError) as e:
            raise SdtkError(f"cannot read metadata {in_json}: {e}") from e
    ext = getattr(args, "caption_extention", None) or args.caption_extension
    ext = ext if ext.startswith(".") else "." + ext
    missing = []
    for image in images:
        text_file = image.with_suffix(ext)
        if not text_file.is_file():
            missing.append(image)
            continue
        text = read_caption_file(text_file)
        key = str(image) if args.full_path else image.stem
        metadata.setdefault(key, {})[field] = text
        if args.debug:
            print(key, text)
    return metadata, missing


def run(args: argparse.Namespace, field: str) -> int:
    from library.utils.atomic import write_json

    try:
        metadata, missing = merge_into_metadata(args, field)
        write_json(args.out_json, metadata)
    except SdtkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for m in missing:
        print(f"warning: no {field} file for {m}", file=sys.stderr)
    print(f"wrote {args.out_json}: {len(metadata)} images ({len(missing)} without a {field} file)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv), "caption")


if __name__ == "__main__":
    sys.exit(main())

"""Shrink the images of a folder to at most one or more pixel areas (kohya's tool and flags).

    python tools/resize_images_to_resolution.py src dst --max_resolution 512x512,384x384 \\
        --divisible_by 8 --save_as_png --copy_associated_files

Each image becomes ``<stem>+<WxH>.jpg`` (``.png`` with ``--save_as_png``) per ``--max_resolution``
area: scaled down, aspect kept, when it has more pixels than ``W*H`` (never up), then
center-cropped so both sides are multiples of ``--divisible_by``. Other files are copied as they
are; ``--copy_associated_files`` also copies ``<stem>.*`` (captions, ...) as ``<stem>+<WxH>.<ext>``.
Unlike kohya, each resolution is made from the original image (kohya resizes the previous one).
Every file is written atomically.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.errors import ConfigError, DatasetError, SdtkError  # noqa: E402

logger = logging.getLogger("resize_images_to_resolution")

# kohya's names (OpenCV's) -> sdtk's resize_interpolation names
INTERPOLATIONS = {"area": "area", "cubic": "cubic", "lanczos4": "lanczos", "nearest": "nearest", "linear": "linear",
                  "box": "area"}
_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # kohya's list for this tool


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src_img_folder", help="folder of the source images")
    p.add_argument("dst_img_folder", help="folder for the resized images")
    p.add_argument("--max_resolution", default="512x512,384x384,256x256,128x128",
                   help="maximum areas as 'WxH', comma-separated (one output image per area)")
    p.add_argument("--divisible_by", type=int, default=1, help="crop so both sides are multiples of this")
    p.add_argument("--interpolation", default=None, choices=list(INTERPOLATIONS),
                   help="resize filter (default: area when shrinking)")
    p.add_argument("--save_as_png", action="store_true", help="write PNG instead of JPEG")
    p.add_argument("--copy_associated_files", action="store_true",
                   help="also copy <stem>.* (captions, ...) beside each resized image")
    return p


def parse_resolutions(text: str) -> list[tuple[str, int]]:
    """``"512x512,384x384"`` -> ``[("512x512", 262144), ...]``."""
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            w, h = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise ConfigError(f"--max_resolution item {part!r} must look like 512x512") from None
        if w < 1 or h < 1:
            raise ConfigError(f"--max_resolution item {part!r} must be positive")
        out.append((part, w * h))
    if not out:
        raise ConfigError("--max_resolution is empty; give areas such as 512x512,384x384")
    return out


def target_size(w: int, h: int, max_pixels: int, divisible_by: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(resized (w, h), cropped (w, h))`` for an image of ``w x h`` (kohya's arithmetic)."""
    if w * h > max_pixels:
        scale = math.sqrt(max_pixels / (w * h))
        w, h = int(w * scale), int(h * scale)
    resized = (w, h)
    return resized, (w - w % divisible_by, h - h % divisible_by)


def resize_folder(src: Path, dst: Path, resolutions: list[tuple[str, int]], divisible_by: int = 1,
                  interpolation: str | None = None, save_as_png: bool = False, copy_associated: bool = False) -> int:
    """Write the resized images (and copies) to ``dst``; returns the number of images written."""
    import numpy as np
    from PIL import Image

    from library.data.images import load_image, resize_image
    from library.utils.atomic import atomic_write, write_bytes

    if not src.is_dir():
        raise DatasetError(f"src_img_folder {src} is not a folder")
    if divisible_by < 1:
        raise ConfigError(f"--divisible_by must be at least 1, got {divisible_by}")
    dst.mkdir(parents=True, exist_ok=True)
    written = 0
    files = sorted(p for p in src.iterdir() if p.is_file())
    for path in files:
        if not path.name.endswith(_IMAGE_EXTS):
            write_bytes(dst / path.name, path.read_bytes())
            continue
        img = load_image(path)  # RGB uint8 [H, W, 3], EXIF orientation applied
        h0, w0 = img.shape[:2]
        for name, max_pixels in resolutions:
            (rw, rh), (cw, ch) = target_size(w0, h0, max_pixels, divisible_by)
            out = resize_image(img, (rw, rh), INTERPOLATIONS[interpolation] if interpolation else None)
            y, x = (rh - ch) // 2, (rw - cw) // 2
            out = np.ascontiguousarray(out[y:y + ch, x:x + cw])
            target = dst / f"{path.stem}+{name}{'.png' if save_as_png else '.jpg'}"
            image = Image.fromarray(out)
            atomic_write(target, lambda tmp, im=image: im.save(tmp, format="PNG" if save_as_png else "JPEG",
                                                                quality=100))
            written += 1
            logger.info("%s %s (%dx%d) as %s", "resized" if w0 * h0 > max_pixels else "saved", path.name, cw, ch,
                        target.name)
        if copy_associated:
            for other in sorted(src.glob(f"{path.stem}.*")):
                if other.suffix in _IMAGE_EXTS or not other.is_file():
                    continue
                for name, _ in resolutions:
                    write_bytes(dst / f"{path.stem}+{name}{other.suffix}", other.read_bytes())
    return written


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        n = resize_folder(Path(args.src_img_folder), Path(args.dst_img_folder), parse_resolutions(args.max_resolution),
                          args.divisible_by, args.interpolation, args.save_as_png, args.copy_associated_files)
    except SdtkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {n} images to {args.dst_img_folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

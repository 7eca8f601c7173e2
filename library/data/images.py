"""Image loading and per-sample image preparation (load -> resize/crop to bucket -> augment).

Everything here works on ``numpy`` ``uint8`` arrays shaped ``[H, W, C]`` (C = 3 for RGB, 4 when
an alpha channel is kept as a loss mask) and on PIL for decoding and resizing; torchvision is not
used. Sizes are ``(width, height)`` tuples, as in kohya.

Differences from kohya, on purpose:

* EXIF orientation is applied (a phone photo stored sideways trains upright). ``image_size``
  applies it too, so bucketing sees the same size that loading produces.
* Transparent images are composited on white instead of having their alpha dropped (which
  reveals whatever colour sits under transparent pixels, often black).
* 16-bit greyscale PNGs are scaled to 8 bits instead of clipped to white.
"""

from __future__ import annotations

import logging
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError, features

from library.data.buckets import crop_ltrb as kohya_crop_ltrb
from library.data.buckets import crop_offsets
from library.errors import DatasetError

logger = logging.getLogger(__name__)

Reso = tuple[int, int]

# kohya's list (matched case-insensitively here), plus AVIF when this Pillow decodes it
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp") + (
    (".avif",) if features.check("avif") else ()
)

_INTERPOLATIONS = {
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "linear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "cubic": Image.Resampling.BICUBIC,
    # PIL's BOX filter averages the covered source pixels, like OpenCV's INTER_AREA
    "area": Image.Resampling.BOX,
}
_EXIF_ORIENTATION = 0x0112
_FACE_SUFFIX = re.compile(r"_(\d+)_(\d+)_(\d+)_(\d+)$")


def is_image_file(path: Path) -> bool:
    """Whether ``path`` has one of :data:`IMAGE_EXTENSIONS` (any letter case)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _open_error(path: Path, e: Exception) -> DatasetError:
    reason = str(e) or type(e).__name__
    return DatasetError(
        f"cannot read image {path}: {reason}. The file is corrupt, truncated or not an image; "
        "re-export it or remove it from the dataset"
    )


def image_size(path: str | Path) -> Reso:
    """``(width, height)`` after EXIF orientation, read from the header only (fast).

    Raises:
        DatasetError: the file is not a readable image.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            w, h = img.size
            orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise _open_error(path, e) from e
    # orientations 5-8 rotate by 90 degrees
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _to_rgb_or_rgba(img: Image.Image) -> Image.Image:
    """Normalise any Pillow mode to RGB, or RGBA when the image carries transparency."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img).astype(np.float64)
        # 16-bit data: scale to 8 bits rather than clip (Pillow's convert would clip)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode in ("P", "L", "RGB") and "transparency" in img.info
    )
    if has_alpha:
        return img.convert("RGBA")
    return img if img.mode == "RGB" else img.convert("RGB")


def load_image(path: str | Path, keep_alpha: bool = False) -> np.ndarray:
    """Decode an image file completely.

    Args:
        path: any format Pillow reads (JPEG, PNG, WebP, BMP, TIFF, ...).
        keep_alpha: return ``[H, W, 4]`` with the alpha channel (opaque images get alpha 255),
            for ``alpha_mask``. Otherwise transparency is composited on white.

    Returns:
        ``uint8`` array ``[H, W, 3]`` (RGB) or ``[H, W, 4]`` (RGBA), EXIF orientation applied.

    Raises:
        DatasetError: unreadable, corrupt or truncated file (the message names it).
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()  # decode now so truncation is detected here, not later
            img = ImageOps.exif_transpose(img)
            img = _to_rgb_or_rgba(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise _open_error(path, e) from e
    if img.mode == "RGBA" and not keep_alpha:
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img).convert("RGB")
    elif img.mode == "RGB" and keep_alpha:
        img = img.convert("RGBA")
    return np.asarray(img, dtype=np.uint8).copy()


def resize_image(image: np.ndarray, size: Reso, interpolation: str | None = None) -> np.ndarray:
    """Resize ``[H, W, C]`` uint8 to ``size`` = (width, height).

    ``interpolation`` is a kohya ``resize_interpolation`` name; by default "area" when no side
    grows and "lanczos" otherwise, as kohya does.
    """
    h, w = image.shape[:2]
    if (w, h) == tuple(size):
        return image
    if interpolation is None:
        interpolation = "area" if w >= size[0] and h >= size[1] else "lanczos"
    try:
        resample = _INTERPOLATIONS[interpolation]
    except KeyError:
        raise DatasetError(
            f"unknown resize_interpolation {interpolation!r}; use one of {', '.join(_INTERPOLATIONS)}"
        ) from None
    mode = "RGBA" if image.shape[2] == 4 else "RGB"
    return np.asarray(Image.fromarray(image, mode).resize(tuple(size), resample), dtype=np.uint8).copy()


def trim_and_resize(
    image: np.ndarray,
    bucket_reso: Reso,
    resized_size: Reso,
    random_crop: bool,
    rng: random.Random,
    interpolation: str | None = None,
) -> tuple[np.ndarray, Reso, tuple[float, float, float, float]]:
    """Resize so the image covers the bucket, then crop to it (centre, or random).

    Returns:
        ``(image [bucket_h, bucket_w, C], original_size (w, h), crop_ltrb)`` where ``crop_ltrb``
        is kohya's SDXL crop box for the time ids (``BucketManager.get_crop_ltrb``), so SDXL
        conditioning matches kohya's exactly.
    """
    h, w = image.shape[:2]
    original_size = (w, h)
    image = resize_image(image, resized_size, interpolation)
    rh, rw = image.shape[:2]
    left, top = crop_offsets(bucket_reso, (rw, rh), random_crop, rng)
    image = image[top : top + bucket_reso[1], left : left + bucket_reso[0]]
    if image.shape[:2] != (bucket_reso[1], bucket_reso[0]):
        raise DatasetError(f"internal error: resized {original_size} to {(rw, rh)}, smaller than bucket {bucket_reso}")
    return image, original_size, kohya_crop_ltrb(bucket_reso, original_size)


def face_box_from_name(path: Path) -> tuple[int, int, int, int] | None:
    """Face centre and size ``(cx, cy, w, h)`` from a kohya face-crop file name ``name_cx_cy_w_h.ext``."""
    m = _FACE_SUFFIX.search(path.stem)
    return tuple(int(g) for g in m.groups()) if m else None  # type: ignore[return-value]


def face_crop(
    image: np.ndarray, face: tuple[int, int, int, int], target: Reso, face_range: tuple[float, float],
    random_crop: bool, rng: random.Random,
) -> np.ndarray:
    """kohya's ``face_crop_aug_range`` (fixed resolution only): ``face_range`` = (lo, hi) bounds the
    ratio *target short side / face size*; the image is scaled (down only, as kohya) so the face
    gets a random size in ``[short / hi, short / lo]``, then ``target`` is cut around the face."""
    height, width = image.shape[:2]
    tw, th = target
    if (width, height) == (tw, th):
        return image
    cx, cy, fw, fh = face
    face_size = max(fw, fh, 1)
    short = min(tw, th)
    cover = max(th / height, tw / width)  # the smallest scale that still covers the target
    # kohya never enlarges here (it asserts instead); an image smaller than the target is enlarged to cover it
    min_scale = max(cover, min(1.0, short / (face_size * face_range[1])))
    max_scale = max(min_scale, min(1.0, short / (face_size * face_range[0])))
    scale = min_scale if min_scale >= max_scale else rng.uniform(min_scale, max_scale)
    nw, nh = max(tw, int(width * scale + 0.5)), max(th, int(height * scale + 0.5))
    image = resize_image(image, (nw, nh), "area")
    centers = (int(cy * scale + 0.5), int(cx * scale + 0.5))
    for axis, (size, length, center) in enumerate(zip((th, tw), (nh, nw), centers)):
        p = center - size // 2
        if random_crop:
            spread = max(length - center, center)
            p += rng.randint(0, spread) + rng.randint(0, spread) - spread  # peaked around the face
        elif face_range[0] != face_range[1] and face_size > short // 10 and face_size >= 40:
            p += rng.randint(-face_size // 20, face_size // 20)
        p = max(0, min(p, length - size))
        image = image[p : p + size] if axis == 0 else image[:, p : p + size]
    return image


def color_aug(image: np.ndarray, rng: random.Random) -> np.ndarray:
    """kohya's colour augmentation: with probability 0.33, either a hue shift of up to +-8 of 180
    hue steps, or a gamma in [0.95, 1.05], each half of the time. RGB channels only."""
    if rng.random() > 0.33:
        return image
    rgb = image[:, :, :3]
    if rng.random() > 0.5:
        hsv = np.asarray(Image.fromarray(rgb, "RGB").convert("HSV")).copy()
        shift = rng.uniform(-8, 8) * 256.0 / 180.0  # PIL hue runs 0..255, OpenCV's 0..179
        hsv[:, :, 0] = ((hsv[:, :, 0].astype(np.float64) + shift) % 256).astype(np.uint8)
        rgb = np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))
    else:
        gamma = rng.uniform(0.95, 1.05)
        rgb = np.clip(255.0 * (rgb / 255.0) ** gamma + 0.5, 0, 255).astype(np.uint8)
    out = image.copy()
    out[:, :, :3] = rgb
    return out


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """``uint8 [H, W, 3]`` -> ``float32 [3, H, W]`` in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image[:, :, :3])).permute(2, 0, 1).float().div(127.5).sub(1.0)


@dataclass
class PreparedImage:
    """One training image after loading, cropping and augmentation.

    Attributes:
        image: ``uint8 [H, W, 3]`` at the bucket resolution.
        alpha_mask: ``float32 [H, W]`` in [0, 1] when the subset uses ``alpha_mask``, else None.
        original_size: ``(w, h)`` of the file (after EXIF orientation).
        crop_ltrb: kohya's SDXL crop box, before flipping.
        flipped: whether the image was mirrored.
    """

    image: np.ndarray
    alpha_mask: np.ndarray | None
    original_size: Reso
    crop_ltrb: tuple[float, float, float, float]
    flipped: bool

    def crop_top_left(self) -> Reso:
        """SDXL ``(top, left)``; for a flipped image the left is measured from the mirrored side (kohya)."""
        left, top, right, _ = self.crop_ltrb
        if self.flipped:
            left = self.image.shape[1] - right
        return int(top), int(left)


def prepare_image(
    path: Path,
    *,
    bucket_reso: Reso,
    resized_size: Reso,
    rng: random.Random,
    alpha_mask: bool = False,
    random_crop: bool = False,
    use_color_aug: bool = False,
    flip: bool = False,
    face_crop_aug_range: tuple[float, float] | None = None,
    enable_bucket: bool = True,
    interpolation: str | None = None,
) -> PreparedImage:
    """Load ``path`` and turn it into a bucket-sized training image (kohya's order of steps)."""
    img = load_image(path, keep_alpha=alpha_mask)
    face = face_box_from_name(path) if face_crop_aug_range is not None else None
    if face is not None and not enable_bucket:
        original = (img.shape[1], img.shape[0])
        img = face_crop(img, face, bucket_reso, face_crop_aug_range, random_crop, rng)
        ltrb: tuple[float, float, float, float] = (0, 0, 0, 0)
    else:
        img, original, ltrb = trim_and_resize(img, bucket_reso, resized_size, random_crop, rng, interpolation)
    if use_color_aug:
        img = color_aug(img, rng)
    if flip:
        img = img[:, ::-1]
    mask = img[:, :, 3].astype(np.float32) / 255.0 if alpha_mask else None
    return PreparedImage(np.ascontiguousarray(img[:, :, :3]), mask, original, ltrb, flip)


def crop_to_conditioning(image: np.ndarray, resized_size: Reso, bucket_reso: Reso, flip: bool,
                         interpolation: str | None = None) -> np.ndarray:
    """Resize and centre-crop a ControlNet conditioning image exactly like its training image."""
    img = resize_image(image, resized_size, interpolation)
    left, top = crop_offsets(bucket_reso, resized_size, False)
    img = img[top : top + bucket_reso[1], left : left + bucket_reso[0]]
    return np.ascontiguousarray(img[:, ::-1] if flip else img)


def scale_factor(original: Reso, resized: Reso) -> float:
    """How much an image is scaled to reach its bucket (>1 means upscaled)."""
    return max(resized[0] / original[0], resized[1] / original[1]) if all(original) else math.inf

"""Helpers for data-pipeline tests: real photos shipped with scikit-image / matplotlib, generated
images of odd sizes and modes, and small dataset folders.

Import from tests (``from tests.data_fixtures import ...``); nothing here is a pytest fixture
so it never clashes with ``tests/conftest.py``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from library.config.dataset_params import Blueprint, DatasetParams, SubsetParams


def _skimage_data() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("skimage")
    assert spec is not None and spec.origin, "scikit-image is needed for the real-photo tests"
    return Path(spec.origin).parent / "data"


def _mpl_sample_data() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "sample_data"


# name -> (file, (width, height))
PHOTOS = {
    "astronaut": ("astronaut.png", (512, 512)),
    "chelsea": ("chelsea.png", (451, 300)),
    "coffee": ("coffee.png", (600, 400)),
    "rocket": ("rocket.jpg", (640, 427)),
    "motorcycle": ("motorcycle_left.png", (741, 500)),
    "hubble": ("hubble_deep_field.jpg", (1000, 872)),
    "retina": ("retina.jpg", (1411, 1411)),
    "grace_hopper": ("grace_hopper.jpg", (512, 600)),
}


def photo_path(name: str) -> Path:
    """Path of a real photo shipped by scikit-image or matplotlib."""
    file = PHOTOS[name][0]
    return (_mpl_sample_data() if name == "grace_hopper" else _skimage_data()) / file


def copy_photo(name: str, dest_dir: Path, stem: str | None = None, max_side: int | None = None) -> Path:
    """Copy a real photo into ``dest_dir`` (optionally shrunk so its long side is ``max_side``)."""
    src = photo_path(name)
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / ((stem or name) + src.suffix)
    if max_side is None:
        shutil.copyfile(src, dest)
    else:
        with Image.open(src) as im:
            im = im.convert("RGB")
            scale = max_side / max(im.size)
            im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.BOX).save(dest)
    return dest


def gradient_image(size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A deterministic non-uniform image of ``size`` (w, h) in ``mode`` (RGB, RGBA, L, P, CMYK, I;16)."""
    w, h = size
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, w)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h)[:, None].repeat(w, 1)
    rgb = np.stack([x, y, np.full_like(x, rng.integers(0, 255))], -1).astype(np.uint8)
    img = Image.fromarray(rgb, "RGB")
    if mode == "RGBA":
        alpha = np.zeros((h, w), np.uint8)
        alpha[:, w // 2 :] = 255  # right half opaque, left half transparent
        img = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    elif mode == "I;16":
        img = Image.fromarray((y * 257).astype(np.uint16))
    elif mode != "RGB":
        img = img.convert(mode)
    return img


def write_image(path: Path, size: tuple[int, int] = (64, 64), mode: str = "RGB", seed: int = 0, **save_kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    gradient_image(size, mode, seed).save(path, **save_kw)
    return path


def write_truncated_jpeg(path: Path, size: tuple[int, int] = (96, 96)) -> Path:
    """A JPEG whose data stops half-way (header intact, so only a full decode notices)."""
    import io

    buf = io.BytesIO()
    gradient_image(size).save(buf, "JPEG", quality=95)
    data = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 2])
    return path


def dreambooth_folder(root: Path, images: dict[str, tuple[int, int]], captions: dict[str, str] | None = None,
                      ext: str = ".txt") -> Path:
    """A folder of generated PNGs ``{stem: (w, h)}`` plus caption files ``{stem: caption}``."""
    root.mkdir(parents=True, exist_ok=True)
    for i, (stem, size) in enumerate(images.items()):
        write_image(root / f"{stem}.png", size, seed=i)
    for stem, caption in (captions or {}).items():
        (root / f"{stem}{ext}").write_text(caption, encoding="utf-8")
    return root


def blueprint(subsets: list[SubsetParams], **dataset_kw) -> Blueprint:
    """One dataset with small buckets (64 px) unless overridden."""
    kw = dict(resolution=(64, 64), batch_size=2, enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128,
              bucket_reso_steps=32)
    kw.update(dataset_kw)
    kind = subsets[0].kind
    return Blueprint([DatasetParams(kind=kind, subsets=subsets, **kw)])


def db_subset(image_dir: Path, **kw) -> SubsetParams:
    kw.setdefault("caption_extension", ".txt")
    return SubsetParams(kind="dreambooth", image_dir=str(image_dir), **kw)

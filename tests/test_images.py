"""Image loading, modes, EXIF, corrupt files, resize/crop to bucket and augmentations."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from library.data import images as im
from library.data.buckets import BucketManager
from library.errors import DatasetError
from tests.data_fixtures import PHOTOS, copy_photo, photo_path, write_image, write_truncated_jpeg


@pytest.mark.parametrize("name", list(PHOTOS))
def test_real_photos_load_at_their_size(name):
    arr = im.load_image(photo_path(name))
    w, h = PHOTOS[name][1]
    assert arr.shape == (h, w, 3) and arr.dtype == np.uint8
    assert im.image_size(photo_path(name)) == (w, h)
    assert arr.std() > 10  # a real picture, not a blank


@pytest.mark.parametrize("fmt,ext", [("PNG", ".png"), ("JPEG", ".jpg"), ("WEBP", ".webp"), ("BMP", ".bmp")])
def test_formats(tmp_path, fmt, ext):
    p = write_image(tmp_path / f"x{ext}", (37, 23), format=fmt)
    arr = im.load_image(p)
    assert arr.shape == (23, 37, 3)
    assert im.is_image_file(p) and im.is_image_file(p.with_suffix(ext.upper()))


def test_rgba_composited_on_white_or_kept_as_alpha(tmp_path):
    p = write_image(tmp_path / "a.png", (40, 20), "RGBA")
    rgb = im.load_image(p)
    assert rgb.shape == (20, 40, 3)
    assert (rgb[:, :20] == 255).all()  # transparent half becomes white
    rgba = im.load_image(p, keep_alpha=True)
    assert rgba.shape == (20, 40, 4)
    assert (rgba[:, :20, 3] == 0).all() and (rgba[:, 20:, 3] == 255).all()
    opaque = im.load_image(write_image(tmp_path / "o.png", (8, 8)), keep_alpha=True)
    assert (opaque[:, :, 3] == 255).all()


def test_palette_with_transparency_and_la(tmp_path):
    base = Image.new("P", (10, 10), 1)
    base.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    base.info["transparency"] = 0
    pix = base.load()
    for x in range(5):
        for y in range(10):
            pix[x, y] = 0  # left half transparent index
    base.save(tmp_path / "p.png", transparency=0)
    arr = im.load_image(tmp_path / "p.png")
    assert (arr[:, :5] == 255).all() and tuple(arr[0, 9]) == (200, 10, 10)
    la = Image.new("LA", (6, 6), (100, 0))
    la.save(tmp_path / "la.png")
    assert (im.load_image(tmp_path / "la.png") == 255).all()


@pytest.mark.parametrize("mode", ["L", "CMYK", "P"])
def test_other_modes_become_rgb(tmp_path, mode):
    ext = ".jpg" if mode == "CMYK" else ".png"
    p = write_image(tmp_path / f"m{ext}", (33, 17), mode)
    arr = im.load_image(p)
    assert arr.shape == (17, 33, 3)
    if mode == "L":
        assert (arr[:, :, 0] == arr[:, :, 1]).all()


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    p = write_image(tmp_path / "g16.png", (8, 64), "I;16")
    assert Image.open(p).mode.startswith("I")
    arr = im.load_image(p)
    column = arr[:, 0, 0].astype(int)
    # a vertical ramp 0..65535 must come out as a ramp 0..255, not white everywhere
    assert column[0] == 0 and column[-1] == 255 and np.all(np.diff(column) >= 0)
    assert 100 < column[32] < 160


def test_exif_orientation_applied(tmp_path):
    img = Image.fromarray(np.zeros((10, 30, 3), np.uint8))  # 30 wide, 10 high as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when displaying
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert im.image_size(tmp_path / "rot.jpg") == (10, 30)
    assert im.load_image(tmp_path / "rot.jpg").shape == (30, 10, 3)


def test_corrupt_and_truncated_files_name_the_file(tmp_path):
    bad = tmp_path / "notanimage.png"
    bad.write_bytes(b"hello, I am text")
    with pytest.raises(DatasetError, match="notanimage.png"):
        im.image_size(bad)
    with pytest.raises(DatasetError, match="notanimage.png"):
        im.load_image(bad)
    trunc = write_truncated_jpeg(tmp_path / "trunc.jpg")
    assert im.image_size(trunc) == (96, 96)  # the header is fine ...
    with pytest.raises(DatasetError, match="trunc.jpg.*(truncated|corrupt)"):
        im.load_image(trunc)  # ... the full decode is not


def test_trim_and_resize_covers_then_center_crops():
    photo = im.load_image(photo_path("rocket"))  # 640x427
    mgr = BucketManager(False, (512, 512), 256, 1024, 64)
    mgr.make_buckets()
    bucket, resized, _ = mgr.select_bucket(640, 427)
    out, original, ltrb = im.trim_and_resize(photo, bucket, resized, False, random.Random(0))
    assert out.shape == (bucket[1], bucket[0], 3)
    assert original == (640, 427)
    assert resized[0] >= bucket[0] and resized[1] >= bucket[1]
    # centre crop equals cropping the resized image in the middle
    full = im.resize_image(photo, resized)
    left, top = (resized[0] - bucket[0]) // 2, (resized[1] - bucket[1]) // 2
    assert np.array_equal(out, full[top : top + bucket[1], left : left + bucket[0]])
    assert ltrb[0] >= 0 and ltrb[1] >= 0


def test_random_crop_varies_and_stays_in_bounds():
    photo = im.load_image(photo_path("chelsea"))  # 451x300
    bucket, resized = (192, 192), (289, 192)
    outs = {im.trim_and_resize(photo, bucket, resized, True, random.Random(s))[0].tobytes() for s in range(6)}
    assert len(outs) > 1
    for s in range(6):
        assert im.trim_and_resize(photo, bucket, resized, True, random.Random(s))[0].shape == (192, 192, 3)


def test_resize_interpolation_choices():
    photo = im.load_image(photo_path("astronaut"))
    a = im.resize_image(photo, (64, 64), "nearest")
    b = im.resize_image(photo, (64, 64), "lanczos")
    c = im.resize_image(photo, (64, 64))  # default: area when shrinking
    assert a.shape == b.shape == c.shape == (64, 64, 3)
    assert not np.array_equal(a, b)
    with pytest.raises(DatasetError, match="resize_interpolation"):
        im.resize_image(photo, (64, 64), "magic")


def test_prepare_image_flip_alpha_and_sdxl_crop(tmp_path):
    p = write_image(tmp_path / "a.png", (96, 64), "RGBA")
    kw = dict(bucket_reso=(64, 64), resized_size=(96, 64), rng=random.Random(0), alpha_mask=True)
    plain = im.prepare_image(p, **kw)
    flipped = im.prepare_image(p, **{**kw, "rng": random.Random(0)}, flip=True)
    assert plain.image.shape == (64, 64, 3) and plain.alpha_mask.shape == (64, 64)
    assert np.array_equal(flipped.image, plain.image[:, ::-1])
    assert np.array_equal(flipped.alpha_mask, plain.alpha_mask[:, ::-1])
    assert plain.original_size == (96, 64)
    # kohya's SDXL crop box for a wide image in a square bucket; a flip mirrors the left edge
    l, t, r, _ = plain.crop_ltrb
    assert plain.crop_top_left() == (int(t), int(l))
    assert flipped.crop_top_left() == (int(t), int(64 - r))


def test_color_aug_changes_colour_sometimes_and_keeps_shape():
    photo = im.load_image(photo_path("coffee"))[:64, :64]
    outs = [im.color_aug(photo, random.Random(s)) for s in range(20)]
    changed = [o for o in outs if not np.array_equal(o, photo)]
    assert 0 < len(changed) < 20  # applied with probability 0.33
    assert all(o.shape == photo.shape and o.dtype == np.uint8 for o in outs)
    # hue shifts are small: the mean colour moves by a few levels at most
    assert max(abs(o.astype(float).mean() - photo.astype(float).mean()) for o in changed) < 20


def test_face_crop_keeps_face_in_view(tmp_path):
    photo = copy_photo("astronaut", tmp_path, stem="astro_256_160_120_120")  # face box in the name
    assert im.face_box_from_name(photo) == (256, 160, 120, 120)
    prep = im.prepare_image(photo, bucket_reso=(128, 128), resized_size=(128, 128), rng=random.Random(1),
                            face_crop_aug_range=(2.0, 3.0), enable_bucket=False)
    assert prep.image.shape == (128, 128, 3)
    # a pure-red "face" far from the centre must end up inside the crop, at each scale drawn
    canvas = np.full((400, 600, 3), 40, np.uint8)
    canvas[40:100, 480:540] = (255, 0, 0)  # face centre (510, 70), 60 px
    Image.fromarray(canvas).save(tmp_path / "scene_510_70_60_60.png")
    for seed in range(5):
        out = im.prepare_image(tmp_path / "scene_510_70_60_60.png", bucket_reso=(128, 128), resized_size=(128, 128),
                               rng=random.Random(seed), face_crop_aug_range=(2.0, 4.0), enable_bucket=False).image
        red = (out[:, :, 0] > 200) & (out[:, :, 1] < 60)
        assert out.shape == (128, 128, 3) and red.sum() > 0
        # kohya's range is short side / face size: the 60 px face becomes 128/4..128/2 px (never enlarged)
        assert 128 / 4 - 2 <= red.any(axis=0).sum() <= 60 + 1


def test_to_tensor_range():
    t = im.to_tensor(np.array([[[0, 127, 255]]], np.uint8))
    assert t.shape == (3, 1, 1)
    assert torch.allclose(t.flatten(), torch.tensor([-1.0, 127 / 127.5 - 1, 1.0]))

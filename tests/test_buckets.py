"""Bucketing must match kohya sd-scripts exactly.

Expected values are worked out by hand from kohya's formulas (model_util.make_bucket_resolutions,
train_util.BucketManager.select_bucket); the image sizes are those of the scikit-image sample
photos (astronaut 512², chelsea 451×300, coffee 600×400, rocket 640×427, motorcycle_left
741×500, hubble_deep_field 1000×872, retina 1411²) plus a tiny 40×30.
"""

from __future__ import annotations

import random

import pytest

from library.data.buckets import (
    BucketManager, adjust_min_max_bucket_reso, crop_ltrb, crop_offsets, fixed_resolution_manager, format_histogram,
    make_bucket_resolutions,
)
from library.errors import DatasetError

SD15_BUCKETS = [
    (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576), (512, 512),
    (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256),
]


def test_bucket_set_512_steps64():
    # e.g. width 320: 262144 // 320 = 819 -> 819 // 64 * 64 = 768; width 704: 372 -> 320
    assert make_bucket_resolutions((512, 512), 256, 1024, 64) == SD15_BUCKETS


def test_bucket_set_properties_1024_steps32():
    resos = make_bucket_resolutions((1024, 1024), 512, 2048, 32)
    assert (1024, 1024) in resos
    assert all(w % 32 == 0 and h % 32 == 0 for w, h in resos)
    assert all(w * h <= 1024 * 1024 for w, h in resos)
    assert all(512 <= min(w, h) and max(w, h) <= 2048 for w, h in resos)
    # width 832: 1048576 // 832 = 1260 -> 1260 // 32 * 32 = 1248
    assert (832, 1248) in resos and (1248, 832) in resos
    assert resos == sorted(set(resos))


def test_min_size_excludes_short_heights():
    # max_size 2048 with a 512 area: width 1024 would need height 256 < min_size 384 -> dropped
    resos = make_bucket_resolutions((512, 512), 384, 2048, 64)
    assert min(min(r) for r in resos) >= 384
    assert (1024, 256) not in resos


# (image size) -> (bucket, resized size) at resolution 512, min 256, max 1024, steps 64
PREDEFINED_512 = {
    (512, 512): ((512, 512), (512, 512)),  # exact bucket: no resize
    (451, 300): ((640, 384), (640, 426)),  # ar 1.503: |1.667-1.503| < |1.286-1.503|; scale 640/451
    (600, 400): ((640, 384), (640, 427)),  # 400 * 640/600 = 426.67 -> 427
    (640, 427): ((640, 384), (640, 427)),
    (741, 500): ((640, 384), (640, 432)),  # 500 * 640/741 = 431.85 -> 432
    (1000, 872): ((576, 448), (576, 502)),  # ar 1.147: 1.286 beats 1.0; 872 * .576 = 502.27
    (1411, 1411): ((512, 512), (512, 512)),
    (40, 30): ((576, 448), (597, 448)),  # upscaled: 40 * 448/30 = 597.3
}


@pytest.mark.parametrize("size", list(PREDEFINED_512))
def test_select_bucket_predefined(size):
    manager = BucketManager(False, (512, 512), 256, 1024, 64)
    manager.make_buckets()
    bucket, resized, ar_error = manager.select_bucket(*size)
    assert (bucket, resized) == PREDEFINED_512[size]
    assert ar_error == pytest.approx(bucket[0] / bucket[1] - size[0] / size[1])
    # the resized image covers the bucket on both sides and touches it on one
    assert resized[0] >= bucket[0] and resized[1] >= bucket[1]
    assert resized[0] == bucket[0] or resized[1] == bucket[1]


def test_select_bucket_sdxl_1024():
    manager = BucketManager(False, (1024, 1024), 256, 2048, 64)
    manager.make_buckets()
    # width 1088: 1048576 // 1088 = 963 -> 960; ar 1.133 is nearest to 1.147; scale 960/872
    assert manager.select_bucket(1000, 872)[:2] == ((1088, 960), (1101, 960))
    # width 1216: 862 -> 832 (ar 1.4615, nearest to 1.4988); scale 832/427
    assert manager.select_bucket(640, 427)[:2] == ((1216, 832), (1247, 832))
    assert manager.select_bucket(512, 512)[:2] == ((1024, 1024), (1024, 1024))  # upscaled
    no_up = BucketManager(True, (1024, 1024), 256, 2048, 64)
    assert no_up.select_bucket(741, 500)[:2] == ((704, 448), (741, 500))  # 741 - 37, 500 - 52
    assert no_up.select_bucket(1000, 872)[:2] == ((960, 832), (1000, 872))
    assert no_up.select_bucket(1411, 1411)[:2] == ((1024, 1024), (1024, 1024))


def test_select_bucket_steps32():
    manager = BucketManager(False, (512, 512), 256, 1024, 32)
    manager.make_buckets()
    # width 608: 262144 // 608 = 431 -> 416; ar 1.4615 is nearest to 1.5033; scale 416/300
    assert manager.select_bucket(451, 300)[:2] == ((608, 416), (625, 416))


# bucket_no_upscale at resolution 512 (max area 262144), steps 64
NO_UPSCALE_512 = {
    (512, 512): ((512, 512), (512, 512)),
    (451, 300): ((448, 256), (451, 300)),  # smaller than the area: not resized, bucket rounded down
    (600, 400): ((576, 384), (600, 400)),
    (640, 427): ((576, 384), (576, 384)),  # 273280 px > max area: both roundings give ar 1.5 -> height path
    (741, 500): ((576, 384), (576, 389)),  # width path (ar 1.5) beats height path (ar 1.333)
    (1000, 872): ((512, 448), (514, 448)),  # height path: 448 * 1.1468 = 513.8 -> 514
    (1411, 1411): ((512, 512), (512, 512)),
}


@pytest.mark.parametrize("size", list(NO_UPSCALE_512))
def test_select_bucket_no_upscale(size):
    manager = BucketManager(True, (512, 512), 256, 1024, 64)
    bucket, resized, _ = manager.select_bucket(*size)
    assert (bucket, resized) == NO_UPSCALE_512[size]
    assert resized[0] <= size[0] and resized[1] <= size[1]  # never upscaled


def test_no_upscale_tiny_image_is_a_clear_error():
    manager = BucketManager(True, (512, 512), 256, 1024, 64)
    with pytest.raises(DatasetError, match="40x30 image has a side shorter than bucket_reso_steps"):
        manager.select_bucket(40, 30)


FIXED_512 = {
    (512, 512): (512, 512),
    (451, 300): (770, 512),  # scale 512/300: 451 * 1.7067 = 769.7
    (1000, 872): (587, 512),
    (1411, 1411): (512, 512),
    (40, 30): (683, 512),
}


@pytest.mark.parametrize("size", list(FIXED_512))
def test_fixed_resolution_path(size):
    bucket, resized, _ = fixed_resolution_manager((512, 512)).select_bucket(*size)
    assert bucket == (512, 512)
    assert resized == FIXED_512[size]


def test_fixed_non_square_resolution():
    manager = fixed_resolution_manager((768, 512))
    assert manager.select_bucket(600, 400)[:2] == ((768, 512), (768, 512))
    assert manager.select_bucket(512, 512)[:2] == ((768, 512), (768, 768))


def test_used_buckets_are_recorded_and_sorted():
    manager = BucketManager(False, (512, 512), 256, 1024, 64)
    manager.make_buckets()
    for size in [(741, 500), (512, 512), (1000, 872), (600, 400)]:
        manager.select_bucket(*size)
    assert manager.resos == [(640, 384), (512, 512), (576, 448)]
    manager.sort()
    assert manager.resos == [(512, 512), (576, 448), (640, 384)]


def test_adjust_min_max_bucket_reso():
    assert adjust_min_max_bucket_reso(256, 1024, 64) == (256, 1024)
    assert adjust_min_max_bucket_reso(300, 1000, 64) == (256, 1024)
    assert adjust_min_max_bucket_reso(300, 1000, 32) == (288, 1024)


def test_crop_offsets_center_and_random():
    assert crop_offsets((640, 384), (640, 427), random_crop=False) == (0, 21)
    rng = random.Random(0)
    offsets = {crop_offsets((576, 448), (597, 448), True, rng) for _ in range(200)}
    assert {o[1] for o in offsets} == {0}
    assert {o[0] for o in offsets} == set(range(22))  # 0..597-576, every value reachable


def test_crop_ltrb_matches_kohya():
    # bucket wider than the image: fit the height (384 * 1.5033 = 577.3 wide), centre horizontally
    assert crop_ltrb((640, 384), (451, 300)) == pytest.approx((31.0, 0.0, 31.0 + 384 * 451 / 300, 384.0))
    left, top, right, bottom = crop_ltrb((512, 512), (1000, 872))
    assert (left, right) == (0.0, 512.0)
    assert top == (512 - 512 / (1000 / 872)) // 2


def test_format_histogram():
    text = format_histogram({(640, 384): 3, (512, 512): 10, (576, 448): 1})
    lines = text.splitlines()
    assert lines[0].startswith("bucket   0: resolution ( 512,  512)")
    assert "count:     10" in lines[0] and lines[0].endswith("#" * 40)
    assert lines[2].startswith("bucket   2: resolution ( 640,  384)") and lines[2].endswith("#" * 12)
    assert lines[-1] == "total: 14 in 3 buckets"
    assert format_histogram({}) == "no buckets (no images)"

"""finetune/prepare_buckets_latents.py and tools/resize_images_to_resolution.py."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from tests.data_fixtures import copy_photo
from tests.trainer_fixtures import PHOTOS


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "img"
    for n in PHOTOS:
        p = copy_photo(n, folder, max_side=96)
        p.with_suffix(".txt").write_text(f"a photo of {n}", encoding="utf-8")
    return folder


def test_resize_images(photos, tmp_path):
    from tools.resize_images_to_resolution import main

    dst = tmp_path / "out"
    assert main([str(photos), str(dst), "--max_resolution", "48x48,96x96", "--divisible_by", "8", "--save_as_png",
                 "--copy_associated_files"]) == 0
    for n in PHOTOS:
        src = Image.open(next(p for p in photos.glob(f"{n}.*") if p.suffix != ".txt"))
        small = Image.open(dst / f"{n}+48x48.png")
        assert small.width * small.height <= 48 * 48 and small.width % 8 == 0 and small.height % 8 == 0
        big = Image.open(dst / f"{n}+96x96.png")  # never upscaled: only cropped to multiples of 8
        assert big.size == (src.width - src.width % 8, src.height - src.height % 8)
        assert (dst / f"{n}+48x48.txt").read_text(encoding="utf-8") == f"a photo of {n}"
        assert (dst / f"{n}.txt").is_file()  # other files are copied as they are (kohya)
    assert not list(dst.glob(".sdtk-tmp-*"))


def test_resize_images_bad_resolution_is_one_line(photos, tmp_path, capsys):
    from tools.resize_images_to_resolution import main

    assert main([str(photos), str(tmp_path / "o"), "--max_resolution", "512"]) == 1
    assert capsys.readouterr().err.strip() == "error: --max_resolution item '512' must look like 512x512"
    assert not (tmp_path / "o").exists()


@pytest.mark.integration
def test_prepare_buckets_latents_then_fine_tune_reuses_the_cache(photos, tiny_model_dir, tmp_path):
    from finetune.prepare_buckets_latents import main as prepare
    from tests.test_fine_tune import run_ft

    captions = tmp_path / "meta_cap.json"
    captions.write_text(json.dumps({n: {"caption": f"a photo of {n}"} for n in PHOTOS}), encoding="utf-8")
    out_json = tmp_path / "meta_lat.json"
    model = tiny_model_dir("sd1")
    assert prepare([str(photos), str(captions), str(out_json), str(model), "--max_resolution", "64,64",
                    "--bucket_reso_steps", "32", "--min_bucket_reso", "32", "--batch_size", "2"]) == 0
    md = json.loads(out_json.read_text(encoding="utf-8"))
    for n in PHOTOS:
        w, h = Image.open(next(p for p in photos.glob(f"{n}.*") if p.suffix != ".txt")).size
        assert md[n]["image_size"] == [w, h] and md[n]["caption"] == f"a photo of {n}"
        assert all(v % 32 == 0 for v in md[n]["train_resolution"])
    caches = sorted(photos.glob("*_sdtk.safetensors"))
    assert len(caches) == len(PHOTOS)
    stamps = {p: p.stat().st_mtime_ns for p in caches}
    argv = ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(photos), "--in_json",
            str(out_json), "--resolution", "64", "--output_dir", str(tmp_path / "ft"), "--max_train_steps", "1",
            "--cache_latents_to_disk", "--max_data_loader_n_workers", "0", "--save_model_as", "safetensors"]
    assert run_ft(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in sorted(photos.glob("*_sdtk.safetensors"))} == stamps  # reused


def test_prepare_buckets_latents_missing_json(photos, tmp_path, capsys):
    from finetune.prepare_buckets_latents import main as prepare

    assert prepare([str(photos), str(tmp_path / "nope.json"), str(tmp_path / "o.json"), "model"]) == 1
    assert "nope.json does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists()

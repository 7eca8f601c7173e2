"""Subset scanning (DreamBooth, fine-tuning, ControlNet), caption fallbacks and reg balancing."""

from __future__ import annotations

import json

import pytest

from library.config.dataset_params import SubsetParams
from library.data.dataset import build_dataset_group
from library.data.subsets import ImageEntry, balance_reg_repeats, scan_subset
from library.errors import DatasetError
from tests.data_fixtures import blueprint, copy_photo, db_subset, dreambooth_folder, write_image


def test_dreambooth_captions_class_tokens_and_orphans(tmp_path):
    d = dreambooth_folder(tmp_path / "10_sks dog", {"a": (64, 64), "b": (80, 64), "c": (64, 96)},
                          {"a": "sks dog, grass", "b": "sks dog\nsecond line", "zombie": "no image for me"})
    scan = scan_subset(db_subset(d, class_tokens="sks dog", num_repeats=10))
    assert not scan.errors
    by_stem = {e.path.stem: e for e in scan.entries}
    assert by_stem["a"].caption == "sks dog, grass"
    assert by_stem["b"].caption == "sks dog\nsecond line"  # kept whole; the first line is used per step
    assert by_stem["c"].caption == "sks dog" and by_stem["c"].caption_path is None
    assert [p.name for p in scan.missing_captions] == ["c.png"]
    assert [p.name for p in scan.orphan_captions] == ["zombie.txt"]
    assert all(e.num_repeats == 10 for e in scan.entries)


def test_default_caption_extension_falls_back_to_txt(tmp_path):
    d = dreambooth_folder(tmp_path / "imgs", {"a": (64, 64), "b": (64, 64)}, {"a": "from txt"}, ext=".txt")
    (d / "b.caption").write_text("from caption", encoding="utf-8")
    scan = scan_subset(SubsetParams(kind="dreambooth", image_dir=str(d)))  # caption_extension ".caption"
    caps = {e.path.stem: e.caption for e in scan.entries}
    assert caps == {"a": "from txt", "b": "from caption"}
    # an explicit extension does not fall back
    scan = scan_subset(db_subset(d, caption_extension=".md"))
    assert {e.caption for e in scan.entries} == {""}


def test_face_crop_file_name_uses_base_caption(tmp_path):
    d = tmp_path / "faces"
    write_image(d / "person_10_20_30_30.png")
    (d / "person.txt").write_text("a person", encoding="utf-8")
    scan = scan_subset(db_subset(d))
    assert scan.entries[0].caption == "a person" and not scan.orphan_captions


def test_empty_and_missing_folders_are_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match="contains no images"):
        build_dataset_group(blueprint([db_subset(tmp_path / "empty")]))
    with pytest.raises(DatasetError, match="does not exist"):
        build_dataset_group(blueprint([db_subset(tmp_path / "nope")]))


def test_undecodable_and_empty_caption_files(tmp_path):
    d = dreambooth_folder(tmp_path / "x", {"a": (64, 64), "b": (64, 64)})
    (d / "a.txt").write_bytes(b"caf\xe9 au lait")  # latin-1, not UTF-8
    (d / "b.txt").write_text("   \n", encoding="utf-8")
    scan = scan_subset(db_subset(d))
    assert len(scan.errors) == 2
    with pytest.raises(DatasetError) as e:
        build_dataset_group(blueprint([db_subset(d)]))
    assert "a.txt" in str(e.value) and "UTF-8" in str(e.value) and "b.txt" in str(e.value) and "empty" in str(e.value)


@pytest.mark.parametrize("repeats", [0, -3])
def test_bad_repeats(tmp_path, repeats):
    d = dreambooth_folder(tmp_path / "x", {"a": (64, 64)})
    with pytest.raises(DatasetError, match="num_repeats"):
        build_dataset_group(blueprint([db_subset(d, num_repeats=repeats)]))


def test_finetune_metadata(tmp_path):
    imgs = tmp_path / "imgs"
    copy_photo("chelsea", imgs, max_side=96)
    copy_photo("rocket", imgs, max_side=96)
    meta = {
        "chelsea": {"caption": "a cat", "tags": "cat, orange"},
        str(imgs / "rocket.jpg"): {"tags": "rocket, sky"},
    }
    (tmp_path / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    scan = scan_subset(SubsetParams(kind="finetune", image_dir=str(imgs), metadata_file=str(tmp_path / "meta.json")))
    assert not scan.errors
    caps = {e.path.name: e.caption for e in scan.entries}
    assert caps == {"chelsea.png": "a cat,cat, orange", "rocket.jpg": "rocket, sky"}


def test_finetune_missing_images_listed(tmp_path):
    imgs = tmp_path / "imgs"
    copy_photo("chelsea", imgs, max_side=64)
    meta = {"chelsea": {"caption": "cat"}, "ghost1": {"caption": "x"}, "ghost2.png": {"caption": "y"}}
    (tmp_path / "m.json").write_text(json.dumps(meta), encoding="utf-8")
    sub = SubsetParams(kind="finetune", image_dir=str(imgs), metadata_file=str(tmp_path / "m.json"))
    with pytest.raises(DatasetError, match=r"names 2 images that do not exist.*ghost1, ghost2.png"):
        build_dataset_group(blueprint([sub]))


def test_finetune_bad_json(tmp_path):
    (tmp_path / "m.json").write_text("{not json", encoding="utf-8")
    scan = scan_subset(SubsetParams(kind="finetune", image_dir=str(tmp_path), metadata_file=str(tmp_path / "m.json")))
    assert "not valid UTF-8 JSON" in scan.errors[0]


def test_controlnet_pairs_by_stem(tmp_path):
    imgs = dreambooth_folder(tmp_path / "img", {"a": (64, 64), "b": (64, 64), "c": (64, 64)}, {"a": "x", "b": "y", "c": "z"})
    cond = tmp_path / "cond"
    write_image(cond / "a.jpg")
    write_image(cond / "b.png")
    write_image(cond / "extra.png")
    scan = scan_subset(SubsetParams(kind="controlnet", image_dir=str(imgs), conditioning_data_dir=str(cond),
                                    caption_extension=".txt"))
    assert {e.path.stem: e.cond_path.name if e.cond_path else None for e in scan.entries} == {
        "a": "a.jpg", "b": "b.png", "c": None}
    assert [p.name for p in scan.missing_conditioning] == ["c.png"]
    assert [p.name for p in scan.orphan_conditioning] == ["extra.png"]
    assert scan.errors and "c.png" in scan.errors[0]


def _entries(n, repeats=1, reg=True):
    return [ImageEntry(f"r{i}", None, "", is_reg=reg, num_repeats=repeats) for i in range(n)]


def test_reg_balancing_matches_kohya():
    # 3 train images x 10 repeats = 30; 4 reg images x 1 repeat -> each reg image repeated until 30
    used = balance_reg_repeats(30, _entries(4))
    assert sum(e.num_repeats for e in used) == 30
    assert [e.num_repeats for e in used] == [8, 8, 7, 7]
    # more reg than needed: the first ones are used, the rest dropped
    used = balance_reg_repeats(5, _entries(10, repeats=2))
    assert [e.num_repeats for e in used] == [2, 2, 2]
    assert balance_reg_repeats(0, _entries(3)) == []
    # inputs are not modified
    entries = _entries(2)
    balance_reg_repeats(10, entries)
    assert [e.num_repeats for e in entries] == [1, 1]


def test_reg_subset_in_dataset(tmp_path):
    train = dreambooth_folder(tmp_path / "5_sks", {f"t{i}": (64, 64) for i in range(2)})
    reg = dreambooth_folder(tmp_path / "1_dog", {f"r{i}": (64, 64) for i in range(3)})
    bp = blueprint([db_subset(train, num_repeats=5, class_tokens="sks dog"),
                    db_subset(reg, num_repeats=1, class_tokens="dog", is_reg=True)], prior_loss_weight=0.5)
    group = build_dataset_group(bp)
    ds = group.datasets[0]
    reg_repeats = sum(s.entry.num_repeats for s in ds.samples if s.entry.is_reg)
    train_repeats = sum(s.entry.num_repeats for s in ds.samples if not s.entry.is_reg)
    assert reg_repeats == train_repeats == 10
    item = next(ds[i] for i, s in enumerate(ds.samples) if s.entry.is_reg)
    assert item["loss_weight"] == 0.5 and item["is_reg"] and item["caption"] == "dog"

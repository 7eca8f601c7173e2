"""``--debug_dataset`` (show the batches instead of training) and ``--cache_info`` (metadata_cache.json)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library.config.dataset_config import build_blueprint_for_args
from library.data import subsets as subsets_mod
from library.data.dataset import SampleKey, build_dataset_group
from library.data.info_cache import INFO_CACHE_FILE
from tests.data_fixtures import blueprint, db_subset, dreambooth_folder, write_image
from tests.trainer_fixtures import make_dataset, run_in_process, train_argv

NO_MODEL = "/nonexistent/model.safetensors"  # debug_dataset must not load a model


# ---------------------------------------------------------------- --debug_dataset

def _debug_argv(data: Path, out: Path, *extra: str, steps: int = 100) -> list[str]:
    return train_argv(Path(NO_MODEL), data, out, "--debug_dataset", "--train_batch_size", "2", *extra, steps=steps)


def test_debug_dataset_writes_each_batch_of_the_first_epoch_without_a_model(tmp_path):
    data = make_dataset(tmp_path / "data", names=("astronaut", "chelsea", "coffee"), repeats=2)
    out = tmp_path / "out"
    assert run_in_process(_debug_argv(data, out, "--flip_aug", "--cache_info")) == 0
    folder = out / "debug_dataset"
    pngs = sorted(p for p in folder.glob("*.png"))
    assert len(pngs) == 6  # 3 images x 2 repeats = one epoch of 3 batches of 2
    assert sorted({p.name[:5] for p in pngs}) == ["00001", "00002", "00003"]
    assert not list(out.glob("*.safetensors"))  # nothing was trained
    index = (folder / "index.txt").read_text(encoding="utf-8")
    assert "showing 3 batches of epoch 1" in index
    for n in ("astronaut", "chelsea", "coffee"):
        assert index.count(f"caption: 'a photo of sks {n}'") == 2
    # the PNGs are the processed training images: astronaut is square, so it is only resized (PIL "area")
    src = np.asarray(Image.open(data / "2_sks" / "astronaut.png").convert("RGB").resize((64, 64), Image.BOX))
    shots = [p for p in pngs if "astronaut" in p.name]
    assert len(shots) == 2
    for p in shots:
        img = np.asarray(Image.open(p).convert("RGB"))
        assert img.shape == (64, 64, 3)
        expected = src[:, ::-1] if p.stem.endswith("_flip") else src
        assert np.array_equal(img, expected)
    # --cache_info reached the subset
    assert (data / "2_sks" / INFO_CACHE_FILE).is_file()


def test_debug_dataset_stops_at_max_train_steps_and_shows_processed_captions(tmp_path):
    data = make_dataset(tmp_path / "data", names=("astronaut", "chelsea", "coffee", "rocket"))
    out = tmp_path / "out"
    (out / "debug_dataset").mkdir(parents=True)
    (out / "debug_dataset" / "stale.png").write_bytes(b"old run")
    assert run_in_process(_debug_argv(data, out, "--caption_prefix", "PRE,", steps=1)) == 0
    pngs = sorted(p.name for p in (out / "debug_dataset").glob("*.png"))
    assert len(pngs) == 2 and all(n.startswith("00001_") for n in pngs)  # 1 step of batch 2, old files gone
    index = (out / "debug_dataset" / "index.txt").read_text(encoding="utf-8").splitlines()
    shown = [line for line in index if "caption: " in line]
    assert len(shown) == 2 and all("caption: 'PRE, a photo of sks " in m for m in shown)


def test_debug_dataset_follows_the_training_plan(tmp_path):
    from library.config.args import parse_args
    from library.data.dataset import collate
    from library.training.data import ShardedPlan
    from library.training.debug_dataset import run_debug_dataset
    from library.training.trainer import NetworkTrainer

    data = make_dataset(tmp_path / "data", names=("astronaut", "chelsea", "coffee", "rocket"))
    args = parse_args("train_network", _debug_argv(data, tmp_path / "out", "--flip_aug", "--shuffle_caption"))
    report = run_debug_dataset(NetworkTrainer(args))
    # the same batches, in the same order, as the training loop's plan for seed 7 on one process
    group = NetworkTrainer(args).build_dataset_group(7, 1)
    plan = ShardedPlan(group, 0, 1, 1)
    batches = [collate([group[k] for k in keys]) for _, _, keys in plan.slices(1, 0)]
    assert [i.image_key for i in report.items] == [k for b in batches for k in b["image_keys"]]
    assert [i.flipped for i in report.items] == [f for b in batches for f in b["flipped"]]
    assert [i.caption for i in report.items] == [c for b in batches for c in b["captions"]]
    assert report.folder == tmp_path / "out" / "debug_dataset"


def test_debug_dataset_in_the_general_table_of_a_dataset_config(tmp_path):
    from library.config.args import parse_args
    from library.training.debug_dataset import debug_requested

    data = make_dataset(tmp_path / "data", names=("astronaut",))
    cfg = tmp_path / "ds.toml"
    cfg.write_text(f"[general]\ndebug_dataset = true\n[[datasets]]\nresolution = 64\n"
                   f"[[datasets.subsets]]\nimage_dir = '{data / '1_sks'}'\n", encoding="utf-8")
    base = ["--pretrained_model_name_or_path", NO_MODEL, "--dataset_config", str(cfg)]
    assert debug_requested(parse_args("train_network", base))
    cfg.write_text(cfg.read_text(encoding="utf-8").replace("true", "false"), encoding="utf-8")
    assert not debug_requested(parse_args("train_network", base))
    assert debug_requested(parse_args("train_network", base + ["--debug_dataset"]))


def test_debug_dataset_with_the_sdxl_script(tmp_path):
    import sdxl_train_network

    data = make_dataset(tmp_path / "data", names=("astronaut", "chelsea"))
    out = tmp_path / "out"
    assert sdxl_train_network.main(_debug_argv(data, out)) == 0
    assert len(list((out / "debug_dataset").glob("*.png"))) == 2


# ---------------------------------------------------------------- --cache_info

@pytest.fixture
def counters(monkeypatch):
    """Counts PIL image opens and caption file reads (the work cache_info saves)."""
    counts = {"open": 0, "caption": 0}
    real_open, real_read = Image.open, subsets_mod.read_caption_file

    def counting_open(*a, **k):
        counts["open"] += 1
        return real_open(*a, **k)

    def counting_read(*a, **k):
        counts["caption"] += 1
        return real_read(*a, **k)

    monkeypatch.setattr(Image, "open", counting_open)
    monkeypatch.setattr(subsets_mod, "read_caption_file", counting_read)

    def take() -> dict[str, int]:
        got = dict(counts)
        counts.update(open=0, caption=0)
        return got

    return take


def _folder(tmp_path: Path) -> Path:
    return dreambooth_folder(tmp_path / "imgs", {"a": (64, 32), "b": (32, 64), "c": (48, 48)},
                             {"a": "first, tag", "b": "second"})  # c: no caption file -> class tokens


def _build(folder: Path):
    return build_dataset_group(blueprint([db_subset(folder, cache_info=True, class_tokens="cls")]), seed=3)


def _view(group) -> list:
    return [(s.entry.key, s.entry.caption, s.original_size, s.bucket_reso) for s in group.samples()]


def test_second_build_opens_no_image_and_reads_no_caption(tmp_path, counters):
    folder = _folder(tmp_path)
    first = _build(folder)
    assert counters() == {"open": 3, "caption": 2}
    cache = json.loads((folder / INFO_CACHE_FILE).read_text(encoding="utf-8"))
    a = cache[str(folder / "a.png")]  # kohya's keys, plus what sdtk validates with
    assert a["caption"] == "first, tag" and a["resolution"] == [64, 32]
    assert a["caption_file"] == str(folder / "a.txt") and len(a["image_stat"]) == 2
    assert cache[str(folder / "c.png")]["caption"] == "cls" and cache[str(folder / "c.png")]["caption_file"] is None
    mtime = (folder / INFO_CACHE_FILE).stat().st_mtime_ns

    second = _build(folder)
    assert counters() == {"open": 0, "caption": 0}
    assert _view(second) == _view(first)
    assert (folder / INFO_CACHE_FILE).stat().st_mtime_ns == mtime  # unchanged: not rewritten
    for i in range(len(first)):
        x, y = first[SampleKey(i, 1, 0, i)], second[SampleKey(i, 1, 0, i)]
        assert x["caption"] == y["caption"] and torch.equal(x["image"], y["image"])


def test_changed_caption_and_image_are_read_again(tmp_path, counters):
    folder = _folder(tmp_path)
    _build(folder)
    counters()
    (folder / "a.txt").write_text("a new caption, longer than before", encoding="utf-8")
    write_image(folder / "b.png", (64, 64), seed=9)
    group = _build(folder)
    assert counters() == {"open": 1, "caption": 1}  # only b's size and a's caption
    by_stem = {Path(s.entry.key).stem: s for s in group.samples()}
    assert by_stem["a"].entry.caption == "a new caption, longer than before"
    assert by_stem["b"].original_size == (64, 64)
    cache = json.loads((folder / INFO_CACHE_FILE).read_text(encoding="utf-8"))
    assert cache[str(folder / "a.png")]["caption"] == "a new caption, longer than before"
    assert cache[str(folder / "b.png")]["resolution"] == [64, 64]
    # a new image is measured; a removed one leaves the cache
    write_image(folder / "d.png", (32, 32))
    (folder / "c.png").unlink()
    group = _build(folder)
    assert counters()["open"] == 1
    assert sorted(Path(s.entry.key).stem for s in group.samples()) == ["a", "b", "d"]
    assert sorted(Path(k).stem for k in json.loads((folder / INFO_CACHE_FILE).read_text(encoding="utf-8"))) == \
        ["a", "b", "d"]


@pytest.mark.parametrize("content", ["{not json", "[1, 2, 3]", '{"x.png": 5}', "\xff\xfe"])
def test_corrupt_or_foreign_cache_is_ignored_and_rewritten(tmp_path, counters, caplog, content):
    folder = _folder(tmp_path)
    expected = _view(_build(folder))
    (folder / INFO_CACHE_FILE).write_text(content, encoding="latin-1")
    counters()
    with caplog.at_level(logging.WARNING, logger="library.data.info_cache"):
        group = _build(folder)
    assert any("ignored and will be rewritten" in r.getMessage() for r in caplog.records)
    assert counters() == {"open": 3, "caption": 2}
    assert _view(group) == expected
    assert str(folder / "a.png") in json.loads((folder / INFO_CACHE_FILE).read_text(encoding="utf-8"))


def test_kohya_written_cache_without_stats_is_checked_once(tmp_path, counters):
    folder = _folder(tmp_path)
    # kohya's layout: nothing to tell whether the files changed since, so sdtk does not trust it
    kohya = {str(folder / f"{s}.png"): {"caption": "stale", "resolution": [8, 8]} for s in "abc"}
    (folder / INFO_CACHE_FILE).write_text(json.dumps(kohya), encoding="utf-8")
    group = _build(folder)
    assert counters() == {"open": 3, "caption": 2}
    assert {s.original_size for s in group.samples()} == {(64, 32), (32, 64), (48, 48)}
    assert "stale" not in {s.entry.caption for s in group.samples()}
    _build(folder)
    assert counters() == {"open": 0, "caption": 0}


def test_cache_info_flag_reaches_dreambooth_subsets(tmp_path):
    data = make_dataset(tmp_path / "data", names=("astronaut",))
    args = {"train_data_dir": str(data), "resolution": "64", "cache_info": True}
    bp = build_blueprint_for_args(args)
    assert [s.cache_info for d in bp.datasets for s in d.subsets] == [True]

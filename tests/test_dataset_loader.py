"""The bucketed dataset, the batch contract, epoch plans and exact resume."""

from __future__ import annotations

import pytest
import torch

from library.config.dataset_params import Blueprint, DatasetParams, SubsetParams
from library.data.dataset import SampleKey, build_dataset_group
from library.data.sampler import build_dataloader
from library.errors import DatasetError
from tests.data_fixtures import blueprint, copy_photo, db_subset, dreambooth_folder, write_image, write_truncated_jpeg

PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "motorcycle", "grace_hopper"]


@pytest.fixture
def photo_dir(tmp_path):
    d = tmp_path / "3_sks"
    for name in PHOTOS:
        copy_photo(name, d, max_side=160)
        (d / f"{name}.txt").write_text(f"sks, {name}, photo, detailed", encoding="utf-8")
    return d


def _group(photo_dir, **kw):
    sub = kw.pop("subset_kw", {})
    return build_dataset_group(blueprint([db_subset(photo_dir, num_repeats=3, **sub)], **kw), seed=kw.pop("seed", 0))


def test_batches_hold_one_bucket_and_follow_the_contract(photo_dir):
    group = _group(photo_dir)
    loader = build_dataloader(group, max_data_loader_n_workers=0)
    seen = 0
    for batch in loader:
        b = len(batch["captions"])
        h, w = batch["images"].shape[2:]
        assert batch["images"].shape == (b, 3, h, w) and batch["images"].dtype == torch.float32
        assert -1.0 <= batch["images"].min() and batch["images"].max() <= 1.0
        assert batch["latents"] is None and batch["alpha_masks"] is None and batch["conditioning_images"] is None
        assert (batch["target_sizes_hw"] == torch.tensor([h, w])).all()  # one bucket per batch
        assert batch["original_sizes_hw"].dtype == torch.long and batch["original_sizes_hw"].shape == (b, 2)
        assert batch["crop_top_lefts"].shape == (b, 2)
        assert torch.equal(batch["loss_weights"], torch.ones(b))
        assert torch.equal(batch["network_multipliers"], torch.ones(b))
        assert batch["is_reg"].dtype == torch.bool and not batch["is_reg"].any()
        assert all(c.startswith("sks") for c in batch["captions"])
        seen += b
    assert seen == 3 * len(PHOTOS)
    assert len(loader) == group.num_batches()


def test_bucket_assignment_and_original_sizes(photo_dir):
    group = _group(photo_dir)
    ds = group.datasets[0]
    for s in ds.samples:
        w, h = s.original_size
        bw, bh = s.bucket_reso
        assert bw % 32 == 0 and bh % 32 == 0 and bw * bh <= 64 * 64
        # the bucket's aspect ratio is the closest to the image's among the buckets
        item = ds[SampleKey(ds.samples.index(s))]
        assert item["original_size_hw"] == (h, w)
        assert item["image"].shape == (3, bh, bw)
    assert sum(ds.bucket_counts().values()) == 3 * len(PHOTOS)


def test_epoch_plan_deterministic_per_seed_and_epoch(photo_dir):
    a = _group(photo_dir)
    b = _group(photo_dir)
    assert a.epoch_batches(1) == b.epoch_batches(1)
    assert a.epoch_batches(1) != a.epoch_batches(2)
    c = build_dataset_group(blueprint([db_subset(photo_dir, num_repeats=3)]), seed=1)
    assert c.epoch_batches(1) != a.epoch_batches(1)
    # every sample appears num_repeats times per epoch
    flat = sorted(i for batch in a.epoch_batches(1) for i in batch)
    assert flat == sorted(list(range(len(PHOTOS))) * 3)


def _run(loader, epoch, n=None):
    loader.set_epoch(epoch)
    out = []
    for i, batch in enumerate(loader):
        out.append((batch["image_keys"], batch["captions"], batch["images"].sum().item()))
        if n is not None and i + 1 == n:
            break
    return out


def test_exact_resume_inside_an_epoch(photo_dir):
    kw = dict(subset_kw={"shuffle_caption": True, "flip_aug": True, "caption_tag_dropout_rate": 0.2})
    full = _run(build_dataloader(_group(photo_dir, **kw), max_data_loader_n_workers=0), 2)
    first = build_dataloader(_group(photo_dir, **kw), max_data_loader_n_workers=0)
    head = _run(first, 2, n=3)
    state = first.state_dict()
    assert state["epoch"] == 2 and state["position"] == 3
    resumed = build_dataloader(_group(photo_dir, **kw), max_data_loader_n_workers=0)
    resumed.load_state_dict(state)
    tail = [(k, c, s) for k, c, s in _iter_no_set(resumed)]
    assert head + tail == full
    # after the epoch the loader moves on to the next one, from its first batch
    assert resumed.state_dict()["epoch"] == 3 and resumed.state_dict()["position"] == 0


def _iter_no_set(loader):
    for batch in loader:
        yield batch["image_keys"], batch["captions"], batch["images"].sum().item()


def test_resume_refuses_a_changed_dataset(photo_dir):
    loader = build_dataloader(_group(photo_dir), max_data_loader_n_workers=0)
    state = loader.state_dict()
    other = build_dataloader(_group(photo_dir, batch_size=1), max_data_loader_n_workers=0)
    with pytest.raises(DatasetError, match="batches per epoch"):
        other.load_state_dict(state)


def test_workers_give_the_same_batches(photo_dir):
    kw = dict(subset_kw={"shuffle_caption": True, "flip_aug": True})
    single = _run(build_dataloader(_group(photo_dir, **kw), max_data_loader_n_workers=0), 1)
    multi = build_dataloader(_group(photo_dir, **kw), max_data_loader_n_workers=2, persistent_data_loader_workers=True)
    assert multi.dataloader.num_workers == min(2, __import__("os").cpu_count())
    assert _run(multi, 1) == single


def test_alpha_mask_and_flip_in_batches(tmp_path):
    d = tmp_path / "a"
    for i in range(4):
        write_image(d / f"x{i}.png", (64, 64), "RGBA", seed=i)
    group = build_dataset_group(blueprint([db_subset(d, alpha_mask=True, flip_aug=True)], batch_size=4))
    batch = next(iter(build_dataloader(group, max_data_loader_n_workers=0)))
    masks = batch["alpha_masks"]
    assert masks.shape == (4, 64, 64)
    for m, flipped in zip(masks, batch["flipped"]):
        opaque_right = bool((m[:, 40:] == 1).all() and (m[:, :20] == 0).all())
        assert opaque_right != flipped  # the mask is mirrored with the image


def test_controlnet_conditioning_images(tmp_path):
    imgs = dreambooth_folder(tmp_path / "img", {"a": (150, 100), "b": (150, 100)}, {"a": "x", "b": "y"})
    cond = tmp_path / "cond"
    cond.mkdir()
    for stem in ("a", "b"):  # conditioning image = the training image itself
        (cond / f"{stem}.png").write_bytes((imgs / f"{stem}.png").read_bytes())
    sub = SubsetParams(kind="controlnet", image_dir=str(imgs), conditioning_data_dir=str(cond), caption_extension=".txt",
                       flip_aug=True)
    group = build_dataset_group(blueprint([sub]))
    loader = build_dataloader(group, max_data_loader_n_workers=0)
    flips = []
    for epoch in (1, 2, 3):
        loader.set_epoch(epoch)
        for batch in loader:
            # resized, cropped and flipped exactly like the training image
            assert torch.equal(batch["conditioning_images"], batch["images"])
            flips += batch["flipped"]
    assert any(flips) and not all(flips)


def test_two_datasets_never_share_a_batch(tmp_path, photo_dir):
    other = dreambooth_folder(tmp_path / "other", {f"o{i}": (64, 64) for i in range(3)})
    bp = Blueprint([
        DatasetParams(kind="dreambooth", subsets=[db_subset(photo_dir)], resolution=(64, 64), batch_size=2,
                      enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32),
        DatasetParams(kind="dreambooth", subsets=[db_subset(other)], resolution=(64, 64), batch_size=3,
                      network_multiplier=0.5),
    ])
    group = build_dataset_group(bp)
    n0 = len(group.datasets[0])
    for batch in group.epoch_batches(1):
        assert all(i < n0 for i in batch) or all(i >= n0 for i in batch)
    loader = build_dataloader(group, max_data_loader_n_workers=0)
    multipliers = {tuple(b["network_multipliers"].tolist()) for b in loader}
    assert (0.5, 0.5, 0.5) in multipliers


def test_fixed_resolution_without_buckets(photo_dir):
    group = _group(photo_dir, enable_bucket=False)
    assert {s.bucket_reso for s in group.samples()} == {(64, 64)}
    assert group.datasets[0][0]["image"].shape == (3, 64, 64)


def test_bad_images_fail_or_are_skipped(tmp_path):
    d = dreambooth_folder(tmp_path / "x", {"good": (64, 64)})
    (d / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DatasetError, match="broken.png"):
        build_dataset_group(blueprint([db_subset(d)]))
    write_truncated_jpeg(d / "trunc.jpg")
    (d / "broken.png").unlink()
    group = build_dataset_group(blueprint([db_subset(d)]), skip_bad_images=True)
    assert [s.entry.path.name for s in group.samples()] == ["good.png"]


def test_caption_dropout_every_n_epochs_uses_epoch(photo_dir):
    group = _group(photo_dir, subset_kw={"caption_dropout_every_n_epochs": 2})
    assert group[SampleKey(0, epoch=1)]["caption"] != ""
    assert group[SampleKey(0, epoch=2)]["caption"] == ""


def test_cache_info_stores_and_reuses_image_sizes(tmp_path):
    import json

    d = dreambooth_folder(tmp_path / "x", {"a": (64, 32), "b": (32, 64)})
    build_dataset_group(blueprint([db_subset(d, cache_info=True)]))
    cache = json.loads((d / "metadata_cache.json").read_text(encoding="utf-8"))
    assert {k.rsplit("/", 1)[1]: v["resolution"] for k, v in cache.items()} == {"a.png": [64, 32], "b.png": [32, 64]}
    # the cached sizes are what bucketing uses (kohya: keeping it current is the user's job)
    for v in cache.values():
        v["resolution"] = [64, 64]
    (d / "metadata_cache.json").write_text(json.dumps(cache), encoding="utf-8")
    group = build_dataset_group(blueprint([db_subset(d, cache_info=True)]))
    assert {s.original_size for s in group.samples()} == {(64, 64)}


def test_dataset_toml_end_to_end(tmp_path, photo_dir):
    from library.config.dataset_config import build_blueprint_for_args

    cfg = tmp_path / "ds.toml"
    cfg.write_text(f"""
[general]
enable_bucket = true
caption_extension = ".txt"
shuffle_caption = true
keep_tokens = 1

[[datasets]]
resolution = 64
batch_size = 2
min_bucket_reso = 32
max_bucket_reso = 128
bucket_reso_steps = 32

  [[datasets.subsets]]
  image_dir = '{photo_dir}'
  num_repeats = 2
  flip_aug = true
""", encoding="utf-8")
    group = build_dataset_group(build_blueprint_for_args({"dataset_config": str(cfg)}), seed=5)
    loader = build_dataloader(group, max_data_loader_n_workers=0)
    captions = [c for batch in loader for c in batch["captions"]]
    assert len(captions) == 2 * len(PHOTOS)
    assert all(c.startswith("sks, ") for c in captions)  # keep_tokens keeps the trigger first while shuffling
    assert len(set(captions)) > len(PHOTOS)  # the two repeats of an image are shuffled differently
    assert loader.state_dict() == loader.sampler.state_dict() and loader.state_dict()["epoch"] == 2


def test_kohya_metadata(photo_dir):
    meta = _group(photo_dir).datasets[0].kohya_metadata()
    assert sum(b["count"] for b in meta["bucket_info"]["buckets"].values()) == 3 * len(PHOTOS)
    assert meta["bucket_info"]["mean_img_ar_error"] >= 0
    assert meta["tag_frequency"]["3_sks"]["sks"] == len(PHOTOS)
    assert meta["dataset_dirs"] == {"3_sks": {"n_repeats": 3, "img_count": len(PHOTOS)}}


def test_validation_split(tmp_path):
    train_dir = dreambooth_folder(tmp_path / "t", {f"i{k}": (64, 64) for k in range(10)})
    reg_dir = dreambooth_folder(tmp_path / "r", {f"r{k}": (64, 64) for k in range(2)})
    subs = [db_subset(train_dir), db_subset(reg_dir, is_reg=True)]
    bp = blueprint(subs, validation_split=0.3, validation_seed=4)
    train = {s.entry.path.name for s in build_dataset_group(bp).samples()}
    val = {s.entry.path.name for s in build_dataset_group(bp, split="validation").samples()}
    assert len(val) == 3 and not val & train and len(train - {"r0.png", "r1.png"}) == 7
    assert not any(v.startswith("r") for v in val)  # reg images stay in training
    assert val == {s.entry.path.name for s in build_dataset_group(bp, seed=9, split="validation").samples()}
    with pytest.raises(DatasetError, match="no datasets"):
        build_dataset_group(blueprint(subs), split="validation")


@pytest.mark.parametrize("n, share", [(10, 0.35), (10, 0.3), (7, 0.5), (20, 0.15), (3, 0.99)])
def test_validation_split_is_disjoint_and_complete(tmp_path, n, share):
    """kohya's two float formulas (ceil(n * (1 - s)) for training, round(n * s) for validation) overlap by an
    image at 10 x 0.35; sdtk counts once, exactly: training = ceil(n * (1 - s)), validation = the rest."""
    import math
    from fractions import Fraction

    folder = dreambooth_folder(tmp_path / "t", {f"i{k}": (64, 64) for k in range(n)})
    bp = blueprint([db_subset(folder)], validation_split=share, validation_seed=1)
    train = [s.entry.path.name for s in build_dataset_group(bp).samples()]
    val = [s.entry.path.name for s in build_dataset_group(bp, split="validation").samples()]
    assert not set(train) & set(val) and len(set(train) | set(val)) == n
    assert len(set(train)) == math.ceil((1 - Fraction(str(share))) * n)

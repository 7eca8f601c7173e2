"""Latent caching with the tiny VAE: memory and disk, staleness, atomic writes, NaN, rules."""

from __future__ import annotations

import os

import pytest
import torch

from library.data import latent_cache as lc
from library.data.dataset import SampleKey, build_dataset_group
from library.data.sampler import build_dataloader
from library.errors import DatasetError
from library.models.families import Family
from library.models.tiny import vae_config
from tests.data_fixtures import blueprint, copy_photo, db_subset


def tiny_vae(seed: int = 0):
    """Only the tiny model's VAE (building the whole tiny model is slower)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**vae_config(Family.SD1)).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def vae():
    return tiny_vae(0)


@pytest.fixture
def photos(tmp_path):
    d = tmp_path / "p"
    for name in ("astronaut", "chelsea", "rocket", "grace_hopper"):
        copy_photo(name, d, max_side=128)
    return d


def _group(d, **sub):
    return build_dataset_group(blueprint([db_subset(d, **sub)], batch_size=2))


def test_memory_cache_matches_direct_encoding(photos, vae):
    group = _group(photos)
    stats = lc.cache_latents(group, vae, vae_batch_size=4, seed=3)
    assert stats.encoded == 4 and stats.reused == 0
    s = group.samples()[0]
    assert s.latents.shape == (4, s.bucket_reso[1] // 8, s.bucket_reso[0] // 8)
    # the cached latents are a sample of the VAE's distribution for the bucket-sized image
    item_image = build_dataset_group(blueprint([db_subset(photos)]))[SampleKey(0)]["image"]
    with torch.no_grad():
        dist = vae.encode(item_image[None]).latent_dist
    assert ((s.latents - dist.mean[0]).abs() <= 6 * dist.std[0] + 1e-5).all()
    assert not torch.equal(s.latents, dist.mean[0])
    batch = next(iter(build_dataloader(group, max_data_loader_n_workers=0)))
    assert batch["images"] is None and batch["latents"].shape[1] == 4
    h, w = batch["target_sizes_hw"][0].tolist()
    assert batch["latents"].shape[2:] == (h // 8, w // 8)


def test_cache_is_reproducible_and_batching_only_changes_noise(photos, vae):
    a, b, c = _group(photos), _group(photos), _group(photos)
    lc.cache_latents(a, vae, vae_batch_size=1, seed=7)
    lc.cache_latents(b, vae, vae_batch_size=1, seed=7)
    lc.cache_latents(c, vae, vae_batch_size=4, seed=7)
    for sa, sb, sc in zip(a.samples(), b.samples(), c.samples()):
        assert torch.equal(sa.latents, sb.latents)
        # batched encoding gives the same distribution (noise drawn in another order)
        assert (sa.latents - sc.latents).abs().mean() < 3 * (sa.latents.std() + 1e-6)
        assert sa.latents.shape == sc.latents.shape


def test_disk_cache_reused_and_rebuilt_when_stale(photos, vae):
    group = _group(photos, flip_aug=True)
    assert lc.cache_latents(group, vae, to_disk=True).encoded == 4
    files = sorted(photos.glob("*_sdtk.safetensors"))
    assert len(files) == 4
    s = group.samples()[0]
    assert s.latents_path.name == f"{s.entry.path.stem}_{s.bucket_reso[0]}x{s.bucket_reso[1]}_sdtk.safetensors"
    loaded = lc.load_latent_file(s.latents_path, flipped=True)
    assert loaded["latents"].shape == (4, s.bucket_reso[1] // 8, s.bucket_reso[0] // 8)

    again = _group(photos, flip_aug=True)
    assert lc.cache_latents(again, vae, to_disk=True) == lc.CacheStats(encoded=0, reused=4)
    # flip_aug turned off: the record differs -> rebuilt
    assert lc.cache_latents(_group(photos), vae, to_disk=True).encoded == 4
    # another VAE -> rebuilt
    other = tiny_vae(1)
    assert lc.cache_latents(_group(photos), other, to_disk=True).encoded == 4
    # --skip_cache_check trusts existing files even for the first VAE
    assert lc.cache_latents(_group(photos), vae, to_disk=True, skip_cache_check=True).reused == 4
    # a changed image -> rebuilt
    img = group.samples()[0].entry.path
    os.utime(img, ns=(img.stat().st_atime_ns, img.stat().st_mtime_ns + 10**9))
    assert lc.cache_latents(_group(photos), other, to_disk=True).encoded == 1


def test_disk_cache_changes_with_bucket(photos, vae):
    lc.cache_latents(_group(photos), vae, to_disk=True)
    bigger = build_dataset_group(blueprint([db_subset(photos)], resolution=(96, 96), max_bucket_reso=192))
    stats = lc.cache_latents(bigger, vae, to_disk=True)
    assert stats.encoded == 4  # new buckets -> new files, old ones never used for them
    for s in bigger.samples():
        assert lc.load_latent_file(s.latents_path)["latents"].shape[1:] == (s.bucket_reso[1] // 8, s.bucket_reso[0] // 8)


def test_training_reads_disk_cache_with_flip(photos, vae):
    group = _group(photos, flip_aug=True)
    lc.cache_latents(group, vae, to_disk=True)
    batches = list(build_dataloader(group, max_data_loader_n_workers=0))
    flips = [f for b in batches for f in b["flipped"]]
    assert any(flips) or len(flips) < 4
    for b in batches:
        assert b["images"] is None and torch.isfinite(b["latents"]).all()


def test_atomic_write_leaves_no_partial_file(photos, vae, monkeypatch):
    group = _group(photos)
    calls = {"n": 0}
    real = lc.save_safetensors

    def failing(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:
            from library.utils.atomic import atomic_path

            with atomic_path(path) as tmp:
                tmp.write_bytes(b"half a file")
                raise KeyboardInterrupt  # interrupted in the middle of writing
        real(tensors, path, metadata)

    monkeypatch.setattr(lc, "save_safetensors", failing)
    with pytest.raises(KeyboardInterrupt):
        lc.cache_latents(group, vae, to_disk=True)
    files = list(photos.iterdir())
    assert len([f for f in files if f.name.endswith("_sdtk.safetensors")]) == 1
    assert not [f for f in files if ".sdtk-tmp-" in f.name]
    monkeypatch.setattr(lc, "save_safetensors", real)
    assert lc.cache_latents(_group(photos), vae, to_disk=True) == lc.CacheStats(encoded=3, reused=1)


def test_random_crop_and_color_aug_cannot_be_cached(photos, vae):
    for opt in ("random_crop", "color_aug"):
        with pytest.raises(DatasetError, match=f"random_crop or color_aug.*{opt}"):
            lc.cache_latents(_group(photos, **{opt: True}), vae)


def test_nan_latents_name_the_image(photos):
    broken = tiny_vae(0)
    with torch.no_grad():
        broken.encoder.conv_in.weight.fill_(float("nan"))
    with pytest.raises(DatasetError, match=r"NaN.*(astronaut|chelsea|rocket|grace_hopper).*--no_half_vae"):
        lc.cache_latents(_group(photos), broken)


def test_alpha_mask_cached(tmp_path, vae):
    from tests.data_fixtures import write_image

    d = tmp_path / "rgba"
    write_image(d / "a.png", (64, 64), "RGBA")
    group = build_dataset_group(blueprint([db_subset(d, alpha_mask=True)]))
    lc.cache_latents(group, vae, to_disk=True)
    item = group[SampleKey(0)]
    assert item["alpha_mask"].shape == (64, 64) and item["alpha_mask"][:, :20].max() == 0


def test_vae_fingerprint_is_dtype_independent(vae):
    import copy

    half = copy.deepcopy(vae).half()
    assert lc.vae_fingerprint(vae) == lc.vae_fingerprint(half)
    assert lc.vae_fingerprint(vae) != lc.vae_fingerprint(tiny_vae(1))


@pytest.mark.parametrize("to_disk", [False, True])
def test_cached_samples_carry_the_same_sdxl_sizes_as_images(photos, vae, to_disk):
    plain = _group(photos, flip_aug=True)
    cached = _group(photos, flip_aug=True)
    lc.cache_latents(cached, vae, to_disk=to_disk)
    keys = ("original_size_hw", "crop_top_left", "target_size_hw", "flipped", "caption")
    for epoch in (1, 2):
        for i in range(len(plain)):
            a, b = plain[SampleKey(i, epoch, 0, i)], cached[SampleKey(i, epoch, 0, i)]
            assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
            assert b["image"] is None and b["latents"].shape[1:] == (a["image"].shape[1] // 8, a["image"].shape[2] // 8)

"""Full-size SDXL base: sdxl_train_network.py (the low-memory recipe, disk caches and their reuse, text-encoder
LoRA, --fp8_base, --gradient_checkpointing), the cache tools, gen_img.py, sdxl_merge_lora.py, resize_lora.py."""

from __future__ import annotations

import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from library.models.families import Family

from tests.fullsize.helpers import (assert_images, file_states, gen_two_images, lora_modules, run_script,
                                    train_args)
from tests.test_sdxl_lora_keys import _kohya_te_names, _kohya_unet_names
from tests.trainer_fixtures import lora_metadata, lora_tensors

pytestmark = pytest.mark.fullsize

SCRIPT = "sdxl_train_network.py"
LOW_MEMORY = ("--network_train_unet_only", "--cache_latents", "--cache_text_encoder_outputs")
TO_DISK = (*LOW_MEMORY, "--cache_latents_to_disk", "--cache_text_encoder_outputs_to_disk")


def te_caches(data):
    return sorted(data.glob("1_sks/*_te_sdtk.safetensors"))


def latent_caches(data):
    return sorted(p for p in data.glob("1_sks/*_sdtk.safetensors") if re.search(r"_\d+x\d+_sdtk\.", p.name))


def check_unet_only(sd: dict) -> None:
    mods = lora_modules(sd)
    assert set(mods) == _kohya_unet_names() and len(mods) == 722
    assert sd["lora_unet_input_blocks_7_1_transformer_blocks_9_attn2_to_k.lora_down.weight"].shape == (4, 2048)
    assert sd["lora_unet_output_blocks_5_1_transformer_blocks_1_ff_net_0_proj.lora_up.weight"].shape == (5120, 4)
    assert all(torch.isfinite(t).all() for t in sd.values())
    ups = [k for k in sd if k.endswith("lora_up.weight")]
    moved = sum(bool(sd[k].abs().sum() > 0) for k in ups)
    assert moved > len(ups) // 2, f"only {moved} of {len(ups)} lora_up weights moved from zero in two steps"


@pytest.fixture(scope="module")
def canonical(full_model, photos, tmp_path_factory):
    """The command docs/sdxl.md recommends: UNet-only LoRA, latents and text-encoder outputs cached in memory."""
    out = tmp_path_factory.mktemp("xl_canonical")
    log = run_script(SCRIPT, *train_args(full_model("sdxl"), photos("xl_data"), out, "xl", *LOW_MEMORY))
    return out / "xl.safetensors", log


def test_low_memory_recipe(canonical):
    path, log = canonical
    assert log.count("using sdtk's bundled CLIP vocabulary") == 2  # both tokenizers, from a bare single file
    assert "text-encoder outputs: 2 captions encoded" in log
    check_unet_only(lora_tensors(path))
    md = lora_metadata(path)
    assert md["ss_base_model_version"] == "sdxl_base_v1-0"
    assert md["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"


def test_gradient_checkpointing_gives_the_same_lora(full_model, photos, canonical, tmp_path):
    run_script(SCRIPT, *train_args(full_model("sdxl"), photos("xl_gc_data"), tmp_path, "xl", *LOW_MEMORY,
                                   "--gradient_checkpointing"))
    sd, ref = lora_tensors(tmp_path / "xl.safetensors"), lora_tensors(canonical[0])
    check_unet_only(sd)
    assert lora_metadata(tmp_path / "xl.safetensors")["ss_gradient_checkpointing"] == "True"
    for k in ref:  # recomputing activations changes nothing but memory
        torch.testing.assert_close(sd[k], ref[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.fixture(scope="module")
def disk_run(full_model, photos, tmp_path_factory):
    """A first run with disk caches: they are written beside the images."""
    data = photos("xl_disk_data")
    out = tmp_path_factory.mktemp("xl_disk_out")
    log = run_script(SCRIPT, *train_args(full_model("sdxl"), data, out, "first", *TO_DISK))
    return data, out, log


def test_disk_caches_written_then_reused(full_model, disk_run):
    data, out, log = disk_run
    assert "latents: 2 images encoded, 0 valid disk caches reused" in log
    assert "text-encoder outputs: 2 captions encoded, 0 valid disk caches reused" in log
    files = te_caches(data) + latent_caches(data)
    assert len(files) == 4, sorted(p.name for p in data.rglob("*"))
    before = file_states(files)
    log2 = run_script(SCRIPT, *train_args(full_model("sdxl"), data, out, "second", *TO_DISK))
    assert "latents: 0 images encoded, 2 valid disk caches reused" in log2
    assert "text-encoder outputs: 0 captions encoded, 2 valid disk caches reused" in log2
    assert file_states(files) == before  # not rewritten
    first, second = lora_tensors(out / "first.safetensors"), lora_tensors(out / "second.safetensors")
    check_unet_only(second)
    for k in first:  # same seed, same cached inputs: the same LoRA
        torch.testing.assert_close(second[k], first[k], rtol=1e-4, atol=1e-6, msg=k)


def test_cache_tools_write_what_training_writes(full_model, photos, disk_run):
    data = photos("xl_tools_data")
    common = ["--pretrained_model_name_or_path", full_model("sdxl"), "--train_data_dir", data, "--resolution", "64"]
    log = run_script("tools/cache_latents.py", *common, "--sdxl")
    assert "latents: 2 images encoded" in log
    log = run_script("tools/cache_text_encoder_outputs.py", *common, "--sdxl")
    assert "text-encoder outputs: 2 captions encoded" in log
    ours, theirs = te_caches(data) + latent_caches(data), te_caches(disk_run[0]) + latent_caches(disk_run[0])
    assert [p.name for p in ours] == [p.name for p in theirs] and len(ours) == 4
    for a, b in zip(ours, theirs):
        ta, tb = load_file(str(a)), load_file(str(b))
        assert ta.keys() == tb.keys(), a.name
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{a.name}: {k}"


def unet_linear_and_conv_layers() -> int:
    from diffusers import UNet2DConditionModel

    from library.models.loading import shipped_model_config

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(shipped_model_config(Family.SDXL)["unet"])
    return sum(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for m in unet.modules())


def test_fp8_base(full_model, photos, tmp_path):
    log = run_script(SCRIPT, *train_args(full_model("sdxl"), photos("xl_fp8_data"), tmp_path, "xl", *LOW_MEMORY,
                                         "--fp8_base", "--mixed_precision", "bf16"))
    m = re.search(r"fp8: (\d+) layers stored in float8", log)
    assert m and int(m.group(1)) == unet_linear_and_conv_layers(), log[-3000:]  # every one of the UNet's
    check_unet_only(lora_tensors(tmp_path / "xl.safetensors"))
    md = lora_metadata(tmp_path / "xl.safetensors")
    assert md["ss_fp8_base"] == "True" and md["ss_mixed_precision"] == "bf16"


@pytest.fixture(scope="module")
def te_lora(full_model, photos, tmp_path_factory):
    """UNet and both text encoders, no caching."""
    out = tmp_path_factory.mktemp("xl_te")
    run_script(SCRIPT, *train_args(full_model("sdxl"), photos("xl_te_data"), out, "xl_te"))
    return out / "xl_te.safetensors"


def test_text_encoder_lora(te_lora):
    sd = lora_tensors(te_lora)
    mods = lora_modules(sd)
    te = _kohya_te_names("lora_te1", 12) | _kohya_te_names("lora_te2", 32)
    assert set(mods) == _kohya_unet_names() | te and len(mods) == 722 + 72 + 192
    assert sd["lora_te2_text_model_encoder_layers_31_mlp_fc1.lora_up.weight"].shape == (5120, 4)
    assert sd["lora_te1_text_model_encoder_layers_11_self_attn_q_proj.lora_down.weight"].shape == (4, 768)
    assert all(torch.isfinite(t).all() for t in sd.values())
    for prefix in ("lora_te1_", "lora_te2_", "lora_unet_"):  # every part learned something
        assert any(sd[k].abs().sum() > 0 for k in sd if k.startswith(prefix) and k.endswith("lora_up.weight")), prefix


def test_gen_img_sdxl_with_the_lora(full_model, te_lora, tmp_path):
    assert_images(gen_two_images(full_model("sdxl"), te_lora, tmp_path), lora_changes_them=True)


# kohya LoRA name of an original-layout SDXL key, per text encoder; TE2 (OpenCLIP) fuses q/k/v
_TE2 = {"attn.out_proj": "self_attn_out_proj", "mlp.c_fc": "mlp_fc1", "mlp.c_proj": "mlp_fc2"}


def lora_targets(key: str) -> list[tuple[str, slice]]:
    """``[(LoRA module name, row slice of the weight)]`` that adapt the original-layout ``key``."""
    every = slice(None)
    for prefix, lora in (("model.diffusion_model.", "lora_unet_"), ("conditioner.embedders.0.transformer.", "lora_te1_")):
        if key.startswith(prefix) and key.endswith(".weight"):
            return [(lora + key[len(prefix):-len(".weight")].replace(".", "_"), every)]
    m = re.fullmatch(r"conditioner\.embedders\.1\.model\.transformer\.resblocks\.(\d+)\.(.+)", key)
    if m is None:
        return []
    layer, rest = f"lora_te2_text_model_encoder_layers_{m.group(1)}_", m.group(2)
    if rest == "attn.in_proj_weight":
        return [(f"{layer}self_attn_{p}_proj", slice(i * 1280, (i + 1) * 1280)) for i, p in enumerate("qkv")]
    if rest.endswith(".weight") and rest[:-len(".weight")] in _TE2:
        return [(layer + _TE2[rest[:-len(".weight")]], every)]
    return []


def test_sdxl_merge_lora_changes_exactly_the_adapted_weights(full_model, te_lora, tmp_path):
    base_path, merged_path = full_model("sdxl"), tmp_path / "merged.safetensors"
    run_script("networks/sdxl_merge_lora.py", "--sd_model", base_path, "--models", te_lora, "--ratios", "1",
               "--save_to", merged_path, "--save_precision", "fp16")
    try:
        check_merged(base_path, merged_path, lora_modules(lora_tensors(te_lora)))
    finally:
        merged_path.unlink()  # 7 GB


def check_merged(base_path, merged_path, mods: dict) -> None:
    used, changed, exact = set(), {"lora_unet_": 0, "lora_te1_": 0, "lora_te2_": 0}, 0
    with safe_open(str(base_path), "pt") as base, safe_open(str(merged_path), "pt") as merged:
        assert set(merged.keys()) == set(base.keys())  # nothing lost (OpenCLIP's unused logit_scale included)
        for key in base.keys():
            b, m = base.get_tensor(key), merged.get_tensor(key)
            assert m.dtype == b.dtype and m.shape == b.shape, key
            targets = [(n, rows) for n, rows in lora_targets(key) if n in mods]
            if not targets:
                assert torch.equal(m, b), f"{key} changed but no LoRA module adapts it"
                continue
            used.update(n for n, _ in targets)
            if not torch.equal(m, b):
                changed[next(p for p in changed if targets[0][0].startswith(p))] += 1
            if len(used) % 5 and len(targets) == 1:
                continue  # the exact value check below on every fifth module and every fused q/k/v (time)
            want = b.float()
            for name, rows in targets:
                f = mods[name]
                rank = f["lora_down.weight"].shape[0]
                want[rows] += f["lora_up.weight"].float() @ f["lora_down.weight"].float() * (f["alpha"].item() / rank)
            # the float32 sum rounded to fp16: within one unit in the last place (the deltas are far smaller
            # than the weights, so |base| sizes the unit; 2**-17 covers weights near zero)
            err = want.sub_(m.float()).abs_()
            assert (err <= b.float().abs_().mul_(2.0**-10).add_(2.0**-17)).all(), f"{key} is not base + LoRA delta"
            exact += 1
    assert used == set(mods), f"LoRA modules with no checkpoint weight: {sorted(set(mods) - used)[:5]}"
    assert all(n > 0 for n in changed.values()) and exact > 150, (changed, exact)


def test_resize_lora(te_lora, tmp_path):
    out = tmp_path / "r2.safetensors"
    run_script("networks/resize_lora.py", "--model", te_lora, "--new_rank", "2", "--save_to", out)
    src, dst = lora_modules(lora_tensors(te_lora)), lora_modules(lora_tensors(out))
    assert set(dst) == set(src)
    checked = 0
    for name, f in src.items():
        g = dst[name]
        assert g["lora_down.weight"].shape[0] <= 2 and g["lora_up.weight"].shape[1] == g["lora_down.weight"].shape[0]
        if checked >= 24 or f["lora_up.weight"].abs().sum() == 0:
            continue
        # the resized delta is the best rank-2 approximation of the original one (Eckart-Young)
        d = f["lora_up.weight"].float() @ f["lora_down.weight"].float() * (f["alpha"].item() / 4)
        r = g["lora_down.weight"].shape[0]
        d2 = g["lora_up.weight"].float() @ g["lora_down.weight"].float() * (g["alpha"].item() / r)
        s = torch.linalg.svdvals(d)
        err = torch.linalg.matrix_norm(d - d2)
        assert err <= s[r:].norm() * 1.01 + 1e-6 * s[0], (name, err.item(), s.tolist())
        checked += 1
    assert checked == 24

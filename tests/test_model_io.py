"""Model loading and saving on tiny models of every family: lossless round trips, diffusers interop, bad input."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.errors import ModelLoadError, ModelSaveError
from library.models.families import Family
from library.models.loading import load_models
from library.models.saving import save_diffusers, save_model, save_single_file

FAMILIES = ["sd1", "sd2", "sdxl"]


def _tok_dir(path):
    return path.parent / f"{path.stem}_tokenizers"


def _load_file(path, **kw):
    return load_models(str(path), tokenizer_cache_dir=str(_tok_dir(path)), v2=path.stem.startswith("sd2"), **kw)


def _assert_same_tensors(a: dict, b: dict):
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
    for k in a:
        assert not a[k].is_meta and not b[k].is_meta, k
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("family", FAMILIES)
def test_original_roundtrip_is_bit_identical(family, tiny_model_dir, tmp_path):
    src = tiny_model_dir(family, "single_file")
    model = _load_file(src, dtype=None)
    assert model.family is Family(family)
    out = tmp_path / "rt.safetensors"
    save_single_file(model, out)
    _assert_same_tensors(load_file(src), load_file(out))


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_to_original_to_diffusers(family, tiny_model_dir, tmp_path):
    folder = tiny_model_dir(family, "diffusers")
    model = load_models(str(folder), dtype=None)
    single = tmp_path / "m.safetensors"
    save_single_file(model, single)
    back = load_models(str(single), dtype=None, v2=family == "sd2", with_tokenizers=False)
    back.tokenizers = model.tokenizers
    save_diffusers(back, tmp_path / "d")
    subs = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
    for sub in subs:
        fn = "model.safetensors" if sub.startswith("text") else "diffusion_pytorch_model.safetensors"
        _assert_same_tensors(load_file(folder / sub / fn), load_file(tmp_path / "d" / sub / fn))
    # and the original files agree with the tiny single file written directly
    _assert_same_tensors(load_file(tiny_model_dir(family, "single_file")), load_file(single))


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_single_file_loader_reads_our_files(family, tiny_model_dir):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    folder = tiny_model_dir(family, "diffusers")
    single = tiny_model_dir(family, "single_file")
    pipe = cls.from_single_file(str(single), config=str(folder), local_files_only=True)
    ref = load_models(str(folder), dtype=None)
    pairs = [(pipe.unet, ref.unet), (pipe.vae, ref.vae), (pipe.text_encoder, ref.text_encoders[0])]
    if family == "sdxl":
        pairs.append((pipe.text_encoder_2, ref.text_encoders[1]))
    for theirs, ours in pairs:
        _assert_same_tensors(theirs.state_dict(), ours.state_dict())


def test_fp16_file_stays_fp16_and_precision_conversion(tiny_model_dir, tmp_path):
    model = load_models(str(tiny_model_dir("sd1", "diffusers")))
    half = tmp_path / "half.safetensors"
    save_model(model, half, "safetensors", "fp16")
    sd = load_file(half)
    assert all(v.dtype == torch.float16 for v in sd.values() if v.is_floating_point())
    again = load_models(str(half), dtype=None, with_tokenizers=False)
    assert next(again.unet.parameters()).dtype == torch.float16
    rt = tmp_path / "rt.safetensors"
    save_single_file(again, rt)
    _assert_same_tensors(sd, load_file(rt))
    bf = tmp_path / "bf"
    save_model(model, bf, "safetensors", "bf16")
    assert {v.dtype for v in load_file(bf.with_suffix(".safetensors")).values()} == {torch.bfloat16}


def test_converting_reads_release_the_file_mapping_without_changing_values(tmp_path, monkeypatch):
    """Reads that convert dtypes reopen the file every _REMAP_BYTES; values and dtypes are unaffected."""
    from library.models import checkpoint

    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(16, 8 + i, generator=g).half() for i in range(12)}
    tensors["ids"] = torch.arange(5)
    path = tmp_path / "m.safetensors"
    save_file(tensors, path)
    monkeypatch.setattr(checkpoint, "_REMAP_BYTES", 300)  # reopen every one or two tensors
    reader = checkpoint.CheckpointReader(path)
    reopened = []
    original_reopen = reader._reopen

    def counting_reopen():
        original_reopen()
        reopened.append(1)

    monkeypatch.setattr(reader, "_reopen", counting_reopen)
    out = reader.read(sorted(tensors), torch.float32)
    assert len(reopened) >= 4
    for k, v in tensors.items():
        expected = v.float() if v.is_floating_point() else v
        assert out[k].dtype == expected.dtype and torch.equal(out[k], expected), k
    same = reader.read(["t0"], torch.float16)["t0"]  # no conversion: read as stored
    assert same.dtype == torch.float16 and torch.equal(same, tensors["t0"])


def test_unused_source_keys_survive_a_round_trip(tiny_model_dir, tmp_path):
    from safetensors import safe_open

    with safe_open(str(tiny_model_dir("sd1", "single_file")), "pt") as f:
        meta = f.metadata()  # carries the tiny architecture's config
    src = load_file(tiny_model_dir("sd1", "single_file"))
    extra = {
        "model_ema.decay": torch.tensor(0.9999),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
    }
    path = tmp_path / "with_extra.safetensors"
    save_file({**src, **extra}, str(path), metadata=meta)
    model = load_models(str(path), dtype=None, with_tokenizers=False)
    assert sorted(model.passthrough_keys) == sorted(extra)
    out = tmp_path / "out.safetensors"
    save_single_file(model, out)
    _assert_same_tensors({**src, **extra}, load_file(out))


def test_sd2_file_keeps_the_unused_last_text_encoder_layer(tiny_model_dir):
    sd = load_file(tiny_model_dir("sd2", "single_file"))
    model = load_models(str(tiny_model_dir("sd2", "single_file")), dtype=None, v2=True, with_tokenizers=False)
    n = model.text_encoders[0].config.num_hidden_layers
    assert f"cond_stage_model.model.transformer.resblocks.{n}.attn.in_proj_weight" in sd


def test_ckpt_needs_explicit_permission(tiny_model_dir, tmp_path):
    model = load_models(str(tiny_model_dir("sd1", "diffusers")))
    ckpt = tmp_path / "m.ckpt"
    save_model(model, ckpt, "ckpt")
    with pytest.raises(ModelLoadError, match="pickle.*--allow_pickle"):
        load_models(str(ckpt), with_tokenizers=False)
    loaded = load_models(str(ckpt), allow_pickle=True, with_tokenizers=False)
    _assert_same_tensors(model.unet.state_dict(), loaded.unet.state_dict())


def test_vae_override_from_file_and_folder(tiny_model_dir, tmp_path):
    other = load_models(str(tiny_model_dir("sd1", "diffusers")))
    with torch.no_grad():
        for p in other.vae.parameters():
            p.add_(1.0)
    vae_file = tmp_path / "vae.safetensors"
    from library.models.original_layout import VAE_PREFIX, vae_to_original

    sd = {k[len(VAE_PREFIX):]: v for k, v in vae_to_original(other.vae.state_dict(), dict(other.vae.config)).items()}
    save_file(sd, str(vae_file))
    m = load_models(str(tiny_model_dir("sd1", "single_file")), vae=str(vae_file),
                    tokenizer_cache_dir=str(_tok_dir(tiny_model_dir("sd1", "single_file"))))
    _assert_same_tensors(other.vae.state_dict(), m.vae.state_dict())
    m2 = load_models(str(tiny_model_dir("sd1", "diffusers")), vae=str(tiny_model_dir("sd1", "diffusers")))
    assert not any(p.is_meta for p in m2.vae.parameters())


# ---------------------------------------------------------------------------------- tokenizers
def test_tokenizers_from_cache_dir_and_missing_offline(tiny_model_dir, tmp_path):
    single = tiny_model_dir("sdxl", "single_file")
    model = _load_file(single)
    assert len(model.tokenizers) == 2 and model.tokenizers[1].pad_token == "!"
    assert model.tokenizers[0].model_max_length == 77
    # not in the cache dir: sdtk's bundled real tokenizer is used, which is too large for the tiny model's table
    with pytest.raises(ModelLoadError) as e:
        load_models(str(single), tokenizer_cache_dir=str(tmp_path / "empty"))
    msg = str(e.value)
    assert "49408 tokens" in msg and "--tokenizer_cache_dir" in msg and str(single) in msg


def test_sd2_tokenizer_pads_with_exclamation(tiny_model_dir):
    model = load_models(str(tiny_model_dir("sd2", "diffusers")))
    assert model.tokenizers[0].pad_token == "!"


# ---------------------------------------------------------------------------------- bad input
def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        load_models(str(tmp_path / "nope.safetensors"))


def test_random_bytes_and_truncated_file(tiny_model_dir, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(ModelLoadError, match="not a readable safetensors file"):
        load_models(str(junk))
    data = tiny_model_dir("sd1", "single_file").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated"):
        load_models(str(cut), with_tokenizers=False)
    for bad in (junk, cut):  # the plain reader (--disable_mmap_load_safetensors) checks the same
        with pytest.raises(ModelLoadError, match="truncated"):
            load_models(str(bad), with_tokenizers=False, mmap=False)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fmt", ["single_file", "diffusers"])
def test_loading_without_mmap_gives_the_same_model(family, fmt, tiny_model_dir, tmp_path):
    """--disable_mmap_load_safetensors: plain reads, identical weights (also through a dtype change)."""
    path = tiny_model_dir(family, fmt)
    kw = dict(v2=family == "sd2", with_tokenizers=False)
    for dtype in (None, torch.bfloat16):  # as stored (float32), and converted while reading
        a = load_models(str(path), dtype=dtype, **kw)
        b = load_models(str(path), dtype=dtype, mmap=False, **kw)
        for x, y in zip([a.unet, a.vae, *a.text_encoders], [b.unet, b.vae, *b.text_encoders]):
            _assert_same_tensors(x.state_dict(), y.state_dict())
        if fmt == "single_file":
            assert a.passthrough_keys == b.passthrough_keys


def test_lora_given_as_base_model(tmp_path):
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}, str(lora))
    with pytest.raises(ModelLoadError, match="is a LoRA.*--network_weights"):
        load_models(str(lora))


def test_wrong_family_flags_and_scripts(tiny_model_dir):
    sdxl = str(tiny_model_dir("sdxl", "single_file"))
    with pytest.raises(ModelLoadError, match="SDXL model but --v2"):
        load_models(sdxl, v2=True, with_tokenizers=False)
    with pytest.raises(ModelLoadError, match="use sdxl_train_network.py"):
        load_models(sdxl, expected=[Family.SD1, Family.SD2], with_tokenizers=False)
    with pytest.raises(ModelLoadError, match="use train_network.py"):
        load_models(str(tiny_model_dir("sd1", "diffusers")), expected=[Family.SDXL])
    with pytest.raises(ModelLoadError, match="SD1.x model but --v2"):
        load_models(str(tiny_model_dir("sd1", "single_file")), v2=True, with_tokenizers=False)


def test_unwritable_output_writes_nothing(tiny_model_dir, tmp_path):
    model = load_models(str(tiny_model_dir("sd1", "diffusers")))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores permission bits: use a path under a file instead
            target = tmp_path / "a_file"
            target.write_text("x")
            dest = target / "model.safetensors"
        else:
            dest = locked / "model.safetensors"
        with pytest.raises(ModelSaveError):
            save_single_file(model, dest)
        assert not dest.exists()
    finally:
        locked.chmod(0o700)


def test_interrupted_save_keeps_previous_file(tiny_model_dir, tmp_path, monkeypatch):
    model = load_models(str(tiny_model_dir("sd1", "diffusers")))
    dest = tmp_path / "m.safetensors"
    shutil.copy(tiny_model_dir("sd1", "single_file"), dest)
    before = dest.read_bytes()
    import safetensors.torch as st

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        save_single_file(model, dest)
    assert dest.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_v_parameterization_flag_overrides_embedded_config(tiny_model_dir):
    m = load_models(str(tiny_model_dir("sd1", "single_file")), v_parameterization=True, with_tokenizers=False)
    assert m.v_parameterization
    assert m.scheduler_config["prediction_type"] == "v_prediction"
    assert m.model_config["scheduler"]["prediction_type"] == "v_prediction"

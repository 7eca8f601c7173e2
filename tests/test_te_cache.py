"""Text-encoder output caching: memory and disk, validated against what produced the files, atomic;
refused with captions that change; the cache tool shares the files with training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from library.config.dataset_params import SubsetParams
from library.data import te_cache
from library.errors import ConfigError
from library.models.families import Family
from library.models.tiny import build_tiny_model
from library.training.family import get_family_adapter
from tests.trainer_fixtures import make_dataset

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_model(Family.SDXL)


def _encode_fn(model, max_len=None, calls=None):
    adapter = get_family_adapter(Family.SDXL)

    def encode(captions):
        if calls is not None:
            calls.append(list(captions))
        return adapter.encode_prompts(model.text_encoders, model.tokenizers, captions, max_len, None, CPU)

    return encode


def _samples(tmp_path: Path, **subset_options):
    from library.config.dataset_config import build_blueprint_for_args
    from library.data.dataset import build_dataset_group

    data = make_dataset(tmp_path / "data")
    args = {"train_data_dir": str(data), "resolution": "64", "caption_extension": ".caption", **subset_options}
    return build_dataset_group(build_blueprint_for_args(args)).samples()


def test_memory_cache_equals_live_encoding(tmp_path, tiny):
    samples = _samples(tmp_path)
    samples[1].entry.caption = samples[0].entry.caption  # a shared caption is encoded once
    calls: list = []
    fp = te_cache.encoder_fingerprint(tiny.text_encoders, tiny.tokenizers, None)
    cache, stats = te_cache.cache_text_encoder_outputs(samples, _encode_fn(tiny, calls=calls), fp, batch_size=2)
    assert stats.encoded == 3 and len(cache) == 3 and sum(len(c) for c in calls) == 3
    captions = [te_cache.fixed_caption(s) for s in samples]
    got = cache.conditioning(captions, CPU)
    with torch.no_grad():
        live = _encode_fn(tiny)(captions)
    torch.testing.assert_close(got.hidden_states, live.hidden_states, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.pooled, live.pooled, rtol=0, atol=1e-6)
    assert not list((tmp_path / "data").rglob("*" + te_cache.SUFFIX))  # memory mode writes nothing


def test_disk_cache_is_reused_only_when_valid(tmp_path, tiny):
    samples = _samples(tmp_path)
    fp = te_cache.encoder_fingerprint(tiny.text_encoders, tiny.tokenizers, None)
    encode = _encode_fn(tiny)
    cache, stats = te_cache.cache_text_encoder_outputs(samples, encode, fp, to_disk=True)
    files = sorted((tmp_path / "data").rglob("*" + te_cache.SUFFIX))
    assert stats.encoded == 4 and len(files) == 4 and not cache.memory
    assert not [p for p in (tmp_path / "data").rglob("*") if ".tmp" in p.name]  # atomic: no leftovers
    from safetensors import safe_open

    with safe_open(str(files[0]), "pt") as f:
        meta = f.metadata()
        assert meta["format"] == te_cache.FORMAT and meta["encoders"] == fp
        assert meta["caption"] == te_cache.fixed_caption(next(s for s in samples if s.entry.path.stem in files[0].name))
        assert f.get_tensor("hidden_states").shape == (77, 96) and f.get_tensor("pooled").shape == (64,)
    live = encode([te_cache.fixed_caption(samples[0])])
    torch.testing.assert_close(cache.conditioning([te_cache.fixed_caption(samples[0])], CPU).hidden_states,
                               live.hidden_states.detach(), rtol=0, atol=1e-6)

    # same settings: every file is reused, nothing is encoded
    _, stats = te_cache.cache_text_encoder_outputs(samples, encode, fp, to_disk=True)
    assert (stats.encoded, stats.reused) == (0, 4)
    # other text encoders (another model) or another max_token_length: all stale
    other = build_tiny_model(Family.SDXL, seed=1)
    fp_other = te_cache.encoder_fingerprint(other.text_encoders, other.tokenizers, None)
    assert fp_other != fp != te_cache.encoder_fingerprint(tiny.text_encoders, tiny.tokenizers, 150)
    _, stats = te_cache.cache_text_encoder_outputs(samples, _encode_fn(other), fp_other, to_disk=True)
    assert (stats.encoded, stats.reused) == (4, 0)
    # one caption edited: only that file is rebuilt; skip_cache_check trusts the stale one
    samples[0].entry.caption = "a photo of a dog"
    _, stats = te_cache.cache_text_encoder_outputs(samples, _encode_fn(other), fp_other, to_disk=True,
                                                   skip_cache_check=True)
    assert (stats.encoded, stats.reused) == (0, 4)
    _, stats = te_cache.cache_text_encoder_outputs(samples, _encode_fn(other), fp_other, to_disk=True)
    assert (stats.encoded, stats.reused) == (1, 3)
    # a damaged file is rebuilt
    te_cache.cache_file_for(samples[1].entry.path).write_bytes(b"garbage")
    _, stats = te_cache.cache_text_encoder_outputs(samples, _encode_fn(other), fp_other, to_disk=True)
    assert (stats.encoded, stats.reused) == (1, 3)


def test_changing_captions_and_text_encoder_training_are_refused():
    ok = SubsetParams("dreambooth", image_dir="a", keep_tokens=1)
    assert te_cache.cacheable_problems([ok]) == []
    bad = [SubsetParams("dreambooth", image_dir="imgs", shuffle_caption=True), SubsetParams("dreambooth", image_dir="reg", caption_dropout_rate=0.1),
           SubsetParams("dreambooth", image_dir="w", enable_wildcard=True), SubsetParams("dreambooth", image_dir="t", token_warmup_step=10)]
    with pytest.raises(ConfigError) as e:
        te_cache.check_cacheable([ok, *bad], train_text_encoder=True)
    msg = str(e.value)
    for text in ("--network_train_unet_only", "imgs: shuffle_caption=True", "reg: caption_dropout_rate=0.1",
                 "w: enable_wildcard=True", "t: token_warmup_step=10"):
        assert text in msg
    assert "a:" not in msg


def test_cache_tool_writes_files_training_reuses(tmp_path, tiny_model_dir, capsys):
    from tools.cache_text_encoder_outputs import main

    data = make_dataset(tmp_path / "data")
    argv = ["--pretrained_model_name_or_path", str(tiny_model_dir("sdxl")), "--train_data_dir", str(data),
            "--resolution", "64", "--caption_extension", ".caption", "--text_encoder_batch_size", "2"]
    assert main(argv) == 0
    assert "4 captions encoded" in capsys.readouterr().out
    files = sorted(data.rglob("*" + te_cache.SUFFIX))
    assert len(files) == 4
    assert main([*argv, "--skip_existing"]) == 0
    assert "0 captions encoded, 4 valid cache files kept" in capsys.readouterr().out
    # a caption that changes every epoch cannot be cached: refused before the model is loaded
    assert main([*argv[2:], "--pretrained_model_name_or_path", str(tmp_path / "missing"),
                 "--dataset_config", str(_toml_with_shuffle(tmp_path, data))]) == 1
    assert "shuffle_caption" in capsys.readouterr().err
    # an SD1 model is refused
    assert main(["--pretrained_model_name_or_path", str(tiny_model_dir("sd1")), *argv[2:]]) == 1
    assert "SD1.x" in capsys.readouterr().err


def _toml_with_shuffle(tmp_path: Path, data: Path) -> Path:
    cfg = tmp_path / "data.toml"
    sub = next(p for p in data.iterdir() if p.is_dir())
    cfg.write_text(f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = '{sub}'\n"
                   "caption_extension = '.caption'\nshuffle_caption = true\nnum_repeats = 1\n", encoding="utf-8")
    return cfg

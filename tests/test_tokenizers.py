"""The real CLIP tokenizer rebuilt offline from the bundled vocabulary, and the kohya-layout cache."""

from __future__ import annotations

from library.models.families import Family
from library.models.tokenizers import build_clip_tokenizer, load_tokenizers
from tools.make_clip_tokenizer import main as make_clip_tokenizer


def test_rebuilt_clip_tokenizer_matches_known_ids():
    tok = build_clip_tokenizer()
    assert len(tok) == 49408
    # well-known ids of the real CLIP vocabulary
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.pad_token == "<|endoftext|>" and tok.model_max_length == 77


def test_openclip_style_tokenizer_pads_with_exclamation():
    tok = build_clip_tokenizer("!")
    ids = tok("a cat", padding="max_length", max_length=6).input_ids
    assert ids == [49406, 320, 2368, 49407, 0, 0]


def test_tool_writes_kohya_cache_layout_that_loads_offline(tmp_path, capsys):
    assert make_clip_tokenizer(["--tokenizer_cache_dir", str(tmp_path)]) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["laion_CLIP-ViT-bigG-14-laion2B-39B-b160k", "openai_clip-vit-large-patch14",
                     "stabilityai_stable-diffusion-2"]
    t1, t2 = load_tokenizers(Family.SDXL, None, tmp_path)
    assert t1.pad_token == "<|endoftext|>" and t2.pad_token == "!"
    assert t1("a photo of a cat").input_ids == t2("a photo of a cat").input_ids
    (sd2,) = load_tokenizers(Family.SD2, None, tmp_path)
    assert sd2.pad_token == "!"


def test_unreachable_hub_fails_fast_with_offline_instructions(tmp_path, monkeypatch):
    import time

    import pytest
    from huggingface_hub import constants

    from library.errors import ModelLoadError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # closed port on this machine
    t0 = time.monotonic()
    with pytest.raises(ModelLoadError, match="not reachable.*|make_clip_tokenizer") as e:
        load_tokenizers(Family.SD1, None, tmp_path)
    assert time.monotonic() - t0 < 10
    assert "make_clip_tokenizer.py" in str(e.value) and "not reachable" in str(e.value)

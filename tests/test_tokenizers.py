"""The real CLIP tokenizer rebuilt offline from the bundled vocabulary, and the kohya-layout cache."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from library.models.families import TOKENIZER_IDS, Family
from library.models.tokenizers import build_clip_tokenizer, cache_folder, load_tokenizers
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


REFERENCE = json.loads((Path(__file__).parent / "data" / "clip_reference_ids.json").read_text(encoding="utf-8"))["ids"]
BOS, EOS = 49406, 49407


@pytest.fixture
def clean_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SDTK_CACHE_DIR", str(tmp_path / "sdtk_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "sdtk_cache" / "tokenizers"


@pytest.mark.parametrize("family", [Family.SD1, Family.SD2, Family.SDXL])
def test_no_tokenizer_anywhere_uses_the_bundled_one_with_reference_ids(family, clean_user_cache, caplog):
    """A single file with no tokenizer folder, offline, from a clean cache: sdtk's rebuilt tokenizers give
    the reference implementation's ids (OpenCLIP's SimpleTokenizer) for long, unicode and weighted prompts."""
    with caplog.at_level(logging.INFO, logger="library.models.tokenizers"):
        toks = load_tokenizers(family, None, None)
    assert len(toks) == (2 if family is Family.SDXL else 1)
    notes = [r.getMessage() for r in caplog.records if "bundled CLIP vocabulary" in r.getMessage()]
    assert len(notes) == len(toks) and all(str(clean_user_cache) in n for n in notes)
    for i, tok in enumerate(toks):
        assert len(tok) == 49408 and tok.model_max_length == 77
        open_clip_style = family is Family.SD2 or i == 1
        assert tok.pad_token == ("!" if open_clip_style else "<|endoftext|>")
        for prompt, ref in REFERENCE.items():
            assert tok(prompt).input_ids == [BOS, *ref, EOS], prompt
            padded = tok(prompt, padding="max_length", truncation=True, max_length=77).input_ids
            want = ([BOS, *ref][:76] + [EOS])
            assert padded == want + [0 if open_clip_style else EOS] * (77 - len(want)), prompt
    # written atomically in kohya's layout, and read back from there next time (no rebuild)
    folders = sorted(p.name for p in clean_user_cache.iterdir())
    assert folders == sorted(cache_folder(clean_user_cache, h).name for h, _ in TOKENIZER_IDS[family])
    stamp = {p: p.stat().st_mtime_ns for p in clean_user_cache.rglob("*")}
    again = load_tokenizers(family, None, None)
    assert [t("a photo of a cat").input_ids for t in again] == [[BOS, 320, 1125, 539, 320, 2368, EOS]] * len(toks)
    assert {p: p.stat().st_mtime_ns for p in clean_user_cache.rglob("*")} == stamp


def test_damaged_user_cache_is_rebuilt(clean_user_cache):
    folder = cache_folder(clean_user_cache, TOKENIZER_IDS[Family.SD1][0][0])
    folder.mkdir(parents=True)
    (folder / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    (tok,) = load_tokenizers(Family.SD1, None, None)
    assert tok("mobileclip").input_ids == [BOS, *REFERENCE["mobileclip"], EOS]
    assert load_tokenizers(Family.SD1, None, None)[0]("mobileclip").input_ids == tok("mobileclip").input_ids


def test_unreachable_hub_falls_back_fast(clean_user_cache, monkeypatch):
    import time

    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # closed port on this machine
    t0 = time.monotonic()
    (tok,) = load_tokenizers(Family.SD1, None, None)
    assert time.monotonic() - t0 < 10
    assert tok("a photo of a cat").input_ids == [BOS, 320, 1125, 539, 320, 2368, EOS]


def test_tokenizer_larger_than_the_text_encoder_table_is_refused(tiny_model_dir, clean_user_cache):
    """A tiny single file without its tokenizer folder gets the real 49,408-token tokenizer, which would index
    past its small token table: one clear error instead of an IndexError inside torch at the first caption."""
    from library.errors import ModelLoadError
    from library.models.loading import load_models

    path = tiny_model_dir("sd1", "single_file")
    with pytest.raises(ModelLoadError, match=r"49408 tokens but text encoder 1 has only \d+ token embeddings.*"
                                             r"--tokenizer_cache_dir"):
        load_models(str(path))

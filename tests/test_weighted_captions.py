"""--weighted_captions: A1111 attention syntax in training captions (kohya's semantics)."""

from __future__ import annotations

import pytest
import torch

from library.data.tokenize import merge_chunk_weights, tokenize_captions, tokenize_captions_weighted
from library.models.families import Family
from library.models.tiny import build_tiny_model, tiny_tokenizer
from library.training.family import get_family_adapter
from tests.trainer_fixtures import lora_tensors, make_dataset, run_in_process, train_argv

CAPTIONS = [
    "a photo of a dog",
    " ".join(["dog"] * 74) + " cat",  # exactly one chunk
    " ".join(["a dog"] * 60),  # 120 tokens: two chunks
    " ".join(["dog"] * 300),  # longer than any max_token_length
    "",
]


@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])  # SD1 / SDXL TE1, and SD2 / SDXL TE2
@pytest.mark.parametrize("max_len", [None, 150, 225])
def test_captions_without_syntax_tokenize_as_usual(pad, max_len):
    tok = tiny_tokenizer(pad_token=pad)
    ids, weights = tokenize_captions_weighted(tok, CAPTIONS, max_len)
    assert torch.equal(ids, tokenize_captions(tok, CAPTIONS, max_len))
    assert weights.shape == ids.shape and bool((weights == 1).all())


def test_weights_follow_the_tokens():
    tok = tiny_tokenizer()
    ids, weights = tokenize_captions_weighted(tok, ["a (photo:1.5) of [dog] ((cat))"], None)
    assert torch.equal(ids, tokenize_captions(tok, ["a photo of dog cat"], None))
    per_word = {"a": 1.0, "photo": 1.5, "of": 1.0, "dog": 1 / 1.1, "cat": 1.1 * 1.1}
    expected = [w for word, w in per_word.items() for _ in tok(word, add_special_tokens=False).input_ids]
    n = len(expected)
    torch.testing.assert_close(weights[0, 0, 1 : n + 1], torch.tensor(expected))
    assert bool((weights[0, 0, n + 1 :] == 1).all()) and weights[0, 0, 0] == 1  # BOS, EOS, padding


@pytest.mark.parametrize("family", [Family.SD1, Family.SDXL])
@pytest.mark.parametrize("max_len", [None, 150])
def test_weighted_states_are_the_plain_states_times_the_weights(family, max_len):
    """The text without syntax encodes to the same states; only the weighted tokens' states are scaled
    (every text encoder's part; the SDXL pooled embedding is unchanged)."""
    torch.manual_seed(0)
    m = build_tiny_model(family)
    adapter = get_family_adapter(family)
    dogs = " ".join(["dog"] * (20 if max_len is None else 80))  # the weighted words fit in max_len
    caption, plain = f"a (photo:1.5) of {dogs} [cat]", f"a photo of {dogs} cat"
    with torch.no_grad():
        w = adapter.encode_prompts(m.text_encoders, m.tokenizers, [caption], max_len, None, "cpu", weighted=True)
        p = adapter.encode_prompts(m.text_encoders, m.tokenizers, [plain], max_len, None, "cpu")
    _, weights = adapter.tokenize_weighted(m.tokenizers, [caption], max_len)
    expected = merge_chunk_weights(weights[0])[0]  # the tokenizers agree on positions
    assert w.hidden_states.shape == p.hidden_states.shape
    assert sorted({round(x, 4) for x in expected.tolist()}) == [0.9091, 1.0, 1.5]
    torch.testing.assert_close(w.hidden_states, p.hidden_states * expected[None, :, None])
    if family is Family.SDXL:
        assert torch.equal(w.pooled, p.pooled)


def test_training_and_cached_outputs_with_weighted_captions(tiny_model_dir, tmp_path):
    """train_network trains with weighted captions; SDXL caches weighted outputs under their own fingerprint."""
    from tests.test_sdxl_training import run_sdxl

    data = make_dataset(tmp_path / "data", names=("astronaut", "coffee"))
    for cap in data.rglob("*.caption"):
        cap.write_text("a (photo:1.3) of [sks]", encoding="utf-8")
    argv = train_argv(tiny_model_dir("sd1"), data, tmp_path / "sd1", "--weighted_captions", steps=2)
    assert run_in_process(argv) == 0
    assert lora_tensors(tmp_path / "sd1" / "lora.safetensors")

    base = train_argv(tiny_model_dir("sdxl"), data, tmp_path / "xl", "--network_train_unet_only",
                      "--cache_text_encoder_outputs", "--cache_text_encoder_outputs_to_disk", steps=1)
    assert run_sdxl(base + ["--weighted_captions"]) == 0
    files = sorted(data.rglob("*_te_sdtk.safetensors"))
    assert len(files) == 2
    stamps = [f.stat().st_mtime_ns for f in files]
    assert run_sdxl(base + ["--weighted_captions"]) == 0
    assert [f.stat().st_mtime_ns for f in files] == stamps  # valid for the same settings
    assert run_sdxl(base) == 0
    assert all(f.stat().st_mtime_ns != s for f, s in zip(files, stamps))  # unweighted: rebuilt

"""Caption tokenization: kohya's chunking for --max_token_length 75 / 150 / 225."""

from __future__ import annotations

import pytest
import torch

from library.data.tokenize import count_tokens, tokenize_captions, validate_max_token_length
from library.errors import ConfigError
from library.models.tiny import tiny_tokenizer

SHORT = "a photo of a dog"
LONG = " ".join(["dog"] * 100)  # "dog" is one token of the tiny vocabulary
VERY_LONG = " ".join(["dog"] * 300)


@pytest.fixture(scope="module")
def tok_eos():
    """SD1 / SDXL tokenizer 1: pads with EOS."""
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def tok_pad():
    """SD2 / SDXL tokenizer 2: pads with "!"."""
    return tiny_tokenizer(pad_token="!")


def plain_ids(tok, text, length):
    return tok(text, padding="max_length", truncation=True, max_length=length, return_tensors="pt").input_ids[0]


@pytest.mark.parametrize("max_len", [None, 75])
def test_single_chunk(tok_eos, max_len):
    ids = tokenize_captions(tok_eos, [SHORT, LONG], max_len)
    assert ids.shape == (2, 1, 77) and ids.dtype == torch.long
    assert torch.equal(ids[0, 0], plain_ids(tok_eos, SHORT, 77))
    # truncated to 75 tokens + BOS/EOS
    assert ids[1, 0, 0] == tok_eos.bos_token_id and ids[1, 0, -1] == tok_eos.eos_token_id
    assert (ids[1, 0, 1:76] == ids[1, 0, 1]).all()


@pytest.mark.parametrize("max_len,chunks", [(150, 2), (225, 3)])
def test_chunks_are_slices_of_the_long_tokenization(tok_eos, tok_pad, max_len, chunks):
    for tok in (tok_eos, tok_pad):
        ids = tokenize_captions(tok, [SHORT, LONG, VERY_LONG], max_len)
        assert ids.shape == (3, chunks, 77)
        for b, text in enumerate([SHORT, LONG, VERY_LONG]):
            full = plain_ids(tok, text, max_len + 2)
            for k in range(chunks):
                chunk = ids[b, k]
                assert chunk[0] == tok.bos_token_id
                body = full[1 + 75 * k: 1 + 75 * (k + 1)]
                # apart from kohya's EOS fix-ups at positions 1 and 76, the body is the slice
                assert torch.equal(chunk[2:76], body[1:])


def test_eos_padded_tokenizer_chunks(tok_eos):
    ids = tokenize_captions(tok_eos, [LONG], 150)[0]
    dog = ids[0, 1].item()
    # chunk 0: BOS + 75 dogs + last token of the 152 sequence (EOS)
    assert (ids[0, 1:76] == dog).all() and ids[0, 76] == tok_eos.eos_token_id
    # chunk 1: BOS + 25 dogs + EOS + EOS padding
    assert (ids[1, 1:26] == dog).all()
    assert (ids[1, 26:] == tok_eos.eos_token_id).all()


def test_pad_token_tokenizer_chunks(tok_pad):
    eos, pad = tok_pad.eos_token_id, tok_pad.pad_token_id
    assert pad != eos
    ids = tokenize_captions(tok_pad, [LONG, SHORT], 225)
    long_ids, short_ids = ids[0], ids[1]
    # chunk cut in the middle of the text: its last token is turned into EOS
    assert long_ids[0, 75] != eos and long_ids[0, 76] == eos
    # chunk holding the end of the text: "... dog EOS PAD PAD"
    assert long_ids[1, 26] == eos and (long_ids[1, 27:] == pad).all()
    # chunk of pure padding: "BOS EOS PAD ..."
    assert long_ids[2, 1] == eos and (long_ids[2, 2:] == pad).all()
    assert short_ids[1, 1] == eos and short_ids[2, 1] == eos
    # the short caption's first chunk ends with padding, untouched
    assert short_ids[0, -1] == pad


def test_max_token_length_is_validated(tok_eos):
    for bad in (100, 77, 0, True, "150"):
        with pytest.raises(ConfigError, match="max_token_length must be 75, 150 or 225"):
            tokenize_captions(tok_eos, [SHORT], bad)
    assert validate_max_token_length(None) is None and validate_max_token_length(225) == 225


def test_count_tokens(tok_eos):
    n = count_tokens(tok_eos, SHORT)
    ids = plain_ids(tok_eos, SHORT, 77)
    assert n == int((ids != tok_eos.eos_token_id).sum()) - 1  # minus BOS
    assert count_tokens(tok_eos, LONG) == 100  # not truncated
    assert count_tokens(tok_eos, VERY_LONG) == 300
    assert count_tokens(tok_eos, "") == 0

"""Caption tokenization for CLIP text encoders, with kohya's long-prompt chunking.

With ``--max_token_length`` 150 or 225, kohya tokenizes to ``max_token_length + 2`` tokens
and cuts the result into chunks of 75, each wrapped as ``BOS ... EOS`` so every chunk is a
regular 77-token CLIP input; the text encoder outputs of the chunks are concatenated later.
For tokenizers that pad with EOS (SD1, SDXL's first tokenizer) the chunks are cut as is; for
tokenizers with a separate pad token (SD2, SDXL's second tokenizer) a chunk that ends in a
real token gets EOS as its last token, and a chunk that holds only padding gets EOS after BOS.
"""

from __future__ import annotations

from typing import Any

import torch

from library.data.prompt_syntax import chunk_ids, tokenize_weighted
from library.errors import ConfigError

ALLOWED_MAX_TOKEN_LENGTHS = (None, 75, 150, 225)


def validate_max_token_length(max_token_length: Any) -> int | None:
    """Check ``--max_token_length`` (None, 75, 150 or 225) and return it."""
    if isinstance(max_token_length, bool) or max_token_length not in ALLOWED_MAX_TOKEN_LENGTHS:
        raise ConfigError(f"max_token_length must be 75, 150 or 225 (or unset for 75), got {max_token_length!r}")
    return max_token_length


def _chunk(ids: torch.Tensor, tokenizer: Any, total: int) -> torch.Tensor:
    """Cut one ``[total]`` id row into ``[n_chunks, model_max_length]``."""
    model_len = tokenizer.model_max_length
    body = model_len - 2
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    chunks = []
    for start in range(1, total - model_len + 2, body):
        chunk = torch.cat([ids[:1], ids[start:start + body], ids[-1:]])
        if pad != eos:
            # a chunk cut in the middle of the text must still end with EOS
            if chunk[-2] != eos and chunk[-2] != pad:
                chunk[-1] = eos
            # a chunk that is all padding becomes "BOS EOS PAD ..."
            if chunk[1] == pad:
                chunk[1] = eos
        chunks.append(chunk)
    return torch.stack(chunks)


def tokenize_captions(tokenizer: Any, captions: list[str], max_token_length: int | None) -> torch.Tensor:
    """Tokenize captions the way kohya's SD/SDXL tokenize strategies do.

    Args:
        tokenizer: a ``CLIPTokenizer`` (``model_max_length`` 77).
        captions: B captions.
        max_token_length: None or 75 (one chunk), 150 (two) or 225 (three).

    Returns:
        LongTensor ``[B, n_chunks, 77]``.

    Raises:
        ConfigError: ``max_token_length`` is not one of None, 75, 150, 225.
    """
    validate_max_token_length(max_token_length)
    model_len = tokenizer.model_max_length
    total = model_len if max_token_length is None else max_token_length + 2
    ids = tokenizer(list(captions), padding="max_length", truncation=True, max_length=total,
                    return_tensors="pt").input_ids
    if total <= model_len:
        return ids.unsqueeze(1)
    return torch.stack([_chunk(row, tokenizer, total) for row in ids])


def tokenize_captions_weighted(tokenizer: Any, captions: list[str], max_token_length: int | None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``--weighted_captions``: A1111 attention syntax (``(word:1.2)``, ``[word]``) in captions.

    The syntax is removed from the text and each token gets its weight; the ids are laid out in
    the same chunks as :func:`tokenize_captions` (a caption without weights gets the same ids).

    Returns:
        ``(ids, weights)``: LongTensor ``[B, n_chunks, 77]`` and FloatTensor ``[B, n_chunks, 77]``
        (1 on BOS/EOS/padding).
    """
    validate_max_token_length(max_token_length)
    n_chunks = 1 if max_token_length is None else max_token_length // 75
    body = tokenizer.model_max_length - 2
    ids, weights = [], []
    for caption in captions:
        toks, w, _ = tokenize_weighted(tokenizer, caption, n_chunks * body)
        row, row_w = chunk_ids(tokenizer, toks, w, n_chunks)
        ids.append(row)
        weights.append(row_w.reshape(n_chunks, -1))
    return torch.stack(ids), torch.stack(weights)


def merge_chunk_weights(weights: torch.Tensor) -> torch.Tensor:
    """Per-token weights ``[B, n, 77]`` in the merged long-prompt layout ``[B, 75 * n + 2]``
    (BOS of the first chunk, the 75 middle tokens of each chunk, the last chunk's final token)."""
    b, n, length = weights.shape
    if n == 1:
        return weights[:, 0]
    return torch.cat([weights[:, 0, :1], weights[:, :, 1 : length - 1].reshape(b, -1), weights[:, -1, -1:]], dim=1)


def count_tokens(tokenizer: Any, caption: str) -> int:
    """Number of tokens of a caption without BOS/EOS and without truncation."""
    ids = tokenizer(caption, truncation=False, add_special_tokens=False, verbose=False).input_ids
    return len(ids)

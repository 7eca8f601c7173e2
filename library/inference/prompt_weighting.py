"""A1111-style prompt weighting and long prompts, encoded to the embeddings diffusers pipelines take.

The attention syntax (``(text:1.5)``, ``[text]``, ``BREAK``) is parsed by :mod:`library.data.prompt_syntax`
(re-exported here); the family's adapter says which text-encoder layer and pooled output a prompt uses.

Long prompts (kohya's gen_img layout): up to ``max_embeddings_multiples`` chunks of 75 tokens,
each encoded as its own ``BOS + 75 tokens + EOS`` CLIP input; the chunk outputs are concatenated
whole (``77 * n`` states). Every text of one call gets the same number of chunks, so that the
prompt and the negative prompt can be batched for classifier-free guidance. A prompt of at most
75 tokens gives exactly the 77 states that diffusers' own prompt encoding gives.

Weighting multiplies each token's hidden state by its weight, then rescales each sample so the
mean of its states is unchanged (kohya's ``--emb_normalize_mode original``; ``abs`` uses the mean
absolute value, ``none`` does not rescale). The SDXL pooled embedding is not weighted.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from library.data.prompt_syntax import ROUND_UP, chunk_ids, parse_prompt_attention, tokenize_weighted
from library.models.families import Conditioning, Family

logger = logging.getLogger(__name__)

__all__ = ["ROUND_UP", "apply_weights", "chunk_ids", "encode_prompts", "parse_prompt_attention", "tokenize_weighted"]


def apply_weights(hidden: torch.Tensor, weights: torch.Tensor, mode: str = "original") -> torch.Tensor:
    """Multiply ``hidden`` ``[B, L, D]`` by ``weights`` ``[B, L]`` and renormalise per sample (see module doc)."""
    if mode not in ("original", "abs", "none"):
        raise ValueError(f"unknown emb_normalize_mode {mode!r}")
    weighted = hidden * weights.to(hidden.device, hidden.dtype).unsqueeze(-1)
    if mode == "none":
        return weighted
    stat = (lambda t: t.float().abs().mean(dim=(1, 2))) if mode == "abs" else (lambda t: t.float().mean(dim=(1, 2)))
    ratio = stat(hidden) / stat(weighted)
    if not bool(torch.isfinite(ratio).all()):
        # a mean of exactly zero (e.g. an untrained final layer norm) cannot be restored
        logger.warning("prompt weighting: the embedding mean is zero; the weighted embedding is not rescaled")
        ratio = torch.where(torch.isfinite(ratio), ratio, torch.ones_like(ratio))
    return weighted * ratio.to(hidden.dtype)[:, None, None]


@torch.no_grad()
def encode_prompts(family: Family, text_encoders: list, tokenizers: list, texts: list[str], *,
                   max_embeddings_multiples: int | None = None, clip_skip: int | None = None,
                   emb_normalize_mode: str = "original",
                   convert_prompt: Callable[[str, Any], str] | None = None) -> Conditioning:
    """Encode ``texts`` (weighted, possibly long) for a pipeline's ``prompt_embeds``.

    Args:
        family: SD1 / SD2 (one text encoder) or SDXL (two; states concatenated, pooled from the second).
        texts: B prompts; all get the same number of chunks.
        max_embeddings_multiples: at most this many 75-token chunks (None: 1).
        convert_prompt: ``(text, tokenizer) -> text`` applied before tokenizing for each tokenizer
            (textual inversion words -> their tokens, see :mod:`library.inference.textual_inversion`).

    Returns:
        ``Conditioning`` with ``hidden_states`` ``[B, 77 * n, D]`` and, for SDXL, ``pooled`` ``[B, P]``.
    """
    multiples = max(1, max_embeddings_multiples or 1)
    adapter = Family(family).adapter()
    n_tes = adapter.n_text_encoders
    per_tok = []
    for tok in tokenizers[:n_tes]:
        tok_texts = [convert_prompt(t, tok) for t in texts] if convert_prompt else texts
        items = [tokenize_weighted(tok, t, multiples * (tok.model_max_length - 2)) for t in tok_texts]
        if any(tr for _, _, tr in items):
            logger.warning("a prompt is longer than %d tokens and was truncated; raise --max_embeddings_multiples",
                           multiples * (tok.model_max_length - 2))
        per_tok.append(items)
    longest = max(len(ids) for items in per_tok for ids, _, _ in items)
    body = tokenizers[0].model_max_length - 2
    n_chunks = min(multiples, max(1, (longest - 1) // body + 1)) if longest else 1

    states, pooled = [], None
    for i, (te, tok, items) in enumerate(zip(text_encoders, tokenizers, per_tok)):
        laid = [chunk_ids(tok, ids, w, n_chunks) for ids, w, _ in items]
        ids = torch.stack([x[0] for x in laid]).to(next(te.parameters()).device)  # [B, n, 77]
        weights = torch.stack([x[1] for x in laid])  # [B, n * 77]
        b = ids.shape[0]
        flat = ids.reshape(b * n_chunks, -1)
        hidden, out = adapter.prompt_hidden_states(te, i, flat, clip_skip)
        hidden = hidden.reshape(b, n_chunks * flat.shape[1], hidden.shape[-1])
        if not bool((weights == 1.0).all()):
            hidden = apply_weights(hidden, weights, emb_normalize_mode)
        states.append(hidden)
        te_pooled = adapter.prompt_pooled(te, i, out, flat, tok.eos_token_id)
        if te_pooled is not None:
            pooled = te_pooled.reshape(b, n_chunks, -1)[:, 0]  # the first chunk's, as kohya
    hidden = states[0] if len(states) == 1 else torch.cat([states[0], states[1].to(states[0].dtype)], dim=2)
    return Conditioning(hidden, pooled)

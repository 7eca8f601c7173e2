"""A1111-style prompt weighting and long prompts, encoded to the embeddings diffusers pipelines take.

Syntax (as in AUTOMATIC1111 and kohya's gen_img): ``(text)`` multiplies the attention of
``text`` by 1.1, ``[text]`` divides it by 1.1, ``(text:1.5)`` sets the factor; brackets nest
and multiply; ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal characters; unbalanced brackets
close at the end of the prompt. ``BREAK`` (upper case, a word of its own) pads the prompt to the
start of the next 75-token chunk.

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
import re
from typing import Any, Callable

import torch

from library.models.families import Family
from library.training.family import Conditioning

logger = logging.getLogger(__name__)

ROUND_UP = 1.1
_TOKEN = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
_BREAK = "BREAK"


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split ``text`` into ``(piece, weight)`` runs; neighbouring runs of equal weight are merged.

    ``BREAK`` is returned as its own run ``("BREAK", 1.0)``. An empty prompt gives ``[("", 1.0)]``.
    """
    runs: list[list[Any]] = []  # [text, weight, is_break]
    round_open: list[int] = []
    square_open: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for run in runs[start:]:
            run[1] *= factor

    for m in _TOKEN.finditer(text):
        tok, weight = m.group(0), m.group(1)
        if tok.startswith("\\"):
            runs.append([tok[1:] if len(tok) > 1 else tok, 1.0, False])
        elif tok == "(":
            round_open.append(len(runs))
        elif tok == "[":
            square_open.append(len(runs))
        elif weight is not None and round_open:
            scale_from(round_open.pop(), float(weight))
        elif tok == ")" and round_open:
            scale_from(round_open.pop(), ROUND_UP)
        elif tok == "]" and square_open:
            scale_from(square_open.pop(), 1 / ROUND_UP)
        else:
            # BREAK becomes a run of its own so that merging never glues it to text
            for i, part in enumerate(re.split(r"\bBREAK\b", tok)):
                if i:
                    runs.append([_BREAK, 1.0, True])
                if part:
                    runs.append([part, 1.0, False])
    for start in round_open:
        scale_from(start, ROUND_UP)
    for start in square_open:
        scale_from(start, 1 / ROUND_UP)

    merged: list[list[Any]] = []
    for run in runs:
        if merged and merged[-1][1] == run[1] and not run[2] and not merged[-1][2]:
            merged[-1][0] += run[0]
        else:
            merged.append(run)
    out = [(t, 1.0 if brk else w) for t, w, brk in merged]
    return out or [("", 1.0)]


def tokenize_weighted(tokenizer: Any, text: str, max_tokens: int) -> tuple[list[int], list[float], bool]:
    """Token ids (without BOS/EOS) and one weight per token, cut to ``max_tokens``.

    Returns:
        ``(ids, weights, truncated)``.
    """
    body = tokenizer.model_max_length - 2
    ids: list[int] = []
    weights: list[float] = []
    for piece, weight in parse_prompt_attention(text):
        if piece == _BREAK:
            fill = (-len(ids)) % body
            ids += [tokenizer.pad_token_id] * fill
            weights += [1.0] * fill
            continue
        toks = tokenizer(piece, add_special_tokens=False, truncation=False, verbose=False).input_ids
        ids += toks
        weights += [weight] * len(toks)
    truncated = len(ids) > max_tokens
    return ids[:max_tokens], weights[:max_tokens], truncated


def chunk_ids(tokenizer: Any, ids: list[int], weights: list[float], n_chunks: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Lay ``ids`` out as ``n_chunks`` CLIP inputs.

    Returns:
        ids ``LongTensor[n_chunks, 77]`` and weights ``FloatTensor[n_chunks * 77]`` (1 on BOS/EOS/padding).
    """
    length = tokenizer.model_max_length
    body = length - 2
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    stream = ids + [eos] + [pad] * (n_chunks * body + 1 - len(ids) - 1)
    w = weights + [1.0] * (n_chunks * body - len(weights))
    rows, row_w = [], []
    for i in range(n_chunks):
        # the slot after the body holds the first token of the next chunk; it becomes EOS unless
        # it is EOS or padding already (for SD1 padding is EOS, so this always yields EOS)
        last = stream[(i + 1) * body]
        if last not in (eos, pad):
            last = eos
        row = [bos] + stream[i * body:(i + 1) * body] + [last]
        if pad != eos and row[1] == pad:
            row[1] = eos  # a chunk of padding only: "BOS EOS PAD ..." (kohya's rule for SD2/SDXL TE2)
        rows.append(row)
        row_w += [1.0] + w[i * body:(i + 1) * body] + [1.0]
    return torch.tensor(rows, dtype=torch.long), torch.tensor(row_w, dtype=torch.float32)


def _hidden(family: Family, text_encoder: Any, ids: torch.Tensor, clip_skip: int | None
            ) -> tuple[torch.Tensor, Any]:
    """``[N, 77, D]`` states of the layer kohya's gen_img uses, and the raw encoder output."""
    if family is Family.SDXL:
        out = text_encoder(ids, output_hidden_states=True, return_dict=True)
        return out.hidden_states[-(clip_skip or 2)], out  # no final layer norm for SDXL
    from library.training.family_sd import text_hidden_states

    return text_hidden_states(text_encoder, ids, clip_skip), None


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
    n_tes = 2 if family is Family.SDXL else 1
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
        hidden, out = _hidden(family, te, flat, clip_skip)
        hidden = hidden.reshape(b, n_chunks * flat.shape[1], hidden.shape[-1])
        if not bool((weights == 1.0).all()):
            hidden = apply_weights(hidden, weights, emb_normalize_mode)
        states.append(hidden)
        if family is Family.SDXL and i == 1:
            from library.training.family_sdxl import pooled_embedding

            pooled = pooled_embedding(te, out.last_hidden_state, flat, tok.eos_token_id)
            pooled = pooled.reshape(b, n_chunks, -1)[:, 0]  # the first chunk's, as kohya
    hidden = states[0] if len(states) == 1 else torch.cat([states[0], states[1].to(states[0].dtype)], dim=2)
    return Conditioning(hidden, pooled)

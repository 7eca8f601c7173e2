"""A1111 prompt attention syntax, turned into token ids and per-token weights (no text encoder here).

Syntax (as in AUTOMATIC1111 and kohya's gen_img): ``(text)`` multiplies the attention of
``text`` by 1.1, ``[text]`` divides it by 1.1, ``(text:1.5)`` sets the factor; brackets nest
and multiply; ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal characters; unbalanced brackets
close at the end of the prompt. ``BREAK`` (upper case, a word of its own) pads the prompt to the
start of the next 75-token chunk.

Used by ``--weighted_captions`` (:func:`library.data.tokenize.tokenize_captions_weighted`) and by
gen_img's prompt encoding (:mod:`library.inference.prompt_weighting`).
"""

from __future__ import annotations

import re
from typing import Any

import torch

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

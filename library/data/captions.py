"""Caption reading and per-step caption processing with kohya sd-scripts' semantics.

:func:`process_caption` reproduces kohya's ``BaseDataset.process_caption`` step by step
(prefix/suffix, caption dropout, wildcards, keep-tokens, token warm-up, shuffle, tag dropout,
secondary separator), but draws every random number from the ``rng`` it is given instead of
the global ``random`` module, so results are deterministic per seed and resumable.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from library.config.dataset_params import SubsetParams
from library.errors import DatasetError
from library.utils.ratios import floor_of, floor_scaled

_WILDCARD = re.compile(r"\{([^}]+)\}")


def read_caption_file(path: str | Path) -> str:
    """Read a caption file as UTF-8 (a byte-order mark is ignored).

    Lines are stripped and blank lines dropped; the rest are joined with ``"\\n"``. Without
    ``enable_wildcard`` :func:`process_caption` uses the first line (kohya's behaviour); with it,
    one line is chosen at random per step. An empty file gives ``""``.

    Raises:
        DatasetError: the file cannot be read or is not valid UTF-8.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DatasetError(f"cannot read caption file {path}: {e.strerror or e}") from e
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(
            f"caption file {path} is not valid UTF-8 (byte {e.start}: {data[e.start:e.start + 1]!r}); "
            "re-save it as UTF-8"
        ) from e
    return "\n".join(line.strip() for line in text.splitlines() if line.strip())


def _expand_wildcards(caption: str, rng: random.Random) -> str:
    """Pick one line of a multi-line caption, then replace each ``{a|b|c}`` with one choice.

    ``{{`` and ``}}`` are literal braces.
    """
    if "\n" in caption:
        caption = rng.choice(caption.split("\n"))
    # protect escaped braces with markers that cannot occur in the caption
    open_mark, close_mark = "\u2985", "\u2986"
    while open_mark in caption or close_mark in caption:
        open_mark += "\u2985"
        close_mark += "\u2986"
    caption = caption.replace("{{", open_mark).replace("}}", close_mark)
    caption = _WILDCARD.sub(lambda m: rng.choice(m.group(1).split("|")), caption)
    return caption.replace(open_mark, "{").replace(close_mark, "}")


def _split_tokens(caption: str, subset: SubsetParams) -> tuple[list[str], list[str], list[str]]:
    """Split into (fixed prefix, flexible, fixed suffix) tags.

    With ``keep_tokens_separator`` present, the part before it is fixed, and a second separator
    starts a fixed suffix. Otherwise the first ``keep_tokens`` tags are fixed.
    """
    sep = subset.caption_separator
    kts = subset.keep_tokens_separator
    if kts and kts in caption:
        fixed_part, flex_part = caption.split(kts, 1)
        suffix: list[str] = []
        if kts in flex_part:
            flex_part, suffix_part = flex_part.split(kts, 1)
            suffix = [t.strip() for t in suffix_part.split(sep) if t.strip()]
        fixed = [t.strip() for t in fixed_part.split(sep) if t.strip()]
        flex = [t.strip() for t in flex_part.split(sep) if t.strip()]
        return fixed, flex, suffix
    # kohya keeps empty tags here (unlike above); matching it keeps outputs identical
    tokens = [t.strip() for t in caption.strip().split(sep)]
    if subset.keep_tokens > 0:
        return tokens[: subset.keep_tokens], tokens[subset.keep_tokens:], []
    return [], tokens, []


def warmup_step_count(token_warmup_step: float, max_steps: int | None) -> int | float:
    """The step at which token warm-up ends: values < 1 are a fraction of ``max_steps``."""
    if token_warmup_step < 1:
        return floor_of(token_warmup_step, max_steps or 0)
    return token_warmup_step


def process_caption(caption: str, subset: SubsetParams, *, epoch: int, step: int, max_steps: int | None,
                    rng: random.Random) -> str:
    """Turn a stored caption into the caption used for one training sample.

    Args:
        caption: the caption as read (may hold several lines, see :func:`read_caption_file`).
        subset: the subset's options (``shuffle_caption``, ``keep_tokens``, dropout rates, ...).
        epoch: the current epoch, **1-based** as in kohya's loop; ``caption_dropout_every_n_epochs``
            drops the caption when ``epoch % n == 0``.
        step: the current global step (token warm-up).
        max_steps: total training steps (a fractional ``token_warmup_step`` is relative to it).
        rng: the only source of randomness.

    Returns:
        The processed caption; ``""`` when the caption is dropped.
    """
    if subset.caption_prefix:
        caption = subset.caption_prefix + " " + caption
    if subset.caption_suffix:
        caption = caption + " " + subset.caption_suffix

    # draw the dropout number only when the rate is set, so the rng sequence matches kohya's calls
    dropped = subset.caption_dropout_rate > 0 and rng.random() < subset.caption_dropout_rate
    every = subset.caption_dropout_every_n_epochs
    if dropped or (every > 0 and epoch % every == 0):
        return ""

    if subset.enable_wildcard:
        caption = _expand_wildcards(caption, rng)
    else:
        caption = caption.split("\n")[0]

    warmup = warmup_step_count(subset.token_warmup_step, max_steps)
    if subset.shuffle_caption or warmup > 0 or subset.caption_tag_dropout_rate > 0:
        fixed, flex, suffix = _split_tokens(caption, subset)
        if warmup and step < warmup:
            # grow the number of flexible tags linearly from token_warmup_min to all of them
            n = floor_scaled(step, len(flex) - subset.token_warmup_min, warmup) + subset.token_warmup_min
            flex = flex[:n]
        if subset.shuffle_caption:
            rng.shuffle(flex)
        if subset.caption_tag_dropout_rate > 0:
            flex = [t for t in flex if rng.random() >= subset.caption_tag_dropout_rate]
        caption = ", ".join(fixed + flex + suffix)

    if subset.secondary_separator:
        caption = caption.replace(subset.secondary_separator, subset.caption_separator)
    return caption

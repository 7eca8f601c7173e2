"""Block-wise ranks and learning rates (kohya's ``block_dims`` / ``down_lr_weight`` & co.).

kohya numbers the UNet's blocks for these options:

* SD1/SD2 (25 blocks): 0 = (unused: conv_in), 1..12 = down blocks (``3 * block + layer``; the
  downsampler is ``3 * block + 2``), 12 = mid block, 13..24 = up blocks the same way.
  ``down_lr_weight`` / ``up_lr_weight`` have 12 entries, ``mid_lr_weight`` 1.
* SDXL (23 blocks): 0 = time/label embedding, 1..9 = ``input_blocks.0..8``, 10..12 =
  ``middle_block.0..2``, 13..21 = ``output_blocks.0..8``, 22 = ``out``; the lr weights have 9 / 3 / 9
  entries and blocks 0 and 22 always get 1.0.
"""

from __future__ import annotations

import logging
import math
import re

from library.errors import ConfigError
from networks.lora_args import SOURCE

logger = logging.getLogger(__name__)

SD_NUM_BLOCKS, SD_NUM_MID = 12, 1
SDXL_NUM_BLOCKS, SDXL_NUM_MID = 9, 3

_RE_UPDOWN = re.compile(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_")


def num_blocks(is_sdxl: bool) -> int:
    """Length of ``block_dims`` / ``block_alphas``: 25 (SD1/SD2) or 23 (SDXL)."""
    return 1 + SDXL_NUM_BLOCKS * 2 + SDXL_NUM_MID + 1 if is_sdxl else SD_NUM_BLOCKS * 2 + SD_NUM_MID


def block_index(lora_name: str, is_sdxl: bool) -> int:
    """kohya's block number of a UNet LoRA name; -1 if it has none (text encoder)."""
    if not is_sdxl:
        m = _RE_UPDOWN.search(lora_name)
        if m:
            updown, i, kind, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
            idx = 3 * i + 2 if kind in ("upsamplers", "downsamplers") else 3 * i + j
            return 1 + idx if updown == "down" else SD_NUM_BLOCKS + 1 + idx
        return SD_NUM_BLOCKS if "mid_block_" in lora_name else -1
    if not lora_name.startswith("lora_unet_"):
        return -1
    name = lora_name[len("lora_unet_") :]
    if name.startswith(("time_embed_", "label_emb_")):
        return 0
    for prefix, base in (("input_blocks_", 1), ("middle_block_", 10), ("output_blocks_", 13)):
        if name.startswith(prefix):
            return base + int(name.split("_")[2])
    return 22 if name.startswith("out_") else -1


def _preset(spec: str, n: int) -> list[float]:
    name, _, base_s = spec.partition("+")
    base = float(base_s) if base_s else 0.0
    ramp = [i / (n - 1) for i in range(n)]
    if name == "cosine":
        return [math.sin(math.pi * r / 2) + base for r in reversed(ramp)]
    if name == "sine":
        return [math.sin(math.pi * r / 2) + base for r in ramp]
    if name == "linear":
        return [r + base for r in ramp]
    if name == "reverse_linear":
        return [r + base for r in reversed(ramp)]
    if name == "zeros":
        return [base] * n
    raise ConfigError(f"unknown lr weight preset {name!r}; valid: cosine, sine, linear, reverse_linear, zeros", source=SOURCE)


def _weights(spec: str | None, n: int, key: str, allow_preset: bool) -> list[float] | None:
    if spec is None:
        return None
    if "," in spec or not allow_preset:
        try:
            values = [float(s) if s.strip() else 0.0 for s in spec.split(",")]
        except ValueError:
            raise ConfigError(f"{key}={spec!r}: expected comma-separated numbers", source=SOURCE) from None
    else:
        values = _preset(spec, n)
    if len(values) > n:
        logger.warning("%s has %d values; only the first %d are used", key, len(values), n)
        values = values[:n]
    elif len(values) < n:
        logger.warning("%s has %d values; the missing %d are 1.0", key, len(values), n - len(values))
        values = values + [1.0] * (n - len(values))
    return values


def block_lr_weights(is_sdxl: bool, down: str | None, mid: str | None, up: str | None, zero_threshold: float) -> list[float] | None:
    """Per-block lr multipliers (length :func:`num_blocks`), or ``None`` when none of the options is set."""
    if down is None and mid is None and up is None:
        return None
    n, n_mid = (SDXL_NUM_BLOCKS, SDXL_NUM_MID) if is_sdxl else (SD_NUM_BLOCKS, SD_NUM_MID)
    parts = []
    for spec, count, key, preset in ((down, n, "down_lr_weight", True), (mid, n_mid, "mid_lr_weight", False), (up, n, "up_lr_weight", True)):
        w = _weights(spec, count, key, preset)
        parts += [1.0] * count if w is None else [x if x > zero_threshold else 0.0 for x in w]
    return [1.0] + parts + [1.0] if is_sdxl else parts


def block_dims_and_alphas(
    is_sdxl: bool,
    block_dims: list[int] | None,
    block_alphas: list[float] | None,
    network_dim: int,
    network_alpha: float,
    conv_block_dims: list[int] | None,
    conv_block_alphas: list[float] | None,
    conv_dim: int | None,
    conv_alpha: float | None,
) -> tuple[list[int], list[float], list[int] | None, list[float] | None]:
    """Full per-block rank/alpha lists for linear and conv LoRA (defaults filled from the global values)."""
    n = num_blocks(is_sdxl)
    problems = []
    for key, value in (("block_dims", block_dims), ("block_alphas", block_alphas), ("conv_block_dims", conv_block_dims), ("conv_block_alphas", conv_block_alphas)):
        if value is not None and len(value) != n:
            problems.append(f"{key} needs {n} values for {'SDXL' if is_sdxl else 'SD1/SD2'}, got {len(value)}")
    if problems:
        raise ConfigError(problems, source=SOURCE)
    dims = list(block_dims) if block_dims is not None else [network_dim] * n
    alphas = list(block_alphas) if block_alphas is not None else [network_alpha] * n
    if conv_block_dims is not None:
        conv_dims: list[int] | None = list(conv_block_dims)
        conv_alphas: list[float] | None = list(conv_block_alphas) if conv_block_alphas is not None else [conv_alpha or 1.0] * n
    elif conv_dim is not None:
        conv_dims, conv_alphas = [conv_dim] * n, [conv_alpha if conv_alpha is not None else 1.0] * n
    else:
        conv_dims = conv_alphas = None
    return dims, alphas, conv_dims, conv_alphas

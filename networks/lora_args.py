"""``--network_args`` for ``networks.lora``: declared once, typed, validated all at once.

kohya passes ``--network_args "conv_dim=4" "conv_alpha=1"`` to ``create_network`` as string keyword
arguments and converts each where it is used; a typo is silently ignored there. Here every key is
declared with its type and range; unknown keys and bad values are reported together in one
:class:`~library.errors.ConfigError` that lists the valid keys.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping

from library.errors import ConfigError

SOURCE = "--network_args (networks.lora)"


def _float(v: Any) -> float:
    return float(v)


def _int(v: Any) -> int:
    if isinstance(v, float) and not v.is_integer():
        raise ValueError(v)
    return int(str(v).strip()) if isinstance(v, str) else int(v)


def _probability(v: Any) -> float:
    p = float(v)
    if not 0.0 <= p < 1.0:
        raise ValueError(v)
    return p


def _positive_int(v: Any) -> int:
    i = _int(v)
    if i <= 0:
        raise ValueError(v)
    return i


def _positive_float(v: Any) -> float:
    f = float(v)
    if f <= 0:
        raise ValueError(v)
    return f


def _csv(kind: Callable[[str], Any]) -> Callable[[Any], list]:
    def parse(v: Any) -> list:
        items = v if isinstance(v, (list, tuple)) else str(v).split(",")
        return [kind(str(s).strip()) for s in items]

    return parse


def _str(v: Any) -> str:
    return str(v).strip()


@dataclass
class LoRAArgs:
    """Typed ``--network_args`` of ``networks.lora`` (names and meanings as kohya's)."""

    conv_dim: int | None = None
    conv_alpha: float | None = None
    rank_dropout: float | None = None
    module_dropout: float | None = None
    dropout: float | None = None  # kohya's trainer injects the neuron dropout under this name
    block_dims: list[int] | None = None
    block_alphas: list[float] | None = None
    conv_block_dims: list[int] | None = None
    conv_block_alphas: list[float] | None = None
    down_lr_weight: str | None = None
    mid_lr_weight: str | None = None
    up_lr_weight: str | None = None
    block_lr_zero_threshold: float | None = None
    loraplus_lr_ratio: float | None = None
    loraplus_unet_lr_ratio: float | None = None
    loraplus_text_encoder_lr_ratio: float | None = None


# key -> (parser, human description of valid values)
_PARSERS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "conv_dim": (_positive_int, "a positive integer (rank of the 3x3-conv LoRA, LoCon)"),
    "conv_alpha": (_float, "a number (alpha of the conv LoRA; default 1)"),
    "rank_dropout": (_probability, "a probability in [0, 1)"),
    "module_dropout": (_probability, "a probability in [0, 1)"),
    "dropout": (_probability, "a probability in [0, 1) (same as --network_dropout)"),
    "block_dims": (_csv(_int), "comma-separated integers, one per block"),
    "block_alphas": (_csv(_float), "comma-separated numbers, one per block"),
    "conv_block_dims": (_csv(_int), "comma-separated integers, one per block"),
    "conv_block_alphas": (_csv(_float), "comma-separated numbers, one per block"),
    "down_lr_weight": (_str, "comma-separated numbers or a preset (cosine, sine, linear, reverse_linear, zeros)[+base]"),
    "mid_lr_weight": (_str, "comma-separated numbers"),
    "up_lr_weight": (_str, "comma-separated numbers or a preset (cosine, sine, linear, reverse_linear, zeros)[+base]"),
    "block_lr_zero_threshold": (_float, "a number"),
    "loraplus_lr_ratio": (_positive_float, "a positive number (LoRA+ lr ratio of lora_up)"),
    "loraplus_unet_lr_ratio": (_positive_float, "a positive number"),
    "loraplus_text_encoder_lr_ratio": (_positive_float, "a positive number"),
}

# Keys kohya's trainer may pass for every module; None means "not set".
VALID_KEYS = tuple(f.name for f in fields(LoRAArgs))

# Keys that belong to other network modules: a better hint than "unknown".
_FOREIGN_HINTS = {
    "algo": "LyCORIS (use --network_module lycoris.kohya)",
    "preset": "LyCORIS (use --network_module lycoris.kohya)",
    "factor": "LyCORIS LoKr (use --network_module lycoris.kohya)",
    "use_tucker": "LyCORIS (use --network_module lycoris.kohya)",
    "use_scalar": "LyCORIS (use --network_module lycoris.kohya)",
    "train_norm": "LyCORIS (use --network_module lycoris.kohya)",
}


def parse_network_args(kwargs: Mapping[str, Any]) -> LoRAArgs:
    """Type and check ``kwargs`` (strings from ``--network_args`` or typed values from TOML).

    ``None`` values mean "not given" (kohya's trainer passes ``dropout=None``).

    Raises:
        ConfigError: listing every unknown key or bad value, and the valid keys.
    """
    problems: list[str] = []
    values: dict[str, Any] = {}
    for key, raw in kwargs.items():
        if key not in _PARSERS:
            hint = f" — it is an argument of {_FOREIGN_HINTS[key]}" if key in _FOREIGN_HINTS else ""
            problems.append(f"unknown key {key!r}{hint}")
            continue
        if raw is None:
            continue
        parser, wanted = _PARSERS[key]
        try:
            values[key] = parser(raw)
        except (TypeError, ValueError):
            problems.append(f"{key}={raw!r} is invalid: expected {wanted}")
    if problems:
        problems.append("valid keys: " + ", ".join(VALID_KEYS))
        raise ConfigError(problems, source=SOURCE)
    return LoRAArgs(**values)

"""Learning-rate schedulers with kohya's names (``--lr_scheduler``) and warmup semantics.

Covers constant, constant_with_warmup, linear and cosine (plus cosine_with_restarts and
polynomial, which cost nothing extra); #6 adds the rest. The scheduler steps once per
optimizer step, whatever the number of processes, so a run's LR curve does not depend on it.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR

from library.errors import ConfigError

SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


def resolve_steps(value: int | float | None, total: int) -> int:
    """kohya's int-or-ratio: a float below 1 is a fraction of ``total`` steps."""
    if value is None:
        return 0
    if isinstance(value, float) and value < 1:
        return int(value * total)
    return int(value)


def lr_lambda(name: str, warmup: int, total: int, num_cycles: int = 1, power: float = 1.0) -> Callable[[int], float]:
    """The LR multiplier at optimizer step ``s`` (0-based), the formulas of diffusers/transformers."""
    if name not in SCHEDULERS:
        raise ConfigError(f"--lr_scheduler {name!r} is not supported; choose one of {', '.join(SCHEDULERS)}")

    def f(step: int) -> float:
        if name == "constant":
            return 1.0
        if step < warmup:
            return float(step) / float(max(1, warmup))
        if name == "constant_with_warmup":
            return 1.0
        progress = float(step - warmup) / float(max(1, total - warmup))
        if name == "linear":
            return max(0.0, 1.0 - progress)
        if name == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        if name == "cosine_with_restarts":
            if progress >= 1.0:
                return 0.0
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(num_cycles) * progress) % 1.0))))
        # polynomial decay to 0 (diffusers' lr_end default 1e-7 relative is negligible)
        return max(0.0, 1.0 - progress) ** power

    return f


def build_lr_scheduler(optimizer: torch.optim.Optimizer, name: str, total_steps: int,
                       warmup_steps: int | float | None = 0, num_cycles: int = 1,
                       power: float = 1.0) -> LambdaLR:
    """A ``LambdaLR`` implementing ``name`` over ``total_steps`` optimizer steps."""
    name = (name or "constant").lower()
    warmup = resolve_steps(warmup_steps, total_steps)
    if name == "constant" and warmup:
        # kohya warns and ignores warmup for "constant"; be explicit instead of silently different
        raise ConfigError("--lr_warmup_steps needs --lr_scheduler constant_with_warmup (or another scheduler "
                          "with warmup); 'constant' has no warmup")
    return LambdaLR(optimizer, lr_lambda(name, warmup, total_steps, num_cycles or 1, power or 1.0))

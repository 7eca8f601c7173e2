"""The memory figure printed before training: what the trained weights will cost on the device.

Parameters (trained and frozen, by dtype), their gradients (none held with
``--fused_backward_pass``: one tensor at a time), the optimizer state (estimated per optimizer
family: it is created at the first step) and an EMA copy. Activations are not included: they
depend on the batch, resolution and ``--gradient_checkpointing``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Iterable

import torch

# optimizer state in bytes per trained element, by optimizer family (first match of the lower-cased name)
_STATE_BYTES = (("8bit", 2.0), ("adafactor", 0.1), ("lion", 4.0), ("sgd", 4.0), ("prodigy", 16.0),
                ("dadapt", 12.0), ("adam", 8.0))


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def state_bytes_per_element(optimizer_type: str | None) -> float:
    name = (optimizer_type or "AdamW").lower()
    return next((b for key, b in _STATE_BYTES if key in name), 8.0)


def memory_plan(trained: Iterable[torch.nn.Parameter], frozen: Iterable[torch.Tensor], optimizer_type: str | None,
                fused: bool, ema: bool, grad_groups: int = 1) -> dict[str, Any]:
    """``{"weights": {dtype: bytes}, "gradients": bytes, "optimizer": bytes, "ema": bytes, "total": bytes}``."""
    weights: dict[str, int] = defaultdict(int)
    trained = list(trained)
    seen = {id(p) for p in trained}
    for p in trained:
        weights[f"trained {str(p.dtype).removeprefix('torch.')}"] += p.numel() * p.element_size()
    for t in frozen:
        if id(t) not in seen:
            weights[f"frozen {str(t.dtype).removeprefix('torch.')}"] += t.numel() * t.element_size()
    n = sum(p.numel() for p in trained)
    # --fused_optimizer_groups: about one group's gradients are held at a time
    grads = 0 if fused else math.ceil(sum(p.numel() * p.element_size() for p in trained) / grad_groups)
    plan = {"weights": dict(weights), "gradients": grads, "optimizer": int(n * state_bytes_per_element(optimizer_type)),
            "ema": 4 * n if ema else 0, "trained_elements": n}
    plan["total"] = sum(weights.values()) + grads + plan["optimizer"] + plan["ema"]
    return plan


def describe(plan: dict[str, Any]) -> str:
    """One line for the log."""
    parts = [f"{k} {_gib(v)}" for k, v in sorted(plan["weights"].items())]
    parts += [f"gradients {_gib(plan['gradients'])}", f"optimizer state ~{_gib(plan['optimizer'])}"]
    if plan["ema"]:
        parts.append(f"EMA {_gib(plan['ema'])}")
    return (f"memory before activations: ~{_gib(plan['total'])} ({plan['trained_elements'] / 1e6:.1f} M trained "
            f"parameters; " + ", ".join(parts) + ")")

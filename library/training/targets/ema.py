"""``--ema``: an exponential moving average of the trained weights (sdtk; kohya's scripts have none).

After every optimizer step ``ema = decay * ema + (1 - decay) * weight``, in float32, on the
weights' device (one extra float32 copy of the trained weights). The EMA weights are what saves
write and what samples are rendered with; the raw weights keep training. A state holds both, so a
resume continues the average exactly.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


class EmaWeights:
    """The moving average of ``params`` (name -> parameter)."""

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float):
        self.decay = decay
        self.params = params
        self.shadow = {k: p.detach().to(torch.float32).clone() for k, p in params.items()}

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step towards the current weights."""
        names = list(self.params)
        shadow = [self.shadow[k] for k in names]
        current = [self.params[k].detach().to(torch.float32) for k in names]
        torch._foreach_lerp_(shadow, current, 1.0 - self.decay)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The EMA weights in place of the trained ones for the duration (saving, sampling)."""
        saved = {k: p.data for k, p in self.params.items()}
        try:
            for k, p in self.params.items():
                p.data = self.shadow[k] if p.dtype == torch.float32 else self.shadow[k].to(p.dtype)
            yield
        finally:
            for k, p in self.params.items():
                p.data = saved[k]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> list[str]:
        """Restore; returns the names missing from ``sd``."""
        missing = [k for k in self.shadow if k not in sd]
        for k in self.shadow:
            if k in sd:
                self.shadow[k].copy_(sd[k])
        return missing

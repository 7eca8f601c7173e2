"""Evenly spaced samples of a tensor's elements, for cheap fingerprints of model weights."""

from __future__ import annotations

import torch


def sample_positions(n: int, k: int = 64) -> torch.Tensor:
    """``min(n, k)`` evenly spaced indices into ``range(n)``, first and last included, as int64.

    Computed in integer arithmetic: a float32 ``linspace`` cannot represent every index above
    2**24 and rounds the last one up to ``n`` (49,408 x 768 token embeddings crashed that way).
    """
    k = min(n, k)
    if k <= 1:
        return torch.zeros(k, dtype=torch.int64)
    return torch.arange(k, dtype=torch.int64) * (n - 1) // (k - 1)


def sample_elements(t: torch.Tensor, k: int = 64) -> torch.Tensor:
    """``k`` evenly spaced elements of ``t`` (flattened), on ``t``'s device and in its dtype."""
    flat = t.detach().reshape(-1)
    return flat[sample_positions(flat.numel(), k).to(flat.device)]

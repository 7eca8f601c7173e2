"""The loss of a training step: elementwise loss, masks, per-sample weights (prior, min-SNR).

Each feature is a small function so it can be checked against its reference formula.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str = "l2") -> torch.Tensor:
    """Unreduced loss ``[B, C, H, W]`` in float32. #6 adds huber / smooth_l1 with their schedules."""
    pred, target = pred.float(), target.float()
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none")
    raise ValueError(f"loss_type {loss_type!r} is not supported here; use l2 or l1")


def apply_masks(loss: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Masked loss: ``masks`` ``[B, H, W]`` in [0, 1] (image resolution) resized to the loss's ``[h, w]``.

    Like kohya, the mask is downsampled with area interpolation and multiplies the loss.
    """
    m = masks.to(loss).unsqueeze(1)
    if m.shape[-2:] != loss.shape[-2:]:
        m = F.interpolate(m, size=loss.shape[-2:], mode="area")
    return loss * m


def min_snr_weight(snr: torch.Tensor, gamma: float, v_prediction: bool) -> torch.Tensor:
    """Min-SNR-gamma weights ``[B]``: ``min(snr, gamma) / snr`` (epsilon) or ``/ (snr + 1)`` (v-prediction)."""
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1.0) if v_prediction else clipped / snr


def reduce_loss(loss: torch.Tensor, loss_weights: torch.Tensor | None = None,
                snr_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over C, H, W, then the per-sample weights, then the batch mean (a scalar)."""
    per_sample = loss.mean(dim=(1, 2, 3))
    if loss_weights is not None:
        per_sample = per_sample * loss_weights.to(per_sample)
    if snr_weights is not None:
        per_sample = per_sample * snr_weights.to(per_sample)
    return per_sample.mean()


def prior_loss_weights(is_reg: torch.Tensor, base_weights: torch.Tensor | None, prior_loss_weight: float) -> torch.Tensor:
    """Per-sample weights ``[B]``: ``prior_loss_weight`` for regularisation images, 1 (or the dataset's weight) otherwise."""
    w = torch.ones(is_reg.shape[0]) if base_weights is None else base_weights.float().clone()
    return torch.where(is_reg.bool().cpu(), torch.full_like(w, float(prior_loss_weight)), w.cpu())

"""The loss of a training step: elementwise loss, masks, per-sample weights (prior, SNR-based).

Each feature is a small function so it can be checked against its reference formula (kohya's
``conditional_loss``, ``get_huber_threshold_if_needed`` and ``custom_train_functions``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")

# kohya limits the SNR to 1000 in the v-pred-like and debiased weights (SNR is huge at t = 0)
_SNR_CAP = 1000.0
# zero terminal SNR makes SNR exactly 0 at the last timestep; divide by this floor instead of 0
_SNR_FLOOR = 1e-8


def huber_c_per_sample(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, schedule: str, huber_c: float,
                       huber_scale: float = 1.0) -> torch.Tensor:
    """The Huber parameter ``c`` for each sample, ``[B]`` float32 (kohya's schedules).

    * constant: ``huber_c * huber_scale``;
    * exponential: ``huber_scale * exp(-alpha * t)`` with ``alpha = -ln(huber_c) / T``, i.e. from
      ``huber_scale`` at t = 0 down to ``huber_c * huber_scale`` at t = T;
    * snr: ``(1 - huber_c) / (1 + sigma_t)**2 + huber_c`` with ``sigma_t = sqrt((1 - a_t) / a_t)``
      (kohya does not apply ``huber_scale`` here).
    """
    t = timesteps.cpu()
    if schedule == "constant":
        return torch.full((t.shape[0],), float(huber_c) * float(huber_scale))
    if schedule == "exponential":
        alpha = -math.log(huber_c) / len(alphas_cumprod)
        return torch.exp(-alpha * t.float()) * float(huber_scale)
    if schedule == "snr":
        a = alphas_cumprod.cpu().float()[t]
        sigmas = ((1.0 - a) / a) ** 0.5
        return (1.0 - huber_c) / (1.0 + sigmas) ** 2 + huber_c
    raise ValueError(f"huber_schedule {schedule!r} is not one of {', '.join(HUBER_SCHEDULES)}")


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str = "l2",
                     huber_c: torch.Tensor | None = None) -> torch.Tensor:
    """Unreduced loss ``[B, C, H, W]`` in float32.

    Args:
        pred, target: ``[B, C, H, W]``.
        loss_type: l2 (squared error), l1, huber (``2c (sqrt(d^2 + c^2) - c)``, pseudo-Huber) or
            smooth_l1 (``2 (sqrt(d^2 + c^2) - c)``), as kohya.
        huber_c: ``[B]`` from :func:`huber_c_per_sample` (huber and smooth_l1 only).
    """
    pred, target = pred.float(), target.float()
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none")
    if loss_type in ("huber", "smooth_l1"):
        if huber_c is None:
            raise ValueError(f"loss_type {loss_type} needs huber_c")
        c = huber_c.to(pred).view(-1, 1, 1, 1)
        smooth = torch.sqrt((pred - target) ** 2 + c**2) - c
        return 2.0 * c * smooth if loss_type == "huber" else 2.0 * smooth
    raise ValueError(f"loss_type {loss_type!r} is not one of {', '.join(LOSS_TYPES)}")


def apply_masks(loss: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Masked loss: ``masks`` ``[B, H, W]`` in [0, 1] (image resolution) resized to the loss's ``[h, w]``.

    Like kohya, the mask is downsampled with area interpolation and multiplies the loss.
    """
    m = masks.to(loss).unsqueeze(1)
    if m.shape[-2:] != loss.shape[-2:]:
        m = F.interpolate(m, size=loss.shape[-2:], mode="area")
    return loss * m


def min_snr_weight(snr: torch.Tensor, gamma: float, v_prediction: bool) -> torch.Tensor:
    """Min-SNR-gamma weights ``[B]``: ``min(snr, gamma) / snr`` (epsilon) or ``/ (snr + 1)`` (v-prediction).

    At SNR 0 (the last timestep with ``--zero_terminal_snr``) the epsilon weight is its limit, 1,
    where kohya's division gives NaN.
    """
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1.0) if v_prediction else clipped.clamp(min=_SNR_FLOOR) / snr.clamp(min=_SNR_FLOOR)


def v_pred_scale(snr: torch.Tensor) -> torch.Tensor:
    """kohya's ``get_snr_scale``: ``s / (s + 1)`` with ``s = min(snr, 1000)``, ``[B]``."""
    s = torch.clamp(snr, max=_SNR_CAP)
    return s / (s + 1.0)


def v_pred_like_weight(snr: torch.Tensor, v_pred_like_loss: float) -> torch.Tensor:
    """``--v_pred_like_loss``: kohya's ``loss + loss / scale * w`` as a factor ``1 + w / scale``, ``[B]``."""
    return 1.0 + float(v_pred_like_loss) / v_pred_scale(snr).clamp(min=_SNR_FLOOR)


def debiased_weight(snr: torch.Tensor, v_prediction: bool) -> torch.Tensor:
    """``--debiased_estimation_loss``: ``1 / sqrt(s)`` (epsilon) or ``1 / (s + 1)`` (v-prediction),
    ``s = min(snr, 1000)``, ``[B]``."""
    s = torch.clamp(snr, max=_SNR_CAP)
    return 1.0 / (s + 1.0) if v_prediction else 1.0 / torch.sqrt(s.clamp(min=_SNR_FLOOR))


def snr_weights(snr: torch.Tensor, *, v_prediction: bool, min_snr_gamma: float | None = None,
                scale_v_pred_loss_like_noise_pred: bool = False, v_pred_like_loss: float | None = None,
                debiased_estimation_loss: bool = False) -> torch.Tensor | None:
    """The product of kohya's per-sample loss weights (its ``post_process_loss``, in its order), ``[B]``.

    Every weight multiplies the per-sample loss, so applying them in sequence equals applying
    their product. Returns None when no option is active.
    """
    w = None

    def mul(x: torch.Tensor) -> torch.Tensor:
        return x if w is None else w * x

    if min_snr_gamma:
        w = mul(min_snr_weight(snr, min_snr_gamma, v_prediction))
    if scale_v_pred_loss_like_noise_pred:
        w = mul(v_pred_scale(snr))
    if v_pred_like_loss:
        w = mul(v_pred_like_weight(snr, v_pred_like_loss))
    if debiased_estimation_loss:
        w = mul(debiased_weight(snr, v_prediction))
    return w


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

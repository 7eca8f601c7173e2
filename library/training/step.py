"""The maths of one training step from the parsed flags: noise, timesteps, noisy input, loss.

:meth:`library.training.trainer.NetworkTrainer.compute_loss` (and the validation loss) call
these two functions, so every loss/noise flag is handled in one place, in kohya's order
(``get_noise_noisy_latents_and_timesteps``, ``conditional_loss``, ``post_process_loss``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from library.errors import ConfigError
from library.training import loss as L
from library.training import noise as N

logger = logging.getLogger(__name__)


def check_loss_and_noise_args(a: Any) -> list[str]:
    """kohya's combination rules for the loss/noise flags (problems, empty when fine)."""
    problems = []
    if getattr(a, "noise_offset", None) and getattr(a, "multires_noise_iterations", None):
        problems.append("--noise_offset and --multires_noise_iterations cannot be used together (kohya's rule); "
                        "choose one")
    if getattr(a, "adaptive_noise_scale", None) and not getattr(a, "noise_offset", None):
        problems.append("--adaptive_noise_scale needs --noise_offset")
    lo, hi = getattr(a, "min_timestep", None), getattr(a, "max_timestep", None)
    if lo is not None and hi is not None and lo > hi:
        problems.append(f"--min_timestep {lo} is larger than --max_timestep {hi}")
    if getattr(a, "huber_schedule", None) == "exponential" and (getattr(a, "huber_c", 0.1) or 0) >= 1:
        problems.append("--huber_schedule exponential needs --huber_c below 1 (it decays from 1 to huber_c)")
    v_param = bool(getattr(a, "v_parameterization", False))
    # kohya's warnings: these settings are meant for v-prediction (or epsilon) models
    if getattr(a, "zero_terminal_snr", False) and not v_param:
        logger.warning("--zero_terminal_snr without --v_parameterization: an epsilon model cannot predict pure "
                       "noise at the last timestep; results may be unexpected")
    if getattr(a, "scale_v_pred_loss_like_noise_pred", False) and not v_param:
        logger.warning("--scale_v_pred_loss_like_noise_pred is meant for v-prediction (--v_parameterization)")
    if getattr(a, "v_pred_like_loss", None) and v_param:
        logger.warning("--v_pred_like_loss is meant for epsilon-prediction models, not --v_parameterization")
    return problems


def noise_and_timesteps(a: Any, alphas_cumprod: torch.Tensor, latents: torch.Tensor, gens: list[torch.Generator],
                        fixed_timestep: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The target noise, the noisy latents and the timesteps of a batch.

    Args:
        a: parsed flags (noise_offset, adaptive_noise_scale, multires_noise_*, min/max_timestep,
            ip_noise_gamma, ...).
        alphas_cumprod: ``[T]`` of the training schedule.
        latents: ``[B, C, H, W]`` scaled latents.
        gens: one generator per sample (all randomness is drawn from them).
        fixed_timestep: use this timestep for every sample (the validation loss), else sample.

    Returns:
        ``(noise, noisy_latents, timesteps)``: ``[B, C, H, W]``, ``[B, C, H, W]``, ``[B]`` long.
    """
    noise = N.make_noise(latents, gens, a.noise_offset, bool(a.noise_offset_random_strength),
                         getattr(a, "adaptive_noise_scale", None), getattr(a, "multires_noise_iterations", None),
                         getattr(a, "multires_noise_discount", 0.3) or 0.3)
    if fixed_timestep is None:
        timesteps = N.sample_timesteps(gens, a.min_timestep, a.max_timestep, len(alphas_cumprod))
    else:
        timesteps = torch.full((latents.shape[0],), int(fixed_timestep), dtype=torch.long)
    timesteps = timesteps.to(latents.device)
    noise_in = N.input_perturbation(noise, gens, getattr(a, "ip_noise_gamma", None),
                                    bool(getattr(a, "ip_noise_gamma_random_strength", False)))
    return noise, N.add_noise(alphas_cumprod, latents, noise_in, timesteps), timesteps


def loss_mask(batch: dict[str, Any], masked_loss: bool) -> torch.Tensor | None:
    """kohya's mask: the R channel of mask images (``conditioning_images``, [-1, 1] -> [0, 1]) or
    the alpha masks, ``[B, H, W]``; used with ``--masked_loss`` or whenever alpha masks exist."""
    alpha, cond = batch.get("alpha_masks"), batch.get("conditioning_images")
    if not masked_loss and alpha is None:
        return None
    if cond is not None:
        return cond[:, 0].float() / 2 + 0.5
    return alpha


def step_loss(a: Any, pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor,
              alphas_cumprod: torch.Tensor, v_prediction: bool, batch: dict[str, Any], n_real: int,
              global_size: int) -> torch.Tensor:
    """This process's share of the global batch's weighted mean loss (a scalar with grad).

    Elementwise loss (``--loss_type`` with its Huber schedule), mask, per-sample mean, then the
    per-sample weights: prior/dataset weight and the SNR-based weights. Padding samples
    (``n_real`` onwards) weigh 0; the sum is divided by ``global_size``.
    """
    loss_type = a.loss_type or "l2"
    huber_c = None
    if loss_type in ("huber", "smooth_l1"):
        huber_c = L.huber_c_per_sample(timesteps, alphas_cumprod, a.huber_schedule or "snr",
                                       a.huber_c if a.huber_c is not None else 0.1,
                                       a.huber_scale if a.huber_scale is not None else 1.0)
    loss = L.elementwise_loss(pred, target, loss_type, huber_c)
    mask = loss_mask(batch, bool(a.masked_loss))
    if mask is not None:
        loss = L.apply_masks(loss, mask.to(loss.device))
    per_sample = loss.mean(dim=(1, 2, 3))
    weights = L.prior_loss_weights(batch["is_reg"], batch.get("loss_weights"), a.prior_loss_weight)
    like_noise = bool(getattr(a, "scale_v_pred_loss_like_noise_pred", False))
    extra = L.snr_weights(N.snr(alphas_cumprod, timesteps.cpu()), v_prediction=v_prediction,
                          min_snr_gamma=a.min_snr_gamma, scale_v_pred_loss_like_noise_pred=like_noise,
                          v_pred_like_loss=getattr(a, "v_pred_like_loss", None),
                          debiased_estimation_loss=bool(getattr(a, "debiased_estimation_loss", False)))
    if extra is not None:
        weights = weights * extra
    weights[n_real:] = 0.0  # padding samples of an uneven last batch
    return (per_sample * weights.to(per_sample)).sum() / global_size


def require_valid(a: Any) -> None:
    """Raise :class:`ConfigError` listing every problem of :func:`check_loss_and_noise_args`."""
    problems = check_loss_and_noise_args(a)
    if problems:
        raise ConfigError(problems)

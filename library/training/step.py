"""The maths of one training step from the noise and loss settings: noise, timesteps, noisy input, loss.

:meth:`library.training.trainer.NetworkTrainer.compute_loss` (and the validation loss) call
these two functions, so every loss/noise flag is handled in one place, in kohya's order
(``get_noise_noisy_latents_and_timesteps``, ``conditional_loss``, ``post_process_loss``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from library.config.flags.rules import loss_and_noise_problems
from library.config.settings import LossSettings, NoiseSettings
from library.training import loss as L
from library.training import noise as N

logger = logging.getLogger(__name__)


def check_loss_and_noise_args(a: Any) -> list[str]:
    """kohya's combination rules for the loss/noise flags (problems, empty when fine).

    The rules live in :func:`library.config.flags.rules.loss_and_noise_problems` (run by
    ``parse_args``); this name stays for callers that check a namespace themselves.
    """
    return loss_and_noise_problems(a)


def noise_and_timesteps(a: NoiseSettings | Any, alphas_cumprod: torch.Tensor, latents: torch.Tensor, gens: list[torch.Generator],
                        fixed_timestep: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The target noise, the noisy latents and the timesteps of a batch.

    Args:
        a: the noise settings (or the parsed flags they are built from).
        alphas_cumprod: ``[T]`` of the training schedule.
        latents: ``[B, C, H, W]`` scaled latents.
        gens: one generator per sample (all randomness is drawn from them).
        fixed_timestep: use this timestep for every sample (the validation loss), else sample.

    Returns:
        ``(noise, noisy_latents, timesteps)``: ``[B, C, H, W]``, ``[B, C, H, W]``, ``[B]`` long.
    """
    a = NoiseSettings.of(a)
    noise = N.make_noise(latents, gens, a.noise_offset, bool(a.noise_offset_random_strength), a.adaptive_noise_scale,
                         a.multires_noise_iterations, a.multires_noise_discount)
    if fixed_timestep is None:
        timesteps = N.sample_timesteps(gens, a.min_timestep, a.max_timestep, len(alphas_cumprod))
    else:
        timesteps = torch.full((latents.shape[0],), int(fixed_timestep), dtype=torch.long)
    timesteps = timesteps.to(latents.device)
    noise_in = N.input_perturbation(noise, gens, a.ip_noise_gamma, bool(a.ip_noise_gamma_random_strength))
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


def step_loss(a: LossSettings | Any, pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor,
              alphas_cumprod: torch.Tensor, v_prediction: bool, batch: dict[str, Any], n_real: int,
              global_size: int) -> torch.Tensor:
    """This process's share of the global batch's weighted mean loss (a scalar with grad).

    Elementwise loss (``--loss_type`` with its Huber schedule), mask, per-sample mean, then the
    per-sample weights: prior/dataset weight and the SNR-based weights. Padding samples
    (``n_real`` onwards) weigh 0; the sum is divided by ``global_size``. ``a``: the loss settings
    (or the parsed flags they are built from).
    """
    a = LossSettings.of(a)
    huber_c = None
    if a.loss_type in ("huber", "smooth_l1"):
        huber_c = L.huber_c_per_sample(timesteps, alphas_cumprod, a.huber_schedule, a.huber_c, a.huber_scale)
    loss = L.elementwise_loss(pred, target, a.loss_type, huber_c)
    mask = loss_mask(batch, bool(a.masked_loss))
    if mask is not None:
        loss = L.apply_masks(loss, mask.to(loss.device))
    per_sample = loss.mean(dim=(1, 2, 3))
    weights = L.prior_loss_weights(batch["is_reg"], batch.get("loss_weights"), a.prior_loss_weight)
    extra = L.snr_weights(N.snr(alphas_cumprod, timesteps.cpu()), v_prediction=v_prediction,
                          min_snr_gamma=a.min_snr_gamma,
                          scale_v_pred_loss_like_noise_pred=bool(a.scale_v_pred_loss_like_noise_pred),
                          v_pred_like_loss=a.v_pred_like_loss, debiased_estimation_loss=bool(a.debiased_estimation_loss))
    if extra is not None:
        weights = weights * extra
    weights[n_real:] = 0.0  # padding samples of an uneven last batch
    return (per_sample * weights.to(per_sample)).sum() / global_size


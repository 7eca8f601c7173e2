"""Noise, timesteps and the noisy input: the forward-diffusion half of a training step.

Randomness is drawn per sample from generators seeded by (run seed, micro-step, global sample
index), not from a shared global stream. That makes a step's noise independent of everything
that happened before it (sampling images, resumes, data-loader workers) and of how the global
batch is split over processes: 2 processes x batch 1 draw exactly what 1 process x batch 2 draws.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

_MASK63 = (1 << 63) - 1


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (stable across runs, Python versions and platforms)."""
    data = b"".join(int(p).to_bytes(8, "little", signed=True) for p in parts)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") & _MASK63


def sample_generators(seed: int, micro_step: int, first_index: int, count: int) -> list[torch.Generator]:
    """One CPU generator per sample of this process's batch.

    Args:
        seed: the run seed.
        micro_step: global micro-step (forward/backward pass) counter.
        first_index: index of this process's first sample in the global batch.
        count: local batch size.
    """
    return [torch.Generator().manual_seed(derive_seed(seed, micro_step, first_index + i)) for i in range(count)]


def per_sample_randn(gens: list[torch.Generator], shape: tuple[int, ...], device, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise ``[len(gens), *shape]``, sample i drawn from ``gens[i]`` on the CPU."""
    out = torch.stack([torch.randn(shape, generator=g) for g in gens])
    return out.to(device=device, dtype=dtype, non_blocking=True)


def per_sample_rand(gens: list[torch.Generator]) -> torch.Tensor:
    """One uniform [0, 1) value per generator, shape ``[B]`` (CPU, float32)."""
    return torch.stack([torch.rand((), generator=g) for g in gens])


def sample_timesteps(gens: list[torch.Generator], min_timestep: int | None, max_timestep: int | None,
                     num_train_timesteps: int = 1000) -> torch.Tensor:
    """Uniform integer timesteps in ``[min_timestep, max_timestep)`` (kohya's defaults 0 and 1000), shape ``[B]``."""
    lo = 0 if min_timestep is None else int(min_timestep)
    hi = num_train_timesteps if max_timestep is None else int(max_timestep)
    if lo == hi:  # kohya allows min == max: a fixed timestep
        return torch.full((len(gens),), lo, dtype=torch.long)
    return torch.stack([torch.randint(lo, hi, (), generator=g) for g in gens]).long()


def apply_noise_offset(noise: torch.Tensor, offset: float, strengths: torch.Tensor | None,
                       offset_noise: torch.Tensor, latents: torch.Tensor | None = None,
                       adaptive_noise_scale: float | None = None) -> torch.Tensor:
    """kohya's noise offset: ``noise + o * n`` with ``n ~ N(0, 1)`` of shape ``[B, C, 1, 1]``.

    ``o`` is ``offset`` (times a uniform(0, 1) strength per sample with
    ``--noise_offset_random_strength``); with ``--adaptive_noise_scale`` kohya adds
    ``adaptive_noise_scale * |mean_{H,W}(latents)|`` per sample and channel and clamps at 0.

    Args:
        noise: ``[B, C, H, W]``.
        offset: ``--noise_offset``.
        strengths: ``[B]`` uniform(0, 1) factors when ``--noise_offset_random_strength``, else None.
        offset_noise: ``[B, C, 1, 1]`` standard normal values.
        latents: ``[B, C, H, W]``, needed with ``adaptive_noise_scale``.
        adaptive_noise_scale: ``--adaptive_noise_scale`` or None.
    """
    scale = torch.full((noise.shape[0],), float(offset)) if strengths is None else strengths * offset
    scale = scale.to(noise).view(-1, 1, 1, 1)
    if adaptive_noise_scale:
        if latents is None:
            raise ValueError("adaptive_noise_scale needs the latents")
        mean = latents.float().mean(dim=(2, 3), keepdim=True).abs().to(noise)  # [B, C, 1, 1]
        scale = torch.clamp(scale + adaptive_noise_scale * mean, min=0.0)
    return noise + scale * offset_noise.to(noise)


def pyramid_noise(noise: torch.Tensor, gens: list[torch.Generator], iterations: int,
                  discount: float) -> torch.Tensor:
    """kohya's multi-resolution ("pyramid") noise: add upscaled coarser noise levels, renormalise.

    For each level ``i`` = 0..iterations-1, a random ratio ``r`` in [2, 4) gives a normal draw of
    ``[C, max(1, int(H / r**i)), max(1, int(W / r**i))]``, bilinearly resized to ``[H, W]`` and
    weighted by ``discount**i``; the loop stops after a level of height or width 1. The sum is
    divided by its standard deviation.

    Deviation from kohya, on purpose: ``r``, the draws and the final standard deviation are per
    sample (kohya shares ``r`` and takes the std over the whole batch), so a sample's noise does
    not depend on the other samples of its batch; with batch size 1 the formula is kohya's.

    Args:
        noise: ``[B, C, H, W]`` base noise.
        gens: one generator per sample (``r`` and the level noise are drawn from them).
        iterations: ``--multires_noise_iterations``.
        discount: ``--multires_noise_discount``.
    """
    b, c, h, w = noise.shape
    out = []
    for k, g in enumerate(gens):
        x = noise[k : k + 1].float()
        for i in range(iterations):
            r = float(torch.rand((), generator=g)) * 2 + 2
            hn, wn = max(1, int(h / (r**i))), max(1, int(w / (r**i)))
            level = torch.randn((1, c, hn, wn), generator=g).to(x.device)
            x = x + F.interpolate(level, size=(h, w), mode="bilinear") * discount**i
            if hn == 1 or wn == 1:
                break
        out.append(x / x.std())
    return torch.cat(out).to(noise.dtype)


def make_noise(latents: torch.Tensor, gens: list[torch.Generator], noise_offset: float | None = None,
               noise_offset_random_strength: bool = False, adaptive_noise_scale: float | None = None,
               multires_noise_iterations: int | None = None, multires_noise_discount: float = 0.3) -> torch.Tensor:
    """Noise for ``latents`` ``[B, C, H, W]``: kohya's noise offset (optionally adaptive), then
    multi-resolution noise (kohya's order)."""
    b, c, h, w = latents.shape
    noise = per_sample_randn(gens, (c, h, w), latents.device, latents.dtype)
    if noise_offset:
        strengths = per_sample_rand(gens) if noise_offset_random_strength else None
        offset_noise = per_sample_randn(gens, (c, 1, 1), latents.device, latents.dtype)
        noise = apply_noise_offset(noise, noise_offset, strengths, offset_noise, latents, adaptive_noise_scale)
    if multires_noise_iterations:
        noise = pyramid_noise(noise, gens, int(multires_noise_iterations), float(multires_noise_discount))
    return noise


def input_perturbation(noise: torch.Tensor, gens: list[torch.Generator], gamma: float | None,
                       random_strength: bool = False) -> torch.Tensor:
    """``--ip_noise_gamma``: the noise that goes into the noisy latents, ``noise + s * n``.

    ``s`` is gamma, or uniform(0, gamma) per sample with ``--ip_noise_gamma_random_strength``
    (kohya draws one value per batch); ``n ~ N(0, 1)`` like ``noise``. The training target
    stays ``noise``. Returns ``noise`` itself when gamma is unset or 0.
    """
    if not gamma:
        return noise
    strengths = per_sample_rand(gens) * gamma if random_strength else torch.full((len(gens),), float(gamma))
    extra = per_sample_randn(gens, tuple(noise.shape[1:]), noise.device, noise.dtype)
    return noise + strengths.to(noise).view(-1, 1, 1, 1) * extra


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """``--zero_terminal_snr``: betas whose last timestep has SNR 0 (Lin et al. 2023, Algorithm 1).

    ``sqrt(alphas_cumprod)`` is shifted so its last value is 0 and scaled so its first value is
    unchanged; the betas are recovered from the new cumulative products.
    """
    sqrt_ac = torch.cumprod(1.0 - betas.double(), dim=0).sqrt()
    first, last = sqrt_ac[0].clone(), sqrt_ac[-1].clone()
    sqrt_ac = (sqrt_ac - last) * (first / (first - last))
    ac = sqrt_ac**2
    alphas = torch.cat([ac[:1], ac[1:] / ac[:-1]])
    return (1.0 - alphas).to(betas.dtype)


def training_alphas_cumprod(betas: torch.Tensor, zero_terminal_snr: bool = False) -> torch.Tensor:
    """The ``alphas_cumprod`` ``[T]`` (float32) of the training noise schedule."""
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return torch.cumprod(1.0 - betas.float(), dim=0)


def add_noise(alphas_cumprod: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor,
              timesteps: torch.Tensor) -> torch.Tensor:
    """``sqrt(a_t) * x0 + sqrt(1 - a_t) * noise`` (DDPM forward process), all ``[B, C, H, W]``."""
    a = alphas_cumprod.to(latents.device)[timesteps.to(latents.device)].to(torch.float32)
    sa = a.sqrt().view(-1, 1, 1, 1)
    s1a = (1.0 - a).sqrt().view(-1, 1, 1, 1)
    return (sa * latents.float() + s1a * noise.float()).to(latents.dtype)


def velocity(alphas_cumprod: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor,
             timesteps: torch.Tensor) -> torch.Tensor:
    """v-prediction target ``sqrt(a_t) * noise - sqrt(1 - a_t) * x0``, ``[B, C, H, W]``."""
    a = alphas_cumprod.to(latents.device)[timesteps.to(latents.device)].to(torch.float32)
    sa = a.sqrt().view(-1, 1, 1, 1)
    s1a = (1.0 - a).sqrt().view(-1, 1, 1, 1)
    return (sa * noise.float() - s1a * latents.float()).to(latents.dtype)


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ``a_t / (1 - a_t)`` per sample, ``[B]`` float32."""
    a = alphas_cumprod.to(timesteps.device)[timesteps].to(torch.float32)
    return a / (1.0 - a)

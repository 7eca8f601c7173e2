"""Noise, timesteps and the noisy input: the forward-diffusion half of a training step.

Randomness is drawn per sample from generators seeded by (run seed, micro-step, global sample
index), not from a shared global stream. That makes a step's noise independent of everything
that happened before it (sampling images, resumes, data-loader workers) and of how the global
batch is split over processes: 2 processes x batch 1 draw exactly what 1 process x batch 2 draws.
"""

from __future__ import annotations

import hashlib

import torch

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
                       offset_noise: torch.Tensor) -> torch.Tensor:
    """kohya's noise offset: ``noise + offset * n`` with ``n ~ N(0, 1)`` of shape ``[B, C, 1, 1]``.

    Args:
        noise: ``[B, C, H, W]``.
        offset: ``--noise_offset``.
        strengths: ``[B]`` uniform(0, 1) factors when ``--noise_offset_random_strength``, else None.
        offset_noise: ``[B, C, 1, 1]`` standard normal values.
    """
    scale = torch.full((noise.shape[0],), float(offset)) if strengths is None else strengths * offset
    return noise + scale.to(noise).view(-1, 1, 1, 1) * offset_noise.to(noise)


def make_noise(latents: torch.Tensor, gens: list[torch.Generator], noise_offset: float | None = None,
               noise_offset_random_strength: bool = False) -> torch.Tensor:
    """Noise for ``latents`` ``[B, C, H, W]``, with the optional kohya noise offset."""
    b, c, h, w = latents.shape
    noise = per_sample_randn(gens, (c, h, w), latents.device, latents.dtype)
    if noise_offset:
        strengths = per_sample_rand(gens) if noise_offset_random_strength else None
        offset_noise = per_sample_randn(gens, (c, 1, 1), latents.device, latents.dtype)
        noise = apply_noise_offset(noise, noise_offset, strengths, offset_noise)
    return noise


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

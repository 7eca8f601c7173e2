"""Noise and timestep options against independent computations (diffusers' zero-terminal-SNR
schedule, hand-written kohya formulas)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from library.training import noise as N
from library.training.step import check_loss_and_noise_args, noise_and_timesteps


def _gens(n: int, seed: int = 0) -> list[torch.Generator]:
    return N.sample_generators(seed, 0, 0, n)


def test_zero_terminal_snr_matches_diffusers():
    from diffusers import DDPMScheduler

    cfg = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    ref = DDPMScheduler(**cfg, rescale_betas_zero_snr=True).alphas_cumprod
    plain = DDPMScheduler(**cfg)
    ours = N.training_alphas_cumprod(plain.betas, zero_terminal_snr=True)
    assert torch.allclose(ours, ref, atol=1e-6)
    assert ours[-1].item() == pytest.approx(0.0, abs=1e-9)
    assert ours[0].item() == pytest.approx(plain.alphas_cumprod[0].item())
    assert torch.allclose(N.training_alphas_cumprod(plain.betas), plain.alphas_cumprod)


def test_adaptive_noise_offset_by_hand():
    torch.manual_seed(0)
    noise, latents = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8) + 0.5
    off = torch.randn(2, 4, 1, 1)
    got = N.apply_noise_offset(noise, 0.05, None, off, latents, 0.02)
    for b in range(2):
        for c in range(4):
            o = max(0.0, 0.05 + 0.02 * abs(latents[b, c].mean().item()))
            assert torch.allclose(got[b, c], noise[b, c] + o * off[b, c, 0, 0], atol=1e-6)
    # negative adaptive scale is clamped at zero offset
    got = N.apply_noise_offset(noise, 0.01, None, off, latents, -100.0)
    assert torch.equal(got, noise)


def _kohya_pyramid_one(noise: torch.Tensor, g: torch.Generator, iterations: int, discount: float) -> torch.Tensor:
    """kohya's pyramid_noise_like for one sample, drawing r and the levels from ``g`` in the same order."""
    _, c, h, w = noise.shape
    up = torch.nn.Upsample(size=(h, w), mode="bilinear")
    out = noise.clone()
    for i in range(iterations):
        r = torch.rand((), generator=g).item() * 2 + 2
        hn, wn = max(1, int(h / (r**i))), max(1, int(w / (r**i)))
        out += up(torch.randn(1, c, hn, wn, generator=g)) * discount**i
        if hn == 1 or wn == 1:
            break
    return out / out.std()


def test_pyramid_noise_matches_kohya_per_sample():
    base = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    got = N.pyramid_noise(base, _gens(3), 6, 0.3)
    ref = torch.cat([_kohya_pyramid_one(base[i : i + 1], g, 6, 0.3) for i, g in enumerate(_gens(3))])
    assert torch.allclose(got, ref, atol=1e-6)
    assert got[1].std().item() == pytest.approx(1.0, rel=1e-5)
    # a sample's noise does not depend on the rest of the batch
    alone = N.pyramid_noise(base[1:2], _gens(3)[1:2], 6, 0.3)
    assert torch.allclose(alone, got[1:2], atol=1e-6)


def _args(**kw):
    base = dict(noise_offset=None, noise_offset_random_strength=False, adaptive_noise_scale=None,
                multires_noise_iterations=None, multires_noise_discount=0.3, min_timestep=None, max_timestep=None,
                ip_noise_gamma=None, ip_noise_gamma_random_strength=False, huber_schedule="snr", huber_c=0.1)
    base.update(kw)
    return SimpleNamespace(**base)


def test_input_perturbation_changes_the_input_not_the_target():
    ac = torch.linspace(0.99, 0.01, 1000)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    noise0, noisy0, t0 = noise_and_timesteps(_args(), ac, latents, _gens(2))
    noise1, noisy1, t1 = noise_and_timesteps(_args(ip_noise_gamma=0.1), ac, latents, _gens(2))
    assert torch.equal(noise0, noise1) and torch.equal(t0, t1)
    # by hand: the extra noise is the next draw of each sample's generator after noise and timestep
    gens = _gens(2)
    for g in gens:
        torch.randn((4, 8, 8), generator=g), torch.randint(0, 1000, (), generator=g)
    extra = torch.stack([torch.randn((4, 8, 8), generator=g) for g in gens])
    a = ac[t1].view(-1, 1, 1, 1)
    expected = a.sqrt() * latents + (1 - a).sqrt() * (noise1 + 0.1 * extra)
    assert torch.allclose(noisy1, expected, atol=1e-6)
    assert not torch.allclose(noisy0, noisy1)
    _, noisy_r, _ = noise_and_timesteps(_args(ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True), ac, latents,
                                        _gens(2))
    d_fixed = (noisy1 - noisy0).abs().mean()
    d_rand = (noisy_r - noisy0).abs().mean()
    assert 0 < d_rand < d_fixed  # uniform(0, gamma) strengths are smaller than gamma


def test_fixed_and_bounded_timesteps():
    ac = torch.linspace(0.99, 0.01, 1000)
    latents = torch.zeros(64, 4, 2, 2)
    _, _, t = noise_and_timesteps(_args(min_timestep=200, max_timestep=300), ac, latents, _gens(64))
    assert t.min() >= 200 and t.max() < 300 and len(set(t.tolist())) > 10
    _, _, t = noise_and_timesteps(_args(), ac, latents, _gens(64), fixed_timestep=650)
    assert (t == 650).all()


def test_multires_noise_is_normalised_through_the_step():
    ac = torch.linspace(0.99, 0.01, 1000)
    latents = torch.zeros(2, 4, 16, 16)
    noise, _, _ = noise_and_timesteps(_args(multires_noise_iterations=4, multires_noise_discount=0.5), ac, latents,
                                      _gens(2))
    assert noise[0].std().item() == pytest.approx(1.0, rel=1e-5)


def test_combination_rules():
    assert check_loss_and_noise_args(_args()) == []
    problems = check_loss_and_noise_args(_args(noise_offset=0.1, multires_noise_iterations=6, min_timestep=500,
                                               max_timestep=100))
    assert any("multires" in p for p in problems) and any("--min_timestep" in p for p in problems)
    assert any("--noise_offset" in p for p in check_loss_and_noise_args(_args(adaptive_noise_scale=0.1)))
    assert check_loss_and_noise_args(_args(huber_schedule="exponential", huber_c=1.5))

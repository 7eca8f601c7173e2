"""Loss functions and per-sample weights against independent (scalar, loop-based) computations
of kohya's formulas."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from library.training import loss as L
from library.training import noise as N
from library.training.step import loss_mask, step_loss


def _alphas_cumprod(zero_terminal: bool = False) -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2  # SD's scaled_linear
    return N.training_alphas_cumprod(betas.float(), zero_terminal)


def test_huber_and_smooth_l1_elementwise():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    c = torch.tensor([0.1, 0.7])
    hub = L.elementwise_loss(pred, target, "huber", c)
    sl1 = L.elementwise_loss(pred, target, "smooth_l1", c)
    for b in range(2):
        for idx in [(0, 0, 0), (1, 2, 3), (2, 3, 1)]:
            d = float(pred[(b, *idx)] - target[(b, *idx)])
            cb = float(c[b])
            expected = 2 * cb * (math.sqrt(d * d + cb * cb) - cb)
            assert hub[(b, *idx)].item() == pytest.approx(expected, rel=1e-4, abs=1e-7)
            assert sl1[(b, *idx)].item() == pytest.approx(2 * (math.sqrt(d * d + cb * cb) - cb), rel=1e-4, abs=1e-7)
    # pseudo-Huber is ~ squared error for small residuals and ~ linear for large ones
    small = L.elementwise_loss(torch.full((1, 1, 1, 1), 1e-3), torch.zeros(1, 1, 1, 1), "huber", torch.tensor([1.0]))
    assert small.item() == pytest.approx(1e-6, rel=0.1)  # float32 cancellation at this size
    assert torch.equal(L.elementwise_loss(pred, target, "l1"), (pred - target).abs())
    with pytest.raises(ValueError, match="huber_c"):
        L.elementwise_loss(pred, target, "huber")


def test_huber_c_schedules_match_kohyas_formulas():
    ac = _alphas_cumprod()
    t = torch.tensor([0, 10, 500, 999])
    const = L.huber_c_per_sample(t, ac, "constant", 0.2, 3.0)
    assert torch.allclose(const, torch.full((4,), 0.6))
    exp = L.huber_c_per_sample(t, ac, "exponential", 0.1, 2.0)
    for i, ti in enumerate(t.tolist()):
        alpha = -math.log(0.1) / 1000
        assert exp[i].item() == pytest.approx(2.0 * math.exp(-alpha * ti), rel=1e-5)
    snr_c = L.huber_c_per_sample(t, ac, "snr", 0.1, 5.0)  # kohya ignores huber_scale for "snr"
    for i, ti in enumerate(t.tolist()):
        a = float(ac[ti])
        sigma = math.sqrt((1 - a) / a)
        assert snr_c[i].item() == pytest.approx((1 - 0.1) / (1 + sigma) ** 2 + 0.1, rel=1e-5)
    with pytest.raises(ValueError, match="huber_schedule"):
        L.huber_c_per_sample(t, ac, "linear", 0.1)


def test_snr_weights_match_kohyas_sequential_functions():
    ac = _alphas_cumprod()
    t = torch.tensor([0, 1, 17, 500, 998, 999])
    snr = N.snr(ac, t)
    loss = torch.rand(len(t), generator=torch.Generator().manual_seed(1)) + 0.1

    def ref(v_pred: bool) -> list[float]:
        out = []
        for i, ti in enumerate(t.tolist()):
            a = float(ac[ti])
            s = a / (1 - a)
            x = float(loss[i])
            x *= min(s, 5.0) / (s + 1 if v_pred else s)  # apply_snr_weight
            sc = min(s, 1000.0)
            x *= sc / (sc + 1)  # scale_v_prediction_loss_like_noise_prediction
            x = x + x / (sc / (sc + 1)) * 0.3  # add_v_prediction_like_loss
            x *= 1 / (sc + 1) if v_pred else 1 / math.sqrt(sc)  # apply_debiased_estimation
            out.append(x)
        return out

    for v_pred in (False, True):
        w = L.snr_weights(snr, v_prediction=v_pred, min_snr_gamma=5.0, scale_v_pred_loss_like_noise_pred=True,
                          v_pred_like_loss=0.3, debiased_estimation_loss=True)
        assert (loss * w).tolist() == pytest.approx(ref(v_pred), rel=1e-4)
    assert L.snr_weights(snr, v_prediction=False) is None


def test_zero_terminal_snr_weights_stay_finite():
    ac = _alphas_cumprod(zero_terminal=True)
    t = torch.tensor([999, 500])
    snr = N.snr(ac, t)
    assert snr[0].item() == 0.0
    w = L.snr_weights(snr, v_prediction=False, min_snr_gamma=5.0)
    assert torch.isfinite(w).all() and w[0].item() == 1.0  # limit of min(s, g) / s at s -> 0
    w = L.snr_weights(snr, v_prediction=True, min_snr_gamma=5.0, debiased_estimation_loss=True)
    assert w[0].item() == 0.0 and torch.isfinite(w).all()


def test_mask_sources_follow_kohya():
    alpha = torch.rand(2, 16, 16)
    cond = torch.rand(2, 3, 16, 16) * 2 - 1
    assert loss_mask({"alpha_masks": None, "conditioning_images": None}, True) is None
    assert loss_mask({"alpha_masks": alpha, "conditioning_images": None}, False) is alpha  # alpha alone enables it
    m = loss_mask({"alpha_masks": alpha, "conditioning_images": cond}, True)
    assert torch.allclose(m, cond[:, 0] / 2 + 0.5)  # mask images: R channel, [-1, 1] -> [0, 1]
    assert loss_mask({"alpha_masks": None, "conditioning_images": cond}, False) is None


def _args(**kw):
    base = dict(loss_type="l2", huber_schedule="snr", huber_c=0.1, huber_scale=1.0, masked_loss=False,
                prior_loss_weight=1.0, min_snr_gamma=None, scale_v_pred_loss_like_noise_pred=False,
                v_pred_like_loss=None, debiased_estimation_loss=False)
    base.update(kw)
    return SimpleNamespace(**base)


def test_step_loss_composition_by_hand():
    torch.manual_seed(3)
    ac = _alphas_cumprod()
    pred, target = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([5, 400, 900])
    masks = torch.rand(3, 64, 64)
    batch = {"is_reg": torch.tensor([False, True, False]), "loss_weights": torch.tensor([1.0, 1.0, 2.0]),
             "alpha_masks": masks, "conditioning_images": None}
    a = _args(loss_type="smooth_l1", huber_schedule="constant", huber_c=0.3, masked_loss=True, prior_loss_weight=0.5,
              min_snr_gamma=5.0)
    got = step_loss(a, pred, target, t, ac, False, batch, n_real=2, global_size=4)
    expected = 0.0
    for b in range(2):  # the third sample is padding
        d = pred[b] - target[b]
        el = 2 * (torch.sqrt(d * d + 0.09) - 0.3)
        m = masks[b].reshape(8, 8, 8, 8).mean(dim=(1, 3))  # 8x8 area average of the 64x64 mask
        per = (el * m).mean().item()
        s = float(ac[t[b]] / (1 - ac[t[b]]))
        w = [1.0, 0.5, 2.0][b] * min(s, 5.0) / s
        expected += per * w
    assert got.item() == pytest.approx(expected / 4, rel=1e-4)

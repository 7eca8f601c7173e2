"""LR schedulers against transformers' implementations, kohya's int-or-ratio steps, custom classes."""

from __future__ import annotations

import pytest
import torch

from library.errors import ConfigError
from library.training.lr_schedulers import build_lr_scheduler, resolve_steps


def _opt(lr: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def _curve(sched, opt, n: int) -> list[float]:
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("warmup,decay,min_ratio,cycles", [(10, 30, 0.0, 1), (0.1, 0.25, 0.2, 1), (5, 50, 0.1, 3)])
def test_warmup_stable_decay_matches_transformers(warmup, decay, min_ratio, cycles):
    from transformers.optimization import get_wsd_schedule

    total = 100
    w, d = resolve_steps(warmup, total), resolve_steps(decay, total)
    o1, o2 = _opt(), _opt()
    ours = build_lr_scheduler(o1, "warmup_stable_decay", total, warmup, cycles, decay_steps=decay,
                              min_lr_ratio=min_ratio)
    # kohya passes num_stable_steps = total - warmup - decay and num_cycles / 2
    ref = get_wsd_schedule(o2, num_warmup_steps=w, num_decay_steps=d, num_stable_steps=total - w - d,
                           num_cycles=cycles / 2, min_lr_ratio=min_ratio)
    assert _curve(ours, o1, total + 5) == pytest.approx(_curve(ref, o2, total + 5), abs=1e-9)


def test_cosine_with_min_lr_matches_transformers():
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    o1, o2 = _opt(), _opt()
    ours = build_lr_scheduler(o1, "cosine_with_min_lr", 50, 5, 2, min_lr_ratio=0.1)
    ref = get_cosine_with_min_lr_schedule_with_warmup(o2, 5, 50, num_cycles=1.0, min_lr_rate=0.1)
    assert _curve(ours, o1, 50) == pytest.approx(_curve(ref, o2, 50), abs=1e-9)


def test_delegated_schedulers_and_custom_classes():
    opt = _opt(0.5)
    sched = build_lr_scheduler(opt, "inverse_sqrt", 100, 4, timescale=10)
    lrs = _curve(sched, opt, 30)
    assert lrs[2] == pytest.approx(0.5 * 2 / 4) and lrs[20] == pytest.approx(0.5 / ((20 + 10 - 4) / 10) ** 0.5)
    opt = _opt(1.0)
    sched = build_lr_scheduler(opt, "constant", 10, scheduler_type="torch.optim.lr_scheduler.StepLR",
                               scheduler_args=["step_size=2", "gamma=0.5"])
    assert _curve(sched, opt, 5) == pytest.approx([1.0, 1.0, 0.5, 0.5, 0.25])
    opt = _opt(1.0)
    sched = build_lr_scheduler(opt, "constant", 10, scheduler_type="ExponentialLR", scheduler_args=["gamma=0.9"])
    assert _curve(sched, opt, 3) == pytest.approx([1.0, 0.9, 0.81])  # no dot: torch.optim.lr_scheduler
    opt = _opt(1.0)
    sched = build_lr_scheduler(opt, "piecewise_constant", 10, scheduler_args=["step_rules='1:2,0.1'"])
    assert _curve(sched, opt, 4) == pytest.approx([1.0, 1.0, 0.1, 0.1])


def test_bad_scheduler_settings_are_explained():
    with pytest.raises(ConfigError, match="ExponentialLRR"):
        build_lr_scheduler(_opt(), "constant", 10, scheduler_type="ExponentialLRR")
    with pytest.raises(ConfigError, match="do not fit"):
        build_lr_scheduler(_opt(), "constant", 10, scheduler_type="StepLR", scheduler_args=["nope=1"])
    with pytest.raises(ConfigError, match="only used with --lr_scheduler_type"):
        build_lr_scheduler(_opt(), "cosine", 10, scheduler_args=["gamma=0.9"])
    with pytest.raises(ConfigError, match="exceed"):
        build_lr_scheduler(_opt(), "warmup_stable_decay", 10, 6, decay_steps=6)


def test_ratio_steps_follow_kohya():
    assert resolve_steps(0.1, 250) == 25 and resolve_steps(30, 250) == 30 and resolve_steps(None, 9) == 0
    # the decimal the user wrote, counted exactly (int(0.29 * 100) and int(0.57 * 100) are 28 and 56 in floats)
    assert resolve_steps(0.29, 100) == 29 and resolve_steps(0.57, 100) == 57 and resolve_steps(0.07, 1000) == 70
    opt = _opt()
    lrs = _curve(build_lr_scheduler(opt, "linear", 20, 0.25), opt, 20)
    assert lrs[:6] == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])

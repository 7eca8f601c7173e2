"""kohya's optimizer names: each builds and takes a step on CPU tensors; kohya's special cases."""

from __future__ import annotations

import pytest
import torch

from library.errors import ConfigError
from library.training.lr_schedulers import build_lr_scheduler
from library.training.optimizers import (build_optimizer, eval_mode, is_schedule_free, set_train_mode,
                                         uses_adafactor_schedule)

# (name, module needed, extra optimizer args)
NAMES = [
    ("AdamW", None, []), ("adamw8bit", "bitsandbytes", []), ("PagedAdamW", "bitsandbytes", []),
    ("PagedAdamW8bit", "bitsandbytes", []), ("PagedAdamW32bit", "bitsandbytes", []), ("Lion", "lion_pytorch", []),
    ("Lion8bit", "bitsandbytes", []), ("PagedLion8bit", "bitsandbytes", []), ("SGDNesterov", None, []),
    ("SGDNesterov8bit", "bitsandbytes", []), ("DAdaptation", "dadaptation", []), ("DAdaptAdam", "dadaptation", []),
    ("DAdaptAdaGrad", "dadaptation", []), ("DAdaptAdan", "dadaptation", []), ("DAdaptAdanIP", "dadaptation", []),
    ("DAdaptLion", "dadaptation", []), ("DAdaptSGD", "dadaptation", []), ("Prodigy", "prodigyopt", []),
    ("AdaFactor", None, []), ("AdaFactor", None, ["relative_step=False", "scale_parameter=False"]),
    ("AdamWScheduleFree", "schedulefree", []), ("RAdamScheduleFree", "schedulefree", []),
    ("SGDScheduleFree", "schedulefree", []), ("torch.optim.RMSprop", None, ["alpha=0.9"]),
]


@pytest.mark.parametrize("name,module,extra", NAMES, ids=[f"{n}{'-' + e[0] if e else ''}" for n, _, e in NAMES])
def test_every_optimizer_steps_on_cpu(name, module, extra):
    if module:
        pytest.importorskip(module)
    torch.manual_seed(0)
    # 4096 elements: bitsandbytes' 8-bit states only quantize tensors of at least 4096 elements
    p = torch.nn.Parameter(torch.randn(4096))
    before = p.detach().clone()
    lr = 1.0 if name.lower().startswith(("dadapt", "prodigy")) else 1e-2
    _, _, opt = build_optimizer(name, [p], lr, extra)
    for _ in range(6):  # RAdam's rectification needs a few steps before it moves
        p.grad = p.detach().clone()  # gradient of 0.5 * |p|^2: every optimizer must move p
        opt.step()
        opt.zero_grad()
    set_train_mode(opt, False)  # schedule-free: the evaluation weights are the ones that count
    assert not torch.equal(p.detach(), before)
    assert torch.isfinite(p).all()


def test_kohya_defaults_and_names():
    p = [torch.nn.Parameter(torch.zeros(2))]
    _, _, opt = build_optimizer("sgdnesterov", p, 0.1)
    assert opt.param_groups[0]["momentum"] == 0.9 and opt.param_groups[0]["nesterov"] is True
    _, _, opt = build_optimizer("SGDNesterov", p, 0.1, ["momentum=0.5"])
    assert opt.param_groups[0]["momentum"] == 0.5
    pytest.importorskip("lion_pytorch")
    name, _, _ = build_optimizer(None, p, 1e-4, None, use_lion_optimizer=True)
    assert name == "lion_pytorch.lion_pytorch.Lion"
    pytest.importorskip("dadaptation")
    name, _, _ = build_optimizer("DAdaptation", p, 1.0)
    assert name.endswith("DAdaptAdamPreprint")  # kohya's meaning of plain "DAdaptation"
    assert is_schedule_free("AdamWScheduleFree") and not is_schedule_free("AdamW")


def test_adafactor_relative_step_drops_lrs_and_forces_its_schedule():
    from transformers.optimization import AdafactorSchedule

    groups = [{"params": [torch.nn.Parameter(torch.zeros(8))], "lr": 1e-3},
              {"params": [torch.nn.Parameter(torch.zeros(8))], "lr": 5e-4}]
    _, _, opt = build_optimizer("AdaFactor", groups, 1e-3)
    assert opt.defaults["relative_step"] is True and opt.defaults["lr"] is None
    assert all(g["lr"] is None for g in opt.param_groups)  # the group learning rates are ignored, as kohya
    assert uses_adafactor_schedule(opt) == 1e-3
    sched = build_lr_scheduler(opt, "cosine", 10)
    assert isinstance(sched, AdafactorSchedule)
    # warmup_init forces relative_step
    _, _, opt = build_optimizer("adafactor", [torch.nn.Parameter(torch.zeros(2))], 1e-3,
                                ["relative_step=False", "warmup_init=True"])
    assert opt.defaults["relative_step"] is True
    # without relative_step: a normal learning rate and any schedule
    _, _, opt = build_optimizer("AdaFactor", [torch.nn.Parameter(torch.zeros(2))], 1e-3,
                                ["relative_step=False", "scale_parameter=False"])
    assert uses_adafactor_schedule(opt) is None and opt.param_groups[0]["lr"] == 1e-3
    with pytest.raises(ConfigError, match="needs --optimizer_type AdaFactor"):
        build_lr_scheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1), "adafactor", 10)


def test_schedule_free_train_eval_switching():
    sf = pytest.importorskip("schedulefree")
    p = torch.nn.Parameter(torch.ones(16))
    _, _, opt = build_optimizer("AdamWScheduleFree", [p], 0.1)
    assert isinstance(opt, sf.AdamWScheduleFree) and opt.param_groups[0]["train_mode"] is True
    for _ in range(3):
        p.grad = torch.ones_like(p)
        opt.step()
    y = p.detach().clone()
    with eval_mode(opt):
        assert opt.param_groups[0]["train_mode"] is False
        x = p.detach().clone()
        assert not torch.allclose(x, y)  # the averaged (evaluation) weights differ from the training point
    assert opt.param_groups[0]["train_mode"] is True and torch.allclose(p.detach(), y, atol=1e-6)
    # constant multiplier: no LR scheduler for schedule-free optimizers
    sched = build_lr_scheduler(opt, "cosine", 10, 0, schedule_free=True)
    for _ in range(5):
        sched.step()
    assert sched.get_last_lr() == [0.1]


def test_missing_package_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # makes "import prodigyopt" fail like a missing package
    with pytest.raises(ConfigError, match=r'pip install "sdtk\[optim\]"'):
        build_optimizer("Prodigy", [torch.nn.Parameter(torch.zeros(2))], 1.0)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", None)
    with pytest.raises(ConfigError, match=r'pip install "sdtk\[bnb\]"'):
        build_optimizer("AdamW8bit", [torch.nn.Parameter(torch.zeros(2))], 1.0)


def test_optimizer_args_are_typed_and_bad_ones_explained():
    p = [torch.nn.Parameter(torch.zeros(2))]
    _, text, opt = build_optimizer("AdamW", p, 1e-3, ["betas=0.8,0.95", "weight_decay=0.1", "amsgrad=True"])
    g = opt.param_groups[0]
    assert g["betas"] == (0.8, 0.95) and g["weight_decay"] == 0.1 and g["amsgrad"] is True
    assert text == "betas=(0.8, 0.95),weight_decay=0.1,amsgrad=True"
    with pytest.raises(ConfigError, match="not key=value"):
        build_optimizer("AdamW", p, 1e-3, ["betas"])
    with pytest.raises(ConfigError, match="not supported"):
        build_optimizer("Adamm", p, 1e-3)


def test_d_times_lr_is_logged_for_prodigy():
    pytest.importorskip("prodigyopt")
    from library.training.optimizers import adaptive_lr_logs

    p = torch.nn.Parameter(torch.ones(8))
    _, _, opt = build_optimizer("Prodigy", [p], 1.0, ["d0=1e-4"])
    assert adaptive_lr_logs(opt) == {"lr/d*lr": pytest.approx(1e-4)}
    assert adaptive_lr_logs(torch.optim.SGD([p], lr=0.1)) == {}

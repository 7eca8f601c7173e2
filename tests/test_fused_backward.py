"""The fused steps' up-front optimizer state (library/training/targets/fused_backward.py): Adafactor's state
created before training is the state its first step would create, so steps, saved states and resumes
are unchanged (the end-to-end fused runs are in tests/test_sdxl_train.py)."""

from __future__ import annotations

import pytest
import torch
from transformers.optimization import Adafactor

from library.training.targets.fused_backward import materialize_state


def _params(dtype: torch.dtype) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    shapes = [(6, 5), (4, 3, 3, 3), (7,)]  # a linear weight, a conv kernel (both factored), a bias
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def _run(dtype: torch.dtype, kwargs: dict, materialize: bool, steps: int = 3):
    params = _params(dtype)
    frozen = torch.nn.Parameter(torch.ones(3), requires_grad=False)
    opt = Adafactor([{"params": [*params, frozen]}], **kwargs)
    if materialize:
        assert materialize_state(opt) == len(params)
        assert frozen not in opt.state or not opt.state[frozen]
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(dtype)
        opt.step()
    return params, opt.state_dict()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kwargs", [
    dict(lr=1e-3, scale_parameter=False, relative_step=False, warmup_init=False),  # kohya's SDXL fine-tune recipe
    dict(lr=None, relative_step=True, beta1=0.9),  # relative steps and a first moment
])
def test_materialized_state_is_the_first_steps_state(dtype, kwargs):
    lazy_params, lazy_state = _run(dtype, kwargs, materialize=False)
    made_params, made_state = _run(dtype, kwargs, materialize=True)
    for a, b in zip(lazy_params, made_params):
        assert torch.equal(a, b)
    assert lazy_state["param_groups"] == made_state["param_groups"]
    assert lazy_state["state"].keys() == made_state["state"].keys()
    for i, st in lazy_state["state"].items():
        other = made_state["state"][i]
        assert list(st) == list(other)  # same keys in the same order
        for k, v in st.items():
            if torch.is_tensor(v):
                assert v.dtype == other[k].dtype and v.shape == other[k].shape and torch.equal(v, other[k]), (i, k)
            else:
                assert v == other[k], (i, k)


def test_a_resumed_state_and_other_optimizers_are_left_alone():
    params = _params(torch.float32)
    opt = Adafactor(params, lr=1e-3, relative_step=False, scale_parameter=False)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    before = {k: v.clone() for k, v in opt.state[params[0]].items() if torch.is_tensor(v)}
    assert materialize_state(opt) == 0  # every parameter has its (resumed) state already
    assert all(torch.equal(before[k], opt.state[params[0]][k]) for k in before)
    adamw = torch.optim.AdamW(_params(torch.float32))
    assert materialize_state(adamw) == 0 and not adamw.state


def test_stochastic_rounding_in_chunks_draws_the_same_bits(monkeypatch):
    """copy_stochastic_ works in chunks (small temporaries); the result is the one-draw result, bit for bit,
    also into a non-contiguous target."""
    from library.training.targets import fused_backward as fb

    source = torch.randn(37, 53) * 1e-3 + 1.0
    results = []
    for chunk in (1 << 30, 100, 7):
        monkeypatch.setattr(fb, "_CHUNK", chunk)
        for target in (torch.empty(37, 53, dtype=torch.bfloat16), torch.empty(53, 37, dtype=torch.bfloat16).t()):
            fb.copy_stochastic_(target, source, torch.Generator().manual_seed(4))
            results.append(target.contiguous().view(torch.int16))
    assert all(torch.equal(results[0], r) for r in results[1:])
    assert not torch.equal(results[0], source.bfloat16().view(torch.int16))  # it is not round-to-nearest

"""``--fused_backward_pass``: each parameter is stepped by the optimizer as soon as its gradient is
complete, inside the backward pass, and its gradient is freed at once — so a full set of gradients
never exists (kohya's SDXL fine-tune memory trick; the weights' size in gradients is saved).

How: a post-accumulate-grad hook per trained parameter (1) sums the gradient over processes,
(2) clips it on its own to ``--max_grad_norm`` (kohya clips per tensor here too, not the global
norm), (3) runs the optimizer's normal ``step`` on a parameter group narrowed to that one
parameter, and (4) drops the gradient. The optimizer's state is the same as without fusing, so
states save and resume as usual. Only optimizers whose update of a tensor depends on that tensor
alone can be fused; sdtk allows Adafactor, as kohya does.
"""

from __future__ import annotations

from typing import Any

import torch

from library.errors import ConfigError

FUSABLE_OPTIMIZERS = ("adafactor",)


def fused_backward_problems(args: Any) -> list[str]:
    """kohya's conditions for ``--fused_backward_pass`` (empty when fine)."""
    if not getattr(args, "fused_backward_pass", False):
        return []
    problems = []
    name = (args.optimizer_type or "AdamW").rsplit(".", 1)[-1].lower()
    if name not in FUSABLE_OPTIMIZERS:
        problems.append(f"--fused_backward_pass works with --optimizer_type Adafactor only (got {args.optimizer_type or 'AdamW'}): "
                        "its per-tensor update can run inside the backward pass")
    if args.gradient_accumulation_steps > 1:
        problems.append("--fused_backward_pass cannot be used with --gradient_accumulation_steps > 1 (each gradient is "
                        "applied as soon as it is computed)")
    if args.mixed_precision == "fp16":
        problems.append("--fused_backward_pass cannot be used with --mixed_precision fp16 (the loss-scaled gradients "
                        "would be applied unscaled); use bf16")
    return problems


def require_fusable(args: Any) -> None:
    problems = fused_backward_problems(args)
    if problems:
        raise ConfigError(problems)


def attach(optimizer: Any, max_grad_norm: float | None, world: int) -> list[Any]:
    """Register the hooks on every trained parameter of ``optimizer``; returns the hook handles."""
    inner = getattr(optimizer, "optimizer", optimizer)
    handles = []
    for gi, group in enumerate(inner.param_groups):
        for p in group["params"]:
            if p.requires_grad:
                handles.append(p.register_post_accumulate_grad_hook(_hook(inner, gi, max_grad_norm, world)))
    return handles


def _hook(optimizer: torch.optim.Optimizer, group_index: int, max_grad_norm: float | None, world: int):
    # the group is looked up at every call: loading a state (--resume) replaces the group dicts
    def step_now(p: torch.Tensor) -> None:
        if p.grad is None:
            return
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(p.grad)
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p], max_grad_norm)
        saved = [g["params"] for g in optimizer.param_groups]
        try:
            for i, g in enumerate(optimizer.param_groups):
                g["params"] = [p] if i == group_index else []
            optimizer.step()
        finally:
            for g, params in zip(optimizer.param_groups, saved):
                g["params"] = params
        p.grad = None

    return step_now

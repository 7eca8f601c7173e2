"""Optimizer steps inside the backward pass, so a full set of gradients never exists (kohya's SDXL
fine-tune memory tricks).

``--fused_backward_pass``: each parameter is stepped as soon as its gradient is complete and its
gradient is freed at once (the weights' size in gradients is saved). A post-accumulate-grad hook
per trained parameter (1) sums the gradient over processes, (2) clips it on its own to
``--max_grad_norm`` (kohya clips per tensor here too, not the global norm), (3) runs the
optimizer's normal ``step`` on a parameter group narrowed to that one parameter, and (4) drops
the gradient.

``--fused_optimizer_groups N``: the trained parameters are split into about N groups as kohya
splits them (in order, a new group at every learning-rate change); a group is stepped, and its
gradients freed, once every one of its parameters has its gradient (so about 1/N of the
gradients are held). kohya makes one optimizer per group; sdtk keeps one optimizer whose groups
are those chunks, which is the same for the per-tensor optimizers allowed here. A group some of
whose parameters got no gradient in a step (a text encoder's last layer when its penultimate
states are used) is stepped at the end of the backward pass (kohya never steps such a group).

The optimizer's state is the same as without fusing, so states save and resume as usual. Only
optimizers whose update of a tensor depends on that tensor alone (and which count steps per
tensor) can be fused: Adafactor (kohya's only choice), AdamW, Lion and SGDNesterov.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from library.config.flags.rules import FUSABLE_OPTIMIZERS  # noqa: F401  (re-exported)

# The conditions of these flags (optimizer, accumulation, precision) are flag rules, checked before the run loads
# anything (library.config.flags.rules.fused_step_problems); FusedStepSettings.stochastic_rounding says when bf16 weights
# are rounded stochastically (library.config.settings).


# Elements per random draw in copy_stochastic_: bounds its int32 temporaries at 4 MB each.
_CHUNK = 1 << 20


def copy_stochastic_(target: torch.Tensor, source: torch.Tensor, generator: torch.Generator) -> None:
    """Round float32 ``source`` into bfloat16 ``target`` stochastically: up with a probability equal to
    the distance from the lower bf16 value, so updates far below a bf16 step still move the weights
    on average (round-to-nearest drops them every time).

    Done ``_CHUNK`` elements at a time, so the random bits and the sum are int32 buffers of a chunk's
    size rather than of the whole tensor's (two 52 MB buffers for a 1280x10240 SDXL weight, made and
    freed for every tensor inside the backward pass): sdxl_train ``--full_bf16`` with fused Adafactor
    peaked at 10.3-10.8 GB without chunks and 8.6-10.1 GB with them (four runs each). The generator
    yields the same bits either way (tested)."""
    out = target if target.is_contiguous() else torch.empty_like(target, memory_format=torch.contiguous_format)
    src, dst = source.contiguous().view(torch.int32).view(-1), out.view(-1)
    for start in range(0, src.numel(), _CHUNK):
        bits = src[start:start + _CHUNK]
        noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator)
        bits = bits + noise
        dst[start:start + _CHUNK].copy_(bits.bitwise_and_(-65536).view(torch.float32))  # low 16 bits cleared: exact in bf16
    if out is not target:
        target.copy_(out)


class Bf16Rounding:
    """Stochastic rounding of bf16 weights in the fused Adafactor step (``--full_bf16``), as kohya's fused
    Adafactor does. The random bits come from a generator reseeded from the run's seed and the step
    count before each step, so runs and resumes are reproducible and every process draws the same bits."""

    def __init__(self, seed: int, device: torch.device | str = "cpu"):
        self.seed = seed
        self.generator = torch.Generator(device=device)
        self.reseed(0)

    def reseed(self, global_step: int) -> None:
        from library.training.noise import derive_seed

        self.generator.manual_seed(derive_seed(self.seed, global_step, 0xB16))

    def step(self, optimizer: torch.optim.Optimizer, p: torch.Tensor) -> None:
        """``optimizer.step()`` on ``p`` in float32, the result rounded stochastically back into ``p``."""
        low = p.data
        p.data = low.float()
        try:
            optimizer.step()
            copy_stochastic_(low, p.data, self.generator)
        finally:
            p.data = low


def materialize_state(optimizer: Any) -> int:
    """Create Adafactor's per-parameter state now, exactly as its first ``step`` would; returns how many
    parameters got one.

    Fused steps run inside the backward pass, where each parameter's float32 temporaries (tens of MB for
    SDXL's large weights) come and go between the autograd's own buffers. A state created lazily there
    lands in the middle of those freed temporaries and keeps the heap from reusing them: the training
    heap then grows, by a different amount in every run (sdxl_train ``--full_bf16`` + fused Adafactor
    peaked at 8.7 to 13.6 GB between identical runs; with the state created up front, 8.8 GB every time:
    docs/benchmarks.md). The state is the lazily created one (same keys, dtypes, shapes and zeros), so
    the steps, saved states and resumes do not change (tests/test_fused_backward.py). Other optimizers
    are left as they are. Parameters that already have a state (a resumed run) are skipped.
    """
    inner = getattr(optimizer, "optimizer", optimizer)
    try:
        from transformers.optimization import Adafactor
    except ImportError:  # pragma: no cover - transformers is a dependency
        return 0
    if not isinstance(inner, Adafactor):
        return 0
    made = 0
    for group in inner.param_groups:
        for p in group["params"]:
            if not p.requires_grad or inner.state.get(p):  # .get: the state is a defaultdict
                continue
            state = inner.state[p]
            # Adafactor.step works on the gradient in float32 when it is float16/bfloat16
            kind = dict(dtype=torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype, device=p.device)
            factored, use_first_moment = inner._get_options(group, p.shape)
            state["step"] = 0
            if use_first_moment:
                state["exp_avg"] = torch.zeros(p.shape, **kind)
            if factored:
                state["exp_avg_sq_row"] = torch.zeros(p.shape[:-1], **kind)
                state["exp_avg_sq_col"] = torch.zeros(p.shape[:-2] + p.shape[-1:], **kind)
            else:
                state["exp_avg_sq"] = torch.zeros(p.shape, **kind)
            state["RMS"] = 0
            made += 1
    return made


def attach(optimizer: Any, max_grad_norm: float | None, world: int,
           rounding: Bf16Rounding | None = None) -> list[Any]:
    """Register the hooks on every trained parameter of ``optimizer``; returns the hook handles.
    ``rounding``: bf16 parameters are stepped in float32 and rounded stochastically."""
    inner = getattr(optimizer, "optimizer", optimizer)
    handles = []
    for gi, group in enumerate(inner.param_groups):
        for p in group["params"]:
            if p.requires_grad:
                handles.append(p.register_post_accumulate_grad_hook(_hook(inner, gi, max_grad_norm, world, rounding)))
    return handles


def _hook(optimizer: torch.optim.Optimizer, group_index: int, max_grad_norm: float | None, world: int,
          rounding: Bf16Rounding | None = None):
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
            if rounding is not None and p.dtype == torch.bfloat16:
                rounding.step(optimizer, p)
            else:
                optimizer.step()
        finally:
            for g, params in zip(optimizer.param_groups, saved):
                g["params"] = params
        p.grad = None

    return step_now


def split_groups(groups: list[dict[str, Any]], n_groups: int) -> list[dict[str, Any]]:
    """kohya's ``--fused_optimizer_groups`` split: the parameters in order, ``ceil(total / n)`` per
    group, and a new group wherever the learning rate changes (so there can be more than ``n``)."""
    params = [(p, g) for g in groups for p in g["params"]]
    per_group = math.ceil(len(params) / n_groups) if params else 1
    out: list[dict[str, Any]] = []
    for p, g in params:
        if not out or out[-1]["lr"] != g["lr"] or len(out[-1]["params"]) == per_group:
            out.append({**{k: v for k, v in g.items() if k != "params"}, "params": []})
        out[-1]["params"].append(p)
    return out


class GroupStepper:
    """``--fused_optimizer_groups``: step each optimizer group once all its gradients are in."""

    def __init__(self, optimizer: Any, max_grad_norm: float | None, world: int):
        self.optimizer = getattr(optimizer, "optimizer", optimizer)
        self.max_grad_norm, self.world = max_grad_norm, world
        self.sizes = [sum(p.requires_grad for p in g["params"]) for g in self.optimizer.param_groups]
        self.ready = [0] * len(self.sizes)
        self.handles = [p.register_post_accumulate_grad_hook(self._hook(gi))
                        for gi, g in enumerate(self.optimizer.param_groups) for p in g["params"] if p.requires_grad]

    def _hook(self, group_index: int):
        def arrived(p: torch.Tensor) -> None:
            if p.grad is None:
                return
            if self.world > 1:
                import torch.distributed as dist

                dist.all_reduce(p.grad)
            if self.max_grad_norm:
                torch.nn.utils.clip_grad_norm_([p], self.max_grad_norm)
            self.ready[group_index] += 1
            if self.ready[group_index] == self.sizes[group_index]:
                self.step_group(group_index)

        return arrived

    def step_group(self, group_index: int) -> None:
        """Step one group (the others narrowed to nothing) and free its gradients."""
        opt = self.optimizer
        saved = [g["params"] for g in opt.param_groups]
        try:
            for i, g in enumerate(opt.param_groups):
                if i != group_index:
                    g["params"] = []
            opt.step()
        finally:
            for g, params in zip(opt.param_groups, saved):
                g["params"] = params
        for p in opt.param_groups[group_index]["params"]:
            p.grad = None
        self.ready[group_index] = 0

    def finish_backward(self) -> None:
        """Step the groups that got only some of their gradients (parameters unused this step)."""
        for gi, n in enumerate(self.ready):
            if n:
                self.step_group(gi)

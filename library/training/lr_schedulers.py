"""Learning-rate schedulers with kohya's names (``--lr_scheduler``) and warmup semantics.

constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial,
cosine_with_min_lr and warmup_stable_decay are computed here (formulas of diffusers /
transformers, see :func:`lr_lambda`); ``adafactor`` is transformers' AdafactorSchedule;
inverse_sqrt, cosine_warmup_with_min_lr, reduce_lr_on_plateau and piecewise_constant are
delegated to transformers / diffusers; ``--lr_scheduler_type`` names any scheduler class
(``torch.optim.lr_scheduler`` when it has no dot) built with ``--lr_scheduler_args``.
The scheduler steps once per optimizer step, whatever the number of processes, so a run's LR
curve does not depend on it (kohya multiplies the step counts by the process count instead).
"""

from __future__ import annotations

import importlib
import logging
import math
from typing import Any, Callable

import torch
from torch.optim.lr_scheduler import LambdaLR

from library.config.flags.rules import warmup_problem
from library.errors import ConfigError
from library.utils.ratios import floor_of

logger = logging.getLogger(__name__)

SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
              "cosine_with_min_lr", "warmup_stable_decay")
_DELEGATED = ("inverse_sqrt", "cosine_warmup_with_min_lr", "reduce_lr_on_plateau", "piecewise_constant")


def resolve_steps(value: int | float | None, total: int) -> int:
    """kohya's int-or-ratio: a float below 1 is a fraction of ``total`` steps."""
    if value is None:
        return 0
    if isinstance(value, float) and value < 1:
        return floor_of(value, total)  # exact: 0.29 of 100 steps is 29 (kohya's int(0.29 * 100) is 28)
    return int(value)


def lr_lambda(name: str, warmup: int, total: int, num_cycles: int = 1, power: float = 1.0, *,
              decay: int = 0, min_lr_ratio: float | None = None) -> Callable[[int], float]:
    """The LR multiplier at optimizer step ``s`` (0-based), the formulas of diffusers/transformers.

    Args:
        name: one of :data:`SCHEDULERS`.
        warmup / total / decay: warmup, total and (warmup_stable_decay) decay steps.
        num_cycles: cosine_with_restarts' restarts; kohya passes ``num_cycles / 2`` as the
            cosine frequency of cosine_with_min_lr and warmup_stable_decay (1 = half a wave).
        power: polynomial's power.
        min_lr_ratio: floor of cosine_with_min_lr / warmup_stable_decay (ratio of the initial LR).
    """
    if name not in SCHEDULERS:
        raise ConfigError(f"--lr_scheduler {name!r} is not supported; choose one of {', '.join(SCHEDULERS)}")
    floor = float(min_lr_ratio or 0.0)
    half_cycles = float(num_cycles) / 2.0

    def wsd(step: int) -> float:
        stable = total - warmup - decay
        if step < warmup:
            return max(0.0, (step / max(1, warmup)) * (1.0 - floor) + floor)
        if step < warmup + stable:
            return 1.0
        if step < warmup + stable + decay:
            progress = (step - warmup - stable) / max(1, decay)
            factor = 0.5 * (1.0 + math.cos(math.pi * half_cycles * 2.0 * progress))
            return max(0.0, factor * (1.0 - floor) + floor)
        return floor

    def f(step: int) -> float:
        if name == "constant":
            return 1.0
        if name == "warmup_stable_decay":
            return wsd(step)
        if step < warmup:
            return float(step) / float(max(1, warmup))
        if name == "constant_with_warmup":
            return 1.0
        progress = float(step - warmup) / float(max(1, total - warmup))
        if name == "linear":
            return max(0.0, 1.0 - progress)
        if name == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        if name == "cosine_with_min_lr":
            factor = 0.5 * (1.0 + math.cos(math.pi * half_cycles * 2.0 * progress))
            return max(0.0, factor * (1.0 - floor) + floor)
        if name == "cosine_with_restarts":
            if progress >= 1.0:
                return 0.0
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(num_cycles) * progress) % 1.0))))
        # polynomial decay to 0 (diffusers' lr_end default 1e-7 relative is negligible)
        return max(0.0, 1.0 - progress) ** power

    return f


def parse_scheduler_args(items: list[str] | None) -> dict[str, Any]:
    """``--lr_scheduler_args key=value ...`` typed like ``--optimizer_args``."""
    from library.training.optimizers import parse_optimizer_args

    try:
        return parse_optimizer_args(items)
    except ConfigError as e:
        raise ConfigError([p.replace("--optimizer_args", "--lr_scheduler_args") for p in e.problems]) from e


def _custom(optimizer: torch.optim.Optimizer, type_path: str, kwargs: dict[str, Any]):
    module_name, _, cls_name = type_path.rpartition(".")
    try:
        module = importlib.import_module(module_name) if module_name else torch.optim.lr_scheduler
    except ImportError as e:
        raise ConfigError(f"--lr_scheduler_type {type_path}: module {module_name!r} cannot be imported ({e})") from e
    cls = getattr(module, cls_name, None)
    if cls is None:
        raise ConfigError(f"--lr_scheduler_type {type_path}: {module.__name__} has no class {cls_name!r}")
    try:
        return cls(optimizer, **kwargs)
    except TypeError as e:
        raise ConfigError(f"--lr_scheduler_args do not fit {type_path}: {e}") from e


def _delegated(optimizer, name: str, warmup: int, total: int, timescale: int | None, min_lr_ratio: float | None,
               kwargs: dict[str, Any]):
    if name == "piecewise_constant":
        from diffusers.optimization import get_piecewise_constant_schedule

        return get_piecewise_constant_schedule(optimizer, **kwargs)  # step_rules=... from --lr_scheduler_args
    from transformers.optimization import get_scheduler

    specific = dict(kwargs)
    if name == "inverse_sqrt" and timescale:
        specific.setdefault("timescale", timescale)
    if name == "cosine_warmup_with_min_lr":
        specific.setdefault("min_lr_rate", min_lr_ratio or 0.0)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total,
                         scheduler_specific_kwargs=specific)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, name: str, total_steps: int,
                       warmup_steps: int | float | None = 0, num_cycles: int = 1,
                       power: float = 1.0, *, decay_steps: int | float | None = 0,
                       min_lr_ratio: float | None = None, timescale: int | None = None,
                       scheduler_type: str | None = None, scheduler_args: list[str] | None = None,
                       schedule_free: bool = False) -> Any:
    """The LR scheduler for ``optimizer`` over ``total_steps`` optimizer steps (kohya's
    ``get_scheduler_fix``).

    AdaFactor with relative_step forces the ``adafactor`` schedule (kohya rewrites
    ``--lr_scheduler`` to ``adafactor:<lr>``); schedule-free optimizers get a constant multiplier
    (they have no scheduler; their warmup is ``--optimizer_args warmup_steps=N``).
    """
    from library.training.optimizers import uses_adafactor_schedule

    name = (name or "constant").lower()
    kwargs = parse_scheduler_args(scheduler_args)
    warmup = resolve_steps(warmup_steps, total_steps)
    decay = resolve_steps(decay_steps, total_steps)
    if schedule_free:
        if name != "constant" or warmup:
            logger.warning("schedule-free optimizers ignore --lr_scheduler and --lr_warmup_steps; use "
                           "--optimizer_args warmup_steps=N")
        return LambdaLR(optimizer, lambda _: 1.0)
    if scheduler_type:
        logger.info("LR scheduler %s(%s)", scheduler_type, kwargs)
        return _custom(optimizer, scheduler_type, kwargs)
    adafactor_lr = uses_adafactor_schedule(optimizer)
    if name.startswith("adafactor") or adafactor_lr is not None:
        return _adafactor(optimizer, name, adafactor_lr, warmup)
    warmup_refused = warmup_problem(name, warmup)  # the flag rule, for callers that did not parse flags
    if warmup_refused:
        raise ConfigError(warmup_refused)
    if name in _DELEGATED:
        try:
            return _delegated(optimizer, name, warmup, total_steps, timescale, min_lr_ratio, kwargs)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"--lr_scheduler {name}: {e} (check --lr_scheduler_args)") from e
    if name == "warmup_stable_decay" and warmup + decay > total_steps:
        raise ConfigError(f"--lr_warmup_steps ({warmup}) plus --lr_decay_steps ({decay}) exceed the "
                          f"{total_steps} training steps")
    if kwargs:
        raise ConfigError(f"--lr_scheduler_args are only used with --lr_scheduler_type or {', '.join(_DELEGATED)}; "
                          f"{name} takes its settings from the --lr_* flags")
    return LambdaLR(optimizer, lr_lambda(name, warmup, total_steps, num_cycles or 1, power or 1.0,
                                         decay=decay, min_lr_ratio=min_lr_ratio))


def _adafactor(optimizer, name: str, adafactor_lr: float | None, warmup: int):
    from transformers.optimization import Adafactor, AdafactorSchedule

    inner = getattr(optimizer, "optimizer", optimizer)
    if not isinstance(inner, Adafactor):
        raise ConfigError("--lr_scheduler adafactor needs --optimizer_type AdaFactor")
    if warmup:
        raise ConfigError("the adafactor schedule has no warmup: drop --lr_warmup_steps (AdaFactor's own "
                          "warmup is --optimizer_args warmup_init=True)")
    initial = adafactor_lr
    if initial is None:
        _, _, text = name.partition(":")
        initial = float(text) if text else 0.0
    if adafactor_lr is not None and not name.startswith("adafactor"):
        logger.info("AdaFactor with relative_step: using the adafactor LR schedule instead of %s", name)
    return AdafactorSchedule(inner, initial)

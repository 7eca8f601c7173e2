"""Optimizer construction from kohya's ``--optimizer_type`` / ``--optimizer_args``.

Names are case-insensitive like kohya's; any ``package.module.Class`` works too. kohya's special
cases are kept: SGDNesterov(8bit) default to ``momentum=0.9, nesterov=True``; AdaFactor uses
``relative_step=True`` unless told otherwise, and then ignores the learning rates and runs
under the ``adafactor`` LR schedule (:func:`uses_adafactor_schedule`); D-Adaptation and Prodigy
warn about small or several learning rates; the schedule-free optimizers have train/eval modes
(:func:`set_train_mode`), switched around sampling, validation and saving.
"""

from __future__ import annotations

import ast
import importlib
import logging
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch

from library.errors import ConfigError

logger = logging.getLogger(__name__)

# lower-case name -> (class path, pip extra, default kwargs)
_CLASSES: dict[str, tuple[str, str | None, dict[str, Any]]] = {
    "adamw": ("torch.optim.AdamW", None, {}),
    "adamw8bit": ("bitsandbytes.optim.AdamW8bit", "bnb", {}),
    "pagedadamw": ("bitsandbytes.optim.PagedAdamW", "bnb", {}),
    "pagedadamw8bit": ("bitsandbytes.optim.PagedAdamW8bit", "bnb", {}),
    "pagedadamw32bit": ("bitsandbytes.optim.PagedAdamW32bit", "bnb", {}),
    "lion": ("lion_pytorch.Lion", "optim", {}),
    "lion8bit": ("bitsandbytes.optim.Lion8bit", "bnb", {}),
    "pagedlion8bit": ("bitsandbytes.optim.PagedLion8bit", "bnb", {}),
    "sgdnesterov": ("torch.optim.SGD", None, {"momentum": 0.9, "nesterov": True}),
    "sgdnesterov8bit": ("bitsandbytes.optim.SGD8bit", "bnb", {"momentum": 0.9, "nesterov": True}),
    # kohya: plain "DAdaptation" is the preprint Adam variant
    "dadaptation": ("dadaptation.experimental.DAdaptAdamPreprint", "optim", {}),
    "dadaptadampreprint": ("dadaptation.experimental.DAdaptAdamPreprint", "optim", {}),
    "dadaptadam": ("dadaptation.DAdaptAdam", "optim", {}),
    "dadaptadagrad": ("dadaptation.DAdaptAdaGrad", "optim", {}),
    "dadaptadan": ("dadaptation.DAdaptAdan", "optim", {}),
    "dadaptadanip": ("dadaptation.experimental.DAdaptAdanIP", "optim", {}),
    "dadaptlion": ("dadaptation.DAdaptLion", "optim", {}),
    "dadaptsgd": ("dadaptation.DAdaptSGD", "optim", {}),
    "prodigy": ("prodigyopt.Prodigy", "optim", {}),
    "adafactor": ("transformers.optimization.Adafactor", None, {}),
    "adamwschedulefree": ("schedulefree.AdamWScheduleFree", "optim", {}),
    "radamschedulefree": ("schedulefree.RAdamScheduleFree", "optim", {}),
    "sgdschedulefree": ("schedulefree.SGDScheduleFree", "optim", {}),
}


def parse_optimizer_args(items: list[str] | None) -> dict[str, Any]:
    """``["weight_decay=0.01", "betas=0.9,0.99"]`` -> typed dict (Python literals; a comma makes a tuple)."""
    out: dict[str, Any] = {}
    problems = []
    for item in items or []:
        if "=" not in item:
            problems.append(f"--optimizer_args entry {item!r} is not key=value")
            continue
        key, value = item.split("=", 1)
        out[key.strip()] = _literal(value.strip())
    if problems:
        raise ConfigError(problems)
    return out


def _literal(text: str) -> Any:
    """kohya: ``ast.literal_eval`` of the value ("0.9,0.99" is a tuple, "'a,b'" a string); words
    that are not literals stay strings (true/false/none in any case become bool/None)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        pass
    try:
        if "," in text:
            return tuple(ast.literal_eval(v.strip()) for v in text.split(",") if v.strip())
    except (ValueError, SyntaxError):
        pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def optimizer_name(optimizer_type: str | None, use_8bit_adam: bool = False, use_lion_optimizer: bool = False) -> str:
    """The requested name (kohya: empty means AdamW; ``--use_8bit_adam`` / ``--use_lion_optimizer``
    are the old spellings of AdamW8bit / Lion)."""
    name = (optimizer_type or "").strip()
    if not name:
        return "AdamW8bit" if use_8bit_adam else ("Lion" if use_lion_optimizer else "AdamW")
    return name


def is_schedule_free(optimizer_type: str | None) -> bool:
    """kohya's test: the name ends with ``schedulefree`` (no LR scheduler, train/eval modes)."""
    return (optimizer_type or "").strip().lower().endswith("schedulefree")


def _group_lrs(params: list, lr: float) -> list[float]:
    return [g.get("lr", lr) if isinstance(g, dict) else lr for g in params]


def _adafactor_kwargs(kwargs: dict[str, Any], params: list, lr: float) -> tuple[dict[str, Any], float | None]:
    """kohya's AdaFactor handling: relative_step defaults to True (warmup_init forces it); then the
    learning rates are dropped (AdaFactor computes its own) and ``lr`` is only the schedule's
    initial value."""
    kwargs = dict(kwargs)
    kwargs.setdefault("relative_step", True)
    if not kwargs["relative_step"] and kwargs.get("warmup_init", False):
        logger.info("AdaFactor: relative_step set to True because warmup_init is True")
        kwargs["relative_step"] = True
    if not kwargs["relative_step"]:
        if kwargs.get("clip_threshold", 1.0) != 1.0:
            logger.warning("AdaFactor: clip_threshold=1.0 is recommended")
        return kwargs, lr
    dropped = False
    for g in params:
        if isinstance(g, dict):
            dropped = g.pop("lr", None) is not None or dropped
    if dropped:
        logger.warning("AdaFactor with relative_step: --unet_lr / --text_encoder_lr are ignored")
    logger.info("AdaFactor with relative_step: the learning rate %s is only the initial value of the adafactor "
                "schedule", lr)
    return kwargs, None


def build_optimizer(optimizer_type: str | None, params: Iterable, lr: float,
                    optimizer_args: list[str] | None = None, use_8bit_adam: bool = False,
                    use_lion_optimizer: bool = False) -> tuple[str, str, torch.optim.Optimizer]:
    """Build the optimizer for ``params`` (tensors or kohya param-group dicts).

    Returns:
        (class path for the metadata, args text for the metadata, optimizer). AdaFactor with
        ``relative_step`` gets ``sdtk_adafactor_initial_lr``; schedule-free optimizers are put
        in train mode.
    """
    name = optimizer_name(optimizer_type, use_8bit_adam, use_lion_optimizer)
    user_kwargs = parse_optimizer_args(optimizer_args)
    args_text = ",".join(f"{k}={v}" for k, v in user_kwargs.items())
    params = list(params)
    lower = name.lower()
    if lower in _CLASSES:
        path, extra, defaults = _CLASSES[lower]
    elif "." in name:
        path, extra, defaults = name, None, {}
    else:
        raise ConfigError(f"--optimizer_type {name!r} is not supported: use one of "
                          f"{', '.join(sorted(_CLASSES))} (case-insensitive) or a dotted class path such as "
                          "torch.optim.SGD")
    cls = _import_class(path, extra)
    kwargs = {**defaults, **user_kwargs}
    opt_lr: float | None = lr
    if lower.startswith("dadapt") or lower == "prodigy":
        lrs = _group_lrs(params, lr)
        if lrs and lrs[0] <= 0.1:
            logger.warning("the learning rate %s is low for D-Adaptation/Prodigy, which expect about 1.0", lrs[0])
        if len(set(lrs)) > 1:
            logger.warning("with D-Adaptation/Prodigy only the first of several learning rates takes effect")
    if lower == "adafactor":
        kwargs, opt_lr = _adafactor_kwargs(kwargs, params, lr)
    try:
        opt = cls(params, lr=opt_lr, **kwargs)
    except TypeError as e:
        raise ConfigError(f"--optimizer_args do not fit {cls.__module__}.{cls.__name__}: {e}") from e
    if lower == "adafactor" and opt_lr is None:
        opt.sdtk_adafactor_initial_lr = lr
    set_train_mode(opt, True)
    logger.info("optimizer %s.%s, args %s", cls.__module__, cls.__name__, kwargs or "{}")
    return f"{cls.__module__}.{cls.__name__}", args_text, opt


def uses_adafactor_schedule(optimizer: Any) -> float | None:
    """The initial LR when ``optimizer`` is AdaFactor with relative_step (kohya then forces the
    ``adafactor`` schedule), else None."""
    return getattr(_unwrap(optimizer), "sdtk_adafactor_initial_lr", None)


def adaptive_lr_logs(optimizer: Any) -> dict[str, float]:
    """kohya's ``lr/d*lr`` for D-Adaptation / Prodigy (the effective step size of the first group)."""
    group = _unwrap(optimizer).param_groups[0]
    if "d" in group and group.get("lr") is not None:
        return {"lr/d*lr": float(group["d"]) * float(group["lr"])}
    return {}


def _unwrap(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (or itself)."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


def set_train_mode(optimizer: Any, train: bool) -> None:
    """Schedule-free optimizers: ``train()`` before optimizer steps, ``eval()`` before using the
    weights (sampling, validation, saving). Other optimizers: nothing."""
    opt = _unwrap(optimizer)
    fn = getattr(opt, "train" if train else "eval", None)
    if callable(fn) and type(opt).__module__.startswith("schedulefree"):
        fn()


@contextmanager
def eval_mode(optimizer: Any) -> Iterator[None]:
    """Weights in their evaluation form inside the block (schedule-free), train form after."""
    set_train_mode(optimizer, False)
    try:
        yield
    finally:
        set_train_mode(optimizer, True)


def _import_class(path: str, extra: str | None):
    module_name, _, cls_name = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        hint = f'; install it with: pip install "sdtk[{extra}]"' if extra else ""
        raise ConfigError(f"optimizer module {module_name!r} cannot be imported ({e}){hint}") from e
    try:
        return getattr(module, cls_name)
    except AttributeError as e:
        raise ConfigError(f"module {module_name!r} has no optimizer class {cls_name!r}") from e


def load_optimizer_state(optimizer: Any, sd: dict[str, Any]) -> None:
    """``optimizer.load_state_dict(sd)``, keeping each state tensor's saved dtype.

    torch casts floating state tensors to their parameter's dtype on load; an optimizer that keeps
    float32 statistics for bf16 weights (Adafactor under ``--full_bf16``) would resume with bf16
    statistics and drift from the uninterrupted run. The saved tensors are put back as they were.
    """
    optimizer.load_state_dict(sd)
    inner = getattr(optimizer, "optimizer", optimizer)
    saved = sd.get("state", {})
    for group, saved_group in zip(inner.param_groups, sd.get("param_groups", [])):
        for p, index in zip(group["params"], saved_group.get("params", [])):
            loaded = inner.state.get(p)
            for key, value in saved.get(index, {}).items():
                if (loaded is not None and torch.is_tensor(value) and torch.is_tensor(loaded.get(key))
                        and loaded[key].dtype != value.dtype):
                    loaded[key] = value.to(loaded[key].device)

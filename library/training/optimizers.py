"""Optimizer construction from kohya's ``--optimizer_type`` / ``--optimizer_args``.

This module covers AdamW, AdamW8bit and any ``package.module.Class``; #6 adds the rest of
kohya's list. Names are case-insensitive like kohya's.
"""

from __future__ import annotations

import ast
import importlib
import logging
from typing import Any, Iterable

import torch

from library.errors import ConfigError

logger = logging.getLogger(__name__)


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
    try:
        if "," in text and not text.startswith(("[", "(")):
            return tuple(ast.literal_eval(v.strip()) for v in text.split(",") if v.strip())
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def optimizer_name(optimizer_type: str | None, use_8bit_adam: bool = False) -> str:
    """The canonical name (kohya: empty means AdamW, ``--use_8bit_adam`` means AdamW8bit)."""
    name = (optimizer_type or "").strip()
    if not name:
        return "AdamW8bit" if use_8bit_adam else "AdamW"
    return name


def build_optimizer(optimizer_type: str | None, params: Iterable, lr: float,
                    optimizer_args: list[str] | None = None, use_8bit_adam: bool = False
                    ) -> tuple[str, str, torch.optim.Optimizer]:
    """Build the optimizer for ``params`` (tensors or kohya param-group dicts).

    Returns:
        (class path for the metadata, args text for the metadata, optimizer)
    """
    name = optimizer_name(optimizer_type, use_8bit_adam)
    kwargs = parse_optimizer_args(optimizer_args)
    args_text = ",".join(f"{k}={v}" for k, v in kwargs.items())
    lower = name.lower()
    if lower == "adamw":
        cls = torch.optim.AdamW
    elif lower == "adamw8bit":
        cls = _import_class("bitsandbytes.optim.AdamW8bit", extra="bnb")
    elif "." in name:
        cls = _import_class(name, extra=None)
    else:
        raise ConfigError(f"--optimizer_type {name!r} is not supported: use AdamW, AdamW8bit or a dotted "
                          "class path such as torch.optim.SGD")
    try:
        opt = cls(params, lr=lr, **kwargs)
    except TypeError as e:
        raise ConfigError(f"--optimizer_args do not fit {cls.__module__}.{cls.__name__}: {e}") from e
    logger.info("optimizer %s.%s, args %s", cls.__module__, cls.__name__, kwargs or "{}")
    return f"{cls.__module__}.{cls.__name__}", args_text, opt


def _import_class(path: str, extra: str | None):
    module_name, _, cls_name = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        hint = f"; install it with: pip install 'sdtk[{extra}]'" if extra else ""
        raise ConfigError(f"optimizer module {module_name!r} cannot be imported ({e}){hint}") from e
    try:
        return getattr(module, cls_name)
    except AttributeError as e:
        raise ConfigError(f"module {module_name!r} has no optimizer class {cls_name!r}") from e

"""Conversion and checking of one flag's raw value (command-line text or TOML value).

Command-line values arrive as text; TOML values arrive typed (numbers, booleans, lists) and
are accepted when they mean the same thing (``max_train_steps = 100.0``, ``resolution = 512``,
a single ``network_args = "a=1"`` for a list flag). Every failure is returned as a text
naming what was expected, so the caller can report all problems at once.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from library.config.flags.base import INT_OR_FLOAT, Flag, suggest


# ---- value conversion --------------------------------------------------------------------


def _int_or_float(text: str) -> int | float:
    """kohya's int_or_float: "100" -> 100, "0.1" -> 0.1, "10%" -> 0.1."""
    text = text.strip()
    if text.endswith("%"):
        return float(text[:-1]) / 100.0
    try:
        return int(text)
    except ValueError:
        value = float(text)
        return int(value) if value >= 1 and value.is_integer() else value


def _convert_one(flag: Flag, value: Any) -> Any:
    """Convert one raw value (command-line text or TOML value); raise ValueError with a reason."""
    kind = flag.kind
    if isinstance(value, bool) and kind is not bool:
        raise ValueError(f"expected {kind_name(flag)}, got a boolean")
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError(f"expected an integer, got {value!r}")
            return int(value)
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"expected an integer, got {value!r}") from None
    if kind is float:
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"expected a number, got {value!r}") from None
    if kind is INT_OR_FLOAT:
        if isinstance(value, (int, float)):
            return _int_or_float(repr(value))
        try:
            return _int_or_float(str(value))
        except ValueError:
            raise ValueError(f"expected a step count or a ratio, got {value!r}") from None
    if isinstance(value, (list, dict)):
        raise ValueError(f"expected {kind_name(flag)}, got {type(value).__name__}")
    return Path(str(value)) if kind is Path else str(value)


def kind_name(flag: Flag) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", Path: "a path",
             INT_OR_FLOAT: "a step count or a ratio", str: "a text"}
    return names[flag.kind]


def convert(flag: Flag, raw: Any) -> tuple[Any, list[str]]:
    """Convert and check a raw value for ``flag``; returns (value, problems)."""
    if raw is None:
        return None, []
    if isinstance(raw, (list, tuple)) and not flag.is_list:
        return None, [f"expected a single value, got a list {list(raw)!r}"]
    items = raw if isinstance(raw, (list, tuple)) else [raw]
    out, problems = [], []
    for item in items:
        try:
            value = _convert_one(flag, item)
        except ValueError as e:
            problems.append(str(e))
            continue
        if isinstance(value, float) and math.isnan(value):
            problems.append("must be a number, got nan")
            continue
        if flag.choices is not None and value not in flag.choices:
            problems.append(_choice_problem(flag, value))
            continue
        if flag.check is not None:
            problem = flag.check(value)
            if problem:
                problems.append(problem)
                continue
        out.append(value)
    if isinstance(flag.nargs, int) and not isinstance(flag.nargs, bool) and len(items) != flag.nargs:
        problems.append(f"expected {flag.nargs} values, got {len(items)}")
    if flag.nargs == "+" and not items:
        problems.append("expected at least one value")
    if problems:
        return None, problems
    return (out if flag.is_list else out[0]), []


def _choice_problem(flag: Flag, value: Any) -> str:
    shown = [c for c in flag.choices if c is not None]
    msg = f"invalid choice {value!r}; choose one of {', '.join(map(str, shown))}"
    hint = suggest(value, [c for c in shown if isinstance(c, str)]) if isinstance(value, str) else None
    return msg + (f" (did you mean {hint!r}?)" if hint else "")

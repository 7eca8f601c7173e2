"""The declaration type for command-line flags, their support status and value checks.

A :class:`Flag` is the single declaration of one setting: kohya's spelling and destination,
type, default, choices, nargs, our help text, the scripts it belongs to and whether sdtk
implements it. ``library.config.args`` builds argparse parsers, validation, ``--output_config``
and ``docs/flags.md`` from these declarations alone.

Flipping a flag from "not implemented yet" to implemented is a one-word change in its
declaration: ``TODO`` -> ``DONE``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence


@dataclass(frozen=True)
class Support:
    """Whether sdtk implements a flag; ``reason`` says why not (one line) when it does not."""

    implemented: bool
    reason: str = ""

    @property
    def label(self) -> str:
        return "implemented" if self.implemented else f"not supported: {self.reason}"


DONE = Support(True)
TODO = Support(False, "not implemented yet")


def unsupported(reason: str) -> Support:
    """A flag sdtk deliberately does not implement, with a one-line reason."""
    return Support(False, reason)


class IntOrFloat:
    """Marker type for kohya's ``int_or_float``: an int step count, or a float ratio below 1."""


INT_OR_FLOAT = IntOrFloat

# A value check takes the converted value (never None) and returns a problem text or None.
Check = Callable[[Any], "str | None"]

KINDS = (str, int, float, bool, Path, IntOrFloat)


@dataclass(frozen=True)
class Flag:
    """One setting, declared once.

    Attributes:
        spellings: option strings as kohya spells them (``("--v2",)``); a positional argument
            has a single spelling without dashes.
        kind: ``str``, ``int``, ``float``, ``bool`` (a ``store_true`` switch), ``Path`` or
            ``INT_OR_FLOAT``.
        default: the value when the flag is not given (kohya's default).
        support: ``DONE``, ``TODO`` or ``unsupported("reason")``.
        help: our own words for kohya's meaning.
        choices: allowed values (``None`` among them means "unset" is allowed).
        nargs: ``None`` for one value, ``"*"`` / ``"+"`` / an int for a list.
        scripts: the scripts that take this flag; ``None`` means every covered script in which
            kohya has a flag with this dest and the same default and nargs.
        check: extra check on each converted value (range, format).
        dest: namespace attribute; derived from the first long spelling if empty.
        group: topic (section of ``--help``, of docs and of the written TOML); set by the
            topic module.
        secret: never written by ``--output_config`` (API keys, tokens).
        required: must be given (only used by some tools' positional arguments).
        off: values that kohya treats exactly like the default ("off"), e.g. 0 for a flag it
            tests by truthiness; configs written by GUIs often contain them. An unset text
            ("") or an empty list is always treated as off when the default is None.
    """

    spellings: tuple[str, ...]
    kind: type
    default: Any
    support: Support
    help: str
    choices: tuple | None = None
    nargs: str | int | None = None
    scripts: tuple[str, ...] | None = None
    check: Check | None = None
    dest: str = ""
    group: str = ""
    secret: bool = False
    required: bool = False
    off: tuple = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise TypeError(f"flag {self.spellings}: unsupported kind {self.kind!r}")
        if not self.dest:
            long = [s for s in self.spellings if s.startswith("--")] or list(self.spellings)
            object.__setattr__(self, "dest", long[0].lstrip("-"))

    @property
    def positional(self) -> bool:
        return not self.spellings[0].startswith("-")

    @property
    def is_list(self) -> bool:
        return self.nargs is not None

    def is_off(self, value: Any) -> bool:
        """True if ``value`` means the same as leaving the flag at its default."""
        if value == self.default or value in self.off:
            return True
        return self.default is None and value in ("", [])

    @property
    def name(self) -> str:
        """How messages name the flag: its first spelling."""
        return self.spellings[0]


def F(
    spellings: str | Sequence[str],
    kind: type,
    default: Any,
    support: Support,
    help: str,
    **kw: Any,
) -> Flag:
    """Shorthand used by the topic modules: ``F("--seed", int, None, DONE, "help ...")``."""
    if isinstance(spellings, str):
        spellings = (spellings,)
    if "choices" in kw and kw["choices"] is not None:
        kw["choices"] = tuple(kw["choices"])
    if "scripts" in kw and kw["scripts"] is not None:
        kw["scripts"] = tuple(kw["scripts"])
    return Flag(tuple(spellings), kind, default, support, help, **kw)


def in_group(group: str, flags: Sequence[Flag]) -> list[Flag]:
    """Stamp a topic group on a module's declarations."""
    return [dataclasses.replace(f, group=group) for f in flags]


# ---- value checks (each returns a problem text or None) ----------------------------------


def _num(v: Any) -> float:
    return float(v)


def positive(v: Any) -> str | None:
    return None if _num(v) > 0 else f"must be > 0, got {v}"


def non_negative(v: Any) -> str | None:
    return None if _num(v) >= 0 else f"must be >= 0, got {v}"


def at_least(lo: float) -> Check:
    def check(v: Any) -> str | None:
        return None if _num(v) >= lo else f"must be >= {lo}, got {v}"

    return check


def between(lo: float, hi: float, hi_open: bool = False) -> Check:
    """Value in [lo, hi] (or [lo, hi) when ``hi_open``)."""

    def check(v: Any) -> str | None:
        x = _num(v)
        ok = lo <= x < hi if hi_open else lo <= x <= hi
        return None if ok else f"must be in [{lo}, {hi}{')' if hi_open else ']'}, got {v}"

    return check


def finite(v: Any) -> str | None:
    return None if math.isfinite(_num(v)) else f"must be a finite number, got {v}"


def steps_or_ratio(v: Any) -> str | None:
    """kohya's int_or_float steps: an int >= 0, or a float ratio in [0, 1)."""
    if isinstance(v, int):
        return None if v >= 0 else f"must be a step count >= 0 or a ratio in [0, 1), got {v}"
    return None if 0 <= v < 1 else f"must be a step count >= 0 or a ratio in [0, 1), got {v}"


def int_list(sep: str = ",", count: tuple[int, ...] = (1, 2), minimum: int = 1) -> Check:
    """A text like ``"512"`` or ``"512,768"``: ``count`` integers >= ``minimum``."""

    def check(v: Any) -> str | None:
        parts = [p.strip() for p in str(v).split(sep)]
        try:
            nums = [int(p) for p in parts]
        except ValueError:
            return f"must be {' or '.join(str(c) for c in count)} integers separated by '{sep}', got {v!r}"
        if len(nums) not in count or min(nums) < minimum:
            return f"must be {' or '.join(str(c) for c in count)} integers >= {minimum} separated by '{sep}', got {v!r}"
        return None

    return check


def float_pair(v: Any) -> str | None:
    """A text ``"a,b"`` of two numbers with a <= b (e.g. face_crop_aug_range "2.0,4.0")."""
    try:
        a, b = (float(p) for p in str(v).split(","))
    except ValueError:
        return f"must be two numbers 'low,high', got {v!r}"
    return None if 0 < a <= b else f"must be two numbers 0 < low <= high, got {v!r}"


def key_values(v: Any) -> str | None:
    """One ``key=value`` item of --network_args / --optimizer_args / --lr_scheduler_args."""
    s = str(v)
    if "=" not in s or not s.split("=", 1)[0].strip():
        return f"items must look like key=value, got {s!r}"
    return None


def suggest(word: str, candidates: Sequence[str]) -> str | None:
    """The closest candidate (case-insensitive), or None when nothing is close."""
    lowered = {c.lower(): c for c in candidates}
    if word.lower() in lowered:
        return lowered[word.lower()]
    hits = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[hits[0]] if hits else None

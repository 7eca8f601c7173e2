"""Counts from user-given ratios, computed exactly.

A ratio such as ``--lr_warmup_steps 0.29`` or ``validation_split = 0.35`` means the decimal the user
wrote. Multiplying the binary float instead can land just below a whole number (0.29 x 100 =
28.999999999999996) and a floor or ceiling then miscounts by one — an off-by-one that kohya's
scripts have, and that made a validation split overlap its training split. These helpers read the
ratio as its shortest decimal (``repr``) and count in exact fractions.
"""

from __future__ import annotations

import math
from fractions import Fraction


def exact(value: float | int) -> Fraction:
    """``value`` as the decimal it is written as (``0.1`` -> 1/10), exactly."""
    return Fraction(repr(value)) if isinstance(value, float) else Fraction(value)


def floor_of(ratio: float | int, total: int) -> int:
    """``floor(ratio * total)`` in exact arithmetic."""
    return math.floor(exact(ratio) * total)


def ceil_of(ratio: float | int, total: int) -> int:
    """``ceil(ratio * total)`` in exact arithmetic."""
    return math.ceil(exact(ratio) * total)


def floor_scaled(step: int, count: int | float, span: int | float) -> int:
    """``floor(step * count / span)`` in exact arithmetic (linear growth of a count over ``span`` steps)."""
    return math.floor(Fraction(step) * exact(count) / exact(span))

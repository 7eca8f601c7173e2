"""The trainer's family interface, now in :mod:`library.models.families` (one module per family).

Kept so the older import path works: :class:`Conditioning` and :class:`FamilyAdapter` are
re-exported, and :func:`get_family_adapter` asks the family for its adapter.
"""

from __future__ import annotations

from library.models.families import Conditioning, Family, FamilyAdapter

__all__ = ["Conditioning", "FamilyAdapter", "get_family_adapter"]


def get_family_adapter(family: Family | str) -> FamilyAdapter:
    """The adapter instance for ``family`` (``Family(family).adapter()``)."""
    return Family(family).adapter()

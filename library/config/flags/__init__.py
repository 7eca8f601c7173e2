"""All flag declarations, grouped by topic (one module per topic).

Each topic module exposes ``FLAGS``: a list of :class:`~library.config.flags.base.Flag`.
A dest may be declared only once (checked at import).
"""

from __future__ import annotations

from library.config.flags import (
    config, dataset, logging, loss, model, network, optimizer, sampling, saving, training, validation,
)
from library.config.flags.base import Flag
from library.config.flags.scripts import COVERED_SCRIPTS, NETWORK_TRAINERS

ALL_FLAGS: list[Flag] = [
    *config.FLAGS, *model.FLAGS, *dataset.FLAGS, *training.FLAGS, *loss.FLAGS, *optimizer.FLAGS,
    *network.FLAGS, *saving.FLAGS, *logging.FLAGS, *sampling.FLAGS, *validation.FLAGS,
]


def _check_unique(flags: list[Flag]) -> None:
    seen: dict[str, Flag] = {}
    for f in flags:
        if f.dest in seen:
            raise RuntimeError(f"flag dest {f.dest!r} is declared twice: {seen[f.dest].spellings} and {f.spellings}")
        seen[f.dest] = f


_check_unique(ALL_FLAGS)

__all__ = ["ALL_FLAGS", "COVERED_SCRIPTS", "NETWORK_TRAINERS", "Flag"]

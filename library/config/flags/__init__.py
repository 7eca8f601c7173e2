"""All flag declarations, grouped by topic (one module per topic).

Each topic module exposes ``FLAGS``: a list of :class:`~library.config.flags.base.Flag`.
A dest may be declared only once per script (checked at import).
"""

from __future__ import annotations

from library.config.flags import (
    config, dataset, deepspeed, embedding, full_model, gen_img, logging, loss, model, network, optimizer, sampling, saving,
    training, validation,
)
from library.config.flags.base import Flag
from library.config.flags.scripts import COVERED_SCRIPTS, FULL_TRAINERS, NETWORK_TRAINERS

ALL_FLAGS: list[Flag] = [
    *config.FLAGS, *model.FLAGS, *dataset.FLAGS, *training.FLAGS, *deepspeed.FLAGS, *loss.FLAGS, *optimizer.FLAGS,
    *network.FLAGS, *saving.FLAGS, *logging.FLAGS, *sampling.FLAGS, *validation.FLAGS, *gen_img.FLAGS,
    *full_model.FLAGS, *embedding.FLAGS,
]


def _check_unique(flags: list[Flag]) -> None:
    # a dest may be declared once per script; declarations without ``scripts`` cover the covered scripts
    seen: dict[str, list[Flag]] = {}
    for f in flags:
        scripts = set(f.scripts if f.scripts is not None else COVERED_SCRIPTS)
        for other in seen.get(f.dest, []):
            if scripts & set(other.scripts if other.scripts is not None else COVERED_SCRIPTS):
                raise RuntimeError(f"flag dest {f.dest!r} is declared twice: {other.spellings} and {f.spellings}")
        seen.setdefault(f.dest, []).append(f)


_check_unique(ALL_FLAGS)

__all__ = ["ALL_FLAGS", "COVERED_SCRIPTS", "FULL_TRAINERS", "NETWORK_TRAINERS", "Flag"]

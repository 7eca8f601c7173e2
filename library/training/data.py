"""Training data for the loop: the epoch plan split over processes, resumable at any batch.

Every process walks the same seeded epoch plan of *global* batches (each one bucket, of
``train_batch_size x num_processes`` samples) and loads only its slice of each. One process
with batch 2 and two processes with batch 1 therefore see the same global batches in the same
order, and a run can resume from (epoch, batch position) alone: every random choice of a
sample is drawn from its :class:`~library.data.dataset.SampleKey`.

The keys travel with the indices to the DataLoader's workers, so workers kept for the whole run
(``--persistent_data_loader_workers``) load exactly what workers started for each epoch load.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from library.data.dataset import DatasetGroup, SampleKey, collate

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalSlice:
    """This process's part of one global batch.

    Attributes:
        indices: sample indices to load (never empty: a process with nothing to do repeats the
            last sample with weight 0, so every process runs the same collective operations).
        n_real: how many of ``indices`` count (the rest are padding).
        first_index: position of ``indices[0]`` in the global batch (seeds its noise).
        global_size: samples in the global batch (the loss divisor).
    """

    indices: list[int]
    n_real: int
    first_index: int
    global_size: int


def local_slice(batch: list[int], rank: int, world: int) -> LocalSlice:
    """Split ``batch`` into ``world`` contiguous parts and return part ``rank``."""
    per = math.ceil(len(batch) / world)
    start = min(rank * per, len(batch))
    part = batch[start : start + per]
    if part:
        return LocalSlice(part, len(part), start, len(batch))
    return LocalSlice([batch[-1]], 0, len(batch) - 1, len(batch))


def scale_batch_sizes(blueprint: Any, world: int) -> Any:
    """The blueprint with every dataset's batch size multiplied by ``world`` (global batches)."""
    if world == 1:
        return blueprint
    return dataclasses.replace(
        blueprint, datasets=[dataclasses.replace(d, batch_size=d.batch_size * world) for d in blueprint.datasets])


def loader_workers(num_workers: int) -> int:
    """Worker processes for ``--max_data_loader_n_workers``: capped by the CPU count (kohya)."""
    return max(0, min(num_workers, os.cpu_count() or 1))


class _KeyList(torch.utils.data.Sampler):
    """The batches of one pass. A persistent loader keeps its sampler, so a new pass replaces
    ``keys`` (a new list, never mutated: a started pass keeps walking its own)."""

    def __init__(self, keys: list[list[SampleKey]]):
        self.keys = keys

    def __iter__(self):
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


class ShardedPlan:
    """The epoch plans of a :class:`DatasetGroup`, cut into this process's slices.

    With ``persistent`` loading (kohya's ``--persistent_data_loader_workers``) the plan also owns
    the one DataLoader of the run, whose workers load every epoch; :meth:`close` stops them.
    """

    def __init__(self, group: DatasetGroup, rank: int, world: int, grad_accum: int):
        self.group, self.rank, self.world, self.grad_accum = group, rank, world, max(1, grad_accum)
        self.batches_per_epoch = group.num_batches()
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / self.grad_accum)
        self._cache: tuple[int, list[list[int]]] | None = None
        self._loader: torch.utils.data.DataLoader | None = None  # the persistent one
        self._pass = 0  # which pass of the persistent loader is current (see iterate_epoch)

    def plan(self, epoch: int) -> list[list[int]]:
        """Global batches of ``epoch`` (1-based), cached for the current epoch."""
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, self.group.epoch_batches(epoch))
        return self._cache[1]

    def slices(self, epoch: int, start: int) -> Iterator[tuple[int, LocalSlice, list[SampleKey]]]:
        """``(position, slice, keys)`` for every batch of ``epoch`` from ``start`` on."""
        plan = self.plan(epoch)
        slot = sum(len(b) for b in plan[:start])
        for pos in range(start, len(plan)):
            batch = plan[pos]
            sl = local_slice(batch, self.rank, self.world)
            step = (epoch - 1) * self.steps_per_epoch + pos // self.grad_accum
            keys = [SampleKey(i, epoch, step, slot + sl.first_index + j) for j, i in enumerate(sl.indices)]
            slot += len(batch)
            yield pos, sl, keys

    def loader(self, keys: list[list[SampleKey]], workers: int, persistent: bool) -> torch.utils.data.DataLoader:
        """A DataLoader that loads the batches ``keys`` (with ``workers`` processes).

        Persistent (and ``workers`` > 0): the plan's one loader, its batches replaced; its worker
        processes, started by the first pass, serve every later pass. A sample's randomness comes
        from its key alone, so these workers load exactly what fresh ones would.
        """
        if not (persistent and workers > 0):
            return torch.utils.data.DataLoader(self.group, batch_sampler=_KeyList(keys), collate_fn=collate,
                                               num_workers=workers)
        if self._loader is not None and self._loader.num_workers != workers:
            self.close()
        if self._loader is None:
            self._loader = torch.utils.data.DataLoader(self.group, batch_sampler=_KeyList([]), collate_fn=collate,
                                                       num_workers=workers, persistent_workers=True)
            logger.info("data loader: %d persistent worker processes", workers)
        self._loader.batch_sampler.keys = keys
        return self._loader

    def close(self) -> None:
        """Stop the persistent loader's worker processes (if any); safe to call more than once.

        A later :func:`iterate_epoch` starts new ones.
        """
        loader, self._loader = self._loader, None
        self._pass += 1  # a pass still being iterated is over
        iterator = getattr(loader, "_iterator", None)  # the workers live in the loader's kept iterator
        if iterator is not None:
            loader._iterator = None
            shutdown = getattr(iterator, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def __enter__(self) -> "ShardedPlan":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def iterate_epoch(plan: ShardedPlan, epoch: int, start: int, num_workers: int, persistent: bool = False
                  ) -> Iterator[tuple[int, LocalSlice, dict[str, Any]]]:
    """Load the batches of ``epoch`` from position ``start``: ``(position, slice, batch dict)``.

    The batch dict is :func:`library.data.dataset.collate`'s layout. Without ``persistent`` (or
    without workers) each call builds a DataLoader whose workers end with the epoch; with it, all
    calls share the plan's loader (call :meth:`ShardedPlan.close` when training ends). One pass of
    a persistent loader is current at a time: starting a new one ends the previous (a generator of
    an ended pass raises instead of yielding another pass's batches).
    """
    items = list(plan.slices(epoch, start))
    if not items:
        return
    workers = loader_workers(num_workers)
    shared = persistent and workers > 0
    loader = plan.loader([k for _, _, k in items], workers, persistent)
    if shared:
        plan._pass += 1
    ticket = plan._pass
    batches = iter(loader)
    for pos, sl, _ in items:
        if shared and plan._pass != ticket:
            raise RuntimeError("a pass of the persistent data loader was abandoned and another started; "
                               "iterate one epoch at a time")
        yield pos, sl, next(batches)

"""Training data for the loop: the epoch plan split over processes, resumable at any batch.

Every process walks the same seeded epoch plan of *global* batches (each one bucket, of
``train_batch_size x num_processes`` samples) and loads only its slice of each. One process
with batch 2 and two processes with batch 1 therefore see the same global batches in the same
order, and a run can resume from (epoch, batch position) alone: every random choice of a
sample is drawn from its :class:`~library.data.dataset.SampleKey`.
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


class ShardedPlan:
    """The epoch plans of a :class:`DatasetGroup`, cut into this process's slices."""

    def __init__(self, group: DatasetGroup, rank: int, world: int, grad_accum: int):
        self.group, self.rank, self.world, self.grad_accum = group, rank, world, max(1, grad_accum)
        self.batches_per_epoch = group.num_batches()
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / self.grad_accum)
        self._cache: tuple[int, list[list[int]]] | None = None

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


class _KeyList(torch.utils.data.Sampler):
    def __init__(self, keys: list[list[SampleKey]]):
        self.keys = keys

    def __iter__(self):
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


def iterate_epoch(plan: ShardedPlan, epoch: int, start: int, num_workers: int, persistent: bool = False
                  ) -> Iterator[tuple[int, LocalSlice, dict[str, Any]]]:
    """Load the batches of ``epoch`` from position ``start``: ``(position, slice, batch dict)``.

    The batch dict is :func:`library.data.dataset.collate`'s layout.
    """
    items = list(plan.slices(epoch, start))
    if not items:
        return
    workers = max(0, min(num_workers, os.cpu_count() or 1))
    loader = torch.utils.data.DataLoader(plan.group, batch_sampler=_KeyList([k for _, _, k in items]),
                                         collate_fn=collate, num_workers=workers,
                                         persistent_workers=False)
    for (pos, sl, _), batch in zip(items, loader):
        yield pos, sl, batch

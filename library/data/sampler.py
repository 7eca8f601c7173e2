"""The batch sampler (one bucket per batch, seeded epoch plans, exact resume) and the DataLoader.

Resuming exactly needs the number of batches the *training loop* has consumed, not the number
the sampler has handed to the DataLoader (which prefetches ahead, and does so in worker
processes). :class:`ResumableLoader` therefore counts batches as it yields them, and its
:meth:`~ResumableLoader.state_dict` is what a training state should save.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Iterator

import torch

from library.data.dataset import DatasetGroup, SampleKey, collate
from library.errors import DatasetError

logger = logging.getLogger(__name__)


class BucketBatchSampler(torch.utils.data.Sampler):
    """Yields the batches of one epoch as lists of :class:`SampleKey`, from ``position`` on.

    ``position`` counts the batches of the current epoch the training loop has consumed; the
    consumer advances it (:class:`ResumableLoader` does), because a DataLoader pulls batches from
    the sampler ahead of their use. :meth:`state_dict` / :meth:`load_state_dict` save and restore
    (epoch, position) for an exact resume.

    Args:
        group: the datasets.
        gradient_accumulation_steps: batches per optimizer step (the key's ``step`` is the
            optimizer step, which token warm-up uses).
    """

    def __init__(self, group: DatasetGroup, gradient_accumulation_steps: int = 1):
        self.group = group
        self.seed = group.seed
        self.grad_accum = max(1, gradient_accumulation_steps)
        self.epoch = 1
        self.position = 0
        self._num_batches = group.num_batches()

    def set_epoch(self, epoch: int) -> None:
        """Select the (1-based) epoch to play; a different epoch starts at its first batch."""
        if epoch != self.epoch:
            self.position = 0
        self.epoch = epoch

    def __len__(self) -> int:
        return self._num_batches

    def __iter__(self) -> Iterator[list[SampleKey]]:
        plan = self.group.epoch_batches(self.epoch)
        slots = [0]
        for batch in plan[:-1]:
            slots.append(slots[-1] + len(batch))
        for pos in range(self.position, len(plan)):
            step = ((self.epoch - 1) * len(plan) + pos) // self.grad_accum
            yield [SampleKey(i, self.epoch, step, slots[pos] + j) for j, i in enumerate(plan[pos])]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_batches": len(self)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved (epoch, position).

        Raises:
            DatasetError: the dataset, batch size or seed changed since the state was saved.
        """
        if state.get("num_batches") != len(self) or state.get("seed") != self.seed:
            raise DatasetError(
                f"cannot resume the data position: the saved state has {state.get('num_batches')} batches per epoch "
                f"and seed {state.get('seed')}, this run {len(self)} and seed {self.seed}. "
                "The dataset, batch size or seed changed; resume with the same ones"
            )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])


class ResumableLoader:
    """A DataLoader over a :class:`BucketBatchSampler` that advances the sampler's position as
    the training loop consumes batches.

    Iterate it once per epoch after :meth:`set_epoch`; when an epoch completes, the position moves
    to the start of the next epoch. Save :meth:`state_dict` with the training state.
    """

    def __init__(self, dataloader: torch.utils.data.DataLoader, sampler: BucketBatchSampler):
        self.dataloader = dataloader
        self.sampler = sampler

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    @property
    def position(self) -> int:
        return self.sampler.position

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        """Batches per epoch (a resumed epoch yields ``len(self) - position`` of them)."""
        return len(self.sampler)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.dataloader:
            self.sampler.position += 1
            yield batch
        # the epoch is complete: a state saved now resumes at the next epoch's start
        self.sampler.set_epoch(self.sampler.epoch + 1)

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.load_state_dict(state)


def build_dataloader(
    group: DatasetGroup,
    *,
    max_data_loader_n_workers: int = 8,
    persistent_data_loader_workers: bool = False,
    gradient_accumulation_steps: int = 1,
) -> ResumableLoader:
    """The training DataLoader with kohya's worker options.

    ``max_data_loader_n_workers`` is capped by the CPU count (kohya); 0 loads in the main
    process. Workers need no seeding: every random choice comes from the sample's key.
    """
    n_workers = max(0, min(max_data_loader_n_workers, os.cpu_count() or 1))
    sampler = BucketBatchSampler(group, gradient_accumulation_steps)
    loader = torch.utils.data.DataLoader(
        group,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=n_workers,
        persistent_workers=persistent_data_loader_workers and n_workers > 0,
    )
    logger.info("data loader: %d batches per epoch, %d workers", len(sampler), n_workers)
    return ResumableLoader(loader, sampler)

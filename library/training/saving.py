"""Output names and the save / keep-last-N policy, with kohya's file names.

- per epoch: ``NAME-000001.safetensors`` (state: ``NAME-000001-state``)
- per step: ``NAME-step00000100.safetensors`` (state: ``NAME-step00000100-state``)
- at the end: ``NAME.safetensors`` (state: ``NAME-state``)

Without ``--output_name`` kohya uses ``epoch`` / ``at`` / ``last`` as NAME; so does sdtk.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from library.config.settings import flag_values

logger = logging.getLogger(__name__)


def epoch_name(output_name: str | None, epoch: int) -> str:
    return f"{output_name or 'epoch'}-{epoch:06d}"


def step_name(output_name: str | None, step: int) -> str:
    return f"{output_name or 'at'}-step{step:08d}"


def last_name(output_name: str | None) -> str:
    return output_name or "last"


def model_ext(save_model_as: str | None) -> str:
    return "." + (save_model_as or "safetensors")


@dataclass(frozen=True)
class SavePolicy:
    """When to save models and states (kohya's ``--save_*`` flags)."""

    every_n_epochs: int | None = None
    every_n_steps: int | None = None
    last_n_epochs: int | None = None
    last_n_steps: int | None = None
    last_n_epochs_state: int | None = None
    last_n_steps_state: int | None = None
    save_state: bool = False
    save_state_on_train_end: bool = False

    @classmethod
    def from_args(cls, args: Any, num_epochs: int) -> "SavePolicy":
        """The policy of kohya's ``--save_*`` flags for a run of ``num_epochs`` epochs
        (``--save_n_epoch_ratio N``: about N saves over the run, overriding ``--save_every_n_epochs``)."""
        v = flag_values(args)
        every_n_epochs = v["save_every_n_epochs"]
        if v["save_n_epoch_ratio"]:
            every_n_epochs = num_epochs // v["save_n_epoch_ratio"] or 1
        return cls(every_n_epochs, v["save_every_n_steps"], v["save_last_n_epochs"], v["save_last_n_steps"],
                   v["save_last_n_epochs_state"], v["save_last_n_steps_state"], bool(v["save_state"]),
                   bool(v["save_state_on_train_end"]))

    def save_at_step(self, step: int) -> bool:
        return bool(self.every_n_steps) and step % self.every_n_steps == 0

    def save_at_epoch(self, epoch_no: int, num_epochs: int) -> bool:
        """``epoch_no`` is 1-based; the last epoch is covered by the final save (kohya)."""
        return bool(self.every_n_epochs) and epoch_no % self.every_n_epochs == 0 and epoch_no < num_epochs

    def removable_epoch(self, epoch_no: int, state: bool = False) -> int | None:
        """The epoch whose file falls out of the keep-last-N window once ``epoch_no`` is saved."""
        keep = (self.last_n_epochs_state or self.last_n_epochs) if state else self.last_n_epochs
        if not keep or not self.every_n_epochs:
            return None
        old = epoch_no - self.every_n_epochs * keep
        return old if old > 0 else None

    def removable_step(self, step: int, state: bool = False) -> int | None:
        """kohya's rule: drop the save at or below ``step - keep - 1`` rounded to the save cadence."""
        keep = (self.last_n_steps_state or self.last_n_steps) if state else self.last_n_steps
        if not keep or not self.every_n_steps:
            return None
        old = step - keep - 1
        old -= old % self.every_n_steps
        return old if old > 0 else None


def remove_output(path: Path) -> None:
    """Delete an old model file or state folder (missing is fine)."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
        logger.info("removed old state %s", path)
    elif path.exists():
        path.unlink()
        logger.info("removed old model %s", path)


_STEP_RE = re.compile(r"-step(\d{8})")


def existing_saves(output_dir: Path, name: str) -> list[Path]:
    """Files and folders in ``output_dir`` that a run named ``name`` wrote (for listing in messages)."""
    return sorted(p for p in output_dir.glob(f"{name}*") if not p.name.startswith(".sdtk-tmp-"))

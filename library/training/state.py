"""Training state: what ``--save_state`` writes and ``--resume`` reads back, exactly.

A state folder holds everything needed to continue bit-identically:

- ``network.pt``: the trainable network's ``state_dict`` (full precision)
- ``optimizer.pt``, ``scheduler.pt``, ``scaler.pt`` (fp16 grad scaler, when used)
- ``rng.pt``: torch (CPU and CUDA), numpy and Python RNG states
- ``train_state.json``: epoch, optimizer step, position inside the epoch, the data
  sampler's state (shuffle order position, caption RNG) and a signature of the run's
  setup, checked on resume so an incompatible state is refused with the differences listed.

The folder is written through :func:`library.utils.atomic.atomic_dir`: a crash (even SIGKILL)
leaves the previous state or the complete new one. kohya also writes ``train_state.json``
with ``current_epoch`` / ``current_step``; the same keys are kept for tools that read them.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from library.errors import ConfigError, TrainingError
from library.utils.atomic import atomic_dir

logger = logging.getLogger(__name__)

STATE_VERSION = 1
_FILES = ("network.pt", "optimizer.pt", "scheduler.pt", "rng.pt", "train_state.json")


@dataclass
class Progress:
    """Counters of a run.

    Attributes:
        epoch: 0-based epoch in progress (or about to start).
        global_step: optimizer steps done.
        batch_in_epoch: global batches of ``epoch`` already consumed.
        micro_step: forward/backward passes done (seeds each pass's noise).
        data_shift: global batches the data order lags behind the counters: a run started at
            ``--initial_step`` without ``--skip_until_initial_step`` counts from that step but
            reads the data from its first batch (kohya). 0 otherwise.
    """

    epoch: int = 0
    global_step: int = 0
    batch_in_epoch: int = 0
    micro_step: int = 0
    data_shift: int = 0


@dataclass
class TrainState:
    """Everything in a state folder, in memory."""

    progress: Progress
    network: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]
    data: dict[str, Any] = field(default_factory=dict)
    signature: dict[str, Any] = field(default_factory=dict)
    scaler: dict[str, Any] | None = None


def capture_rng() -> dict[str, Any]:
    """All global RNG states (torch CPU / CUDA, numpy, Python)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(folder: str | Path, state: TrainState) -> Path:
    """Write ``state`` to ``folder`` atomically (replacing an older state of that name)."""
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        torch.save({k: v.detach().cpu() for k, v in state.network.items()}, tmp / "network.pt")
        torch.save(state.optimizer, tmp / "optimizer.pt")
        torch.save(state.scheduler, tmp / "scheduler.pt")
        torch.save(state.rng, tmp / "rng.pt")
        if state.scaler is not None:
            torch.save(state.scaler, tmp / "scaler.pt")
        progress = asdict(state.progress)
        # kept beside the data position, so "progress" holds the same four counters as ever
        data = {**state.data, "data_shift": progress.pop("data_shift")}
        meta = {
            "sdtk_state_version": STATE_VERSION,
            "progress": progress,
            "data": data,
            "signature": state.signature,
            # kohya's keys, for tools that read them
            "current_epoch": state.progress.epoch,
            "current_step": state.progress.global_step,
        }
        (tmp / "train_state.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    logger.info("saved training state to %s (step %d)", folder, state.progress.global_step)
    return folder


def load_state(folder: str | Path, expected_signature: dict[str, Any] | None = None) -> TrainState:
    """Read a state folder written by :func:`save_state`.

    Raises:
        TrainingError: the folder is missing, incomplete, from kohya/accelerate (other layout)
            or from a run whose setup differs in a way that prevents continuing.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise TrainingError(f"--resume {folder}: no such state folder; point it at a '*-state' folder written "
                            "by --save_state")
    missing = [f for f in _FILES if not (folder / f).is_file()]
    if missing:
        hint = " (this looks like a kohya/accelerate state, which sdtk cannot continue exactly)" \
            if (folder / "model.safetensors").exists() or (folder / "random_states_0.pkl").exists() else ""
        raise TrainingError(f"--resume {folder}: incomplete state, missing {', '.join(missing)}{hint}")
    meta = json.loads((folder / "train_state.json").read_text(encoding="utf-8"))
    if meta.get("sdtk_state_version") != STATE_VERSION:
        raise TrainingError(f"--resume {folder}: state version {meta.get('sdtk_state_version')} is not "
                            f"{STATE_VERSION}; it was written by another sdtk version")
    signature = meta.get("signature", {})
    if expected_signature is not None:
        diffs = [f"{k}: state has {signature.get(k)!r}, this run has {v!r}"
                 for k, v in expected_signature.items() if signature.get(k) != v]
        if diffs:
            raise TrainingError(f"--resume {folder}: the state does not fit this run:\n  - " + "\n  - ".join(diffs)
                                + "\nresume with the settings of the original run")
    load = lambda name: torch.load(folder / name, map_location="cpu", weights_only=False)  # noqa: E731
    return TrainState(
        progress=Progress(**meta["progress"], data_shift=int(meta.get("data", {}).get("data_shift", 0))),
        network=load("network.pt"),
        optimizer=load("optimizer.pt"),
        scheduler=load("scheduler.pt"),
        rng=load("rng.pt"),
        data=meta.get("data", {}),
        signature=signature,
        scaler=load("scaler.pt") if (folder / "scaler.pt").is_file() else None,
    )


def start_progress(initial_step: int | None, initial_epoch: int | None, skip_data: bool, *,
                   steps_per_epoch: int, batches_per_epoch: int, grad_accum: int, max_train_steps: int) -> Progress:
    """The counters of a run that starts at ``--initial_step`` / ``--initial_epoch`` without a state (kohya).

    ``--initial_step`` wins over ``--initial_epoch`` (1-based: epoch E starts at step
    ``(E - 1) * steps_per_epoch``). The counters are those of a run that did those steps, so the
    schedules, saves and ``max_train_steps`` count from there. With ``skip_data`` the data order
    continues where those steps would have left it; without, it starts from its first batch.

    Raises:
        ConfigError: the start is at or past ``max_train_steps``.
    """
    if initial_step is not None:
        step, given = initial_step, f"--initial_step {initial_step}"
    elif initial_epoch is not None:
        step = (initial_epoch - 1) * steps_per_epoch
        given = f"--initial_epoch {initial_epoch} (step {step}, {steps_per_epoch} steps per epoch)"
    else:
        return Progress()
    if step >= max_train_steps:
        raise ConfigError(f"{given} is not before the end of training at step {max_train_steps} "
                          "(--max_train_steps, or --max_train_epochs x steps per epoch); lower it or train longer")
    epoch, step_in_epoch = divmod(step, steps_per_epoch)
    batch = step_in_epoch * max(1, grad_accum)  # < batches_per_epoch: the epoch's last step may be short
    consumed = epoch * batches_per_epoch + batch
    return Progress(epoch=epoch, global_step=step, batch_in_epoch=batch, micro_step=consumed,
                    data_shift=0 if skip_data else consumed)

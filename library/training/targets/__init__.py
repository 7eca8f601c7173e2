"""What a run trains: the pluggable *training target* of the one trainer template.

The template (:class:`library.training.trainer.Trainer`) and the shared loop, step, saving,
state, sampling, validation and multi-process code never ask *what* is trained; they ask the
session's target (a :class:`TrainingTarget`):

- which parameters are trained, in which optimizer groups and with which learning rates,
- how the model is prepared (frozen parts, dtypes, wrappers such as a LoRA network),
- what a save writes (a network file, a full checkpoint or diffusers folder, ...),
- what a state holds and what a resume restores,
- what the run's metadata says and which settings a resume must match.

Targets: :mod:`.network` (``--network_module``: LoRA and friends), :mod:`.full_model` (the UNet
and optionally the text encoders: DreamBooth, fine-tuning, SDXL fine-tuning). Adding a method
(textual inversion next) means one target module and a thin root script.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch


class TrainingTarget(ABC):
    """The trained part of a run (see the module docstring).

    Attributes:
        train_unet: the UNet (or adapters on it) is trained.
        train_text_encoder: text encoder(s) (or adapters on them) are trained now.
        module: the module whose train/eval mode sampling and validation toggle.
        steps_in_backward: the optimizer steps each parameter during the backward pass
            (``--fused_backward_pass``, ``--fused_optimizer_groups``), so the loop neither reduces, clips
            nor steps.
    """

    train_unet: bool = True
    train_text_encoder: bool = False
    module: torch.nn.Module | None = None
    steps_in_backward: bool = False  # the optimizer steps inside the backward pass (the loop does not)

    # ---------------------------------------------------------------- building
    @abstractmethod
    def build(self, t: Any, model: Any, accelerator: Any, weight_dtype: torch.dtype) -> None:
        """Freeze / unfreeze, cast and wrap the loaded ``model`` for training (before text-encoder
        outputs are cached); afterwards :meth:`param_groups` is valid."""

    def finish(self, t: Any, model: Any, accelerator: Any, weight_dtype: torch.dtype) -> None:
        """Last moves after text-encoder output caching (devices, dtypes, checkpointing hooks)."""

    @abstractmethod
    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups (``{"params": [...], "lr": ...}``); the order is fixed for a run."""

    def trainable_params(self) -> list[torch.nn.Parameter]:
        """Every parameter the optimizer steps (gradient clipping and the multi-process all-reduce)."""
        return [p for g in self.param_groups() for p in (g["params"] if isinstance(g, dict) else [g])]

    def session_ready(self, s: Any) -> None:
        """Hook: the session is complete (optimizer, step counts): warn, refuse, attach optimizer hooks."""

    # ---------------------------------------------------------------- per step
    def on_epoch_start(self, s: Any) -> None:
        """Called before each epoch's first batch."""

    def on_step_start(self, s: Any) -> None:
        """Called before each forward pass."""

    def finish_backward(self, s: Any) -> None:
        """With :attr:`steps_in_backward`: called after each window's last backward pass, before the
        learning-rate schedule steps (step what the backward hooks left)."""

    def after_optimizer_step(self, s: Any, global_step: int) -> tuple[dict[str, float], dict[str, str]]:
        """Called after each optimizer step with the new step count; returns tracker logs and
        progress-bar fields to add."""
        return {}, {}

    # ---------------------------------------------------------------- state
    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights a state folder stores (full precision, exact)."""

    @abstractmethod
    def load_state_dict(self, sd: dict[str, torch.Tensor], where: str) -> None:
        """Restore :meth:`state_dict` (``where`` names the state for messages)."""

    def before_resume(self, s: Any, global_step: int) -> None:
        """Hook: bring the optimizer into the shape it had at ``global_step`` before its state is loaded."""

    def signature(self, s: Any) -> dict[str, Any]:
        """Settings a resume must share with the run that wrote the state (besides the shared ones)."""
        return {}

    # ---------------------------------------------------------------- outputs
    def session_metadata(self, t: Any, s: Any, optimizer_text: str) -> dict[str, str]:
        """The run's metadata, fixed at the start (per-save keys are added by :meth:`save`)."""
        return {}

    def output_suffix(self) -> str:
        """What follows the output name: a file extension (``.safetensors``) or ``""`` for a folder."""
        return ".safetensors"

    @abstractmethod
    def save(self, t: Any, s: Any, path: Path, steps: int, epoch: int) -> None:
        """Write what this target trained to ``path`` atomically (called on the main process only)."""


__all__ = ["TrainingTarget"]

"""The :class:`Session`: everything the training loop needs, built by :func:`library.training.setup.setup_session`.

Its own module so that the setup (which builds it) and the trainer template (which runs it) both
depend on it, not on each other.
"""

from __future__ import annotations

import math
from argparse import Namespace
from dataclasses import dataclass, field
from typing import Any

import torch

from library.config.settings import TrainingSettings
from library.training.family import FamilyAdapter


@dataclass
class Session:
    """Everything the loop needs, built by :func:`library.training.setup.setup_session`.

    ``network`` is the target's module (the network for a network target; the trained UNet and
    text encoders for a full-model target): sampling and validation switch its train/eval mode.
    ``settings`` are the run's typed settings (noise, loss, optimizer, ...), built once from ``args``.
    """

    args: Namespace
    accelerator: Any
    family: FamilyAdapter
    model: Any  # LoadedModel-like: unet, vae, text_encoders, tokenizers, scheduler_config
    network: torch.nn.Module
    net_kwargs: dict[str, Any]
    optimizer: Any
    lr_scheduler: Any
    plan: Any  # library.training.data.ShardedPlan
    group: Any  # the DatasetGroup
    seed: int
    weight_dtype: torch.dtype
    train_unet: bool
    train_text_encoder: bool
    alphas_cumprod: torch.Tensor
    v_prediction: bool
    max_train_steps: int
    num_epochs: int
    metadata: dict[str, str] = field(default_factory=dict)
    save_dtype: torch.dtype | None = None
    trainable_params: list = field(default_factory=list)
    loss_recorder: Any = None  # progress.LossRecorder, set by the loop (saved in states for avr_loss)
    target: Any = None  # library.training.targets.TrainingTarget
    deepspeed_engine: Any = None  # --deepspeed: the engine of the trained modules (library/training/deepspeed_plugin.py)
    settings: TrainingSettings | None = None

    def __post_init__(self) -> None:
        if self.settings is None:
            self.settings = TrainingSettings.from_args(self.args)


def num_epochs_for(max_train_steps: int, steps_per_epoch: int) -> int:
    return math.ceil(max_train_steps / max(1, steps_per_epoch))

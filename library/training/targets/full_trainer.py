"""The template for full-model training scripts (``train_db.py``, ``fine_tune.py``, ``sdxl_train.py``).

A :class:`FullModelTrainer` is the shared :class:`~library.training.trainer.Trainer` with the
full-model target (:mod:`.full_model`); a script overrides only what differs: which text
encoders are trained and with which learning rates, when text-encoder training stops, extra
UNet parameter groups, and the model families it accepts.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from library.config.settings import flag_values
from library.errors import ConfigError, ModelLoadError
from library.models.families import Family
from library.training import saving as S
from library.training.targets.full_model import FullModelTarget, TextEncoderPlan
from library.training.targets.full_saving import SaveFormat, check_output_path, resolve_format
from library.training.trainer import Trainer

logger = logging.getLogger(__name__)


def complete_namespace(args: Any) -> Any:
    """Give ``args`` every setting the shared loop reads that this kohya script does not have.

    kohya's full-model scripts lack the network, validation and ``--initial_step`` flags; the
    shared code reads them, so they are added with kohya's defaults (which mean "off").
    """
    from library.config.args import flags_for
    from library.config.flags.scripts import NETWORK_TRAINERS

    values = vars(args)
    for script in NETWORK_TRAINERS:
        for f in flags_for(script):
            values.setdefault(f.dest, f.default)
    return args


def detect_family(path: str | None, allow_pickle: bool = False) -> Family | None:
    """The family of a model file or diffusers folder from its keys / configs, without loading it
    (``None`` when it cannot be told: loading then reports the problem)."""
    from library.models.checkpoint import CheckpointReader
    from library.models.loading import _diffusers_family, detect_family_from_keys

    if not path:
        return None
    p = Path(path)
    try:
        if p.is_dir():
            return _diffusers_family(p) if (p / "unet" / "config.json").is_file() else None
        if p.is_file():
            return detect_family_from_keys(CheckpointReader(p, allow_pickle=allow_pickle).keys(), str(p))
    except (ModelLoadError, OSError, ValueError):
        return None
    return None


def require_family(trainer: Any, what: str) -> None:
    """Refuse a base model of a family the trainer's script does not train, naming the script that does
    (``trainer.other_scripts``); ``what`` is inserted before "models" (e.g. "embeddings for ")."""
    a = trainer.args
    family = detect_family(a.pretrained_model_name_or_path, bool(flag_values(a)["allow_pickle"]))
    if family is not None and family not in trainer.expected_families():
        hint = trainer.other_scripts.get(family, "another script")
        raise ConfigError(f"{a.pretrained_model_name_or_path} is an {family.pretty} model; use {hint} for it "
                          f"({trainer.script_name}.py trains {what}"
                          f"{', '.join(f.pretty for f in trainer.expected_families())} models)")


class FullModelTrainer(Trainer):
    """Train the UNet (and optionally the text encoders) of an SD1.x / SD2.x model."""

    tracker_name = "finetuning"
    # the script to suggest for a model of another family
    other_scripts: dict[Family, str] = {Family.SDXL: "sdxl_train.py"}

    def __init__(self, args: Any):
        super().__init__(complete_namespace(args))

    # ------------------------------------------------------------------ hooks: what is trained
    def text_encoder_plans(self) -> list[TextEncoderPlan]:
        """Per text encoder of the family: trained or not, and its learning rate."""
        return [TextEncoderPlan(False)] * self.num_text_encoders()

    def stop_text_encoder_step(self) -> int | None:
        """Freeze the text encoders after this many steps (None: train them to the end)."""
        return None

    def unet_param_groups(self) -> Any:
        """Optional ``unet -> param groups`` (``--block_lr``); None is one group at ``--learning_rate``."""
        return None

    def num_text_encoders(self) -> int:
        return max(f.n_text_encoders for f in self.expected_families())

    def save_format(self) -> SaveFormat:
        a = self.args
        return resolve_format(a.save_model_as, bool(a.use_safetensors), a.pretrained_model_name_or_path)

    def make_target(self) -> FullModelTarget:
        return FullModelTarget(self.args, self.text_encoder_plans(), self.stop_text_encoder_step(),
                               self.save_format(), self.unet_param_groups())

    def output_label(self) -> str:
        return "model"

    def sample_images(self, s: Any, steps: int, epoch: int | None) -> None:
        """Samples show the weights that are saved (the EMA ones with ``--ema``)."""
        with s.target.weights_for_output():
            super().sample_images(s, steps, epoch)

    # ------------------------------------------------------------------ checks before loading
    def preflight(self) -> None:
        """The model's family (named script for another family) and the final output path's kind (the
        fused-step conditions are flag rules: library.config.flags.rules.run_problems)."""
        a = self.args
        require_family(self, "")
        fmt = self.save_format()
        check_output_path(Path(a.output_dir or ".") / (S.last_name(a.output_name) + fmt.suffix), fmt)

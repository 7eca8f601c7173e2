"""The full-model target: the UNet and, optionally, the text encoders themselves are trained.

Used by ``train_db.py`` (DreamBooth), ``fine_tune.py`` and ``sdxl_train.py``. The trained
components are kept in float32 master weights under mixed precision (``--full_fp16`` /
``--full_bf16``: in the half dtype), frozen ones in the training dtype. A text encoder can stop
training at a step (``--stop_text_encoder_training``): it is frozen then and its parameters
leave the optimizer (its group is emptied and its optimizer state freed), so a resume after that
step rebuilds the same optimizer shape before loading the state.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from library.config.settings import FusedStepSettings
from library.errors import TrainingError
from library.training.targets import TrainingTarget
from library.training.targets.full_saving import SaveFormat, full_model_metadata, save_full_model
from library.training.targets.prepare import frozen_te_dtype, place_models

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextEncoderPlan:
    """How one text encoder is trained: ``lr`` None means ``--learning_rate``."""

    trained: bool
    lr: float | None = None


def inner_optimizer(optimizer: Any) -> Any:
    """The torch optimizer behind accelerate's wrapper (its ``state`` holds the per-parameter tensors)."""
    return getattr(optimizer, "optimizer", optimizer)


class FullModelTarget(TrainingTarget):
    """Train the model's UNet and the text encoders that ``te_plans`` mark as trained.

    Args:
        args: the run's flags.
        te_plans: one :class:`TextEncoderPlan` per text encoder of the model.
        stop_te_step: freeze the text encoders once this many optimizer steps are done (None: never).
        save_format: how saves are written (:func:`~.full_saving.resolve_format`).
        unet_groups: optional hook ``unet -> param groups`` (``--block_lr``); default one group.
    """

    def __init__(self, args: Any, te_plans: list[TextEncoderPlan], stop_te_step: int | None,
                 save_format: SaveFormat, unet_groups: Any = None):
        self.args = args
        self.fused = FusedStepSettings.from_args(args)
        self.te_plans = te_plans
        self.stop_te_step = stop_te_step
        self.save_format = save_format
        self._unet_groups = unet_groups
        self.train_unet = True
        self.train_text_encoder = any(p.trained for p in te_plans)
        self._groups: list[dict[str, Any]] = []
        self._te_group_ids: list[int] = []
        self._model: Any = None
        self._trained: dict[str, torch.nn.Module] = {}
        self.ema: Any = None  # .ema.EmaWeights with --ema
        self.memory: dict[str, Any] = {}  # the figure printed before training (.memory_plan)
        self._stepper: Any = None  # fused_backward.GroupStepper with --fused_optimizer_groups
        self._rounding: Any = None  # fused_backward.Bf16Rounding with the fused Adafactor + --full_bf16

    def train_dtype(self, weight_dtype: torch.dtype) -> torch.dtype:
        """The dtype of the trained weights: half only with ``--full_fp16`` / ``--full_bf16``."""
        return weight_dtype if (self.args.full_fp16 or self.args.full_bf16) else torch.float32

    # ---------------------------------------------------------------- building
    def build(self, t: Any, model: Any, accelerator: Any, weight_dtype: torch.dtype) -> None:
        a, device = self.args, accelerator.device
        if len(self.te_plans) != len(model.text_encoders):
            raise TrainingError(f"{len(self.te_plans)} text-encoder settings for a model with "
                                f"{len(model.text_encoders)} text encoders")
        dtype = self.train_dtype(weight_dtype)
        te_dtypes = [dtype if p.trained else frozen_te_dtype(weight_dtype, device) for p in self.te_plans]
        place_models(a, model, device, dtype, te_dtypes, [p.trained for p in self.te_plans], train_unet_mode=True)
        self._model = model
        model.unet.requires_grad_(True)
        self._trained = {"unet": model.unet}
        unet_groups = self._unet_groups(model.unet) if self._unet_groups else \
            [{"params": list(model.unet.parameters()), "lr": a.learning_rate}]
        self._groups = list(unet_groups)
        for i, (te, plan) in enumerate(zip(model.text_encoders, self.te_plans)):
            if not plan.trained:
                continue
            te.requires_grad_(True)
            te.train()
            self._trained[f"te{i}"] = te
            self._te_group_ids.append(len(self._groups))
            self._groups.append({"params": list(te.parameters()),
                                 "lr": plan.lr if plan.lr is not None else a.learning_rate})
        if self.fused.fused_optimizer_groups:
            from library.training.targets.fused_backward import split_groups

            if self._te_group_ids and self.stop_te_step is not None:
                raise TrainingError("--fused_optimizer_groups cannot stop text-encoder training during the run")
            self._groups = split_groups(self._groups, self.fused.fused_optimizer_groups)
            self._te_group_ids = []
        self.module = torch.nn.ModuleList(list(self._trained.values()))
        if a.ema:  # every full-model script has --ema
            from library.training.targets.ema import EmaWeights

            self.ema = EmaWeights({f"{name}.{k}": p for name, m in self._trained.items()
                                   for k, p in m.named_parameters() if p.requires_grad}, a.ema_decay)

    def param_groups(self) -> list[dict[str, Any]]:
        return self._groups

    def session_ready(self, s: Any) -> None:
        stop = self.stop_te_step
        if self.train_text_encoder and stop is not None and stop >= s.max_train_steps:
            logger.warning("--stop_text_encoder_training %d is not before the end of training (%d steps): the text "
                           "encoder is trained for the whole run", stop, s.max_train_steps)
        from library.training.targets.memory_plan import describe, memory_plan

        m = s.model
        frozen = [t for mod in [m.unet, *m.text_encoders] for t in mod.parameters()]
        if next(m.vae.parameters()).device == s.accelerator.device:
            frozen += list(m.vae.parameters())
        fused = self.fused
        self.memory = memory_plan(self.trainable_params(), frozen, self.args.optimizer_type,
                                  bool(fused.fused_backward_pass), self.ema is not None,
                                  grad_groups=len(self._groups) if fused.fused_optimizer_groups else 1)
        logger.info(describe(self.memory))
        if fused.fused_backward_pass or fused.fused_optimizer_groups:
            from library.training.targets import fused_backward

            fused_backward.materialize_state(s.optimizer)  # before the steps in the backward pass: a steady heap
        if fused.fused_backward_pass:
            if fused.stochastic_rounding:
                self._rounding = fused_backward.Bf16Rounding(s.seed)
            fused_backward.attach(s.optimizer, self.args.max_grad_norm, s.accelerator.num_processes,
                                  self._rounding)
            self.steps_in_backward = True
            logger.info("--fused_backward_pass: each parameter is stepped during the backward pass%s",
                        " (bf16 weights rounded stochastically)" if self._rounding else "")
        elif fused.fused_optimizer_groups:
            from library.training.targets.fused_backward import GroupStepper

            self._stepper = GroupStepper(s.optimizer, self.args.max_grad_norm, s.accelerator.num_processes)
            self.steps_in_backward = True
            logger.info("--fused_optimizer_groups %d: %d optimizer groups, each stepped during the backward pass "
                        "once its gradients are complete", fused.fused_optimizer_groups, len(self._groups))

    def finish_backward(self, s: Any) -> None:
        if self._stepper is not None:
            self._stepper.finish_backward()

    # ---------------------------------------------------------------- per step
    def after_optimizer_step(self, s: Any, global_step: int) -> tuple[dict[str, float], dict[str, str]]:
        if self.train_text_encoder and self.stop_te_step is not None and global_step >= self.stop_te_step:
            logger.info("stopping text encoder training at step %d (--stop_text_encoder_training)", global_step)
            self.stop_text_encoders(s)
        if self.ema is not None:
            self.ema.update()
        if self._rounding is not None:
            self._rounding.reseed(global_step)
        return {}, {}

    def stop_text_encoders(self, s: Any) -> None:
        """Freeze the trained text encoders and take their parameters out of the optimizer."""
        opt = inner_optimizer(s.optimizer)
        for gi in self._te_group_ids:
            group = opt.param_groups[gi]
            for p in group["params"]:
                opt.state.pop(p, None)
            group["params"] = []
            self._groups[gi]["params"] = []
        for name, te in list(self._trained.items()):
            if name.startswith("te"):
                te.requires_grad_(False)
                for p in te.parameters():
                    p.grad = None
                if not self.args.gradient_checkpointing:
                    te.eval()
        self.train_text_encoder = False
        s.train_text_encoder = False
        s.trainable_params = self.trainable_params()

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, torch.Tensor]:
        sd = {f"{name}.{k}": v for name, m in self._trained.items() for k, v in m.state_dict().items()}
        if self.ema is not None:
            sd.update({f"ema:{k}": v for k, v in self.ema.state_dict().items()})
        return sd

    def load_state_dict(self, sd: dict[str, torch.Tensor], where: str) -> None:
        if self.ema is not None:
            missing = self.ema.load_state_dict({k[4:]: v for k, v in sd.items() if k.startswith("ema:")})
            if missing:
                raise TrainingError(f"--resume {where}: the state has no EMA weights for {len(missing)} tensors "
                                    "(was it saved without --ema?)")
        sd = {k: v for k, v in sd.items() if not k.startswith("ema:")}
        for name, m in self._trained.items():
            part = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")}
            missing, unexpected = m.load_state_dict(part, strict=False)
            if missing or unexpected:
                raise TrainingError(f"--resume {where}: the {name} weights do not match this model "
                                    f"(missing {len(missing)}, unexpected {len(unexpected)} keys)")

    def before_resume(self, s: Any, global_step: int) -> None:
        if self._rounding is not None:
            self._rounding.reseed(global_step)
        if self.train_text_encoder and self.stop_te_step is not None and global_step >= self.stop_te_step:
            self.stop_text_encoders(s)

    def signature(self, s: Any) -> dict[str, Any]:
        return {"target": "full_model", "trained": sorted(self._trained),
                "stop_text_encoder_training": self.stop_te_step,
                "fused_optimizer_groups": self.fused.fused_optimizer_groups,
                "ema_decay": self.ema.decay if self.ema is not None else None,
                "trained_keys": sum(len(m.state_dict()) for m in self._trained.values())}

    # ---------------------------------------------------------------- outputs
    def output_suffix(self) -> str:
        return self.save_format.suffix

    def save(self, t: Any, s: Any, path: Path, steps: int, epoch: int) -> None:
        from library.training.optimizers import eval_mode

        md = full_model_metadata(s, s.model.family)
        with eval_mode(s.optimizer), self.weights_for_output():  # schedule-free: the evaluation weights
            save_full_model(s.model, path, self.save_format, s.save_dtype, md, epoch, steps)

    def weights_for_output(self) -> Any:
        """The weights saves and samples use: the EMA ones with ``--ema``."""
        import contextlib

        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

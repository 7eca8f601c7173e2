"""The network target: a ``--network_module`` (LoRA, LyCORIS, ...) trained on a frozen base model."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from library.errors import TrainingError
from library.network_contract import call_prepare_optimizer_params, capabilities_of
from library.training.targets import TrainingTarget
from library.training.targets.prepare import frozen_te_dtype, place_models

logger = logging.getLogger(__name__)


def _te_arg(model: Any) -> Any:
    """kohya passes one text encoder as itself and several as a list."""
    tes = model.text_encoders
    return tes[0] if len(tes) == 1 else tes


class NetworkTarget(TrainingTarget):
    """Train the network created by the trainer's ``create_network`` hook; the base stays frozen."""

    def __init__(self, args: Any):
        self.args = args
        self.train_unet = not args.network_train_text_encoder_only
        self.train_text_encoder = not args.network_train_unet_only
        self.network: torch.nn.Module | None = None
        self.net_kwargs: dict[str, Any] = {}
        self._groups: list = []
        self._caps: Any = None
        self._model: Any = None

    # ---------------------------------------------------------------- building
    def build(self, t: Any, model: Any, accelerator: Any, weight_dtype: torch.dtype) -> None:
        a = self.args
        module = t.import_network_module()
        self.net_kwargs = t.network_kwargs()
        network = t.create_network(module, model, dict(self.net_kwargs))
        network.apply_to(_te_arg(model), model.unet, self.train_text_encoder, self.train_unet)
        if a.network_weights:  # also with --dim_from_weights: that only sizes the network (kohya loads both ways)
            info = network.load_weights(a.network_weights)
            logger.info("loaded network weights from %s: %s", a.network_weights, info)
        te_lr = a.text_encoder_lr
        if isinstance(te_lr, (list, tuple)) and len(te_lr) == 0:
            te_lr = None
        self._groups, _ = call_prepare_optimizer_params(network, te_lr, a.unet_lr, a.learning_rate)
        self.network = self.module = network
        self._caps = capabilities_of(network)
        self._model = model
        device = accelerator.device
        n = len(model.text_encoders)
        place_models(a, model, device, weight_dtype, [frozen_te_dtype(weight_dtype, device)] * n,
                     [self.train_text_encoder] * n)

    def finish(self, t: Any, model: Any, accelerator: Any, weight_dtype: torch.dtype) -> None:
        a, network = self.args, self.network
        if a.full_fp16 or a.full_bf16:
            network.to(weight_dtype)
        network.to(accelerator.device)
        if a.gradient_checkpointing:
            network.enable_gradient_checkpointing()
        network.prepare_grad_etc(_te_arg(model), model.unet)
        if not self.trainable_params():
            raise TrainingError("the network has no trainable parameters: check --network_train_unet_only / "
                                "--network_train_text_encoder_only and --network_args")

    def param_groups(self) -> list:
        return self._groups

    # ---------------------------------------------------------------- per step
    def on_epoch_start(self, s: Any) -> None:
        self.network.on_epoch_start(_te_arg(self._model), self._model.unet)

    def on_step_start(self, s: Any) -> None:
        if self._caps.on_step_start:
            self.network.on_step_start(_te_arg(self._model), self._model.unet)

    def after_optimizer_step(self, s: Any, global_step: int) -> tuple[dict[str, float], dict[str, str]]:
        a = self.args
        if not (a.scale_weight_norms and self._caps.max_norm_regularization):
            return {}, {}
        scaled, mean_norm, max_norm = self.network.apply_max_norm_regularization(a.scale_weight_norms,
                                                                                 s.accelerator.device)
        # kohya's tracker keys and progress-bar fields
        logs = {"max_norm/keys_scaled": scaled, "max_norm/average_key_norm": mean_norm,
                "max_norm/max_key_norm": max_norm}
        return logs, {"keys_scaled": scaled, "avg_key_norm": f"{mean_norm:.4f}"}

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.network.state_dict()

    def load_state_dict(self, sd: dict[str, torch.Tensor], where: str) -> None:
        missing, unexpected = self.network.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise TrainingError(f"--resume {where}: network weights do not match this network "
                                f"(missing {len(missing)}, unexpected {len(unexpected)} keys)")

    def signature(self, s: Any) -> dict[str, Any]:
        a = self.args
        return {"network_module": a.network_module or "networks.lora", "network_dim": a.network_dim,
                "network_alpha": a.network_alpha, "network_args": list(a.network_args or []),
                "network_keys": len(self.network.state_dict())}

    # ---------------------------------------------------------------- outputs
    def session_metadata(self, t: Any, s: Any, optimizer_text: str) -> dict[str, str]:
        from library.training.metadata_setup import build_session_metadata

        return build_session_metadata(t, s, optimizer_text)

    def output_suffix(self) -> str:
        return "." + (self.args.save_model_as or "safetensors")

    def save(self, t: Any, s: Any, path: Path, steps: int, epoch: int) -> None:
        from library.training.metadata_setup import metadata_for_save
        from library.training.optimizers import eval_mode
        from library.utils.atomic import atomic_path

        md = metadata_for_save(s, steps, epoch)
        with atomic_path(path) as tmp, eval_mode(s.optimizer):  # schedule-free: save the evaluation weights
            self.network.save_weights(str(tmp), s.save_dtype, md)
        logger.info("saved %s", path)

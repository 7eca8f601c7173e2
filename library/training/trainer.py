"""The training template (:class:`Trainer`): build everything, then run the loop.

Each stage is a named method so a script for another family or method overrides only what
differs (SDXL: :meth:`Trainer.family_adapter`, :meth:`expected_families`, ...). *What* is
trained is the session's training target (:mod:`library.training.targets`), made by
:meth:`Trainer.make_target`: :class:`NetworkTrainer` (kohya's ``NetworkTrainer``) trains a
network module, the full-model trainers (``train_db.py``, ``fine_tune.py``, ``sdxl_train.py``)
the model itself. The loop lives in :mod:`library.training.loop`; the per-step maths in
:meth:`compute_loss` uses the small feature modules (noise, loss).
"""

from __future__ import annotations

import importlib
import logging
import os
import random
import time
from argparse import Namespace
from pathlib import Path
from typing import Any

import torch

from library.config.settings import flag_values
from library.errors import ConfigError, ModelSaveError, TrainingError
from library.models.families import Family
from library.training import noise as N
from library.training.family import Conditioning, FamilyAdapter, get_family_adapter
from library.training.session import Session, num_epochs_for  # noqa: F401  (re-exported: the template's types)

logger = logging.getLogger(__name__)

_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_SAVE_DTYPES = {None: None, "float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Trainer:
    """The training template shared by every method; :meth:`make_target` says what is trained."""

    script_name = "train_network"
    tracker_name = "network_train"  # kohya's tracker project name for the method

    def __init__(self, args: Namespace):
        self.args = args

    # ------------------------------------------------------------------ hooks: what is trained
    def make_target(self) -> Any:
        """The run's :class:`~library.training.targets.TrainingTarget` (made before the model is loaded)."""
        raise NotImplementedError

    def output_label(self) -> str:
        """What the entry script says it saved ("model", "LoRA", ...)."""
        return "model"

    # ------------------------------------------------------------------ hooks: model family
    def expected_families(self) -> tuple[Family, ...]:
        return (Family.SD1, Family.SD2)

    def family_adapter(self, family: Family) -> FamilyAdapter:
        return get_family_adapter(family)

    def load_model(self) -> Any:
        """The base model (``LoadedModel``), checked to be of :meth:`expected_families`."""
        from library.models.loading import load_models

        a = self.args
        # Keep the file's dtype when the frozen UNet ends up in half precision anyway (mixed precision)
        # or is quantized from it (--fp8_base): setup casts each model to its training dtype one
        # tensor at a time, so a half-precision file never costs a float32 copy of the model in RAM
        # (SDXL: ~7 GB at the peak instead of ~19 GB). Training in float32 reads float32.
        flags = flag_values(a)
        keep = a.fp8_base or flags["fp8_base_unet"] or self.weight_dtype() != torch.float32
        return load_models(a.pretrained_model_name_or_path, v2=bool(a.v2), v_parameterization=bool(a.v_parameterization),
                           vae=a.vae, tokenizer_cache_dir=a.tokenizer_cache_dir, expected=self.expected_families(),
                           dtype=None if keep else torch.float32, mmap=not flags["disable_mmap_load_safetensors"])

    def preflight(self) -> None:
        """Hook: checks that need neither the model nor the data (run before anything is loaded)."""

    def prepare_base_model(self, model: Any, accelerator: Any) -> None:
        """Right after loading: ``--fp8_base`` stores the frozen UNet's Linear/Conv weights in float8
        (before the network wraps them); ``--lowram`` moves the UNet and text encoders to the device
        at once, so their CPU copies are freed before the data is prepared."""
        a = self.args
        if a.fp8_base or flag_values(a)["fp8_base_unet"]:  # sdtk's fp8_base covers only the UNet anyway
            from library.training.fp8 import apply_fp8

            apply_fp8(model.unet)
        if a.lowram and accelerator.device.type != "cpu":
            model.unet.to(accelerator.device)
            for te in model.text_encoders:
                te.to(accelerator.device)

    def cache_text_encoder_outputs(self, group: Any, model: Any, accelerator: Any) -> None:
        """Hook: encode every caption once before training (SDXL's ``--cache_text_encoder_outputs``)."""

    # ------------------------------------------------------------------ hooks: data
    def build_dataset_group(self, seed: int, world: int) -> Any:
        """The datasets, with global batches of ``train_batch_size x world``."""
        from library.config.dataset_config import build_blueprint_for_args
        from library.data.dataset import build_dataset_group
        from library.training.data import scale_batch_sizes

        # kohya: mask images come as ControlNet-style subsets (conditioning_data_dir) with --masked_loss
        masked = bool(flag_values(self.args)["masked_loss"])
        blueprint = scale_batch_sizes(build_blueprint_for_args(vars(self.args), support_controlnet=masked), world)
        return build_dataset_group(blueprint, seed=seed)

    def cache_latents(self, group: Any, vae: torch.nn.Module, accelerator: Any) -> None:
        """``--cache_latents``: encode every image once (to memory or disk) before training."""
        from library.data.latent_cache import cache_latents
        from library.training.distributed import main_process_first

        a = self.args
        kwargs = dict(vae_batch_size=a.vae_batch_size or 1, to_disk=bool(a.cache_latents_to_disk),
                      skip_cache_check=bool(a.skip_cache_check), seed=0, progress=accelerator.is_main_process)
        # only the main process writes cache files; the others then find them valid
        main_process_first(accelerator, lambda: cache_latents(group, vae, **kwargs), bool(a.cache_latents_to_disk))

    # ------------------------------------------------------------------ per-step maths
    def encode_text(self, s: Session, batch: dict[str, Any]) -> Conditioning:
        a, captions, tokenizers = self.args, batch["captions"], s.model.tokenizers
        weights = None
        if flag_values(a)["weighted_captions"]:
            ids, weights = s.family.tokenize_weighted(tokenizers, captions, a.max_token_length)
        else:
            ids = s.family.tokenize(tokenizers, captions, a.max_token_length)
        ids = [t.to(s.accelerator.device) for t in ids]
        with torch.set_grad_enabled(s.train_text_encoder), s.accelerator.autocast():
            cond = s.family.encode(s.model.text_encoders, tokenizers, ids, a.clip_skip)
            return cond if weights is None else s.family.apply_token_weights(cond, weights, s.model.text_encoders)

    def batch_latents(self, s: Session, batch: dict[str, Any], gens: list[torch.Generator]) -> torch.Tensor:
        """Scaled latents ``[B, 4, h, w]`` (cached, or encoded now without gradients).

        The VAE's posterior is sampled with the per-sample generators, so a sample's latents do
        not depend on which process encodes it.
        """
        device = s.accelerator.device
        scale = s.model.vae.config.scaling_factor
        if batch.get("latents") is not None:
            latents = batch["latents"].to(device)
        else:
            vae = s.model.vae
            with torch.no_grad():
                dist = vae.encode(batch["images"].to(device, dtype=vae.dtype)).latent_dist
                eps = N.per_sample_randn(gens, tuple(dist.mean.shape[1:]), dist.mean.device, dist.mean.dtype)
                latents = dist.mean + dist.std * eps
        if torch.isnan(latents).any() or torch.isinf(latents).any():
            raise TrainingError("NaN/inf in the latents: the VAE overflows in this precision; use --no_half_vae "
                                "or a VAE fixed for fp16 (--vae)")
        return latents.float() * scale

    def compute_loss(self, s: Session, batch: dict[str, Any], gens: list[torch.Generator], n_real: int,
                     global_size: int, fixed_timestep: int | None = None) -> torch.Tensor:
        """This process's share of the global batch's mean loss (a scalar with grad).

        Dividing the per-sample sum by ``global_size`` and summing the gradients over processes
        gives exactly the gradient of the global mean, whatever the split. The noise, timestep
        and loss flags are applied by :mod:`library.training.step`; ``fixed_timestep`` (the
        validation loss) replaces the sampled timesteps.
        """
        from library.training.step import noise_and_timesteps, step_loss

        latents = self.batch_latents(s, batch, gens)
        cond = self.encode_text(s, batch)
        noise, noisy, timesteps = noise_and_timesteps(s.settings.noise, s.alphas_cumprod, latents, gens, fixed_timestep)
        with s.accelerator.autocast():
            pred = s.family.predict(s.model.unet, noisy.to(s.weight_dtype), timesteps, cond, batch)
        target = N.velocity(s.alphas_cumprod, latents, noise, timesteps) if s.v_prediction else noise
        return step_loss(s.settings.loss, pred, target, timesteps, s.alphas_cumprod, s.v_prediction, batch, n_real,
                         global_size)

    # ------------------------------------------------------------------ orchestration
    def train(self) -> Path | None:
        """Run the whole training; returns the final output (main process) or None."""
        from library.training.debug_dataset import debug_requested, run_debug_dataset
        from library.training.loop import run_loop
        from library.training.setup import setup_session

        if debug_requested(self.args):  # kohya: show the dataset instead of training
            run_debug_dataset(self)
            return None
        session = setup_session(self)
        return run_loop(self, session)

    def check_output_dir(self) -> Path:
        out = Path(self.args.output_dir or ".")
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ModelSaveError(f"--output_dir {out}: cannot create it ({e.strerror}); choose another folder") from e
        if not os.access(out, os.W_OK):
            raise ModelSaveError(f"--output_dir {out} is not writable; choose another folder or fix its permissions")
        return out

    def save_dtype(self) -> torch.dtype | None:
        return _SAVE_DTYPES[self.args.save_precision]

    def weight_dtype(self) -> torch.dtype:
        return _DTYPES[self.args.mixed_precision or "no"]

    def resolve_seed(self, accelerator: Any) -> int:
        """``--seed`` or a random one, the same on every process."""
        from accelerate.utils import broadcast_object_list

        seed = self.args.seed if self.args.seed is not None else random.randint(0, 2**32 - 1)
        if accelerator.num_processes > 1:
            seed = broadcast_object_list([seed])[0]
        return int(seed)

    # ------------------------------------------------------------------ outputs
    def save_output(self, s: Session, path: Path, steps: int, epoch: int) -> None:
        """Write what the target trained to ``path`` atomically (main process only; others wait)."""
        from library.training.deepspeed_plugin import gathered_weights

        with gathered_weights(s):  # ZeRO-3: every process takes part in gathering the whole weights
            if s.accelerator.is_main_process:
                s.target.save(self, s, path, steps, epoch)
            s.accelerator.wait_for_everyone()

    def sample_images(self, s: Session, steps: int, epoch: int | None) -> None:
        """Render ``--sample_prompts`` when kohya's cadence says so."""
        from library.training.optimizers import eval_mode
        from library.training.sampling import sample_during_training, should_sample

        a = self.args
        if not a.sample_prompts or not should_sample(steps=steps, epoch=epoch, every_n_steps=a.sample_every_n_steps,
                                                     every_n_epochs=a.sample_every_n_epochs,
                                                     at_first=bool(a.sample_at_first)):
            return
        if s.accelerator.is_main_process:
            with torch.no_grad(), eval_mode(s.optimizer):  # schedule-free: sample with the evaluation weights
                sample_during_training(s, steps, epoch)
        s.accelerator.wait_for_everyone()

    def session_metadata_extra(self) -> dict[str, Any]:
        """Hook: family-specific ``ss_*`` keys (SDXL adds its own)."""
        return {}

    def started(self) -> tuple[int, float]:
        return random.randint(0, 2**32 - 1), time.time()


class NetworkTrainer(Trainer):
    """Train a network module (LoRA, LyCORIS, ...) on SD1/SD2 (kohya's ``NetworkTrainer``)."""

    script_name = "train_network"

    def make_target(self) -> Any:
        from library.training.targets.network import NetworkTarget

        return NetworkTarget(self.args)

    def output_label(self) -> str:
        """What the entry script says it saved."""
        name = self.args.network_module
        return "LoRA" if name in (None, "networks.lora", "networks.dylora") else name

    # ------------------------------------------------------------------ hooks: network
    def import_network_module(self) -> Any:
        from library.training.plugin_compat import apply_fixes

        name = self.args.network_module or "networks.lora"
        try:
            module = importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(f"--network_module {name!r} cannot be imported ({e}); give a module path such as "
                              "networks.lora or lycoris.kohya (pip install lycoris-lora)") from e
        apply_fixes(name, module)
        return module

    def network_kwargs(self) -> dict[str, Any]:
        """``--network_args key=value`` as a dict of strings (kohya passes strings to the module)."""
        kwargs: dict[str, Any] = {}
        for item in self.args.network_args or []:
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"--network_args entry {item!r} is not key=value")
            kwargs[key.strip()] = value.strip()
        return kwargs

    def create_network(self, module: Any, model: Any, net_kwargs: dict[str, Any]) -> torch.nn.Module:
        a = self.args
        te = model.text_encoders[0] if len(model.text_encoders) == 1 else model.text_encoders
        if a.dim_from_weights:  # needs --network_weights (library/config/flags/rules.py)
            network, _ = module.create_network_from_weights(1.0, a.network_weights, model.vae, te, model.unet,
                                                            **net_kwargs)
        else:
            if "dropout" not in net_kwargs:  # kohya injects the dropout into the module's kwargs
                net_kwargs["dropout"] = a.network_dropout
            network = module.create_network(1.0, a.network_dim, a.network_alpha, model.vae, te, model.unet,
                                            neuron_dropout=a.network_dropout, **net_kwargs)
        if network is None:
            raise ConfigError(f"--network_module {a.network_module}: create_network returned nothing")
        return network


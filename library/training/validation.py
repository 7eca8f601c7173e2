"""Validation loss (kohya's ``--validation_split`` family of flags).

The held-out images (``build_dataset_group(..., split="validation")``) are evaluated without
gradients, with the network and a schedule-free optimizer in eval mode, at kohya's fixed
timesteps (:data:`VALIDATION_TIMESTEPS`) and with noise drawn from generators seeded by
``--validation_seed`` (the run seed when unset), the batch and the sample. Every evaluation
therefore sees the same images, noise and timesteps, so the curve measures the network alone.
The training RNG state is saved and restored around it, so enabling validation does not change
the training run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from library.training import noise as N

logger = logging.getLogger(__name__)

# kohya evaluates every validation batch at these timesteps
VALIDATION_TIMESTEPS = (10, 350, 500, 650, 990)
_TAG = 0x56414C  # separates the validation noise streams from the training ones


def should_validate_step(step: int, every_n_steps: int | None) -> bool:
    """kohya: every ``--validate_every_n_steps`` optimizer steps (never at step 0)."""
    return bool(every_n_steps) and step > 0 and step % every_n_steps == 0


def should_validate_epoch(epoch: int, every_n_epochs: int | None) -> bool:
    """kohya: after every epoch, or every ``--validate_every_n_epochs`` epochs (1-based ``epoch``)."""
    return epoch % every_n_epochs == 0 if every_n_epochs else True


def validation_batches(num_batches: int, max_validation_steps: int | None) -> int:
    """Batches per evaluation: all, or at most ``--max_validation_steps``."""
    return min(num_batches, max_validation_steps) if max_validation_steps else num_batches


def validation_generators(seed: int, batch_index: int, timestep_index: int, first_index: int,
                          count: int) -> list[torch.Generator]:
    """The fixed per-sample generators of one validation forward pass."""
    return N.sample_generators(N.derive_seed(seed, _TAG), batch_index * len(VALIDATION_TIMESTEPS) + timestep_index,
                               first_index, count)


@dataclass
class Validator:
    """The validation data of a run and its evaluation."""

    plan: Any  # ShardedPlan over the validation DatasetGroup
    seed: int
    num_batches: int

    @classmethod
    def create(cls, t: Any, s: Any) -> "Validator | None":
        """The validator of the session, or None when no dataset holds images out."""
        a, acc = s.args, s.accelerator
        if not _has_split(s.group, a):
            return None
        from library.config.dataset_config import build_blueprint_for_args
        from library.data.dataset import build_dataset_group
        from library.training.data import ShardedPlan, scale_batch_sizes

        blueprint = scale_batch_sizes(build_blueprint_for_args(vars(a)), acc.num_processes)
        group = build_dataset_group(blueprint, seed=s.seed, split="validation")
        if a.cache_latents:
            vae = s.model.vae
            device = next(vae.parameters()).device
            vae.to(acc.device)
            t.cache_latents(group, vae, acc)
            vae.to(device)
        _cache_validation_captions(t, s, group)
        plan = ShardedPlan(group, acc.process_index, acc.num_processes, 1)
        n = validation_batches(plan.batches_per_epoch, a.max_validation_steps)
        seed = a.validation_seed if a.validation_seed is not None else s.seed
        logger.info("validation: %d image(s), %d batch(es) x %d timesteps per evaluation", group.num_train_images,
                    n, len(VALIDATION_TIMESTEPS))
        return cls(plan, seed, n)

    @torch.no_grad()
    def evaluate(self, t: Any, s: Any) -> float:
        """The mean validation loss over the batches and timesteps (the same on every process)."""
        from library.training.data import iterate_epoch
        from library.training.optimizers import eval_mode
        from library.training.state import capture_rng, restore_rng

        acc = s.accelerator
        rng = capture_rng()
        was_training = s.network.training
        s.network.eval()
        total, count = 0.0, 0
        try:
            with eval_mode(s.optimizer):
                # epoch 1 always: the same batches (and augmentations) at every evaluation
                for pos, sl, batch in iterate_epoch(self.plan, 1, 0, s.args.max_data_loader_n_workers,
                                                    bool(s.args.persistent_data_loader_workers)):
                    if pos >= self.num_batches:
                        break
                    for k, timestep in enumerate(VALIDATION_TIMESTEPS):
                        gens = validation_generators(self.seed, pos, k, sl.first_index, len(sl.indices))
                        torch.manual_seed(N.derive_seed(self.seed, _TAG, pos, k, acc.process_index))
                        loss = t.compute_loss(s, batch, gens, sl.n_real, sl.global_size, fixed_timestep=timestep)
                        if acc.num_processes > 1:
                            loss = acc.reduce(loss.detach().clone(), reduction="sum")
                        total += float(loss)
                        count += 1
        finally:
            s.network.train(was_training)
            restore_rng(rng)
        return total / max(1, count)


def _cache_validation_captions(t: Any, s: Any, group: Any) -> None:
    """With cached text-encoder outputs (SDXL), add the validation captions to the trainer's cache.

    The trainer's hook builds a new cache and moves the encoders off the device afterwards, so the
    encoders go back to the device (in their training dtype) first, and the new entries are
    merged into the existing cache (it is keyed by caption).
    """
    old = getattr(t, "te_cache", None)
    if old is None:
        return
    acc = s.accelerator
    dtype = s.weight_dtype if acc.device.type != "cpu" else torch.float32
    for te in s.model.text_encoders:
        te.to(acc.device, dtype=dtype)
    t.cache_text_encoder_outputs(group, s.model, acc)
    new = t.te_cache
    if new is not old and new is not None:
        old.memory.update(new.memory)
        old.files.update(new.files)
    t.te_cache = old


def _has_split(group: Any, a: Any) -> bool:
    if a.validation_split:
        return True
    return any((getattr(d.params, "validation_split", 0) or 0) > 0 for d in group.datasets)

"""kohya's ``ss_*`` training metadata for saved networks (what A1111 / ComfyUI / civitai read).

Values are stored as strings (safetensors metadata is str -> str); ``None`` becomes "None",
as kohya writes it. ``--no_metadata`` keeps only :data:`MINIMUM_KEYS`.
"""

from __future__ import annotations

import json
import os
import time
from argparse import Namespace
from typing import Any

from library.config.settings import flag_values

MINIMUM_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                "ss_network_args")

# (metadata key, args attribute): copied as they are
_ARG_KEYS = (
    ("ss_output_name", "output_name"), ("ss_learning_rate", "learning_rate"), ("ss_unet_lr", "unet_lr"),
    ("ss_gradient_checkpointing", "gradient_checkpointing"),
    ("ss_gradient_accumulation_steps", "gradient_accumulation_steps"), ("ss_max_train_steps", "max_train_steps"),
    ("ss_lr_warmup_steps", "lr_warmup_steps"), ("ss_lr_scheduler", "lr_scheduler"),
    ("ss_network_module", "network_module"), ("ss_network_dim", "network_dim"),
    ("ss_network_alpha", "network_alpha"), ("ss_network_dropout", "network_dropout"),
    ("ss_mixed_precision", "mixed_precision"), ("ss_clip_skip", "clip_skip"),
    ("ss_max_token_length", "max_token_length"), ("ss_seed", "seed"), ("ss_lowram", "lowram"),
    ("ss_noise_offset", "noise_offset"), ("ss_multires_noise_iterations", "multires_noise_iterations"),
    ("ss_multires_noise_discount", "multires_noise_discount"), ("ss_adaptive_noise_scale", "adaptive_noise_scale"),
    ("ss_zero_terminal_snr", "zero_terminal_snr"), ("ss_training_comment", "training_comment"),
    ("ss_max_grad_norm", "max_grad_norm"), ("ss_caption_dropout_rate", "caption_dropout_rate"),
    ("ss_caption_dropout_every_n_epochs", "caption_dropout_every_n_epochs"),
    ("ss_caption_tag_dropout_rate", "caption_tag_dropout_rate"), ("ss_face_crop_aug_range", "face_crop_aug_range"),
    ("ss_prior_loss_weight", "prior_loss_weight"), ("ss_min_snr_gamma", "min_snr_gamma"),
    ("ss_scale_weight_norms", "scale_weight_norms"), ("ss_ip_noise_gamma", "ip_noise_gamma"),
    ("ss_noise_offset_random_strength", "noise_offset_random_strength"),
    ("ss_ip_noise_gamma_random_strength", "ip_noise_gamma_random_strength"), ("ss_loss_type", "loss_type"),
    ("ss_huber_schedule", "huber_schedule"), ("ss_huber_scale", "huber_scale"), ("ss_huber_c", "huber_c"),
    ("ss_validation_seed", "validation_seed"), ("ss_validation_split", "validation_split"),
    ("ss_max_validation_steps", "max_validation_steps"), ("ss_validate_every_n_epochs", "validate_every_n_epochs"),
    ("ss_validate_every_n_steps", "validate_every_n_steps"), ("ss_resize_interpolation", "resize_interpolation"),
)
# options kohya does not record: sdtk's own keys, written only when set to something but "off"
# (key, args attribute, the value meaning off)
_ACTIVE_ONLY_KEYS = (
    ("ss_masked_loss", "masked_loss", False), ("ss_v_pred_like_loss", "v_pred_like_loss", 0),
    ("ss_scale_v_pred_loss_like_noise_pred", "scale_v_pred_loss_like_noise_pred", False),
    ("ss_min_timestep", "min_timestep", None), ("ss_max_timestep", "max_timestep", None),
    ("ss_base_weights", "base_weights", None), ("ss_base_weights_multiplier", "base_weights_multiplier", None),
    ("ss_lr_decay_steps", "lr_decay_steps", 0), ("ss_lr_scheduler_num_cycles", "lr_scheduler_num_cycles", 1),
    ("ss_lr_scheduler_power", "lr_scheduler_power", 1), ("ss_lr_scheduler_min_lr_ratio", "lr_scheduler_min_lr_ratio", None),
    ("ss_lr_scheduler_type", "lr_scheduler_type", ""), ("ss_lr_scheduler_args", "lr_scheduler_args", None),
)
_BOOL_KEYS = (("ss_full_fp16", "full_fp16"), ("ss_v2", "v2"), ("ss_cache_latents", "cache_latents"),
              ("ss_debiased_estimation", "debiased_estimation_loss"), ("ss_fp8_base", "fp8_base"),
              ("ss_fp8_base_unet", "fp8_base_unet"))


def build_training_metadata(args: Namespace, *, session_id: int, started_at: float, base_model_version: str,
                            optimizer_text: str, text_encoder_lr: Any, net_kwargs: dict[str, Any],
                            num_epochs: int, num_batches_per_epoch: int, dataset_info: dict[str, Any],
                            model_hashes: dict[str, str]) -> dict[str, str]:
    """The run's ``ss_*`` metadata (without the per-save keys added by :func:`per_save_metadata`).

    Args:
        dataset_info: ``ss_*`` keys describing the data (image counts, ``ss_datasets``,
            ``ss_tag_frequency``, ``ss_dataset_dirs``, ...), already JSON-encoded where kohya does.
        model_hashes: ``ss_sd_model_hash`` / ``ss_new_sd_model_hash`` / ``ss_vae_hash`` ... when known.
    """
    flags = flag_values(args)
    md: dict[str, Any] = {"ss_session_id": session_id, "ss_training_started_at": started_at}
    for key, attr in _ARG_KEYS:
        md[key] = flags[attr]
    for key, attr in _BOOL_KEYS:
        md[key] = bool(flags[attr])
    for key, attr, off in _ACTIVE_ONLY_KEYS:
        value = flags[attr]
        if value is not None and value != off and value not in ("", []):
            md[key] = value
    md.update(
        ss_text_encoder_lr=text_encoder_lr,
        ss_num_batches_per_epoch=num_batches_per_epoch,
        ss_num_epochs=num_epochs,
        ss_base_model_version=base_model_version,
        ss_optimizer=optimizer_text,
        ss_sd_scripts_commit_hash="sdtk",
    )
    md.update(dataset_info)
    if flags["network_args"]:
        md["ss_network_args"] = json.dumps(net_kwargs)
    model = flags["pretrained_model_name_or_path"]
    if model:
        md["ss_sd_model_name"] = os.path.basename(os.path.normpath(model)) if os.path.exists(model) else model
    vae = flags["vae"]
    if vae:
        md["ss_vae_name"] = os.path.basename(os.path.normpath(vae)) if os.path.exists(vae) else vae
    md.update(model_hashes)
    return {k: str(v) for k, v in md.items()}


def minimum_metadata(full: dict[str, str]) -> dict[str, str]:
    """``--no_metadata``: only the keys needed to use the file."""
    return {k: full[k] for k in MINIMUM_KEYS if k in full}


def per_save_metadata(base: dict[str, str], steps: int, epoch: int, finished: bool = True) -> dict[str, str]:
    """``base`` plus the keys that change from save to save (kohya: steps, epoch, finish time)."""
    md = dict(base)
    md["ss_training_finished_at"] = str(time.time())
    md["ss_steps"] = str(steps)
    md["ss_epoch"] = str(epoch)
    return md

"""Checks across several flags, and kohya's folding of old or implied flags.

Each rule sees the whole {dest: value} mapping of one script after per-flag conversion and
returns problem texts; :func:`apply_rules` runs the normalisations first (in place), then all
rules, so every conflict is reported in one pass.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

logger = logging.getLogger(__name__)

Values = dict[str, Any]


def _normalise(v: Values) -> None:
    """kohya's aliases and implications, applied so later code sees one spelling."""
    if v.get("caption_extention") is not None:
        # the misspelled flag wins when given, as in kohya
        v["caption_extension"], v["caption_extention"] = v["caption_extention"], None
    if v.get("use_8bit_adam") and not v.get("optimizer_type") and not v.get("use_lion_optimizer"):
        v["optimizer_type"], v["use_8bit_adam"] = "AdamW8bit", False
    if v.get("cache_latents_to_disk") and not v.get("cache_latents"):
        v["cache_latents"] = True
    if v.get("cache_text_encoder_outputs_to_disk") and not v.get("cache_text_encoder_outputs"):
        v["cache_text_encoder_outputs"] = True


def _precision(v: Values, script: str) -> list[str]:
    out = []
    if v.get("full_fp16") and v.get("full_bf16"):
        out.append("--full_fp16 and --full_bf16 cannot be used together")
    if v.get("full_fp16") and v.get("mixed_precision") != "fp16":
        out.append("--full_fp16 needs --mixed_precision fp16")
    if v.get("full_bf16") and v.get("mixed_precision") != "bf16":
        out.append("--full_bf16 needs --mixed_precision bf16")
    return out


def _optimizer(v: Values, script: str) -> list[str]:
    out = []
    if v.get("use_8bit_adam") and v.get("use_lion_optimizer"):
        out.append("--use_8bit_adam and --use_lion_optimizer cannot be used together")
    elif v.get("use_8bit_adam") and v.get("optimizer_type"):
        out.append("--use_8bit_adam conflicts with --optimizer_type; use only --optimizer_type")
    if v.get("lr_scheduler") == "constant" and v.get("lr_warmup_steps"):
        out.append("--lr_warmup_steps needs a scheduler with warmup (e.g. --lr_scheduler "
                   "constant_with_warmup); kohya rejects warmup with 'constant' too")
    te_lr = v.get("text_encoder_lr")
    if isinstance(te_lr, list) and len(te_lr) > 2:
        out.append(f"--text_encoder_lr takes 1 or 2 values (text encoder 1 and 2), got {len(te_lr)}")
    return out


def _network(v: Values, script: str) -> list[str]:
    if v.get("network_train_unet_only") and v.get("network_train_text_encoder_only"):
        return ["--network_train_unet_only and --network_train_text_encoder_only cannot be used "
                "together (nothing would be trained)"]
    if v.get("dim_from_weights") and not v.get("network_weights"):
        return ["--dim_from_weights needs --network_weights"]
    return []


def _caching(v: Values, script: str) -> list[str]:
    out = []
    if v.get("cache_latents") and (v.get("color_aug") or v.get("random_crop")):
        out.append("--cache_latents cannot be used with --color_aug or --random_crop (the cached "
                   "latents would never change); drop one of them")
    if v.get("cache_text_encoder_outputs"):
        if script == "sdxl_train":
            if v.get("train_text_encoder"):
                out.append("--cache_text_encoder_outputs cannot be used with --train_text_encoder (a text encoder "
                           "cannot be trained from cached outputs)")
        elif not v.get("network_train_unet_only"):
            out.append("--cache_text_encoder_outputs needs --network_train_unet_only (a text encoder "
                       "cannot be trained from cached outputs)")
        changing = [f"--{k}" for k in ("shuffle_caption", "caption_dropout_rate", "caption_tag_dropout_rate",
                                       "token_warmup_step") if v.get(k)]
        if changing:
            out.append(f"--cache_text_encoder_outputs cannot be used with {', '.join(changing)} "
                       "(captions must not change between epochs)")
    return out


def _ranges(v: Values, script: str) -> list[str]:
    out = []
    lo, hi = v.get("min_timestep"), v.get("max_timestep")
    if lo is not None and hi is not None and lo >= hi:
        out.append(f"--min_timestep ({lo}) must be smaller than --max_timestep ({hi})")
    lo, hi = v.get("min_bucket_reso"), v.get("max_bucket_reso")
    if lo is not None and hi is not None and lo > hi:
        out.append(f"--min_bucket_reso ({lo}) must not exceed --max_bucket_reso ({hi})")
    return out


def _sdxl(v: Values, script: str) -> list[str]:
    if not script.startswith("sdxl_"):
        return []
    out = []
    if v.get("v2"):
        out.append("--v2 cannot be used with SDXL (it selects Stable Diffusion 2.x)")
    if v.get("v_parameterization"):
        logger.warning("--v_parameterization with SDXL: the base SDXL models predict noise, not v")
    return out


def _hints(v: Values, script: str) -> list[str]:
    """Settings that are legal but probably not what the user meant: warnings only."""
    if (v.get("sample_every_n_steps") or v.get("sample_every_n_epochs")) and not v.get("sample_prompts"):
        logger.warning("--sample_every_n_steps/--sample_every_n_epochs without --sample_prompts: no samples")
    if v.get("xformers") and v.get("sdpa"):
        logger.warning("--xformers and --sdpa both given: xformers is used")
    return []


RULES: list[Callable[[Values, str], list[str]]] = [
    _precision, _optimizer, _network, _caching, _ranges, _sdxl, _hints,
]


def apply_rules(values: Values, script: str) -> list[str]:
    """Normalise ``values`` in place and return every cross-flag problem."""
    _normalise(values)
    problems: list[str] = []
    for rule in RULES:
        problems += rule(values, script)
    return problems

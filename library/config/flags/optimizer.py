"""Optimizer and learning-rate scheduler flags."""

from __future__ import annotations

from typing import Any

from library.config.flags.base import (
    DONE, INT_OR_FLOAT, F, at_least, in_group, key_values, non_negative, positive, steps_or_ratio,
    suggest,
)

# kohya's optimizer names (case-insensitive); any "package.module.Class" is also accepted.
OPTIMIZERS = (
    "AdamW", "AdamW8bit", "PagedAdamW", "PagedAdamW8bit", "PagedAdamW32bit", "Lion", "Lion8bit",
    "PagedLion8bit", "SGDNesterov", "SGDNesterov8bit", "DAdaptation", "DAdaptAdam", "DAdaptAdaGrad",
    "DAdaptAdan", "DAdaptAdanIP", "DAdaptLion", "DAdaptSGD", "Prodigy", "AdaFactor",
    "AdamWScheduleFree", "RAdamScheduleFree", "SGDScheduleFree",
)

# Scheduler names kohya accepts (diffusers/transformers names plus "adafactor").
SCHEDULERS = (
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
    "adafactor", "warmup_stable_decay", "piecewise_constant", "inverse_sqrt", "cosine_with_min_lr",
    "cosine_warmup_with_min_lr", "reduce_lr_on_plateau",
)


def _optimizer_name(v: Any) -> str | None:
    if v == "" or "." in v or v.lower() in {o.lower() for o in OPTIMIZERS}:
        return None
    hint = suggest(v, OPTIMIZERS)
    return (f"unknown optimizer {v!r}; use one of {', '.join(OPTIMIZERS)} or package.module.Class"
            + (f" (did you mean {hint!r}?)" if hint else ""))


def _scheduler_name(v: Any) -> str | None:
    if v in SCHEDULERS or v.startswith("adafactor:"):  # kohya's "adafactor:<initial lr>"
        return None
    hint = suggest(v, SCHEDULERS)
    return (f"unknown scheduler {v!r}; use one of {', '.join(SCHEDULERS)} (or --lr_scheduler_type "
            "for a custom class)" + (f" (did you mean {hint!r}?)" if hint else ""))


FLAGS = in_group("optimizer", [
    F("--optimizer_type", str, "", DONE,
      "Optimizer, case-insensitive: AdamW (default), AdamW8bit, Lion, Prodigy, DAdaptAdam, "
      "AdaFactor, ... or any package.module.Class.", check=_optimizer_name),
    F("--optimizer_args", str, None, DONE,
      "Extra optimizer arguments as key=value items (e.g. weight_decay=0.01 betas=0.9,0.999).",
      nargs="*", check=key_values),
    F("--use_8bit_adam", bool, False, DONE,
      "Old spelling of --optimizer_type AdamW8bit (needs bitsandbytes)."),
    F("--use_lion_optimizer", bool, False, DONE, "Old spelling of --optimizer_type Lion."),
    F("--learning_rate", float, 2e-06, DONE,
      "Base learning rate (also for the U-Net and text encoders unless --unet_lr / "
      "--text_encoder_lr are given).", check=positive),
    F("--lr_scheduler", str, "constant", DONE,
      "Learning-rate schedule: constant, constant_with_warmup, linear, cosine, "
      "cosine_with_restarts, polynomial, adafactor, ...", check=_scheduler_name),
    F("--lr_warmup_steps", INT_OR_FLOAT, 0, DONE,
      "Linear warmup: a number of steps, or a ratio < 1 of the total steps (0.05 or 5%).",
      check=steps_or_ratio),
    F("--lr_decay_steps", INT_OR_FLOAT, 0, DONE,
      "Decay phase length for warmup_stable_decay: steps, or a ratio < 1 of the total.",
      check=steps_or_ratio),
    F("--lr_scheduler_num_cycles", int, 1, DONE,
      "Number of restarts for cosine_with_restarts.", check=at_least(1)),
    F("--lr_scheduler_power", float, 1, DONE, "Power of the polynomial schedule.", check=positive),
    F("--lr_scheduler_timescale", int, None, DONE,
      "Time scale of the inverse_sqrt schedule (default: the warmup steps).", check=at_least(1)),
    F("--lr_scheduler_min_lr_ratio", float, None, DONE,
      "Lowest learning rate as a ratio of the initial one (cosine_with_min_lr, "
      "warmup_stable_decay).", check=non_negative),
    F("--lr_scheduler_type", str, "", DONE, "Custom scheduler class as package.module.Class."),
    F("--lr_scheduler_args", str, None, DONE,
      "Extra scheduler arguments as key=value items.", nargs="*", check=key_values),
])

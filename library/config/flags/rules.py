"""Checks across several flags, and kohya's folding of old or implied flags.

Each rule sees the whole {dest: value} mapping of one script after per-flag conversion and
returns problem texts; :func:`apply_rules` runs the normalisations first (in place), then all
rules, so every conflict is reported in one pass. This module is the one place of every
cross-flag rule (a flag a script does not have is absent from its mapping and reads as unset).
Rules that a lone flag would break (``--adaptive_noise_scale`` needs ``--noise_offset``, ...) are
checked by the training run before it loads anything: :func:`run_problems` (the loss / noise,
``--initial_step``, DeepSpeed and fused-step rules, each callable by name), on the trainer's
namespace; they take the mapping or a parsed namespace.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
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
    warmup = warmup_problem(v.get("lr_scheduler"), v.get("lr_warmup_steps"))
    if warmup:
        out.append(warmup)
    te_lr = v.get("text_encoder_lr")
    if isinstance(te_lr, list) and len(te_lr) > 2:
        out.append(f"--text_encoder_lr takes 1 or 2 values (text encoder 1 and 2), got {len(te_lr)}")
    return out


def warmup_problem(scheduler: str | None, warmup: Any) -> str | None:
    """kohya refuses warmup steps with the ``constant`` schedule (the scheduler builder asks too)."""
    if scheduler == "constant" and warmup:
        return ("--lr_warmup_steps needs a scheduler with warmup (e.g. --lr_scheduler "
                "constant_with_warmup); kohya rejects warmup with 'constant' too")
    return None


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


def _timestep_range(v: Values) -> list[str]:
    lo, hi = v.get("min_timestep"), v.get("max_timestep")
    if lo is not None and hi is not None and lo >= hi:
        return [f"--min_timestep ({lo}) must be smaller than --max_timestep ({hi})"]
    return []


def _ranges(v: Values, script: str) -> list[str]:
    out = _timestep_range(v)
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


def _values(a: Any) -> Values:
    """The ``{dest: value}`` mapping of a parsed namespace (or of a mapping)."""
    return a if isinstance(a, dict) else dict(a) if isinstance(a, Mapping) else dict(vars(a))


def loss_and_noise_problems(a: Any) -> list[str]:
    """kohya's combination rules for the loss / noise / timestep flags (problems, empty when fine); warns
    about settings meant for the other kind of model (v-prediction or epsilon)."""
    v = _values(a)
    problems = []
    if v.get("noise_offset") and v.get("multires_noise_iterations"):
        problems.append("--noise_offset and --multires_noise_iterations cannot be used together (kohya's rule); "
                        "choose one")
    if v.get("adaptive_noise_scale") and not v.get("noise_offset"):
        problems.append("--adaptive_noise_scale needs --noise_offset")
    problems += _timestep_range(v)  # also a parse-time rule (_ranges): the same rule, not a copy
    huber_c = v.get("huber_c")
    if v.get("huber_schedule") == "exponential" and huber_c is not None and huber_c >= 1:
        problems.append("--huber_schedule exponential needs --huber_c below 1 (it decays from 1 to huber_c)")
    v_param = bool(v.get("v_parameterization"))
    if v.get("zero_terminal_snr") and not v_param:
        logger.warning("--zero_terminal_snr without --v_parameterization: an epsilon model cannot predict pure "
                       "noise at the last timestep; results may be unexpected")
    if v.get("scale_v_pred_loss_like_noise_pred") and not v_param:
        logger.warning("--scale_v_pred_loss_like_noise_pred is meant for v-prediction (--v_parameterization)")
    if v.get("v_pred_like_loss") and v_param:
        logger.warning("--v_pred_like_loss is meant for epsilon-prediction models, not --v_parameterization")
    return problems


_OFFLOADING_OPTIMIZERS = ("", "adamw", "adam")  # accelerate swaps these for DeepSpeed's CPU Adam
_DEEPSPEED_ONLY = ("offload_optimizer_device", "offload_optimizer_nvme_path", "offload_param_device",
                   "offload_param_nvme_path", "zero3_init_flag", "zero3_save_16bit_model",
                   "fp16_master_weights_and_gradients")


def deepspeed_problems(a: Any) -> list[str]:
    """Every problem of the DeepSpeed flags (empty when fine); nothing is imported or loaded."""
    v = _values(a)
    stage = v.get("zero_stage")
    opt_dev, param_dev = v.get("offload_optimizer_device"), v.get("offload_param_device")
    if not v.get("deepspeed"):
        given = [f"--{k}" for k in _DEEPSPEED_ONLY if v.get(k)]
        return [f"{', '.join(given)} only work{'s' if len(given) == 1 else ''} with --deepspeed"] if given else []
    problems = []
    for kind, dev in (("optimizer", opt_dev), ("param", param_dev)):
        path = v.get(f"offload_{kind}_nvme_path")
        if dev == "nvme" and not path:
            problems.append(f"--offload_{kind}_device nvme needs --offload_{kind}_nvme_path (a folder on the NVMe drive)")
        elif path and dev != "nvme":
            problems.append(f"--offload_{kind}_nvme_path needs --offload_{kind}_device nvme")
        elif path and not os.path.isdir(path):
            problems.append(f"--offload_{kind}_nvme_path {path}: no such folder")
    if opt_dev and stage == 0:
        problems.append(f"--offload_optimizer_device {opt_dev} needs --zero_stage 1, 2 or 3 (stage 0 has no "
                        "partitioned optimizer to offload)")
    if opt_dev == "nvme" and stage != 3:
        problems.append("--offload_optimizer_device nvme needs --zero_stage 3 (ZeRO-Infinity)")
    if param_dev and stage != 3:
        problems.append(f"--offload_param_device {param_dev} needs --zero_stage 3 (only stage 3 partitions the "
                        "weights)")
    if opt_dev and (v.get("optimizer_type") or "").lower() not in _OFFLOADING_OPTIMIZERS:
        problems.append(f"--offload_optimizer_device with --optimizer_type {v.get('optimizer_type')}: an offloaded "
                        "optimizer is DeepSpeed's CPU Adam (accelerate replaces the optimizer by it); use "
                        "--optimizer_type AdamW")
    if v.get("zero3_save_16bit_model") and stage != 3:
        problems.append("--zero3_save_16bit_model needs --zero_stage 3")
    if v.get("fp16_master_weights_and_gradients") and not (
            v.get("mixed_precision") == "fp16" and stage == 2 and opt_dev == "cpu"):
        problems.append("--fp16_master_weights_and_gradients needs --mixed_precision fp16, --zero_stage 2 and "
                        "--offload_optimizer_device cpu (DeepSpeed supports it only with ZeRO-Offload's CPU Adam)")
    if v.get("fused_backward_pass"):
        problems.append("--fused_backward_pass cannot be used with --deepspeed (DeepSpeed steps the optimizer "
                        "itself); drop one of them")
    for flag in ("save_state", "save_state_on_train_end", "resume"):
        if v.get(flag):
            problems.append(f"--{flag} is not supported with --deepspeed yet (an exact sdtk state needs every "
                            "process's optimizer partition); save the model with --save_every_n_steps/epochs")
    if stage == 3 and v.get("ema"):
        problems.append("--ema cannot be used with --zero_stage 3 (the weights are partitioned over the "
                        "processes); use --zero_stage 2")
    if stage == 3 and v.get("sample_prompts"):
        problems.append("--sample_prompts cannot be used with --zero_stage 3 (sampling runs on the main process, "
                        "which does not hold the whole model); use --zero_stage 2, or sample the saved model")
    # train_db.py has --stop_text_encoder_training (unset: the text encoder is trained to the end)
    stop = v.get("stop_text_encoder_training")
    te_trained = bool(v.get("train_text_encoder")) or ("stop_text_encoder_training" in v and (stop is None or stop > 0))
    if stage == 3 and te_trained:
        # ZeRO-3 gathers a module's weights when its forward starts; transformers' CLIP reads a child's weight
        # (position_embedding.weight.shape) before calling it, and fails on the empty partition
        problems.append("--zero_stage 3 trains the UNet only in sdtk (transformers' CLIP text encoders fail on "
                        "ZeRO-3's partitioned weights); use --zero_stage 2, or do not train the text encoder "
                        "(train_db.py: --stop_text_encoder_training -1; fine_tune.py / sdxl_train.py: without "
                        "--train_text_encoder)")
    if stop is not None and stop > 0 and (v.get("max_train_epochs") or stop < (v.get("max_train_steps") or 0)):
        problems.append(f"--stop_text_encoder_training {stop} cannot be used with --deepspeed yet (the text encoder "
                        "cannot leave DeepSpeed's optimizer); train it for the whole run or not at all "
                        "(--stop_text_encoder_training -1)")
    if v.get("torch_compile"):
        problems.append("--torch_compile cannot be used with --deepspeed in sdtk yet; drop one of them")
    return problems


FUSABLE_OPTIMIZERS = ("adafactor", "adamw", "lion", "sgdnesterov")
_FUSABLE_TEXT = "Adafactor, AdamW, Lion or SGDNesterov"


def fused_step_problems(a: Any) -> list[str]:
    """The conditions of ``--fused_backward_pass`` / ``--fused_optimizer_groups`` (empty when fine)."""
    v = _values(a)
    groups, fused = v.get("fused_optimizer_groups"), bool(v.get("fused_backward_pass"))
    if not fused and not groups:
        return []
    flag = "--fused_backward_pass" if fused else "--fused_optimizer_groups"
    problems = []
    if fused and groups:
        problems.append("--fused_backward_pass and --fused_optimizer_groups are two ways of stepping inside the "
                        "backward pass: give one")
    optimizer = v.get("optimizer_type") or "AdamW"
    if optimizer.rsplit(".", 1)[-1].lower() not in FUSABLE_OPTIMIZERS:
        problems.append(f"{flag} works with --optimizer_type {_FUSABLE_TEXT} (got {optimizer}): "
                        "their per-tensor update can run inside the backward pass")
    if (v.get("gradient_accumulation_steps") or 1) > 1:
        problems.append(f"{flag} cannot be used with --gradient_accumulation_steps > 1 (each gradient is "
                        "applied as soon as it is computed)")
    if v.get("mixed_precision") == "fp16":
        problems.append(f"{flag} cannot be used with --mixed_precision fp16 (the loss-scaled gradients "
                        "would be applied unscaled); use bf16")
    return problems


def initial_step_problems(a: Any) -> list[str]:
    """What is wrong with ``--initial_step`` / ``--initial_epoch`` before anything is loaded.

    (A start at or past the end that needs the data's size to see is caught by
    :func:`library.training.state.start_progress`.)
    """
    v = _values(a)
    given = [f"--{name}" for name in ("initial_step", "initial_epoch") if v.get(name) is not None]
    problems = []
    if given and v.get("resume"):
        problems.append(f"{' and '.join(given)} cannot be combined with --resume: the state already continues at "
                        "its own step, data order included (kohya would ignore the state's step); drop one of them")
    step, max_steps = v.get("initial_step"), v.get("max_train_steps")
    if step is not None and max_steps is not None and not v.get("max_train_epochs") and step >= max_steps:
        problems.append(f"--initial_step {step} must be less than --max_train_steps {max_steps} "
                        "(training stops at --max_train_steps, counted from step 0)")
    return problems


def run_problems(a: Any) -> list[str]:
    """The rules a training run checks before loading anything (``library.training.setup.check_args``), on
    the trainer's namespace: the loss / noise, ``--initial_step``, DeepSpeed and fused-step rules. They are
    not parse-time rules because each flag alone is a valid command line (a script's parser accepts every
    kohya flag of it on its own)."""
    v = _values(a)
    return loss_and_noise_problems(v) + initial_step_problems(v) + deepspeed_problems(v) + fused_step_problems(v)


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

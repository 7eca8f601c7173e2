"""``--deepspeed``: ZeRO training of the full-model scripts through accelerate's ``DeepSpeedPlugin``.

kohya's semantics (``library/deepspeed_utils.py`` there): the trained modules (the UNet and the
trained text encoders) are prepared together with the optimizer as *one* module, since
accelerate gives DeepSpeed one model; the loop keeps calling the UNet and text encoders
themselves (ZeRO's hooks sit on their submodules and parameters). DeepSpeed then owns the
gradient reduction over processes, gradient clipping (``--max_grad_norm`` becomes the config's
``gradient_clipping``), gradient accumulation (``--gradient_accumulation_steps``) and, under
``--mixed_precision fp16/bf16``, the half-precision model with float32 master weights inside its
optimizer (fp16: its own loss scaler, starting at scale 1 as in kohya).

Differences from kohya, on purpose:

- the forward passes of the trained modules run under ``torch.autocast`` with the run's half
  dtype (kohya's wrapper autocasts with the device's default dtype: fp16 on CUDA, also under bf16);
- the accumulation boundary is the loop's own (an epoch's last window may be short), given to
  DeepSpeed per backward pass, and the loss scale keeps sdtk's "sum of per-process shares";
- under ZeRO-3 every process gathers the partitioned weights for a save, so the saved model is
  complete (kohya's unwrap of a ZeRO-3 model saves empty tensors);
- flag combinations DeepSpeed would ignore or fail on later are refused when the flags are parsed
  (:func:`library.config.flags.rules.deepspeed_problems`).

Not supported with ``--deepspeed`` yet: ``--save_state`` / ``--resume`` (sdtk's exact states would
need every process's optimizer partition), ``--stop_text_encoder_training`` within the run,
``--fused_backward_pass`` (DeepSpeed steps the optimizer), ``--ema``, samples and trained text
encoders under ZeRO-3,
``--zero3_init_flag`` (sdtk reads the model from its checkpoint before ZeRO-3 partitions it).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
from typing import Any, Iterator

import torch

from library.config.flags.rules import deepspeed_problems  # noqa: F401  (the flag rules live there)
from library.config.settings import DeepSpeedSettings
from library.errors import ConfigError

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'sdtk[deepspeed]' (or: DS_BUILD_OPS=0 pip install deepspeed)"


def require_deepspeed() -> None:
    """Raise one clear line when the DeepSpeed package is missing."""
    try:
        import deepspeed  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"--deepspeed needs the DeepSpeed package, which is not installed: {INSTALL_HINT}") from e


def ensure_process_env() -> None:
    """A plain ``python train_db.py --deepspeed``: the environment of a one-process group.

    DeepSpeed reads the process group from ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` /
    ``MASTER_PORT`` (set by ``accelerate launch``, ``torchrun`` or ``deepspeed``); without them it
    looks for MPI. A single process gets them here, with a free local port.
    """
    if "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port))):
        os.environ.setdefault(key, value)


def make_plugin(a: DeepSpeedSettings | Any) -> Any:
    """accelerate's ``DeepSpeedPlugin`` from the DeepSpeed settings (or the parsed flags they are built from;
    kohya's ``prepare_deepspeed_plugin``; the flags are checked by :func:`deepspeed_problems` when parsed).
    Sets a one-process group's environment when none is set."""
    from accelerate import DeepSpeedPlugin

    a = DeepSpeedSettings.of(a)
    ensure_process_env()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    accum = max(1, a.gradient_accumulation_steps)
    plugin = DeepSpeedPlugin(
        zero_stage=a.zero_stage, gradient_accumulation_steps=accum, gradient_clipping=float(a.max_grad_norm or 0.0),
        offload_optimizer_device=a.offload_optimizer_device or "none",
        offload_optimizer_nvme_path=a.offload_optimizer_nvme_path or "none",
        offload_param_device=a.offload_param_device or "none",
        offload_param_nvme_path=a.offload_param_nvme_path or "none",
        # --zero3_init_flag is refused (library/config/flags/deepspeed.py): the model is read before partitioning
        zero3_init_flag=False, zero3_save_16bit_model=bool(a.zero3_save_16bit_model))
    config = plugin.deepspeed_config
    # sdtk gives DeepSpeed no data loader, so the batch sizes are set here (accelerate reads them from it)
    config["train_micro_batch_size_per_gpu"] = a.train_batch_size
    config["train_batch_size"] = a.train_batch_size * accum * world
    plugin.set_mixed_precision(a.mixed_precision or "no")
    if a.mixed_precision == "fp16":
        config["fp16"]["initial_scale_power"] = 0  # kohya: start the loss scale at 1, avoiding early overflow
        if a.fp16_master_weights_and_gradients or (a.full_fp16 and a.zero_stage == 2
                                                  and a.offload_optimizer_device == "cpu"):
            config["fp16"]["fp16_master_weights_and_grads"] = True
        elif a.full_fp16:
            logger.info("--full_fp16 with --deepspeed: DeepSpeed keeps float32 master weights in its optimizer "
                        "(fp16 masters need --zero_stage 2 --offload_optimizer_device cpu)")
    logger.info("DeepSpeed: ZeRO stage %d, %d process(es), accumulation %d, clipping %s, precision %s, offload "
                "optimizer %s / parameters %s", a.zero_stage, world, accum, a.max_grad_norm or "off",
                a.mixed_precision or "no", a.offload_optimizer_device or "none", a.offload_param_device or "none")
    return plugin


def no_construction_time_partitioning() -> None:
    """Undo accelerate's hook that makes transformers build models under ``deepspeed.zero.Init``.

    accelerate registers the DeepSpeed config with transformers whatever ``zero3_init_flag`` says;
    under ZeRO-3, every text encoder loaded afterwards (the frozen ones too) would then be
    partitioned at construction and hold empty weights outside the engine. sdtk loads the whole
    model first; ZeRO-3 partitions only the trained modules when they are prepared.
    """
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def _autocast_forward(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Run ``module``'s forward under autocast: DeepSpeed casts the trained modules to the half dtype,
    while their inputs (frozen text encoders' outputs, latents) may be float32."""
    forward = module.forward

    @functools.wraps(forward)
    def autocast_forward(*args: Any, **kwargs: Any) -> Any:
        device = next(module.parameters()).device
        with torch.autocast(device_type=device.type, dtype=dtype):
            return forward(*args, **kwargs)

    module.forward = autocast_forward


def prepare(accelerator: Any, modules: list[torch.nn.Module], optimizer: Any, mixed_precision: str) -> tuple[Any, Any]:
    """Hand the trained modules (as one ``ModuleList``) and the optimizer to DeepSpeed.

    Returns:
        ``(engine, optimizer)``: the DeepSpeed engine and accelerate's wrapper of DeepSpeed's
        optimizer (its ``step`` / ``zero_grad`` are no-ops: the engine steps at each boundary).
    """
    if mixed_precision in ("fp16", "bf16"):
        dtype = torch.float16 if mixed_precision == "fp16" else torch.bfloat16
        for m in modules:
            _autocast_forward(m, dtype)
    engine, optimizer = accelerator.prepare(torch.nn.ModuleList(modules), optimizer)
    return engine, optimizer


def backward(accelerator: Any, loss: torch.Tensor, window: int, accum: int, sync: bool) -> None:
    """Backward pass of one micro-batch through DeepSpeed.

    ``loss`` is this process's share of the global batch's mean (sdtk sums the shares over
    processes); DeepSpeed averages the gradients over processes and divides the loss by the
    accumulation steps, so the loss is scaled by ``world * accum / window`` to end as the plain
    loop's gradient (``window`` is the length of this accumulation window, shorter at an epoch's
    end). ``sync``: the window's last micro-batch, where DeepSpeed reduces, clips and steps.
    """
    scale = accelerator.num_processes * accum / window
    accelerator.deepspeed_engine_wrapped.backward(loss * scale, sync_gradients=sync)


@contextlib.contextmanager
def gathered_weights(s: Any) -> Iterator[None]:
    """Under ZeRO-3: the whole weights of the trained modules on every process (entered by all
    processes; the main process saves inside). Other stages hold them already."""
    engine = getattr(s, "deepspeed_engine", None)
    if engine is None or engine.zero_optimization_stage() != 3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
        yield

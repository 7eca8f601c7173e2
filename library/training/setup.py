"""Build a training :class:`~library.training.session.Session` from parsed arguments.

Order matters for memory: frozen parts are cast to the training dtype and put in eval /
no-grad mode before the optimizer exists; with ``--cache_latents`` the VAE leaves the device
after caching, so only the UNet, text encoder(s) and the network stay there.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import torch

from library.config.settings import DeepSpeedSettings, TrainingSettings, flag_values
from library.errors import ConfigError, TrainingError
from library.training import noise as N
from library.training.data import ShardedPlan
from library.training.lr_schedulers import build_lr_scheduler
from library.training.optimizers import build_optimizer
from library.training.session import Session, num_epochs_for

logger = logging.getLogger(__name__)


def make_accelerator(args: Any, deepspeed: DeepSpeedSettings | None = None):
    """The run's ``Accelerator``: trackers, mixed precision and the process-group / DDP options.

    ``--ddp_gradient_as_bucket_view`` / ``--ddp_static_graph`` reach accelerate as a
    ``DistributedDataParallelKwargs`` handler (kohya's way). sdtk itself never wraps the network
    in DDP (it sums the LoRA gradients with one all-reduce per optimizer step), so these options
    only matter for models a plugin prepares with accelerate. ``deepspeed``: the run's DeepSpeed
    settings (built from ``args`` when not given).
    """
    import os

    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    from library.training.progress import check_tracker_args, resolve_trackers, run_logging_dir

    trackers = resolve_trackers(args.log_with, args.logging_dir)
    check_tracker_args(args, trackers)  # a broken --log_tracker_config fails now, not after model loading
    handlers: list[Any] = []
    ds = DeepSpeedSettings.of(deepspeed if deepspeed is not None else args)
    # DeepSpeed without a GPU: accelerate forms the process group only when told the backend (DeepSpeed's CPU
    # accelerator uses gloo); otherwise each process would see itself alone
    gloo = {"backend": "gloo"} if ds.enabled and not torch.cuda.is_available() else {}
    if args.ddp_timeout or gloo:
        timeout = {"timeout": timedelta(minutes=args.ddp_timeout)} if args.ddp_timeout else {}
        handlers.append(InitProcessGroupKwargs(**timeout, **gloo))
    if args.ddp_gradient_as_bucket_view or args.ddp_static_graph:
        handlers.append(DistributedDataParallelKwargs(gradient_as_bucket_view=bool(args.ddp_gradient_as_bucket_view),
                                                      static_graph=bool(args.ddp_static_graph)))
    ds_plugin = None
    if ds.enabled:  # before reading WORLD_SIZE: a single process gets its group's env here
        from library.training.deepspeed_plugin import make_plugin

        ds_plugin = make_plugin(ds)
    # torchrun / accelerate on a machine without a GPU: accelerate needs cpu=True to form the gloo group
    # (DeepSpeed forms its group itself, with its CPU accelerator's gloo backend: cpu=True would bypass it)
    cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1 and ds_plugin is None
    acc = Accelerator(cpu=cpu, mixed_precision=args.mixed_precision or "no",
                      gradient_accumulation_steps=args.gradient_accumulation_steps if ds_plugin else 1,
                      log_with=trackers or None, deepspeed_plugin=ds_plugin,
                      project_dir=run_logging_dir(args.logging_dir, args.log_prefix), kwargs_handlers=handlers)
    if ds_plugin is not None:
        from library.training.deepspeed_plugin import no_construction_time_partitioning

        no_construction_time_partitioning()
    return acc


# kohya's --dynamo_backend choices (accelerate's names) -> torch.compile backend names
_BACKEND_ALIASES = {"tensort": "tensorrt", "fx2trt": "tensorrt"}
# backends that torch registers only once their package is imported
_BACKEND_PACKAGES = {"tensorrt": "torch_tensorrt", "ipex": "intel_extension_for_pytorch", "tvm": "tvm",
                     "onnxrt": "onnxruntime"}


def compile_backend(name: str, cuda: bool) -> str:
    """The ``torch.compile`` backend for ``--dynamo_backend NAME``, checked to be usable here.

    Raises:
        ConfigError: the backend does not exist in this PyTorch or needs a missing package /
            compiler.
    """
    import importlib
    import importlib.util
    import shutil

    import torch._dynamo

    backend = _BACKEND_ALIASES.get(name.lower(), name.lower())
    package = _BACKEND_PACKAGES.get(backend)
    if package is not None:
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"--dynamo_backend {name} needs the '{package}' package; install it or use "
                              "--dynamo_backend inductor (or eager / aot_eager to check that compiling works)")
        if backend in ("tensorrt", "ipex"):
            importlib.import_module(package)  # importing it registers the backend with torch
    available = torch._dynamo.list_backends(exclude_tags=())
    if backend not in available:
        raise ConfigError(f"--dynamo_backend {name} is not available in PyTorch {torch.__version__} "
                          f"(it has: {', '.join(b for b in available if 'TESTING' not in b)}); "
                          "use inductor (the default), aot_eager or eager")
    if backend == "inductor":
        if cuda and importlib.util.find_spec("triton") is None:
            raise ConfigError("--dynamo_backend inductor on a GPU needs the 'triton' package (pip install triton); "
                              "or use --dynamo_backend aot_eager / eager")
        if not cuda and not any(shutil.which(c) for c in ("g++", "c++", "clang++", "cl")):
            raise ConfigError("--dynamo_backend inductor on the CPU needs a C++ compiler (g++ or clang++) on PATH; "
                              "or use --dynamo_backend aot_eager / eager")
    return backend


def compile_unet(unet: torch.nn.Module, backend: str) -> None:
    """``--torch_compile``: compile the U-Net in place, after the network is applied to it.

    kohya lets ``accelerator.prepare(unet)`` wrap it in ``torch.compile``; that wrapper prefixes
    every state-dict key with ``_orig_mod.``. ``nn.Module.compile`` compiles the module's own
    call instead, so the U-Net object, its keys and the network's hooks stay as they were:
    saving, sampling and resuming see no difference. Compilation happens at the first call
    (and again when shapes or train/eval mode change).
    """
    unet.compile(backend=backend)
    logger.info("--torch_compile: the U-Net will be compiled with the %r backend at its first call", backend)


def check_args(args: Any) -> None:
    """Problems the trainer itself can see before loading anything (all at once): the run's flag rules
    (:func:`library.config.flags.rules.run_problems`; the parse-time rules ran in ``parse_args``) and this
    machine's environment.
    """
    from library.config.flags.rules import run_problems

    problems = run_problems(args)
    flags = flag_values(args)
    if args.xformers and not torch.cuda.is_available():
        problems.append("--xformers needs a CUDA GPU (and the xformers package); on this machine use --sdpa")
    if args.gradient_accumulation_steps < 1:
        problems.append("--gradient_accumulation_steps must be at least 1")
    if flags["torch_compile"]:
        try:
            compile_backend(args.dynamo_backend, torch.cuda.is_available())
        except ConfigError as e:
            problems += e.problems
    if flags["deepspeed"]:
        from library.training.deepspeed_plugin import require_deepspeed

        try:
            require_deepspeed()
        except ConfigError as e:
            problems += e.problems
    if problems:
        raise ConfigError(problems)


def setup_session(t: Any) -> Session:
    """Everything from parsed args to a ready :class:`Session` (may resume from a state later).

    ``t`` is the run's :class:`~library.training.trainer.Trainer` (its hooks build the parts).
    """
    from library.training.memory import tune_allocator

    tune_allocator()  # before any large allocation
    a = t.args
    check_args(a)
    target = t.make_target()
    t.preflight()
    t.check_output_dir()
    settings = TrainingSettings.from_args(a)  # after the hooks above, which may complete the namespace
    acc = make_accelerator(a, settings.deepspeed)
    seed = t.resolve_seed(acc)
    torch.manual_seed(seed)
    weight_dtype = t.weight_dtype()

    model = t.load_model()
    if flag_values(a)["base_weights"]:  # before fp8 / device moves; merged weights keep their dtype
        from library.training.base_weights import merge_base_weights

        merge_base_weights(t.import_network_module(), model, a.base_weights, a.base_weights_multiplier,
                           None, acc.device if a.lowram else "cpu")
    t.prepare_base_model(model, acc)
    family = t.family_adapter(model.family)
    v_prediction = bool(a.v_parameterization or getattr(model, "v_parameterization", False))
    group = t.build_dataset_group(seed, acc.num_processes)
    plan = ShardedPlan(group, acc.process_index, acc.num_processes, a.gradient_accumulation_steps)

    vae_dtype = torch.float32 if (a.no_half_vae or acc.device.type == "cpu") else weight_dtype
    model.vae.requires_grad_(False).eval().to(acc.device, dtype=vae_dtype)
    if a.cache_latents:
        t.cache_latents(group, model.vae, acc)
        if not a.highvram:  # kohya's --highvram keeps it on the device
            model.vae.to("cpu")  # only sampling needs it now
            if acc.device.type == "cuda":
                torch.cuda.empty_cache()

    target.build(t, model, acc, weight_dtype)  # what is trained: frozen, cast, wrapped
    t.cache_text_encoder_outputs(group, model, acc)
    target.finish(t, model, acc, weight_dtype)
    if a.torch_compile:  # after the network hooks are in place and the modes / devices are final
        compile_unet(model.unet, compile_backend(a.dynamo_backend, acc.device.type == "cuda"))
    groups = target.param_groups()
    params = target.trainable_params()
    if not params:
        raise TrainingError("nothing to train: the training target has no trainable parameters")

    if a.max_train_epochs:
        max_steps = a.max_train_epochs * plan.steps_per_epoch
    else:
        max_steps = a.max_train_steps
    group.set_max_train_steps(max_steps)
    o, sch = settings.optimizer, settings.scheduler
    opt_name, opt_args, optimizer = build_optimizer(o.optimizer_type, groups, o.learning_rate, o.optimizer_args,
                                                    bool(o.use_8bit_adam), bool(o.use_lion_optimizer))
    from library.training.optimizers import is_schedule_free

    scheduler = build_lr_scheduler(optimizer, sch.lr_scheduler, max_steps, sch.lr_warmup_steps,
                                   sch.lr_scheduler_num_cycles, sch.lr_scheduler_power,
                                   decay_steps=sch.lr_decay_steps, min_lr_ratio=sch.lr_scheduler_min_lr_ratio,
                                   timescale=sch.lr_scheduler_timescale, scheduler_type=sch.lr_scheduler_type,
                                   scheduler_args=sch.lr_scheduler_args,
                                   schedule_free=is_schedule_free(o.optimizer_type))
    engine = None
    if settings.deepspeed.enabled:  # the trained modules and the optimizer go to DeepSpeed together
        from library.training.deepspeed_plugin import prepare as prepare_deepspeed

        engine, optimizer = prepare_deepspeed(acc, list(target.module), optimizer, a.mixed_precision or "no")
    else:
        optimizer = acc.prepare(optimizer)  # grad scaler for fp16; devices are handled here, not by accelerate
    if a.full_fp16:
        _allow_fp16_unscale(acc)

    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler.from_config({k: v for k, v in model.scheduler_config.items() if not k.startswith("_")})
    s = Session(args=a, accelerator=acc, family=family, model=model, network=target.module,
                net_kwargs=getattr(target, "net_kwargs", {}), optimizer=optimizer, lr_scheduler=scheduler, plan=plan,
                group=group, seed=seed, weight_dtype=weight_dtype, train_unet=target.train_unet,
                train_text_encoder=target.train_text_encoder,
                alphas_cumprod=N.training_alphas_cumprod(noise_sched.betas, bool(a.zero_terminal_snr)),
                v_prediction=v_prediction,
                max_train_steps=max_steps, num_epochs=num_epochs_for(max_steps, plan.steps_per_epoch),
                save_dtype=t.save_dtype(), trainable_params=params, target=target, deepspeed_engine=engine,
                settings=settings)
    s.metadata = target.session_metadata(t, s, f"{opt_name}" + (f"({opt_args})" if opt_args else ""))
    target.session_ready(s)
    from library.training.memory import tune_allocator_for_training

    tune_allocator_for_training()  # steps reuse heap buffers instead of faulting in fresh mappings (issue 12)
    return s


def _allow_fp16_unscale(acc: Any) -> None:
    """``--full_fp16``: the grad scaler must unscale fp16 gradients, which PyTorch refuses by default."""
    scaler = getattr(acc, "scaler", None)
    if scaler is None:
        return
    original = scaler._unscale_grads_

    def unscale(optimizer, inv_scale, found_inf, allow_fp16):  # noqa: ARG001
        return original(optimizer, inv_scale, found_inf, True)

    scaler._unscale_grads_ = unscale

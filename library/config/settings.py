"""Typed, frozen views of the parsed flags, built once and passed to the code that uses them.

The namespace :func:`library.config.args.parse_args` returns has one attribute per flag of *its*
script; shared training code also runs for scripts that lack some flags (the DeepSpeed flags exist
for the full-model scripts only, ``--stop_text_encoder_training`` for ``train_db.py`` only, ...).
Instead of probing the namespace for an attribute with a default — which re-states each
default and drifts from its declaration — code reads a settings object here. Each settings class
has one ``from_args`` (the one place its flags are read); a flag the script does not declare gets
its declared default from :func:`declared_defaults`, built from the declarations in
:mod:`library.config.flags`. Field names are the flags' dests.

Every cross-flag rule lives in :mod:`library.config.flags.rules` (run by ``parse_args``, and by the
training setup for the rules a lone flag would break); these objects hold values only.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@functools.lru_cache(maxsize=1)
def declared_defaults() -> dict[str, Any]:
    """``{dest: default}`` of every flag, independent of the script.

    The training scripts (``COVERED_SCRIPTS``) come first; a dest whose declarations give those
    scripts different defaults has no script-independent default and is left out (reading it for a
    script that lacks it is then an error, never a guess). Other scripts (tools, ``gen_img``) only
    add dests the training scripts do not have.
    """
    from library.config.args import flags_for, known_scripts
    from library.config.flags.scripts import COVERED_SCRIPTS

    table: dict[str, Any] = {}
    ambiguous: set[str] = set()
    for script in COVERED_SCRIPTS:
        for f in flags_for(script):
            if f.dest in table and table[f.dest] != f.default:
                ambiguous.add(f.dest)
            table.setdefault(f.dest, f.default)
    for dest in ambiguous:
        del table[dest]
    for script in known_scripts():
        if script in COVERED_SCRIPTS:
            continue
        for f in flags_for(script):
            if f.dest not in table and f.dest not in ambiguous:
                table[f.dest] = f.default
    return table


class FlagValues(Mapping):
    """The parsed flags of one script (a namespace or a ``{dest: value}`` mapping); a flag the script
    does not declare reads as its declared default (:func:`declared_defaults`).

    Reading a name that is not a flag at all raises ``KeyError`` (a typo never reads as "off"). The
    view is live: it reads the namespace as it is at each access.
    """

    __slots__ = ("_given",)

    def __init__(self, args: Any = None):
        if args is None:
            self._given: Mapping[str, Any] = {}
        elif isinstance(args, Mapping):
            self._given = args
        else:
            self._given = vars(args)

    def __getitem__(self, dest: str) -> Any:
        if dest in self._given:
            return self._given[dest]
        defaults = declared_defaults()
        if dest not in defaults:
            raise KeyError(f"{dest!r} is not a flag with a script-independent declared default")
        return defaults[dest]

    def declares(self, dest: str) -> bool:
        """True when the parsed flags hold ``dest`` (the script has that flag)."""
        return dest in self._given

    def __iter__(self) -> Iterator[str]:
        return iter(self._given)

    def __len__(self) -> int:
        return len(self._given)


def flag_values(args: Any) -> FlagValues:
    """:class:`FlagValues` of ``args`` (returned as is when it already is one)."""
    return args if isinstance(args, FlagValues) else FlagValues(args)


def _from_flags(cls: type[T], args: Any, **derived: Any) -> T:
    """``cls`` with each field read from the flag of the same dest (``derived`` fields given)."""
    values = flag_values(args)
    kw = {f.name: values[f.name] for f in dataclasses.fields(cls) if f.name not in derived}  # type: ignore[arg-type]
    return cls(**kw, **derived)


class _Settings:
    """``from_args`` for settings whose fields are all flag dests; ``of`` accepts either form."""

    __slots__ = ()

    @classmethod
    def from_args(cls, args: Any):
        return _from_flags(cls, args)

    @classmethod
    def of(cls, value: Any):
        """``value`` itself when it is already these settings, else :meth:`from_args` of it."""
        return value if isinstance(value, cls) else cls.from_args(value)


@dataclass(frozen=True, slots=True)
class NoiseSettings(_Settings):
    """Noise, timestep and input-perturbation flags of a training step (:mod:`library.training.step`)."""

    noise_offset: float | None
    noise_offset_random_strength: bool
    adaptive_noise_scale: float | None
    multires_noise_iterations: int | None
    multires_noise_discount: float
    min_timestep: int | None
    max_timestep: int | None
    ip_noise_gamma: float | None
    ip_noise_gamma_random_strength: bool
    zero_terminal_snr: bool


@dataclass(frozen=True, slots=True)
class LossSettings(_Settings):
    """The loss flags: elementwise loss with its Huber schedule, mask and per-sample weights."""

    loss_type: str
    huber_schedule: str
    huber_c: float
    huber_scale: float
    masked_loss: bool
    prior_loss_weight: float
    min_snr_gamma: float | None
    scale_v_pred_loss_like_noise_pred: bool
    v_pred_like_loss: float | None
    debiased_estimation_loss: bool


@dataclass(frozen=True, slots=True)
class OptimizerSettings(_Settings):
    """Which optimizer, with which arguments (:func:`library.training.optimizers.build_optimizer`)."""

    optimizer_type: str
    learning_rate: float
    optimizer_args: list[str] | None
    use_8bit_adam: bool
    use_lion_optimizer: bool


@dataclass(frozen=True, slots=True)
class SchedulerSettings(_Settings):
    """The learning-rate schedule (:func:`library.training.lr_schedulers.build_lr_scheduler`)."""

    lr_scheduler: str
    lr_warmup_steps: Any  # int steps or a float ratio
    lr_scheduler_num_cycles: int
    lr_scheduler_power: float
    lr_decay_steps: Any  # int steps or a float ratio
    lr_scheduler_min_lr_ratio: float | None
    lr_scheduler_timescale: int | None
    lr_scheduler_type: str
    lr_scheduler_args: list[str] | None


@dataclass(frozen=True, slots=True)
class DeepSpeedSettings(_Settings):
    """``--deepspeed`` and the ZeRO flags, with the batch / precision flags its plugin is built from."""

    deepspeed: bool
    zero_stage: int
    offload_optimizer_device: str | None
    offload_optimizer_nvme_path: str | None
    offload_param_device: str | None
    offload_param_nvme_path: str | None
    zero3_save_16bit_model: bool
    fp16_master_weights_and_gradients: bool
    gradient_accumulation_steps: int
    max_grad_norm: float | None
    train_batch_size: int
    mixed_precision: str | None
    full_fp16: bool

    @property
    def enabled(self) -> bool:
        return bool(self.deepspeed)


@dataclass(frozen=True, slots=True)
class FusedStepSettings(_Settings):
    """``--fused_backward_pass`` / ``--fused_optimizer_groups``: stepping inside the backward pass."""

    fused_backward_pass: bool
    fused_optimizer_groups: int | None
    optimizer_type: str
    full_bf16: bool

    @property
    def optimizer_name(self) -> str:
        """The optimizer's lower-case class name (AdamW when none is given)."""
        return (self.optimizer_type or "AdamW").rsplit(".", 1)[-1].lower()

    @property
    def stochastic_rounding(self) -> bool:
        """kohya's fused Adafactor rounds bf16 weights stochastically: fused + Adafactor + ``--full_bf16``."""
        return bool(self.fused_backward_pass and self.full_bf16 and self.optimizer_name == "adafactor")


@dataclass(frozen=True, slots=True)
class ConsoleLogSettings(_Settings):
    """kohya's ``--console_log_level/_file/_simple`` (read by entry points' logging setup)."""

    console_log_level: str | None
    console_log_file: str | None
    console_log_simple: bool


@dataclass(frozen=True, slots=True)
class TrainingSettings:
    """The settings of one training run, built once by the session setup."""

    noise: NoiseSettings
    loss: LossSettings
    optimizer: OptimizerSettings
    scheduler: SchedulerSettings
    deepspeed: DeepSpeedSettings
    fused_step: FusedStepSettings

    @classmethod
    def from_args(cls, args: Any) -> "TrainingSettings":
        values = flag_values(args)
        return cls(noise=NoiseSettings.from_args(values), loss=LossSettings.from_args(values),
                   optimizer=OptimizerSettings.from_args(values), scheduler=SchedulerSettings.from_args(values),
                   deepspeed=DeepSpeedSettings.from_args(values), fused_step=FusedStepSettings.from_args(values))


__all__ = [
    "ConsoleLogSettings", "DeepSpeedSettings", "FlagValues", "FusedStepSettings", "LossSettings", "NoiseSettings",
    "OptimizerSettings", "SchedulerSettings", "TrainingSettings", "declared_defaults", "flag_values",
]

"""Progress bar and metric logging (tqdm, optional TensorBoard / W&B through accelerate)."""

from __future__ import annotations

import importlib.util
import logging
from collections import deque

from tqdm.auto import tqdm

from library.errors import ConfigError

logger = logging.getLogger(__name__)

_TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "log"), "wandb": ("wandb", "log")}


def resolve_trackers(log_with: str | None, logging_dir: str | None) -> list[str]:
    """Tracker names for accelerate, checked for their optional packages.

    kohya's meaning: ``--logging_dir`` alone means TensorBoard; ``all`` means both.
    """
    if log_with is None:
        names = ["tensorboard"] if logging_dir else []
    elif log_with == "all":
        names = ["tensorboard", "wandb"]
    else:
        names = [log_with]
    for name in names:
        if name not in _TRACKER_PACKAGES:
            raise ConfigError(f"--log_with {name!r} is not supported; use tensorboard, wandb or all")
        package, extra = _TRACKER_PACKAGES[name]
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"--log_with {name} needs the '{package}' package: pip install 'sdtk[{extra}]' "
                              f"(or pip install {package})")
    if "tensorboard" in names and not logging_dir:
        raise ConfigError("--log_with tensorboard needs --logging_dir (where the event files go)")
    return names


class LossRecorder:
    """Running average of the loss over the current epoch (kohya's "avr_loss")."""

    def __init__(self) -> None:
        self.values: deque[float] = deque()
        self.total = 0.0

    def add(self, epoch_position: int, loss: float) -> None:
        if epoch_position < len(self.values):  # a new epoch overwrites position by position, like kohya
            self.total -= self.values[epoch_position]
            self.values[epoch_position] = loss
        else:
            self.values.append(loss)
        self.total += loss

    @property
    def average(self) -> float:
        return self.total / max(1, len(self.values))


def make_progress_bar(total: int, initial: int, enabled: bool) -> tqdm:
    return tqdm(total=total, initial=initial, smoothing=0, disable=not enabled, desc="steps", dynamic_ncols=True)


def run_logging_dir(logging_dir: str | None, log_prefix: str | None) -> str | None:
    """kohya's layout: each run logs into ``LOGGING_DIR/<log_prefix><YYYYmmddHHMMSS>``."""
    import time

    if not logging_dir:
        return None
    return f"{logging_dir}/{log_prefix or ''}{time.strftime('%Y%m%d%H%M%S', time.localtime())}"


def init_trackers(accelerator, args, default_name: str, config: dict | None = None) -> None:
    """Start the trackers (main process), with kohya's ``--log_tracker_name``, ``--log_tracker_config``
    (a TOML of per-tracker init kwargs), ``--wandb_run_name`` and ``--wandb_api_key``."""
    if not accelerator.is_main_process or not (args.log_with or args.logging_dir):
        return
    init_kwargs: dict = {}
    if getattr(args, "log_tracker_config", None):
        import toml

        try:
            init_kwargs = toml.load(args.log_tracker_config)
        except (OSError, toml.TomlDecodeError) as e:
            raise ConfigError(f"--log_tracker_config {args.log_tracker_config}: cannot read it ({e})") from e
    if getattr(args, "wandb_run_name", None):
        init_kwargs.setdefault("wandb", {})["name"] = args.wandb_run_name
    if getattr(args, "wandb_api_key", None):
        import wandb

        wandb.login(key=args.wandb_api_key)
    accelerator.init_trackers(args.log_tracker_name or default_name, config=config, init_kwargs=init_kwargs)

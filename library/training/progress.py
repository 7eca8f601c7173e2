"""Progress bar and metric logging (tqdm, optional TensorBoard / W&B through accelerate)."""

from __future__ import annotations

import importlib.util
import logging
from collections import deque
from pathlib import Path

from tqdm.auto import tqdm

from library.config.settings import flag_values
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


# kohya's get_sanitized_config_or_none: never sent to a tracker (W&B runs may be public)
_SECRET_ARGS = ("wandb_api_key", "huggingface_token")
_PRIVATE_PATH_ARGS = ("pretrained_model_name_or_path", "vae", "tokenizer_cache_dir", "train_data_dir",
                      "conditioning_data_dir", "reg_data_dir", "output_dir", "logging_dir")


def sanitized_config(args) -> dict | None:
    """``--log_config``: the run settings for the trackers' config panel, else ``None``.

    Like kohya, API keys / tokens and local paths (model, data, output, logs) are left out;
    sdtk also leaves out every flag declared ``secret``. Values accelerate's trackers cannot
    store (lists, paths, ...) become their text.
    """
    if not flag_values(args)["log_config"]:
        return None
    from library.config.flags import ALL_FLAGS

    hidden = set(_SECRET_ARGS) | set(_PRIVATE_PATH_ARGS) | {f.dest for f in ALL_FLAGS if f.secret}
    out: dict = {}
    for key, value in vars(args).items():
        if key in hidden or key.startswith("_"):  # "_..." are attributes added by the program, not flags
            continue
        out[key] = value if value is None or isinstance(value, (bool, int, float, str)) else str(value)
    return out


def load_tracker_config(path: str, active: list[str] | None = None) -> dict[str, dict]:
    """``--log_tracker_config``: ``{tracker name: init kwargs}`` from a TOML file.

    Each top-level table names a tracker (``[wandb]``, ``[tensorboard]``...); its keys are
    passed to that tracker's constructor (for W&B: ``wandb.init``). Raises ConfigError naming
    the file (and the TOML line) when it is missing, unreadable or not made of tables.
    """
    import tomllib

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--log_tracker_config: file not found: {file}")
    try:
        with open(file, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        msg = str(e)
        if "at end of document" in msg:  # tomllib names the line and column except for an unfinished file
            msg += f" (line {len(file.read_text(encoding='utf-8', errors='replace').splitlines())}, the last line)"
        raise ConfigError(f"--log_tracker_config: invalid TOML: {msg}", source=str(file)) from None
    except OSError as e:
        raise ConfigError(f"--log_tracker_config: cannot read it ({e})", source=str(file)) from None
    problems = [f"top-level key {k!r} must be a table of settings for one tracker, e.g. [wandb] with "
                f"name = \"my run\" under it" for k, v in data.items() if not isinstance(v, dict)]
    if problems:
        raise ConfigError(problems, source=str(file))
    for name in data:
        if active is not None and name not in active:
            logger.warning("%s: section [%s] is ignored: %s is not among the trackers in use (%s)", file, name,
                           name, ", ".join(active) or "none")
    return data


def tracker_init_kwargs(args, active: list[str]) -> dict[str, dict]:
    """accelerate's ``init_kwargs``: the ``--log_tracker_config`` tables, then ``--wandb_run_name``
    (which wins over a ``name`` in the file) and W&B's folder (``--logging_dir``, as kohya)."""
    kwargs = load_tracker_config(args.log_tracker_config, active) if args.log_tracker_config else {}
    if args.wandb_run_name:
        kwargs.setdefault("wandb", {})["name"] = args.wandb_run_name
    if "wandb" in active and args.logging_dir:
        Path(args.logging_dir).mkdir(parents=True, exist_ok=True)  # wandb.init wants the folder to exist
        kwargs.setdefault("wandb", {}).setdefault("dir", args.logging_dir)
    return kwargs


def check_tracker_args(args, active: list[str]) -> None:
    """Up-front checks (before any model is loaded): the tracker TOML parses; W&B-only flags
    without W&B are reported as ignored."""
    if args.log_tracker_config:
        if not active:
            logger.warning("--log_tracker_config is ignored: no tracker is in use (set --logging_dir or --log_with)")
        load_tracker_config(args.log_tracker_config, active)
    if "wandb" not in active:
        flags = flag_values(args)
        for flag in ("wandb_run_name", "wandb_api_key"):
            if flags[flag]:
                logger.warning("--%s is ignored: W&B is not among the trackers (use --log_with wandb or all)", flag)


def _wandb_login(key: str) -> None:
    try:
        import wandb
    except ImportError as e:
        raise ConfigError("--wandb_api_key needs the 'wandb' package: pip install 'sdtk[log]' "
                          "(or pip install wandb)") from e
    wandb.login(key=key)


def init_trackers(accelerator, args, default_name: str) -> None:
    """Start the trackers (main process only) as kohya does.

    Project name ``--log_tracker_name`` (else ``default_name``); init kwargs from
    :func:`tracker_init_kwargs`; with W&B, ``--wandb_api_key`` logs in first; the config sent
    is :func:`sanitized_config` (only with ``--log_config``; secrets are filtered there, in one place).
    """
    if not accelerator.is_main_process or not (args.log_with or args.logging_dir):
        return
    # accelerate's tracker types, or GeneralTracker objects a caller gave it
    from accelerate.tracking import GeneralTracker

    active = [t.name if isinstance(t, GeneralTracker) else str(t) for t in accelerator.log_with]
    init_kwargs = tracker_init_kwargs(args, active)
    if "wandb" in active and flag_values(args)["wandb_api_key"]:
        _wandb_login(args.wandb_api_key)
    accelerator.init_trackers(args.log_tracker_name or default_name, config=sanitized_config(args),
                              init_kwargs=init_kwargs)

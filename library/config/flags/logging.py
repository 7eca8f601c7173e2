"""Logging and tracker flags."""

from __future__ import annotations

from library.config.flags.base import DONE, F, in_group

FLAGS = in_group("logging", [
    F("--logging_dir", str, None, DONE, "Folder for TensorBoard/W&B logs (no logging when unset)."),
    F("--log_with", str, None, DONE,
      "Tracker(s) to log to (default tensorboard when --logging_dir is set).",
      choices=["tensorboard", "wandb", "all"]),
    F("--log_prefix", str, None, DONE, "Prefix of the run folder name under --logging_dir."),
    F("--log_tracker_name", str, None, DONE, "Name of the tracker project/run."),
    F("--wandb_run_name", str, None, DONE, "Name of the W&B run."),
    F("--log_tracker_config", str, None, DONE, "TOML file with extra tracker settings."),
    F("--wandb_api_key", str, None, DONE, "W&B API key (otherwise taken from the environment).",
      secret=True),
    F("--log_config", bool, False, DONE, "Send the training config to the trackers."),
    F("--console_log_level", str, None, DONE, "Console log level.",
      choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]),
    F("--console_log_file", str, None, DONE, "Also write the console log to this file."),
    F("--console_log_simple", bool, False, DONE, "Plain console log format."),
])

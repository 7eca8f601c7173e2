"""Flags about the config file itself."""

from __future__ import annotations

from library.config.flags.base import DONE, F, in_group

FLAGS = in_group("config", [
    F("--config_file", str, None, DONE,
      "Read flags from this TOML file (keys are flag names without '--'; sections are "
      "ignored); command-line flags override it. '.toml' is appended if missing."),
    F("--output_config", bool, False, DONE,
      "Write the effective config as TOML and exit without training: to --config_file if "
      "given (never overwriting it), else to <output_dir>/<output_name>.toml."),
])

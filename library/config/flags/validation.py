"""Validation-loss flags (issue #6 item 6)."""

from __future__ import annotations

from library.config.flags.base import TODO, F, at_least, between, in_group

FLAGS = in_group("validation", [
    F("--validation_split", float, 0.0, TODO,
      "Fraction of the dataset held out for validation loss.", check=between(0, 1, hi_open=True)),
    F("--validation_seed", int, None, TODO, "Seed for the validation split and its fixed noise."),
    F("--validate_every_n_steps", int, None, TODO, "Compute the validation loss every N steps.",
      check=at_least(1)),
    F("--validate_every_n_epochs", int, None, TODO, "Compute the validation loss every N epochs.",
      check=at_least(1)),
    F("--max_validation_steps", int, None, TODO, "Use at most N validation batches.", check=at_least(1)),
])

"""Validation-loss flags (issue #6 item 6)."""

from __future__ import annotations

from library.config.flags.base import DONE, F, at_least, between, in_group

FLAGS = in_group("validation", [
    F("--validation_split", float, 0.0, DONE,
      "Fraction of the dataset held out for validation loss.", check=between(0, 1, hi_open=True)),
    F("--validation_seed", int, None, DONE, "Seed for the validation split and its fixed noise."),
    F("--validate_every_n_steps", int, None, DONE, "Compute the validation loss every N steps.",
      check=at_least(1)),
    F("--validate_every_n_epochs", int, None, DONE, "Compute the validation loss every N epochs.",
      check=at_least(1)),
    F("--max_validation_steps", int, None, DONE, "Use at most N validation batches.", check=at_least(1)),
])

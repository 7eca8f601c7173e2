"""Exceptions raised at sdtk's boundaries (config, files, models, data).

Every error a user can cause derives from :class:`SdtkError`. Entry scripts catch it and
print one line (``error: <message>``) with a non-zero exit; library code never calls ``exit()``.
"""

from __future__ import annotations


class SdtkError(Exception):
    """Base class: a problem the user can fix. The message says what is wrong and what to do."""


class ConfigError(SdtkError):
    """Invalid flags, TOML config or dataset config. May carry several problems at once."""

    def __init__(self, problems: str | list[str], source: str | None = None):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        self.source = source
        head = f"{source}: " if source else ""
        if len(self.problems) == 1:
            msg = head + self.problems[0]
        else:
            msg = head + f"{len(self.problems)} problems:\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(msg)


class ModelLoadError(SdtkError):
    """A base model, VAE, tokenizer or network file cannot be loaded."""


class ModelSaveError(SdtkError):
    """A model or network cannot be written where the user asked."""


class DatasetError(SdtkError):
    """Images, captions or metadata that cannot be used for training."""


class TrainingError(SdtkError):
    """A run that cannot continue (NaN loss, incompatible resume state, ...)."""

"""Logging setup for entry points (scripts and tools). Library modules only call ``logging.getLogger``."""

from __future__ import annotations

import logging
import sys
from typing import Any

_THIRD_PARTY = ("diffusers", "transformers", "accelerate", "PIL", "huggingface_hub", "bitsandbytes", "urllib3")


class _StderrHandler(logging.StreamHandler):
    """A console handler that writes to whatever ``sys.stderr`` is when a record is emitted, so a
    redirected or replaced stderr (a wrapper, a test's capture) never leaves it writing to a closed stream."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # noqa: D102
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # logging.StreamHandler.__init__ assigns it
        pass


def configure_logging(args: Any = None, default_level: str = "INFO") -> None:
    """Configure the root logger from kohya's ``--console_log_level/_file/_simple`` (when present on ``args``).

    Third-party libraries are limited to errors: their warnings about conversions sdtk does on
    purpose (e.g. casting a model's dtype) or optional packages sdtk does not use are noise for users.
    """
    from library.config.settings import ConsoleLogSettings

    console = ConsoleLogSettings.from_args(args)  # a tool without these flags gets their declared defaults
    level = console.console_log_level or default_level
    handlers: list[logging.Handler] = [_StderrHandler()]
    if console.console_log_file:
        handlers.append(logging.FileHandler(console.console_log_file, encoding="utf-8"))
    fmt = "%(message)s" if console.console_log_simple else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    for h in handlers:
        h.sdtk_console = True  # type: ignore[attr-defined]  (lets test fixtures find and remove them)
    logging.basicConfig(level=level, format=fmt, handlers=handlers, force=True)
    for name in _THIRD_PARTY:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:  # transformers and diffusers log through their own handlers
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        dlog.set_verbosity_error()
    except ImportError:
        pass

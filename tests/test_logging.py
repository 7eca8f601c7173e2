"""Entry-point logging: the console handler writes to whatever sys.stderr is at the time."""

from __future__ import annotations

import io
import logging
import sys

from library.utils.logging import configure_logging


def test_console_handler_follows_a_replaced_stderr(monkeypatch):
    configure_logging(None)
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    logging.getLogger("sdtk.test").warning("to the first stream")
    monkeypatch.setattr(sys, "stderr", second)  # e.g. a wrapper replaced stderr after configuration
    logging.getLogger("sdtk.test").warning("to the second stream")
    assert "to the first stream" in first.getvalue() and "to the second stream" not in first.getvalue()
    assert "to the second stream" in second.getvalue()
    # the handler is marked so test fixtures can remove it
    assert any(getattr(h, "sdtk_console", False) for h in logging.getLogger().handlers)

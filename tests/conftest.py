"""Shared fixtures: tiny models of every family in both layouts, built once per test session.

No test touches a model hub: HF_HUB_OFFLINE is set before anything imports huggingface_hub.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
if "SDTK_CACHE_DIR" not in os.environ:  # sdtk's per-user cache (rebuilt tokenizers): never the user's real one
    import atexit
    import shutil
    import tempfile

    os.environ["SDTK_CACHE_DIR"] = tempfile.mkdtemp(prefix="sdtk-test-cache-")
    atexit.register(shutil.rmtree, os.environ["SDTK_CACHE_DIR"], True)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # shared, noisy machines: determinism and stable timings


@pytest.fixture(autouse=True)
def _isolated_logging():
    """Entry points run in-process (in tests or in module fixtures) configure the root logger;
    remove the console/file handlers they installed after each test, so no test sees output or
    levels left by another test's script."""
    import logging

    root = logging.getLogger()
    level = root.level
    yield
    for h in list(root.handlers):
        if getattr(h, "sdtk_console", False):
            root.removeHandler(h)
            h.close()
    root.setLevel(level)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """``tiny_model_dir(family, fmt)`` -> path of a tiny model (``fmt``: "diffusers" or "single_file").

    Single files come with a tokenizer cache folder ``<stem>_tokenizers`` beside them.
    """
    from library.models.families import Family
    from tools.make_tiny_model import make_tiny_model

    root = tmp_path_factory.mktemp("tiny_models")
    cache: dict[tuple[str, str], Path] = {}

    def get(family: str, fmt: str = "diffusers") -> Path:
        key = (family, fmt)
        if key not in cache:
            out = root / (f"{family}_{fmt}" + (".safetensors" if fmt == "single_file" else ""))
            cache[key] = make_tiny_model(Family(family), fmt, out)
        return cache[key]

    return get


@pytest.fixture
def repo_root() -> Path:
    return ROOT

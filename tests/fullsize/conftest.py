"""The ``fullsize`` tier: real entry scripts on the real SD1.5 / SD2.x / SDXL architectures (random weights).

Every test module here sets ``pytestmark = pytest.mark.fullsize``; the tier runs only with
``pytest -m fullsize`` (CI does, after the default suite). The three base models are built once per
session, each on first use, by ``tools/make_tiny_model.py --full_size`` in a subprocess, as fp16
single files in the original layout with no tokenizer folder — what a user downloads. Every script
runs in its own subprocess, one at a time, so the pytest process never holds a full-size model;
SDXL processes peak near 15 GB.

``SDTK_FULLSIZE_DIR=<folder>`` keeps the built models there and reuses them in later sessions
(local iteration; CI builds them fresh).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.fullsize.helpers import run_script

# SD2 here is the 768-v layout (v-prediction); its file name says so
MODELS = {"sd1": ("sd1", False), "sd2v": ("sd2", True), "sdxl": ("sdxl", False)}


@pytest.fixture(scope="session")
def full_model(tmp_path_factory):
    """``full_model(name)`` -> path of the full-size random model ``sd1`` / ``sd2v`` / ``sdxl``, built on first use."""
    from library.models.random_full import BUILD_VERSION

    keep = os.environ.get("SDTK_FULLSIZE_DIR")
    root = Path(keep) if keep else tmp_path_factory.mktemp("fullsize_models")
    root.mkdir(parents=True, exist_ok=True)

    def get(name: str) -> Path:
        family, v = MODELS[name]
        path = root / f"{name}_random_v{BUILD_VERSION}.safetensors"
        if not path.exists():
            args = ["--family", family, "--full_size", "--out", path] + (["--v_parameterization"] if v else [])
            run_script("tools/make_tiny_model.py", *args, timeout=300)
        return path

    yield get
    if not keep:  # 12 GB; pytest keeps the temporary folders of the last three sessions
        for p in root.glob("*.safetensors"):
            p.unlink()


@pytest.fixture(scope="session")
def photos(tmp_path_factory):
    """``photos(name)`` -> a fresh kohya DreamBooth folder ``<name>/1_sks/`` with two real photos and captions."""
    from tests.trainer_fixtures import make_dataset

    def make(name: str) -> Path:
        return make_dataset(tmp_path_factory.mktemp(name), names=("astronaut", "chelsea"))

    return make

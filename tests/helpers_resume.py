"""Helpers of the resume tests: an entry script's ``main`` in this process, and a run killed after a state.

Not a pytest plugin: import from tests (``from tests.helpers_resume import ...``).
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def run_script_in_process(script: str, argv: list[str], trainer_cls: Any = None) -> int:
    """``<script>.main(argv)`` of a root entry script (e.g. ``"fine_tune"``) in this process, with
    accelerate's process-wide state reset first. Returns the exit code."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    module = importlib.import_module(script)
    return module.main(argv) if trainer_cls is None else module.main(argv, trainer_cls)


def run_killed_after_state(script: str, argv: list[str], state: Path, timeout: float = 120) -> int:
    """Run ``python <script>.py argv`` and SIGKILL it as soon as ``state`` (a state folder it writes) is
    complete, i.e. its ``train_state.json`` exists. Returns the process's return code (negative: killed).

    One thread, as the in-process runs of the tests use (``conftest``): the same float sums, so a run
    resumed from ``state`` can be compared bit for bit with an uninterrupted one.
    """
    proc = subprocess.Popen([sys.executable, str(ROOT / f"{script}.py"), *argv], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = state / "train_state.json"
    deadline = time.time() + timeout
    try:
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert marker.exists(), f"{script} never saved the state {state.name} (return code {proc.returncode})"
    return proc.returncode


def state_progress(state: Path) -> dict:
    """The ``progress`` counters of a saved state folder."""
    return json.loads((state / "train_state.json").read_text())["progress"]

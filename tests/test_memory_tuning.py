"""The training-phase allocator setting (issue 12): buffers reused from the heap, no page faults."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

CODE = (
    "import resource, sys, torch\n"
    "from library.training.memory import tune_allocator, tune_allocator_for_training\n"
    "tune_allocator()\n"
    "applied = tune_allocator_for_training()\n"
    "def step():  # allocate and free activation-sized buffers, as a training step does\n"
    "    bufs = [torch.ones(n * 2**20 // 4) for n in (64, 8, 2, 40, 3)]\n"
    "    del bufs\n"
    "for _ in range(4):  # the heap settles after a few steps\n"
    "    step()\n"
    "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
    "for _ in range(5):\n"
    "    step()\n"
    "print(int(applied), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
)


def _run(env_extra: dict[str, str]) -> tuple[int, int]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", CODE], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**env, **env_extra}).stdout.split()
    return int(out[-2]), int(out[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_training_allocator_reuses_buffers_without_page_faults():
    applied, faults = _run({})
    if not applied:
        pytest.skip("not glibc")
    # The same steps with glibc's own 1 MiB mmap threshold: every buffer is a fresh mapping,
    # ~150,000 faults for 5 steps x 117 MB on 4 KiB pages. Measured in the same place, because the
    # absolute count depends on the machine (a CI machine showed 6,144 where this one shows 0).
    _, untuned = _run({"MALLOC_MMAP_THRESHOLD_": "1048576"})
    if untuned < 5000:
        pytest.skip(f"fresh mappings cost only {untuned} faults here (huge pages): nothing to save")
    assert faults * 10 < untuned, (faults, untuned)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_user_malloc_settings_win():
    applied, _ = _run({"MALLOC_MMAP_THRESHOLD_": "1048576"})
    assert applied == 0

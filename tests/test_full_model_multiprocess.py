"""train_db.py under torchrun: 2 processes x batch 1 == 1 process x batch 2 (the full-model target's
gradients are summed like the network's); only the main process writes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.test_train_db import db_argv, run_db
from tests.trainer_fixtures import ROOT, assert_same_tensors, make_dataset

pytestmark = pytest.mark.integration


def test_train_db_two_processes_equal_one_with_double_batch(tiny_model_dir, tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed")
    data = make_dataset(tmp_path / "data")
    model = tiny_model_dir("sd1")
    common = ("--save_model_as", "safetensors", "--stop_text_encoder_training", "2")
    two = tmp_path / "two"
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", str(ROOT / "train_db.py"),
           *db_argv(model, data, two, *common, "--train_batch_size", "1", "--save_every_n_steps", "2",
                    "--save_state", steps=3)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=150, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 process(es)" in res.stderr
    one = tmp_path / "one"
    assert run_db(db_argv(model, data, one, *common, "--train_batch_size", "2", steps=3)) == 0
    assert_same_tensors(load_file(one / "db.safetensors"), load_file(two / "db.safetensors"), atol=1e-4)
    names = sorted(p.name for p in two.iterdir())
    assert names == ["db-state", "db-step00000002-state", "db-step00000002.safetensors", "db.safetensors"], names

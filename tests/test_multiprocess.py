"""Multi-process training (#4 item 10): 2 processes x batch 1 == 1 process x batch 2; only main writes."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from tests.trainer_fixtures import assert_same_tensors, lora_tensors, make_dataset, run_in_process, run_subprocess, train_argv

pytestmark = pytest.mark.integration


def test_two_processes_equal_one_process_with_double_batch(tiny_model_dir, tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed")
    data = make_dataset(tmp_path / "data")
    model = tiny_model_dir("sd1")
    two = tmp_path / "two"
    res = run_subprocess(train_argv(model, data, two, "--train_batch_size", "1", "--save_every_n_steps", "2",
                                    "--save_state", steps=3),
                         launcher=[str(torchrun), "--standalone", "--nproc_per_node", "2"], timeout=110)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 process(es)" in res.stderr
    one = tmp_path / "one"
    assert run_in_process(train_argv(model, data, one, "--train_batch_size", "2", steps=3)) == 0
    # same global batches, same per-sample noise: equal up to float summation order
    assert_same_tensors(lora_tensors(one / "lora.safetensors"), lora_tensors(two / "lora.safetensors"), atol=1e-4)
    # only the main process wrote: one final file, one step file, one state, the final state, no leftovers
    names = sorted(p.name for p in two.iterdir())
    assert names == ["lora-state", "lora-step00000002-state", "lora-step00000002.safetensors", "lora.safetensors"], names


def test_sdxl_two_processes_with_disk_text_encoder_cache(tiny_model_dir, tmp_path):
    """SDXL under torchrun: the main process writes the text-encoder (and latent) caches, the other
    reuses them, and the LoRA equals one process with the in-memory caches and double batch."""
    import os
    import subprocess

    from tests.trainer_fixtures import ROOT

    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed")
    data = make_dataset(tmp_path / "data")
    model = tiny_model_dir("sdxl")
    common = ("--network_train_unet_only", "--cache_latents", "--cache_text_encoder_outputs")
    two = tmp_path / "two"
    argv = train_argv(model, data, two, *common, "--cache_text_encoder_outputs_to_disk", "--cache_latents_to_disk",
                      "--train_batch_size", "1", steps=3)
    cmd = [str(torchrun), "--standalone", "--nproc_per_node", "2", str(ROOT / "sdxl_train_network.py"), *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=150, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 process(es)" in res.stderr
    assert list(data.rglob("*_te_sdtk.safetensors")), "the text-encoder outputs were not cached to disk"

    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    import sdxl_train_network

    one = tmp_path / "one"
    assert sdxl_train_network.main(train_argv(model, data, one, *common, "--train_batch_size", "2", steps=3)) == 0
    assert_same_tensors(lora_tensors(one / "lora.safetensors"), lora_tensors(two / "lora.safetensors"), atol=1e-4)
    assert sorted(p.name for p in two.iterdir()) == ["lora.safetensors"]

"""``--deepspeed`` for the full-model scripts (library/training/deepspeed_plugin.py).

- the DeepSpeed config accelerate's plugin is built with, from the flags (no DeepSpeed package needed);
- bad flag combinations: one line naming the flag, nothing written;
- real runs on the CPU (DeepSpeed's CPU accelerator, gloo; ``train_db.py`` in a subprocess, one
  process and two under torchrun): ZeRO-2 with gradient accumulation over a short last window and
  ZeRO-3 (UNet) give the non-DeepSpeed result (SGD, within 1e-6 where
  training moved the weights by more than 1e-2: float32 rounding only) and save checkpoints that load. The first DeepSpeed run on a machine builds its CPU communication op
  (about 2 minutes on 2 cores; cached in ~/.cache/torch_extensions afterwards).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.test_train_db import db_argv, run_db
from tests.trainer_fixtures import ROOT, make_dataset

_PROCESS_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _args(**kw) -> Namespace:
    base = dict(deepspeed=True, zero_stage=2, offload_optimizer_device=None, offload_optimizer_nvme_path=None,
                offload_param_device=None, offload_param_nvme_path=None, zero3_init_flag=False,
                zero3_save_16bit_model=False, fp16_master_weights_and_gradients=False, gradient_accumulation_steps=1,
                max_grad_norm=1.0, train_batch_size=2, mixed_precision="no", full_fp16=False, optimizer_type="",
                fused_backward_pass=False, save_state=False, save_state_on_train_end=False, resume=None, ema=False,
                sample_prompts=None, torch_compile=False, max_train_steps=10, max_train_epochs=None)
    base.update(kw)
    return Namespace(**base)


@pytest.fixture
def process_env(monkeypatch):
    """Whatever the plugin sets in the process environment is undone after the test."""
    for key in _PROCESS_ENV:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def _config(**kw) -> dict:
    from library.training.deepspeed_plugin import make_plugin

    return make_plugin(_args(**kw)).deepspeed_config


def test_plugin_config_from_the_flags(process_env, tmp_path):
    process_env.setenv("WORLD_SIZE", "4")
    c = _config(zero_stage=3, gradient_accumulation_steps=3, max_grad_norm=0.5, train_batch_size=2,
                mixed_precision="bf16", offload_optimizer_device="nvme", offload_optimizer_nvme_path=str(tmp_path),
                offload_param_device="cpu", zero3_save_16bit_model=True)
    z = c["zero_optimization"]
    assert z["stage"] == 3
    assert z["offload_optimizer"] == {"device": "nvme", "nvme_path": str(tmp_path)}
    assert z["offload_param"]["device"] == "cpu"
    assert z["stage3_gather_16bit_weights_on_model_save"] is True
    assert c["gradient_accumulation_steps"] == 3 and c["gradient_clipping"] == 0.5
    assert c["train_micro_batch_size_per_gpu"] == 2 and c["train_batch_size"] == 2 * 3 * 4
    assert c["bf16"]["enabled"] is True and c["fp16"]["enabled"] is False


def test_plugin_config_fp16_and_defaults(process_env):
    c = _config(mixed_precision="fp16", max_grad_norm=0.0, offload_optimizer_device="cpu",
                fp16_master_weights_and_gradients=True)
    assert os.environ["WORLD_SIZE"] == "1" and os.environ["MASTER_ADDR"] == "127.0.0.1"  # a one-process group
    assert c["zero_optimization"]["stage"] == 2
    assert c["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert c["zero_optimization"]["offload_param"]["device"] == "none"
    assert c["fp16"]["enabled"] is True and c["fp16"]["initial_scale_power"] == 0  # kohya: loss scale starts at 1
    assert c["fp16"]["fp16_master_weights_and_grads"] is True
    assert c["gradient_clipping"] == 0.0 and c["train_batch_size"] == 2  # --max_grad_norm 0: no clipping
    plain = _config()
    assert plain["fp16"]["enabled"] is False and plain["bf16"]["enabled"] is False
    assert "fp16_master_weights_and_grads" not in plain["fp16"]
    assert "offload_optimizer" not in plain["zero_optimization"] or \
        plain["zero_optimization"]["offload_optimizer"]["device"] == "none"


@pytest.mark.parametrize("kw, expected", [
    (dict(offload_optimizer_device="nvme", zero_stage=3), "--offload_optimizer_device nvme needs "
                                                          "--offload_optimizer_nvme_path"),
    (dict(offload_param_device="cpu"), "--offload_param_device cpu needs --zero_stage 3"),
    (dict(offload_optimizer_device="cpu", zero_stage=0), "--offload_optimizer_device cpu needs --zero_stage 1, 2 or 3"),
    (dict(offload_optimizer_device="nvme", offload_optimizer_nvme_path="/", zero_stage=2),
     "--offload_optimizer_device nvme needs --zero_stage 3"),
    (dict(offload_param_nvme_path="/"), "--offload_param_nvme_path needs --offload_param_device nvme"),
    (dict(offload_optimizer_device="cpu", optimizer_type="Adafactor"), "--offload_optimizer_device with "
                                                                       "--optimizer_type Adafactor"),
    (dict(fp16_master_weights_and_gradients=True, mixed_precision="fp16"),
     "--fp16_master_weights_and_gradients needs --mixed_precision fp16, --zero_stage 2 and --offload_optimizer_device cpu"),
    (dict(zero3_save_16bit_model=True), "--zero3_save_16bit_model needs --zero_stage 3"),
    (dict(fused_backward_pass=True), "--fused_backward_pass cannot be used with --deepspeed"),
    (dict(save_state=True), "--save_state is not supported with --deepspeed yet"),
    (dict(resume="x"), "--resume is not supported with --deepspeed yet"),
    (dict(zero_stage=3, ema=True), "--ema cannot be used with --zero_stage 3"),
    (dict(zero_stage=3, train_text_encoder=True), "--zero_stage 3 trains the UNet only in sdtk"),
    (dict(zero_stage=3, stop_text_encoder_training=None), "--zero_stage 3 trains the UNet only in sdtk"),
    (dict(zero_stage=3, sample_prompts="p.txt"), "--sample_prompts cannot be used with --zero_stage 3"),
    (dict(stop_text_encoder_training=4), "--stop_text_encoder_training 4 cannot be used with --deepspeed"),
    (dict(deepspeed=False, offload_param_device="cpu"), "--offload_param_device only works with --deepspeed"),
])
def test_flag_problems(kw, expected):
    from library.training.deepspeed_plugin import deepspeed_problems

    problems = deepspeed_problems(_args(**kw))
    assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_good_flags_have_no_problems(tmp_path):
    from library.training.deepspeed_plugin import deepspeed_problems

    assert deepspeed_problems(_args()) == []
    assert deepspeed_problems(_args(stop_text_encoder_training=-1)) == []
    assert deepspeed_problems(_args(zero_stage=3, stop_text_encoder_training=-1)) == []
    assert deepspeed_problems(_args(stop_text_encoder_training=10)) == []  # not before the end: nothing stops
    assert deepspeed_problems(_args(deepspeed=False)) == []
    assert deepspeed_problems(_args(zero_stage=3, offload_optimizer_device="nvme", offload_param_device="nvme",
                                    offload_optimizer_nvme_path=str(tmp_path), offload_param_nvme_path=str(tmp_path),
                                    zero3_save_16bit_model=True, optimizer_type="AdamW")) == []


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("ds") / "train")


@pytest.mark.integration
@pytest.mark.parametrize("extra, expected", [
    (("--deepspeed", "--offload_optimizer_device", "nvme", "--zero_stage", "3", "--stop_text_encoder_training", "-1"),
     "--offload_optimizer_device nvme needs --offload_optimizer_nvme_path"),
    (("--deepspeed", "--stop_text_encoder_training", "2"), "--stop_text_encoder_training 2 cannot be used with "
                                                          "--deepspeed"),
    (("--deepspeed", "--zero3_init_flag", "--zero_stage", "3"), "--zero3_init_flag is not supported by sdtk"),
])
def test_bad_input_one_line_nothing_written(tiny_model_dir, data, tmp_path, capsys, process_env, extra, expected):
    out = tmp_path / "out"
    assert run_db(db_argv(tiny_model_dir("sd1"), data, out, *extra)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {expected}"), err[-3:]
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.integration
def test_network_scripts_refuse_deepspeed(tiny_model_dir, data, tmp_path, capsys):
    import train_network

    from tests.trainer_fixtures import train_argv

    for extra in (("--deepspeed",), ("--zero_stage", "3")):
        assert train_network.main(train_argv(tiny_model_dir("sd1"), data, tmp_path / "o", *extra)) == 1
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"{extra[0]} is not supported by sdtk: only the full-model scripts" in line, line


@pytest.mark.integration
def test_missing_deepspeed_names_the_extra(tiny_model_dir, data, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # an import of it fails as if it were not installed
    assert run_db(db_argv(tiny_model_dir("sd1"), data, tmp_path / "o", "--deepspeed")) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: --deepspeed needs the DeepSpeed package") and "pip install 'sdtk[deepspeed]'" in line


# ---------------------------------------------------------------- real runs on the CPU

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="DeepSpeed is not installed (pip install -e '.[test]' installs it)")


def _run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for key in _PROCESS_ENV:
        env.pop(key, None)
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def _torchrun() -> str:
    path = Path(sys.executable).parent / "torchrun"
    found = str(path) if path.exists() else shutil.which("torchrun")
    if found is None:
        pytest.skip("torchrun is not installed")
    return found


# SGD, not Adam: its step is proportional to the gradient, so a wrong loss scale (processes, accumulation
# window) or clipping shows at once, while Adam's step hides the scale and turns float32 noise in
# gradients near its eps into visible differences (DeepSpeed flattens the weights into one buffer, so
# the kernels run on other memory and round differently: with AdamW at lr 1e-3, a few of the 2.4 M
# weights differ by up to 4e-5 after 4 steps)
_SGD = ("--optimizer_type", "SGDNesterov", "--learning_rate", "0.05")


def _assert_close_and_trained(ours: dict, ref: dict, source: dict, atol: float = 1e-6) -> None:
    assert ours.keys() == ref.keys()
    worst = max((ours[k].float() - ref[k].float()).abs().max().item() for k in ref)
    assert worst <= atol, f"DeepSpeed result differs from the plain run by {worst}"
    moved = max((ref[k].float() - source[k].float()).abs().max().item() for k in ref if k in source)
    assert moved > 100 * atol, f"training barely changed the weights ({moved}): the comparison would prove nothing"


@pytest.fixture(scope="module")
def source_weights(tiny_model_dir):
    """The tiny model's weights in the single-file layout sdtk saves (for 'did training move them')."""
    from library.models.loading import load_models
    from library.training.targets.full_saving import original_state_dict

    return original_state_dict(load_models(str(tiny_model_dir("sd1"))))


@pytest.mark.integration
@needs_deepspeed
def test_zero2_one_process_with_accumulation_equals_plain_run(tiny_model_dir, data, tmp_path, source_weights):
    """UNet and text encoder in one DeepSpeed module; 4 batches per epoch, accumulation 3: windows of 3 and
    1 batches (the short one at the epoch's end); clipping active (--max_grad_norm 0.01)."""
    model = tiny_model_dir("sd1")
    common = ("--save_model_as", "safetensors", *_SGD, "--max_grad_norm", "0.01", "--train_batch_size", "1",
              "--gradient_accumulation_steps", "3", "--learning_rate_te", "0.02", "--lr_scheduler", "linear")
    plain = tmp_path / "plain"
    assert run_db(db_argv(model, data, plain, *common, steps=4)) == 0
    ds = tmp_path / "ds"
    res = _run([sys.executable, str(ROOT / "train_db.py"),
                *db_argv(model, data, ds, *common, "--deepspeed", "--zero_stage", "2", steps=4)])
    assert "DeepSpeed: ZeRO stage 2, 1 process(es), accumulation 3" in res.stderr
    _assert_close_and_trained(load_file(ds / "db.safetensors"), load_file(plain / "db.safetensors"), source_weights)
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_single_file(str(ds / "db.safetensors"), config=str(model), local_files_only=True)
    assert all(torch.isfinite(p).all() for p in pipe.unet.parameters())


@pytest.mark.integration
@needs_deepspeed
def test_zero3_two_processes_equal_one_with_double_batch(tiny_model_dir, data, tmp_path, source_weights):
    """ZeRO-3 partitions the UNet over 2 processes; each save gathers it whole."""
    model = tiny_model_dir("sd1")
    common = ("--save_model_as", "safetensors", *_SGD, "--save_every_n_steps", "2", "--stop_text_encoder_training",
              "-1")
    plain = tmp_path / "plain"
    assert run_db(db_argv(model, data, plain, *common, "--train_batch_size", "2", steps=3)) == 0
    ds = tmp_path / "ds"
    res = _run([_torchrun(), "--standalone", "--nproc_per_node", "2", str(ROOT / "train_db.py"),
                *db_argv(model, data, ds, *common, "--train_batch_size", "1", "--deepspeed", "--zero_stage", "3",
                         steps=3)])
    assert "DeepSpeed: ZeRO stage 3, 2 process(es)" in res.stderr and "2 process(es)" in res.stderr
    for name in ("db-step00000002.safetensors", "db.safetensors"):
        _assert_close_and_trained(load_file(ds / name), load_file(plain / name), source_weights)
    assert sorted(p.name for p in ds.iterdir()) == ["db-step00000002.safetensors", "db.safetensors"]


@pytest.mark.integration
@needs_deepspeed
def test_bf16_keeps_half_weights_with_float32_masters(tiny_model_dir, data, tmp_path, source_weights):
    """--mixed_precision bf16: DeepSpeed trains bf16 modules (autocast forward) with float32 master weights;
    the saved weights are the bf16 copies, so they differ from a float32 run by bf16 rounding only."""
    model = tiny_model_dir("sd1")
    common = ("--save_model_as", "safetensors", *_SGD, "--train_batch_size", "2", "--stop_text_encoder_training", "-1",
              "--save_precision", "float")
    plain = tmp_path / "plain"
    assert run_db(db_argv(model, data, plain, *common, steps=3)) == 0
    ds = tmp_path / "ds"
    _run([sys.executable, str(ROOT / "train_db.py"),
          *db_argv(model, data, ds, *common, "--deepspeed", "--zero_stage", "2", "--mixed_precision", "bf16", steps=3)])
    import torch

    ours, ref = load_file(ds / "db.safetensors"), load_file(plain / "db.safetensors")
    unet = [k for k in ref if k.startswith("model.diffusion_model.")]
    for k in unet:
        assert torch.equal(ours[k], ours[k].to(torch.bfloat16).float()), f"{k} is not a bf16 copy"
        # bf16 roundings of the weights (8-bit mantissa) and of the bf16 gradients (a few % of the update)
        update = (ref[k] - source_weights[k]).abs().max().item()
        bound = 2 ** -7 * ref[k].abs().max().item() + 0.1 * update + 1e-7
        assert (ours[k] - ref[k]).abs().max().item() <= bound, k


@pytest.mark.integration
@needs_deepspeed
def test_cpu_optimizer_offload_follows_the_lr_schedule(tiny_model_dir, data, tmp_path, source_weights):
    """--offload_optimizer_device cpu: accelerate swaps AdamW for DeepSpeed's CPU Adam (built on first use,
    ~1.5 min); sdtk's linear LR schedule must reach it, so the result is the plain AdamW run's."""
    model = tiny_model_dir("sd1")
    common = ("--save_model_as", "safetensors", "--learning_rate", "1e-3", "--optimizer_type", "AdamW",
              "--lr_scheduler", "linear", "--train_batch_size", "2", "--stop_text_encoder_training", "-1")
    plain = tmp_path / "plain"
    assert run_db(db_argv(model, data, plain, *common, steps=3)) == 0
    ds = tmp_path / "ds"
    _run([sys.executable, str(ROOT / "train_db.py"),
          *db_argv(model, data, ds, *common, "--deepspeed", "--zero_stage", "2", "--offload_optimizer_device", "cpu",
                   steps=3)])
    ours, ref = load_file(ds / "db.safetensors"), load_file(plain / "db.safetensors")
    diff = [(ours[k] - ref[k]).abs() for k in ref]
    moved = [(ref[k] - source_weights[k]).abs() for k in ref]
    mean = lambda ts: sum(t.sum().item() for t in ts) / sum(t.numel() for t in ts)  # noqa: E731
    # Adam turns float32 noise near its eps into a few visible differences (see _SGD), hence mean and max bounds
    assert mean(diff) <= 1e-3 * mean(moved), (mean(diff), mean(moved))
    assert max(t.max().item() for t in diff) <= 0.1 * max(t.max().item() for t in moved)

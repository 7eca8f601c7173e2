"""Tracker options (--log_config, --log_tracker_config, --wandb_*), DDP options and --torch_compile."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from library.config.args import parse_args
from library.errors import ConfigError
from tests.trainer_fixtures import assert_same_tensors, lora_tensors, make_dataset, run_in_process, run_subprocess, \
    train_argv

SECRET = "sk-0123456789-very-secret"


def _args(tmp_path: Path, *extra: str):
    base = ["--pretrained_model_name_or_path", str(tmp_path / "model_path_xyz"), "--output_dir", str(tmp_path / "out"),
            "--train_data_dir", str(tmp_path / "data_path_xyz"), "--network_module", "networks.lora"]
    return parse_args("train_network", base + list(extra))


def _fresh_accelerator(**kw):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return Accelerator(**kw)


class _Recorder:
    """A real accelerate tracker (accelerate's GeneralTracker API) that keeps what it is given."""

    def __new__(cls):
        from accelerate.tracking import GeneralTracker

        class Recorder(GeneralTracker):
            name = "recorder"
            requires_logging_directory = False

            def __init__(self):
                super().__init__()
                self.config = None

            @property
            def tracker(self):
                return self

            def store_init_configuration(self, values):
                self.config = dict(values)

            def log(self, values, step=None, **kwargs):
                pass

        return Recorder()


# ---- --log_config ------------------------------------------------------------------------------


def test_log_config_sends_settings_without_secrets_or_paths(tmp_path):
    from library.training.progress import init_trackers

    args = _args(tmp_path, "--log_config", "--wandb_api_key", SECRET, "--logging_dir", str(tmp_path / "logs"),
                 "--network_dim", "8", "--learning_rate", "2e-4", "--network_args", "conv_dim=4", "conv_alpha=1")
    rec = _Recorder()
    acc = _fresh_accelerator(log_with=[rec])
    init_trackers(acc, args, "network_train")
    cfg = rec.config
    assert cfg["network_dim"] == 8 and cfg["learning_rate"] == 2e-4 and cfg["log_config"] is True
    assert cfg["network_args"] == "['conv_dim=4', 'conv_alpha=1']"  # lists as text: trackers take scalars only
    assert all(v is None or isinstance(v, (bool, int, float, str)) for v in cfg.values())
    for hidden in ("wandb_api_key", "huggingface_token", "pretrained_model_name_or_path", "train_data_dir",
                   "output_dir", "logging_dir"):
        assert hidden not in cfg, hidden
    text = repr(cfg)
    assert SECRET not in text and "model_path_xyz" not in text and "data_path_xyz" not in text


def test_without_log_config_no_config_is_sent(tmp_path):
    from library.training.progress import init_trackers

    args = _args(tmp_path, "--logging_dir", str(tmp_path / "logs"))
    rec = _Recorder()
    acc = _fresh_accelerator(log_with=[rec])
    init_trackers(acc, args, "network_train")
    assert acc.trackers == [rec] and rec.config is None


@pytest.mark.integration
def test_tensorboard_run_writes_hparams_without_secret(tiny_model_dir, tmp_path):
    import tensorboard  # noqa: F401  (the test extra installs it)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = make_dataset(tmp_path / "data", names=("astronaut", "coffee"))
    logs = tmp_path / "logs"
    cfg = tmp_path / "trackers.toml"
    cfg.write_text("[tensorboard]\nflush_secs = 1\n", encoding="utf-8")
    argv = train_argv(tiny_model_dir("sd1"), data, tmp_path / "out", "--network_train_unet_only", "--logging_dir",
                      str(logs), "--log_prefix", "run", "--log_config", "--wandb_api_key", SECRET,
                      "--log_tracker_config", str(cfg), "--log_tracker_name", "proj", steps=2)
    assert run_in_process(argv) == 0
    hparams = list(logs.rglob("hparams.yml"))
    assert len(hparams) == 1
    project = logs / next(logs.iterdir()).name / "proj"  # LOGGING_DIR/<log_prefix><time>/<log_tracker_name>
    assert project.parent.name.startswith("run") and project in hparams[0].parents
    text = hparams[0].read_text(encoding="utf-8")
    assert "network_dim: 4" in text and "max_train_steps: 2" in text
    # the secret and the local paths are nowhere in what the tracker wrote
    for f in logs.rglob("*"):
        if f.is_file():
            raw = f.read_bytes()
            assert SECRET.encode() not in raw and str(data).encode() not in raw, f
    acc = EventAccumulator(str(project))
    acc.Reload()
    assert "loss/current" in acc.Tags()["scalars"], acc.Tags()


# ---- --log_tracker_config / --wandb_* ------------------------------------------------------------


def test_tracker_config_toml_errors_name_file_and_line(tmp_path):
    from library.training.progress import load_tracker_config

    with pytest.raises(ConfigError, match="file not found: .*nope.toml"):
        load_tracker_config(str(tmp_path / "nope.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text('[wandb]\nname = "x"\ntags = [1, \n', encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_tracker_config(str(bad))
    assert str(bad) in str(e.value) and "invalid TOML" in str(e.value) and "line 3" in str(e.value)
    bad.write_text('[wandb]\nname = x\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad.toml: --log_tracker_config: invalid TOML: .*at line 2"):
        load_tracker_config(str(bad))
    flat = tmp_path / "flat.toml"
    flat.write_text('name = "x"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"flat.toml: top-level key 'name' must be a table"):
        load_tracker_config(str(flat))


def test_broken_tracker_config_fails_before_model_loading(tmp_path):
    from library.training.setup import make_accelerator

    bad = tmp_path / "bad.toml"
    bad.write_text("[tensorboard\n", encoding="utf-8")
    args = _args(tmp_path, "--log_tracker_config", str(bad))
    with pytest.raises(ConfigError, match=r"bad.toml: --log_tracker_config: invalid TOML: .*line 1"):
        make_accelerator(args)


def test_tracker_init_kwargs_merge(tmp_path, caplog):
    from library.training.progress import tracker_init_kwargs

    cfg = tmp_path / "t.toml"
    cfg.write_text('[wandb]\nname = "from file"\ntags = ["a", "b"]\n[tensorboard]\nflush_secs = 5\n', encoding="utf-8")
    args = _args(tmp_path, "--log_tracker_config", str(cfg), "--wandb_run_name", "from flag",
                 "--logging_dir", str(tmp_path / "logs"))
    kw = tracker_init_kwargs(args, ["wandb"])
    # the explicit flag wins over the file; W&B writes under --logging_dir as in kohya
    assert kw == {"wandb": {"name": "from flag", "tags": ["a", "b"], "dir": str(tmp_path / "logs")},
                  "tensorboard": {"flush_secs": 5}}
    assert (tmp_path / "logs").is_dir()
    assert "[tensorboard] is ignored" in caplog.text
    only_name = tracker_init_kwargs(_args(tmp_path, "--wandb_run_name", "r"), [])
    assert only_name == {"wandb": {"name": "r"}}  # kohya's init_kwargs {"wandb": {"name": ...}}


def test_tracker_config_reaches_tensorboard_writer(tmp_path):
    import tensorboard  # noqa: F401  (the test extra installs it)
    from library.training.progress import init_trackers

    cfg = tmp_path / "t.toml"
    cfg.write_text("[tensorboard]\nflush_secs = 7\n", encoding="utf-8")
    args = _args(tmp_path, "--logging_dir", str(tmp_path / "logs"), "--log_tracker_config", str(cfg))
    acc = _fresh_accelerator(log_with="tensorboard", project_dir=str(tmp_path / "logs"))
    init_trackers(acc, args, "network_train")
    assert acc.get_tracker("tensorboard", unwrap=True).flush_secs == 7
    acc.end_training()


def test_wandb_without_package_names_the_extra(tmp_path):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    from library.training.setup import make_accelerator

    args = _args(tmp_path, "--log_with", "wandb", "--wandb_api_key", SECRET)
    with pytest.raises(ConfigError, match=r"sdtk\[log\]") as e:
        make_accelerator(args)
    assert SECRET not in str(e.value)


def test_wandb_flags_without_wandb_are_reported_ignored(tmp_path, caplog):
    from library.training.progress import check_tracker_args

    check_tracker_args(_args(tmp_path, "--wandb_api_key", SECRET, "--wandb_run_name", "r"), ["tensorboard"])
    assert "--wandb_api_key is ignored" in caplog.text and "--wandb_run_name is ignored" in caplog.text
    assert SECRET not in caplog.text


# ---- DDP options -------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags,bucket,static", [(("--ddp_gradient_as_bucket_view",), True, False),
                                                 (("--ddp_static_graph",), False, True),
                                                 (("--ddp_gradient_as_bucket_view", "--ddp_static_graph"), True, True)])
def test_ddp_options_reach_the_accelerator(tmp_path, flags, bucket, static):
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DistributedDataParallelKwargs

    from library.training.setup import make_accelerator

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    acc = make_accelerator(_args(tmp_path, *flags, "--ddp_timeout", "5"))
    h = acc.ddp_handler
    assert isinstance(h, DistributedDataParallelKwargs)
    assert (h.gradient_as_bucket_view, h.static_graph) == (bucket, static)
    assert acc.init_handler is not None and acc.init_handler.timeout.total_seconds() == 300


def test_no_ddp_handler_by_default(tmp_path):
    from accelerate.state import AcceleratorState, GradientState

    from library.training.setup import make_accelerator

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    assert make_accelerator(_args(tmp_path)).ddp_handler is None


@pytest.mark.integration
def test_two_processes_with_ddp_options(tiny_model_dir, tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed")
    data = make_dataset(tmp_path / "data", names=("astronaut", "coffee"))
    out = tmp_path / "out"
    res = run_subprocess(train_argv(tiny_model_dir("sd1"), data, out, "--network_train_unet_only",
                                    "--ddp_gradient_as_bucket_view", "--ddp_static_graph", "--train_batch_size", "1",
                                    steps=2),
                         launcher=[str(torchrun), "--standalone", "--nproc_per_node", "2"], timeout=110)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 process(es)" in res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["lora.safetensors"]


# ---- --torch_compile ---------------------------------------------------------------------------------


def test_compile_backend_checks():
    from library.training.setup import compile_backend

    assert compile_backend("eager", cuda=False) == "eager"
    assert compile_backend("aot_eager", cuda=False) == "aot_eager"
    for gone in ("ofi", "aot_ts_nvfuser", "nvprims_nvfuser"):
        with pytest.raises(ConfigError, match=f"--dynamo_backend {gone} is not available in PyTorch"):
            compile_backend(gone, cuda=False)
    import importlib.util

    if importlib.util.find_spec("tvm") is None:
        with pytest.raises(ConfigError, match="needs the 'tvm' package"):
            compile_backend("tvm", cuda=False)


def test_unavailable_backend_is_refused_before_loading(tmp_path, capsys):
    # the model path does not exist: the backend problem must be reported first
    argv = ["--pretrained_model_name_or_path", str(tmp_path / "missing"), "--train_data_dir", str(tmp_path),
            "--output_dir", str(tmp_path / "out"), "--network_module", "networks.lora", "--torch_compile",
            "--dynamo_backend", "ofi"]
    assert run_in_process(argv) == 1
    err = capsys.readouterr().err
    assert "--dynamo_backend ofi is not available" in err


@pytest.mark.integration
def test_compiled_unet_trains_saves_and_resumes_like_eager(tiny_model_dir, tmp_path):
    """--torch_compile with the eager backend (no C++ compiler needed): identical LoRA, normal keys,
    and its state resumes in a run without compile to the same result."""
    model = tiny_model_dir("sd1")
    data = make_dataset(tmp_path / "data", names=("astronaut", "coffee"))
    common = ("--network_train_unet_only",)
    plain, comp, resumed = tmp_path / "plain", tmp_path / "comp", tmp_path / "resumed"
    assert run_in_process(train_argv(model, data, plain, *common, steps=2)) == 0
    assert run_in_process(train_argv(model, data, comp, *common, "--torch_compile", "--dynamo_backend", "eager",
                                     "--save_every_n_steps", "1", "--save_state", steps=2)) == 0
    a, b = lora_tensors(plain / "lora.safetensors"), lora_tensors(comp / "lora.safetensors")
    assert not any("_orig_mod" in k for k in b)
    assert_same_tensors(a, b)
    state = comp / "lora-step00000001-state"
    assert state.is_dir()
    assert run_in_process(train_argv(model, data, resumed, *common, "--resume", str(state), steps=2)) == 0
    assert_same_tensors(a, lora_tensors(resumed / "lora.safetensors"))

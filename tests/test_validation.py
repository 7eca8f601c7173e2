"""Validation loss: kohya's cadence, fixed noise/timesteps (equal values for equal weights), no
effect on the training run."""

from __future__ import annotations

import pytest
import torch

from library.training.validation import (VALIDATION_TIMESTEPS, Validator, should_validate_epoch,
                                         should_validate_step, validation_batches, validation_generators)
from tests.trainer_fixtures import assert_same_tensors, lora_tensors, make_dataset, run_in_process, train_argv


def test_cadence_follows_kohya():
    assert [s for s in range(0, 9) if should_validate_step(s, 3)] == [3, 6]
    assert not any(should_validate_step(s, None) for s in range(5))
    assert all(should_validate_epoch(e, None) for e in (1, 2, 3))  # kohya: every epoch by default
    assert [e for e in range(1, 7) if should_validate_epoch(e, 2)] == [2, 4, 6]
    assert validation_batches(10, None) == 10 and validation_batches(10, 3) == 3 and validation_batches(2, 5) == 2


def test_validation_noise_is_fixed_and_separate_from_training():
    a = [torch.randn(3, generator=g) for g in validation_generators(5, 1, 2, 0, 2)]
    b = [torch.randn(3, generator=g) for g in validation_generators(5, 1, 2, 0, 2)]
    c = [torch.randn(3, generator=g) for g in validation_generators(5, 1, 3, 0, 2)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[0], a[1])
    assert VALIDATION_TIMESTEPS == (10, 350, 500, 650, 990)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("val_data"))


def _session(argv):
    from accelerate.state import AcceleratorState, GradientState

    from library.config.args import parse_args
    from library.training.setup import setup_session
    from library.training.trainer import NetworkTrainer

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    t = NetworkTrainer(parse_args("train_network", argv))
    return t, setup_session(t)


@pytest.mark.integration
def test_evaluation_is_repeatable_and_leaves_rng_alone(tiny_model_dir, data, tmp_path):
    torch.set_num_threads(1)
    t, s = _session(train_argv(tiny_model_dir("sd1"), data, tmp_path, "--validation_split", "0.5",
                               "--max_validation_steps", "1"))
    v = Validator.create(t, s)
    assert v is not None and v.num_batches == 1
    rng = torch.get_rng_state()
    first = v.evaluate(t, s)
    assert torch.equal(torch.get_rng_state(), rng)
    assert first == v.evaluate(t, s) and first > 0
    with torch.no_grad():
        for p in s.network.parameters():
            p.add_(0.05)
    assert v.evaluate(t, s) != first  # the same images/noise/timesteps measure the changed weights
    assert s.network.training  # back in training mode


@pytest.mark.integration
def test_validation_does_not_change_training(tiny_model_dir, data, tmp_path, capsys):
    model = tiny_model_dir("sd1")
    common = ("--validation_split", "0.5", "--validation_seed", "3", "--max_validation_steps", "1")
    argv = train_argv(model, data, tmp_path / "a", *common, "--validate_every_n_steps", "1", steps=2)
    assert run_in_process(argv) == 0
    err = capsys.readouterr().err
    assert "val_loss=" in err and "epoch 1: validation loss" in err  # progress bar and log
    # the same split, never evaluated
    argv = train_argv(model, data, tmp_path / "b", *common, "--validate_every_n_epochs", "1000", steps=2)
    assert run_in_process(argv) == 0
    assert_same_tensors(lora_tensors(tmp_path / "a" / "lora.safetensors"),
                        lora_tensors(tmp_path / "b" / "lora.safetensors"))


@pytest.mark.integration
def test_sdxl_validation_with_cached_text_encoder_outputs(tiny_model_dir, data, tmp_path, capsys):
    """The held-out captions join the text-encoder cache; cached latents are made for them too."""
    from tests.test_sdxl_training import run_sdxl

    argv = train_argv(tiny_model_dir("sdxl"), data, tmp_path, "--validation_split", "0.5", "--max_validation_steps", "1",
                      "--network_train_unet_only", "--cache_text_encoder_outputs", "--cache_latents", steps=2)
    assert run_sdxl(argv) == 0
    assert "epoch 1: validation loss" in capsys.readouterr().err


@pytest.mark.integration
def test_persistent_workers_serve_every_evaluation(tiny_model_dir, data, tmp_path):
    """--persistent_data_loader_workers also keeps the validation loader's workers (kohya): the same loss
    as in-process loading at every evaluation, one set of worker processes, stopped by close()."""
    import multiprocessing

    torch.set_num_threads(1)
    base = ("--validation_split", "0.5", "--max_data_loader_n_workers", "2")
    t, s = _session(train_argv(tiny_model_dir("sd1"), data, tmp_path / "a", *base))
    reference = Validator.create(t, s).evaluate(t, s)
    t, s = _session(train_argv(tiny_model_dir("sd1"), data, tmp_path / "b", *base, "--persistent_data_loader_workers"))
    v = Validator.create(t, s)
    assert v.evaluate(t, s) == reference
    workers = {p.pid for p in multiprocessing.active_children()}
    assert workers and v.evaluate(t, s) == reference
    assert {p.pid for p in multiprocessing.active_children()} == workers  # the same processes served both
    v.plan.close()
    assert multiprocessing.active_children() == []

"""``--initial_step`` / ``--initial_epoch`` / ``--skip_until_initial_step`` (kohya): a run that starts
counting at step K, with the data of the skipped steps skipped or read from the start.

The runs are recorded through a trainer subclass that notes, for every training forward pass, the
batch's image keys and the learning rate the pass's optimizer step uses; nothing is mocked.
"""

from __future__ import annotations

import pytest

from library.errors import ConfigError
from library.training.state import Progress, start_progress
from library.training.trainer import NetworkTrainer
from tests.trainer_fixtures import assert_same_tensors, lora_metadata, lora_tensors, make_dataset, train_argv

pytestmark = pytest.mark.integration

STEPS = 10  # 8 samples, batch 2: 4 batches (steps) per epoch, 3 epochs
COMMON = ("--train_batch_size", "2", "--lr_scheduler", "cosine", "--lr_warmup_steps", "2", "--shuffle_caption",
          "--flip_aug", "--save_every_n_steps", "3", "--save_every_n_epochs", "1")


def recording_trainer():
    """A :class:`NetworkTrainer` subclass whose class attributes record one run."""

    class Recorder(NetworkTrainer):
        passes: list[tuple[tuple[str, ...], float]] = []
        session = None

        def compute_loss(self, s, batch, gens, n_real, global_size, fixed_timestep=None):
            if fixed_timestep is None:  # training passes only (not the validation loss)
                Recorder.passes.append((tuple(batch["image_keys"]), s.lr_scheduler.get_last_lr()[0]))
            Recorder.session = s
            return super().compute_loss(s, batch, gens, n_real, global_size, fixed_timestep)

    return Recorder


def run(model, data, out, *extra, steps=STEPS):
    from accelerate.state import AcceleratorState, GradientState

    import train_network

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    rec = recording_trainer()
    code = train_network.main(train_argv(model, data, out, *COMMON, *extra, steps=steps), trainer_cls=rec)
    return code, rec


def optimizer_steps(rec) -> int:
    """Steps the AdamW optimizer did (its per-parameter step counter)."""
    state = rec.session.optimizer.state_dict()["state"]
    return {int(v["step"]) for v in state.values()}.pop()


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("initial_step")
    data = make_dataset(root / "data", repeats=2)
    model = tiny_model_dir("sd1")
    code, full = run(model, data, root / "full")
    assert code == 0 and len(full.passes) == STEPS
    return root, data, model, full


def test_skip_until_initial_step_continues_data_lr_and_counters(setup):
    root, data, model, full = setup
    k = 5  # mid-epoch 2
    out = root / "skip"
    code, rec = run(model, data, out, "--initial_step", str(k), "--skip_until_initial_step")
    assert code == 0
    assert optimizer_steps(rec) == STEPS - k and len(rec.passes) == STEPS - k
    # steps k+1..N see the full run's batches, with the full run's learning rates (the schedule moved on)
    assert [keys for keys, _ in rec.passes] == [keys for keys, _ in full.passes[k:]]
    assert rec.passes[0][1] == pytest.approx(full.passes[k][1], rel=1e-12)
    assert rec.passes[0][1] != pytest.approx(full.passes[0][1])  # non-constant schedule: a real check
    # saves are named by the counted step / epoch: steps 6 and 9, epoch 2 (ends at step 8)
    names = sorted(p.name for p in out.glob("*.safetensors"))
    assert names == ["lora-000002.safetensors", "lora-step00000006.safetensors", "lora-step00000009.safetensors",
                     "lora.safetensors"]
    assert lora_metadata(out / "lora-step00000006.safetensors")["ss_steps"] == "6"
    assert lora_metadata(out / "lora.safetensors")["ss_steps"] == str(STEPS)


def test_without_skip_the_data_starts_from_the_first_batch(setup):
    root, data, model, full = setup
    k = 5
    code, rec = run(model, data, root / "noskip", "--initial_step", str(k))
    assert code == 0 and len(rec.passes) == STEPS - k
    assert [keys for keys, _ in rec.passes] == [keys for keys, _ in full.passes[: STEPS - k]]
    assert rec.passes[0][1] == pytest.approx(full.passes[k][1], rel=1e-12)  # the counters still start at k


def test_initial_epoch_is_the_matching_initial_step(setup):
    root, data, model, full = setup
    code, by_epoch = run(model, data, root / "epoch", "--initial_epoch", "2", "--skip_until_initial_step")
    assert code == 0
    code, by_step = run(model, data, root / "step", "--initial_step", "4", "--skip_until_initial_step")
    assert code == 0
    assert by_epoch.passes == by_step.passes == full.passes[4:]
    assert_same_tensors(lora_tensors(root / "epoch" / "lora.safetensors"),
                        lora_tensors(root / "step" / "lora.safetensors"))


@pytest.mark.parametrize("extra, words", [
    (("--initial_step", "10"), ["--initial_step 10", "--max_train_steps 10"]),
    (("--initial_epoch", "4"), ["--initial_epoch 4", "step 12", "step 10"]),
    (("--initial_epoch", "0"), ["--initial_epoch"]),
    (("--initial_step", "-1"), ["--initial_step"]),
    (("--initial_step", "2", "--resume", "nowhere-state"), ["--initial_step", "--resume"]),
])
def test_bad_values_are_clear_errors(setup, capsys, extra, words):
    root, data, model, _ = setup
    code, rec = run(model, data, root / "bad", *extra)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1 and not rec.passes
    for w in words:
        assert w in errors[0], errors[0]


@pytest.mark.parametrize("accum, expected", [
    (1, Progress(epoch=1, global_step=5, batch_in_epoch=1, micro_step=5)),
    # 5 batches per epoch, accumulation 2: 3 steps per epoch (the last one has a single batch)
    (2, Progress(epoch=1, global_step=5, batch_in_epoch=4, micro_step=9)),
])
def test_start_progress_maps_steps_to_batches(accum, expected):
    spe = -(-(4 if accum == 1 else 5) // accum)
    bpe = 4 if accum == 1 else 5
    p = start_progress(5, None, True, steps_per_epoch=spe, batches_per_epoch=bpe, grad_accum=accum,
                       max_train_steps=20)
    assert p == expected
    no_skip = start_progress(5, None, False, steps_per_epoch=spe, batches_per_epoch=bpe, grad_accum=accum,
                             max_train_steps=20)
    assert no_skip.data_shift == expected.micro_step
    assert start_progress(None, 3, True, steps_per_epoch=spe, batches_per_epoch=bpe, grad_accum=accum,
                          max_train_steps=20).global_step == 2 * spe
    assert start_progress(None, None, True, steps_per_epoch=spe, batches_per_epoch=bpe, grad_accum=accum,
                          max_train_steps=20) == Progress()
    with pytest.raises(ConfigError, match="--initial_step 20"):
        start_progress(20, 1, True, steps_per_epoch=spe, batches_per_epoch=bpe, grad_accum=accum, max_train_steps=20)


def test_a_state_keeps_the_data_shift(tmp_path):
    """A state saved by a run started without ``--skip_until_initial_step`` resumes with its data lag;
    ``progress`` in ``train_state.json`` keeps kohya-era tools' four counters."""
    import json

    import torch

    from library.training.state import TrainState, load_state, save_state

    p = Progress(epoch=1, global_step=7, batch_in_epoch=3, micro_step=7, data_shift=5)
    save_state(tmp_path / "s", TrainState(progress=p, network={"w": torch.ones(1)}, optimizer={}, scheduler={},
                                          rng={}, data={"epoch": 1, "position": 2}))
    meta = json.loads((tmp_path / "s" / "train_state.json").read_text())
    assert set(meta["progress"]) == {"epoch", "global_step", "batch_in_epoch", "micro_step"}
    assert load_state(tmp_path / "s").progress == p

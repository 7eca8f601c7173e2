"""Exact resume (#4 item 7) of train_network.py with shuffling, dropouts and a schedule: chains of resumes,
a killed run, bad states. A resumed run of every method is bit-identical: tests/contracts/test_contract_methods.py.
"""

from __future__ import annotations

import json

import pytest

from tests.helpers_resume import run_killed_after_state
from tests.trainer_fixtures import assert_same_tensors, lora_tensors, make_dataset, run_in_process, train_argv

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    data = make_dataset(root / "data", repeats=2)  # 8 samples: batch 2 -> 4 batches per epoch
    model = tiny_model_dir("sd1")
    # the reference: 6 uninterrupted steps over two epochs (with shuffling, dropout and accumulation)
    common = ("--train_batch_size", "2", "--gradient_accumulation_steps", "1", "--shuffle_caption",
              "--caption_dropout_rate", "0.3", "--flip_aug", "--network_dropout", "0.1", "--noise_offset", "0.05",
              "--lr_scheduler", "cosine", "--lr_warmup_steps", "2")
    ref = root / "ref"
    assert run_in_process(train_argv(model, data, ref, *common, "--save_every_n_steps", "2", "--save_state",
                                     steps=6)) == 0
    return root, data, model, common, ref


def test_repeated_resumes_keep_counters_and_result(setup):
    root, data, model, common, ref = setup
    out = root / "chain"
    # resume at step 2 (mid-epoch), save again at 4 (epoch boundary), resume from that, finish at 6
    assert run_in_process(train_argv(model, data, out, *common, "--resume", str(ref / "lora-step00000002-state"),
                                     "--save_every_n_steps", "2", "--save_state", steps=6)) == 0
    st = json.loads((out / "lora-step00000004-state" / "train_state.json").read_text())
    assert st["progress"] == {"epoch": 1, "global_step": 4, "batch_in_epoch": 0, "micro_step": 4}
    out2 = root / "chain2"
    assert run_in_process(train_argv(model, data, out2, *common, "--resume", str(out / "lora-step00000004-state"),
                                     "--save_state_on_train_end", steps=6)) == 0
    final_state = json.loads((out2 / "lora-state" / "train_state.json").read_text())
    assert final_state["progress"]["global_step"] == 6 and final_state["current_step"] == 6
    assert final_state["progress"]["epoch"] == 1 and final_state["progress"]["batch_in_epoch"] == 2
    assert_same_tensors(lora_tensors(ref / "lora.safetensors"), lora_tensors(out2 / "lora.safetensors"))


def test_resume_after_sigkill(setup):
    root, data, model, common, ref = setup
    out = root / "killed"
    argv = train_argv(model, data, out, *common, "--save_every_n_steps", "2", "--save_state", steps=6)
    state = out / "lora-step00000002-state"
    rc = run_killed_after_state("train_network", argv, state, timeout=90)
    # whatever was being written when the process died is a temp file, never a broken final name
    assert not (out / "lora.safetensors").exists() or rc == 0
    resumed = root / "killed_resumed"
    assert run_in_process(train_argv(model, data, resumed, *common, "--resume", str(state), steps=6)) == 0
    assert_same_tensors(lora_tensors(ref / "lora.safetensors"), lora_tensors(resumed / "lora.safetensors"))


def test_resume_missing_state_is_a_clear_error(setup, capsys):
    root, data, model, common, _ = setup
    rc = run_in_process(train_argv(model, data, root / "x", *common, "--resume", str(root / "nope"), steps=6))
    assert rc == 1
    assert "no such state folder" in capsys.readouterr().err


def test_resume_incompatible_state_lists_differences(setup, capsys):
    root, data, model, common, ref = setup
    argv = train_argv(model, data, root / "y", *common, "--resume", str(ref / "lora-step00000002-state"), steps=6)
    argv[argv.index("--network_dim") + 1] = "8"
    assert run_in_process(argv) == 1
    err = capsys.readouterr().err
    assert "network_dim: state has 4, this run has 8" in err

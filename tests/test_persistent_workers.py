"""``--persistent_data_loader_workers``: one DataLoader (and one set of worker processes) for the
whole run, loading exactly the batches that a DataLoader per epoch loads.

Every random choice of a sample (caption shuffling/dropout, flip, crop) is drawn from its
SampleKey, which travels with the indices to the workers, so the trained LoRA is bit-identical
with and without the flag, with any number of workers, and after a resume in mid-epoch.
"""

from __future__ import annotations

import multiprocessing

import pytest
import torch

from library.data.dataset import build_dataset_group
from library.training.data import ShardedPlan, iterate_epoch
from tests.data_fixtures import blueprint, db_subset, write_truncated_jpeg
from tests.trainer_fixtures import assert_same_tensors, lora_tensors, make_dataset, run_in_process, train_argv

pytestmark = pytest.mark.integration

# 4 images, batch 2: 2 batches (steps) per epoch, 3 epochs
COMMON = ("--train_batch_size", "2", "--shuffle_caption", "--caption_dropout_rate", "0.3", "--flip_aug",
          "--random_crop", "--keep_tokens", "1")
STEPS = 6


def _no_live_workers() -> bool:
    return multiprocessing.active_children() == []  # also reaps finished children


def _worker_pids(plan: ShardedPlan) -> list[int]:
    iterator = plan._loader._iterator  # the persistent loader keeps its iterator, and with it the workers
    return [w.pid for w in iterator._workers if w.is_alive()]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("persistent")
    data = make_dataset(root / "data")
    model = tiny_model_dir("sd1")
    ref = root / "ref"  # a DataLoader per epoch, 2 workers
    assert run_in_process(train_argv(model, data, ref, *COMMON, "--max_data_loader_n_workers", "2",
                                     steps=STEPS)) == 0
    assert _no_live_workers()
    return root, data, model, lora_tensors(ref / "lora.safetensors")


def test_persistent_workers_train_the_same_lora(runs):
    root, data, model, ref = runs
    out = root / "persistent"
    # a state in mid-epoch 2 (step 3 of 6) for the resume test below
    assert run_in_process(train_argv(model, data, out, *COMMON, "--max_data_loader_n_workers", "2",
                                     "--persistent_data_loader_workers", "--save_every_n_steps", "3",
                                     "--save_state", steps=STEPS)) == 0
    assert _no_live_workers(), "the persistent workers outlived the run"
    assert_same_tensors(ref, lora_tensors(out / "lora.safetensors"))


def test_resume_mid_epoch_with_persistent_workers(runs):
    root, data, model, ref = runs
    state = root / "persistent" / "lora-step00000003-state"
    if not state.exists():
        pytest.fail("test_persistent_workers_train_the_same_lora did not leave its step-3 state")
    out = root / "resumed"
    assert run_in_process(train_argv(model, data, out, *COMMON, "--max_data_loader_n_workers", "2",
                                     "--persistent_data_loader_workers", "--resume", str(state), steps=STEPS)) == 0
    assert _no_live_workers()
    assert_same_tensors(ref, lora_tensors(out / "lora.safetensors"))


def test_flag_without_workers_loads_in_process(runs):
    root, data, model, ref = runs
    out = root / "no_workers"
    assert run_in_process(train_argv(model, data, out, *COMMON, "--max_data_loader_n_workers", "0",
                                     "--persistent_data_loader_workers", steps=STEPS)) == 0
    assert_same_tensors(ref, lora_tensors(out / "lora.safetensors"))  # same batches as 2 workers load


def test_workers_stop_when_training_fails(runs, tmp_path):
    root, _, model, _ = runs
    data = make_dataset(tmp_path / "data")
    # its header (size) reads at the scan, its pixels do not: the load fails in a worker
    write_truncated_jpeg(data / "1_sks" / "broken.jpg")
    (data / "1_sks" / "broken.caption").write_text("a photo of sks", encoding="utf-8")
    out = tmp_path / "out"
    rc = run_in_process(train_argv(model, data, out, *COMMON, "--max_data_loader_n_workers", "2",
                                   "--persistent_data_loader_workers", steps=STEPS))
    assert rc == 1
    assert _no_live_workers(), "a failed run left data loader workers behind"
    assert not (out / "lora.safetensors").exists()


def _group(folder, seed=3):
    subset = db_subset(folder, num_repeats=2, shuffle_caption=True, caption_dropout_rate=0.3, flip_aug=True,
                       random_crop=True, caption_extension=".caption")
    return build_dataset_group(blueprint([subset]), seed=seed)


def _summary(batch: dict) -> tuple:
    return (batch["captions"], batch["image_keys"], batch["flipped"], batch["crop_top_lefts"].tolist(),
            batch["images"].sum().item())


def test_one_set_of_workers_serves_every_epoch(tmp_path):
    data = make_dataset(tmp_path / "data")
    folder = data / "1_sks"
    fresh = ShardedPlan(_group(folder), 0, 1, 1)
    expected = {e: [(p, _summary(b)) for p, _, b in iterate_epoch(fresh, e, 0, 0)] for e in (1, 2, 3)}
    assert expected[1] != expected[2]  # the epochs differ (order, captions, flips): the test can fail

    with ShardedPlan(_group(folder), 0, 1, 1) as plan:
        pids = None
        for epoch in (1, 2, 3):
            got = [(p, _summary(b)) for p, _, b in iterate_epoch(plan, epoch, 0, 2, persistent=True)]
            assert got == expected[epoch]
            now = _worker_pids(plan)
            assert len(now) == 2
            assert pids is None or now == pids, "workers were started again for a new epoch"
            pids = now
        # a pass from a position (resume), and a pass abandoned half way then another started
        assert [(p, _summary(b)) for p, _, b in iterate_epoch(plan, 2, 2, 2, persistent=True)] == expected[2][2:]
        half = iterate_epoch(plan, 3, 0, 2, persistent=True)
        assert next(half)[0] == 0
        assert [(p, _summary(b)) for p, _, b in iterate_epoch(plan, 1, 1, 2, persistent=True)] == expected[1][1:]
        with pytest.raises(RuntimeError, match="abandoned"):
            next(half)  # never a batch of another pass
        assert _worker_pids(plan) == pids
    assert plan._loader is None and _no_live_workers()
    plan.close()  # idempotent


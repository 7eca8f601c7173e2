"""fine_tune.py end to end on the tiny SD1 model: metadata JSON / JSONL datasets, repeats, the text
encoder, diffusers reading the result; the metadata's image_size / train_resolution; bad metadata; a
killed run's resume and its counters (the plain resume contract: tests/contracts/test_contract_methods.py)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from tests.data_fixtures import copy_photo
from tests.helpers_resume import run_killed_after_state, run_script_in_process, state_progress
from tests.trainer_fixtures import PHOTOS, assert_same_tensors

pytestmark = pytest.mark.integration


def run_ft(argv: list[str]) -> int:
    return run_script_in_process("fine_tune", argv)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ft_images")
    sizes = {}
    for n in PHOTOS:
        p = copy_photo(n, folder, max_side=96)
        sizes[p.name] = list(Image.open(p).size)
    return folder, sizes


def write_json(folder, sizes, name="meta.json", **extra) -> str:
    md = {k: {"caption": f"a photo of {k.split('.')[0]}", "tags": "photo, sks", "image_size": v, **extra}
          for k, v in sizes.items()}
    path = folder.parent / name
    path.write_text(json.dumps(md), encoding="utf-8")
    return str(path)


def ft_argv(model, folder, meta, out, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(folder), "--in_json", meta,
            "--resolution", "64", "--output_dir", str(out), "--output_name", "ft", "--learning_rate", "1e-4",
            "--seed", "3", "--max_data_loader_n_workers", "0", *extra]


def test_trains_unet_and_text_encoder_with_repeats(tiny_model_dir, images, tmp_path):
    from diffusers import StableDiffusionPipeline

    from library.models.loading import load_models

    folder, sizes = images
    model = tiny_model_dir("sd1")
    argv = ft_argv(model, folder, write_json(folder, sizes), tmp_path, "--train_text_encoder", "--learning_rate_te",
                   "5e-5", "--dataset_repeats", "2", "--train_batch_size", "2", "--max_train_epochs", "1",
                   "--save_state_on_train_end")
    assert run_ft(argv) == 0
    state = json.loads((tmp_path / "ft-state" / "train_state.json").read_text())
    assert state["current_step"] == 4  # 4 images x 2 repeats / batch 2
    out = tmp_path / "ft"  # a diffusers source is saved as a diffusers folder (kohya's default)
    pipe = StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    ours, src = load_models(str(out)), load_models(str(model))
    assert_same_tensors(pipe.unet.state_dict(), ours.unet.state_dict())
    for a, b in ((src.unet, ours.unet), (src.text_encoders[0], ours.text_encoders[0])):
        assert any(not torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_jsonl_metadata_and_frozen_text_encoder(tiny_model_dir, images, tmp_path):
    from library.models.loading import load_models

    folder, sizes = images
    meta = tmp_path / "meta.jsonl"
    meta.write_text("\n".join(json.dumps({"image_path": k, "caption": "a photo", "image_size": v})
                              for k, v in sizes.items()) + "\n", encoding="utf-8")
    model = tiny_model_dir("sd1")
    assert run_ft(ft_argv(model, folder, str(meta), tmp_path / "o", "--max_train_steps", "2",
                          "--save_model_as", "safetensors")) == 0
    ours = load_models(str(tmp_path / "o" / "ft.safetensors"), with_tokenizers=False)
    src = load_models(str(model))
    assert_same_tensors(src.text_encoders[0].state_dict(), ours.text_encoders[0].state_dict())


def test_original_size_is_the_image_size_not_the_bucket(images, tmp_path):
    """train_resolution fixes the bucket; SDXL's original size stays the image's own size."""
    from library.config.dataset_params import DatasetParams, SubsetParams
    from library.data.dataset import BucketDataset
    from library.data.subsets import scan_subset

    folder, sizes = images
    meta = write_json(folder, sizes, name="meta_buckets.json", train_resolution=[64, 64])
    scan = scan_subset(SubsetParams(kind="finetune", image_dir=str(folder), metadata_file=meta))
    assert not scan.errors
    ds = BucketDataset(DatasetParams(kind="finetune", subsets=[scan.subset], resolution=None), [scan])
    for s in ds.samples:
        assert s.bucket_reso == (64, 64)
        assert list(s.original_size) == sizes[s.entry.path.name]
        assert min(s.resized_size) >= 64


@pytest.mark.parametrize("case", ["missing_image", "bad_json", "bad_entry", "bad_line", "folder_dataset"])
def test_bad_metadata_is_one_line_and_writes_nothing(case, tiny_model_dir, images, tmp_path, capsys):
    folder, sizes = images
    meta = tmp_path / ("m.jsonl" if case == "bad_line" else "m.json")
    if case == "missing_image":
        meta.write_text(json.dumps({"ghost.png": {"caption": "x"}}), encoding="utf-8")
        expect = ["m.json", "ghost.png"]
    elif case == "bad_json":
        meta.write_text('{"a.png": {"caption": "x"', encoding="utf-8")
        expect = ["m.json", "not valid UTF-8 JSON"]
    elif case == "bad_entry":
        meta.write_text(json.dumps({"astronaut.png": "a caption"}), encoding="utf-8")
        expect = ["m.json", "'astronaut.png' is not an object"]
    elif case == "bad_line":
        meta.write_text('{"image_path": "astronaut.png"}\n{oops\n', encoding="utf-8")
        expect = ["m.jsonl", "line 2"]
    argv = ft_argv(tiny_model_dir("sd1"), folder, str(meta), tmp_path / "out", "--max_train_steps", "1")
    if case == "folder_dataset":
        i = argv.index("--in_json")
        del argv[i:i + 2]
        expect = ["needs --in_json"]
    assert run_ft(argv) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and all(e in errors[0] for e in expect), errors
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_full_bf16_with_gradient_checkpointing(tiny_model_dir, images, tmp_path):
    """The trained weights stay bf16 with --full_bf16 (saved as trained), checkpointing included."""
    from safetensors.torch import load_file

    folder, sizes = images
    argv = ft_argv(tiny_model_dir("sd1"), folder, write_json(folder, sizes), tmp_path, "--train_text_encoder",
                   "--mixed_precision", "bf16", "--full_bf16", "--gradient_checkpointing", "--max_train_steps", "2",
                   "--save_model_as", "safetensors")
    assert run_ft(argv) == 0
    sd = load_file(tmp_path / "ft.safetensors")
    assert sd["model.diffusion_model.input_blocks.0.0.weight"].dtype == torch.bfloat16
    assert sd["cond_stage_model.transformer.text_model.final_layer_norm.weight"].dtype == torch.bfloat16
    assert all(torch.isfinite(v.float()).all() for v in sd.values() if v.is_floating_point())


@pytest.fixture(scope="module")
def resume_ref(tiny_model_dir, images, tmp_path_factory):
    """6 uninterrupted steps (4 images x 2 repeats, batch 2: two epochs), text encoder trained, states every 2."""
    folder, sizes = images
    root = tmp_path_factory.mktemp("ft_resume")
    meta = write_json(folder, sizes, name="meta_resume.json")
    common = ("--train_text_encoder", "--learning_rate_te", "5e-5", "--dataset_repeats", "2", "--train_batch_size",
              "2", "--max_train_steps", "6", "--shuffle_caption", "--flip_aug", "--lr_scheduler", "cosine",
              "--lr_warmup_steps", "1", "--save_model_as", "safetensors")
    ref = root / "ref"
    assert run_ft(ft_argv(tiny_model_dir("sd1"), folder, meta, ref, *common, "--save_every_n_steps", "2",
                          "--save_state")) == 0
    return root, folder, meta, common, ref


def test_resume_after_kill_is_bit_identical_and_counters_continue(tiny_model_dir, resume_ref):
    """SIGKILL after the step-2 state; resuming gives the uninterrupted run's weights bit for bit, and the
    step / epoch counters continue from the state (kohya's fine_tune.py restarts them, sd-scripts#1559)."""
    from safetensors.torch import load_file

    root, folder, meta, common, ref = resume_ref
    model = tiny_model_dir("sd1")
    killed = root / "killed"
    state = killed / "ft-step00000002-state"
    run_killed_after_state("fine_tune", ft_argv(model, folder, meta, killed, *common, "--save_every_n_steps", "2",
                                                "--save_state"), state)
    assert state_progress(state)["global_step"] == 2
    out = root / "resumed"
    assert run_ft(ft_argv(model, folder, meta, out, *common, "--resume", str(state), "--save_every_n_steps", "2",
                          "--save_state", "--save_state_on_train_end")) == 0
    assert_same_tensors(load_file(ref / "ft.safetensors"), load_file(out / "ft.safetensors"))
    assert_same_tensors(load_file(ref / "ft-step00000004.safetensors"), load_file(out / "ft-step00000004.safetensors"))
    # the counters continued: no step-2 save again, step 4 is the start of the second epoch, the run ends at 6
    assert not (out / "ft-step00000002.safetensors").exists()
    at4 = state_progress(out / "ft-step00000004-state")
    assert at4["global_step"] == 4 and at4["epoch"] == 1 and at4["batch_in_epoch"] == 0
    end = json.loads((out / "ft-state" / "train_state.json").read_text())
    assert end["progress"]["global_step"] == 6 and end["current_step"] == 6 and end["progress"]["epoch"] == 1
    # the text encoder was trained after the resume too (its optimizer state came back)
    te = [k for k in load_file(out / "ft.safetensors") if k.startswith("cond_stage_model.")]
    a, b = load_file(out / "ft-step00000004.safetensors"), load_file(out / "ft.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in te)

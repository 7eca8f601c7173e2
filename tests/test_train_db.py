"""train_db.py (DreamBooth, full model) end to end on tiny SD1/SD2 models: saving in kohya's formats,
diffusers reading what sdtk writes, stopping the text encoder, exact resume, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.trainer_fixtures import assert_same_tensors, make_dataset

pytestmark = pytest.mark.integration


def run_db(argv: list[str]) -> int:
    """``train_db.main(argv)`` in this process (accelerate's process-wide state reset first)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    import train_db

    return train_db.main(argv)


def db_argv(model, data, out, *extra: str, steps: int = 4, name: str = "db", reg=None) -> list[str]:
    argv = ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--resolution", "64",
            "--output_dir", str(out), "--output_name", name, "--max_train_steps", str(steps),
            "--learning_rate", "1e-4", "--seed", "7", "--max_data_loader_n_workers", "0"]
    if str(model).endswith(".safetensors"):
        argv += ["--tokenizer_cache_dir", str(model.parent / f"{model.stem}_tokenizers")]
    if reg is not None:
        argv += ["--reg_data_dir", str(reg)]
    return argv + list(extra)


def _components(m) -> dict[str, dict]:
    return {"unet": m.unet.state_dict(), "vae": m.vae.state_dict(), "te": m.text_encoders[0].state_dict()}


def _differs(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("db")
    return make_dataset(root / "train", repeats=2), make_dataset(root / "reg", names=("coffee", "rocket"), token="dog")


@pytest.fixture(scope="module")
def reference(tiny_model_dir, data, tmp_path_factory):
    """6 steps from a single file with reg images, TE stopped after 3, model + state saved every 2 steps."""
    out = tmp_path_factory.mktemp("db_ref")
    train, reg = data
    model = tiny_model_dir("sd1", "single_file")
    common = ("--stop_text_encoder_training", "3", "--learning_rate_te", "5e-5", "--prior_loss_weight", "0.5",
              "--shuffle_caption", "--flip_aug", "--lr_scheduler", "cosine", "--lr_warmup_steps", "1")
    argv = db_argv(model, train, out, *common, "--save_every_n_steps", "2", "--save_state", "--use_safetensors",
                   steps=6, reg=reg)
    assert run_db(argv) == 0
    return model, out, common


def test_trains_and_diffusers_reads_the_single_file(reference, tiny_model_dir):
    from diffusers import StableDiffusionPipeline

    from library.models.loading import load_models

    model, out, _ = reference
    final = out / "db.safetensors"
    assert final.is_file()  # kohya's default for a single-file source: the same layout (--use_safetensors: .safetensors)
    src = load_models(str(model), tokenizer_cache_dir=str(model.parent / f"{model.stem}_tokenizers"))
    ours = load_models(str(final), tokenizer_cache_dir=str(model.parent / f"{model.stem}_tokenizers"))
    pipe = StableDiffusionPipeline.from_single_file(str(final), config=str(tiny_model_dir("sd1")), local_files_only=True)
    assert_same_tensors(pipe.unet.state_dict(), ours.unet.state_dict())
    assert_same_tensors(pipe.text_encoder.state_dict(), ours.text_encoders[0].state_dict())
    assert_same_tensors(pipe.vae.state_dict(), ours.vae.state_dict())
    s, o = _components(src), _components(ours)
    assert _differs(s["unet"], o["unet"]) and _differs(s["te"], o["te"])
    assert not _differs(s["vae"], o["vae"])  # the VAE is never trained
    with safe_open(str(final), "pt") as f:
        md = f.metadata()
    assert md["modelspec.architecture"] == "stable-diffusion-v1"
    assert md["modelspec.prediction_type"] == "epsilon" and md["modelspec.title"] == "db"


def test_text_encoder_frozen_after_stop_step(reference):
    _, out, _ = reference
    at2, at4, final = (load_file(out / n) for n in ("db-step00000002.safetensors", "db-step00000004.safetensors",
                                                    "db.safetensors"))
    te = [k for k in final if k.startswith("cond_stage_model.")]
    unet = [k for k in final if k.startswith("model.diffusion_model.")]
    assert any(not torch.equal(at2[k], at4[k]) for k in te)  # step 3 still trained it
    assert all(torch.equal(at4[k], final[k]) for k in te)  # after step 3: frozen
    assert any(not torch.equal(at4[k], final[k]) for k in unet)
    state = json.loads((out / "db-step00000004-state" / "train_state.json").read_text())
    assert state["progress"]["global_step"] == 4 and state["current_step"] == 4


@pytest.mark.parametrize("state", ["db-step00000002-state", "db-step00000004-state"])
def test_resume_is_bit_identical(reference, data, tmp_path, state):
    """From before the text encoder stops (step 2) and after (step 4, its optimizer group already empty)."""
    model, out, common = reference
    train, reg = data
    argv = db_argv(model, train, tmp_path, *common, "--resume", str(out / state), "--use_safetensors",
                   "--save_every_n_steps", "2", steps=6, reg=reg)
    assert run_db(argv) == 0
    assert_same_tensors(load_file(out / "db.safetensors"), load_file(tmp_path / "db.safetensors"))
    assert_same_tensors(load_file(out / "db-step00000006.safetensors"),
                        load_file(tmp_path / "db-step00000006.safetensors"))
    # the counters continue from the state, never restart (kohya sd-scripts#1559)
    assert not (tmp_path / "db-step00000002.safetensors").exists()


def test_diffusers_source_and_formats(tiny_model_dir, data, tmp_path):
    from diffusers import StableDiffusionPipeline

    from library.models.loading import load_models

    train, _ = data
    folder = tiny_model_dir("sd1")
    # no --save_model_as: a folder source gives a folder (kohya), .bin weights unless --use_safetensors
    assert run_db(db_argv(folder, train, tmp_path / "a", "--stop_text_encoder_training", "-1", steps=1)) == 0
    assert (tmp_path / "a" / "db" / "unet" / "diffusion_pytorch_model.bin").is_file()
    out = tmp_path / "b"
    assert run_db(db_argv(folder, train, out, "--save_model_as", "diffusers_safetensors", "--save_precision", "fp16",
                          steps=2)) == 0
    weights = load_file(out / "db" / "unet" / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in weights.values()} == {torch.float16}  # --save_precision fp16
    pipe = StableDiffusionPipeline.from_pretrained(str(out / "db"), local_files_only=True, torch_dtype=torch.float16)
    ours = load_models(str(out / "db"), dtype=None)
    assert_same_tensors(pipe.unet.state_dict(), ours.unet.state_dict())
    assert_same_tensors(pipe.text_encoder.state_dict(), ours.text_encoders[0].state_dict())
    # -1: the text encoder is never trained
    src = load_models(str(folder))
    a = load_models(str(tmp_path / "a" / "db"))
    assert not _differs(src.text_encoders[0].state_dict(), a.text_encoders[0].state_dict())
    assert _differs(src.unet.state_dict(), a.unet.state_dict())


def test_sd2_v_prediction_ckpt(tiny_model_dir, data, tmp_path):
    from library.models.loading import load_models

    train, _ = data
    model = tiny_model_dir("sd2", "single_file")
    argv = db_argv(model, train, tmp_path, "--v2", "--v_parameterization", "--save_model_as", "ckpt",
                   "--no_token_padding", steps=2)
    assert run_db(argv) == 0
    ckpt = torch.load(tmp_path / "db.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2 and "model.diffusion_model.input_blocks.0.0.weight" in ckpt["state_dict"]
    back = load_models(str(tmp_path / "db.ckpt"), v2=True, v_parameterization=True, allow_pickle=True,
                       tokenizer_cache_dir=str(model.parent / f"{model.stem}_tokenizers"))
    assert back.v_parameterization and back.family.value == "sd2"
    # the same as a safetensors file: diffusers' single-file loader reads it as sdtk does, modelspec says 768-v
    from diffusers import StableDiffusionPipeline

    argv[argv.index("ckpt")] = "safetensors"
    assert run_db(argv) == 0
    single = tmp_path / "db.safetensors"
    pipe = StableDiffusionPipeline.from_single_file(str(single), config=str(tiny_model_dir("sd2")),
                                                    local_files_only=True)
    ours = load_models(str(single), v2=True, with_tokenizers=False)
    assert_same_tensors(pipe.unet.state_dict(), ours.unet.state_dict())
    assert_same_tensors(pipe.text_encoder.state_dict(), ours.text_encoders[0].state_dict())
    with safe_open(str(single), "pt") as f:
        md = f.metadata()
    assert md["modelspec.architecture"] == "stable-diffusion-v2-768-v" and md["modelspec.prediction_type"] == "v"


def test_stop_text_encoder_training_past_the_end_warns_and_samples(tiny_model_dir, data, tmp_path, capsys):
    train, _ = data
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of sks astronaut --w 64 --h 64 --s 2 --d 42\n", encoding="utf-8")
    assert run_db(db_argv(tiny_model_dir("sd1"), train, tmp_path, "--stop_text_encoder_training", "50",
                          "--save_model_as", "safetensors", "--sample_prompts", str(prompts),
                          "--sample_every_n_steps", "1", "--ema", steps=1)) == 0
    err = capsys.readouterr().err
    assert "WARNING" in err and "--stop_text_encoder_training 50 is not before the end of training" in err
    assert len(list((tmp_path / "sample").glob("*.png"))) == 1  # sampled from the trained (EMA) model


def _files(folder) -> list:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


@pytest.mark.parametrize("case", ["reg_only", "negative_prior", "sdxl_model", "diffusers_to_file"])
def test_bad_input_is_one_line_and_writes_nothing(case, tiny_model_dir, data, tmp_path, capsys):
    train, reg = data
    model = tiny_model_dir("sd1")
    out = tmp_path / "out"
    extra: list[str] = []
    if case == "reg_only":
        toml = tmp_path / "reg_only.toml"  # (empty or missing folders are refused on the command line already)
        toml.write_text(f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = '{reg / '1_dog'}'\n"
                        "is_reg = true\n", encoding="utf-8")
        argv = db_argv(model, train, out)
        argv[argv.index("--train_data_dir"):argv.index("--train_data_dir") + 2] = ["--dataset_config", str(toml)]
        expect = "regularization images but no training images"
    elif case == "negative_prior":
        argv, expect = db_argv(model, train, out, "--prior_loss_weight", "-1", reg=reg), "--prior_loss_weight"
    elif case == "sdxl_model":
        argv, expect = db_argv(tiny_model_dir("sdxl"), train, out), "is an SDXL model; use sdxl_train.py"
    else:
        out.mkdir()
        (out / "db").write_text("not a folder")
        argv, expect = db_argv(model, train, out, "--save_model_as", "diffusers", *extra), "is a file"
    assert run_db(argv) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expect in errors[0], errors
    assert [p.name for p in _files(out)] == (["db"] if case == "diffusers_to_file" else [])


def test_ema_is_saved_sampled_and_resumed(tiny_model_dir, data, tmp_path, capsys):
    """--ema 0.5: the saved UNet is the average of the initial and the trained weights; states hold both."""
    from library.models.loading import load_models

    train, _ = data
    model = tiny_model_dir("sd1")
    common = ("--ema", "--ema_decay", "0.5", "--stop_text_encoder_training", "-1", "--save_model_as", "diffusers")
    out = tmp_path / "ema"
    assert run_db(db_argv(model, train, out, *common, "--save_every_n_steps", "1", "--save_state", steps=2)) == 0
    assert "memory before activations" in capsys.readouterr().err  # the figure printed before training
    init = load_models(str(model)).unet.state_dict()
    raw = [torch.load(out / f"db-step0000000{i}-state" / "network.pt") for i in (1, 2)]
    ema = {k: v for k, v in init.items()}
    for st in raw:
        ema = {k: 0.5 * ema[k] + 0.5 * st[f"unet.{k}"] for k in ema}
    saved = load_models(str(out / "db")).unet.state_dict()
    for k in saved:
        assert torch.allclose(saved[k], ema[k], atol=1e-6), k
    assert any(not torch.equal(saved[k], raw[1][f"unet.{k}"]) for k in saved)  # not the raw weights
    resumed = tmp_path / "resumed"
    assert run_db(db_argv(model, train, resumed, *common, "--resume", str(out / "db-step00000001-state"),
                          steps=2)) == 0
    again = load_models(str(resumed / "db")).unet.state_dict()
    assert_same_tensors(saved, again)


def test_fused_backward_pass_with_adamw_equals_the_plain_step(tiny_model_dir, data, tmp_path):
    """Beyond kohya (whose train_db ignores --fused_backward_pass): AdamW stepped per tensor inside the
    backward pass, text encoder stopped mid-run, gives the plain run's weights bit for bit (no clipping:
    fused clips per tensor)."""
    train, reg = data
    model = tiny_model_dir("sd1")
    common = ("--optimizer_type", "AdamW", "--max_grad_norm", "0", "--stop_text_encoder_training", "2",
              "--save_model_as", "safetensors")
    assert run_db(db_argv(model, train, tmp_path / "plain", *common, steps=3, reg=reg)) == 0
    assert run_db(db_argv(model, train, tmp_path / "fused", *common, "--fused_backward_pass", steps=3, reg=reg)) == 0
    plain, fused = (load_file(tmp_path / d / "db.safetensors") for d in ("plain", "fused"))
    assert_same_tensors(plain, fused)

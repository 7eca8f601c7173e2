"""sdxl_train_network.py end to end on the tiny SDXL model: kohya's file layout and metadata, sampling,
TE-output caching, two text-encoder learning rates, the low-memory options, and bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.trainer_fixtures import assert_same_tensors, lora_metadata, lora_tensors, make_dataset, train_argv

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("sdxl_data"))


def run_sdxl(argv: list[str], trainer_cls=None) -> int:
    """``sdxl_train_network.main(argv)`` in this process (accelerate's process-wide state reset first)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    import sdxl_train_network

    if trainer_cls is None:
        return sdxl_train_network.main(argv)
    from library.config.args import parse_args

    return trainer_cls(parse_args(sdxl_train_network.SCRIPT, argv)).train()


def test_trains_te_and_unet_in_kohya_layout_with_samples(tiny_model_dir, data, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of sks cat --n blurry --w 64 --h 64 --s 2 --d 5\n", encoding="utf-8")
    argv = train_argv(tiny_model_dir("sdxl"), data, tmp_path / "out", "--text_encoder_lr", "1e-4", "2e-4",
                      "--max_token_length", "150", "--sample_prompts", str(prompts), "--sample_every_n_steps", "3",
                      steps=3, name="xl")
    assert run_sdxl(argv) == 0
    path = tmp_path / "out" / "xl.safetensors"
    sd, md = lora_tensors(path), lora_metadata(path)
    names = {k.split(".")[0] for k in sd}
    assert any(n.startswith("lora_te1_text_model_encoder_layers_") for n in names)
    assert any(n.startswith("lora_te2_text_model_encoder_layers_") for n in names)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_middle_block_1_proj_in" in names and "lora_unet_output_blocks_0_1_proj_out" in names
    assert not any(n.startswith(("lora_unet_down_blocks", "lora_unet_up_blocks", "lora_te_text")) for n in names)
    for prefix in ("lora_te1_", "lora_te2_", "lora_unet_"):  # every part learned something
        assert any(sd[k].abs().sum() > 0 for k in sd if k.startswith(prefix) and k.endswith("lora_up.weight"))
    assert md["ss_base_model_version"] == "sdxl_base_v1-0"
    assert md["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert md["ss_v2"] == "False" and md["ss_max_token_length"] == "150"
    assert md["ss_text_encoder_lr"] == "[0.0001, 0.0002]"
    samples = list((tmp_path / "out" / "sample").glob("xl_000003_00_*_5.png"))
    assert len(samples) == 1
    from PIL import Image

    assert Image.open(samples[0]).size == (64, 64)


def test_two_text_encoder_learning_rates(tiny_model_dir, data, tmp_path):
    import sdxl_train_network as script
    from accelerate.state import AcceleratorState, GradientState

    from library.config.args import parse_args
    from library.training.setup import setup_session

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    args = parse_args(script.SCRIPT, train_argv(tiny_model_dir("sdxl"), data, tmp_path / "out", "--unet_lr", "3e-4",
                                                "--text_encoder_lr", "1e-4", "2e-4"))
    s = setup_session(script.SdxlNetworkTrainer(args))
    lr_of = {id(p): g["lr"] for g in s.optimizer.param_groups for p in g["params"]}
    seen = {}
    for lora in s.network.text_encoder_loras + s.network.unet_loras:
        part = lora.lora_name.split("_")[1]  # te1 / te2 / unet
        seen.setdefault(part, set()).update(lr_of[id(p)] for p in lora.parameters())
    assert seen == {"te1": {1e-4}, "te2": {2e-4}, "unet": {3e-4}}


def test_cached_text_encoder_outputs_train_like_live_encoding(tiny_model_dir, data, tmp_path):
    """With frozen text encoders, caching (in memory or on disk) changes nothing in the result."""
    from library.data.te_cache import SUFFIX

    common = ("--network_train_unet_only", "--cache_latents")
    runs = {"live": (), "memory": ("--cache_text_encoder_outputs",), "disk": ("--cache_text_encoder_outputs_to_disk",)}
    out = {}
    for name, extra in runs.items():
        argv = train_argv(tiny_model_dir("sdxl"), data, tmp_path / name, *common, *extra, steps=2, name=name)
        assert run_sdxl(argv) == 0
        out[name] = lora_tensors(tmp_path / name / f"{name}.safetensors")
    assert not any(k.startswith("lora_te") for k in out["live"])
    assert_same_tensors(out["memory"], out["live"], atol=1e-6)
    assert_same_tensors(out["disk"], out["live"], atol=1e-6)
    assert len(list(data.rglob("*" + SUFFIX))) == 4
    for f in data.rglob("*" + SUFFIX):  # leave the shared dataset as it was
        f.unlink()


def test_low_memory_recipe_trains(tiny_model_dir, data, tmp_path):
    pytest.importorskip("bitsandbytes")
    # a single file (loaded in its own dtype with --fp8_base), as users' checkpoints come
    model = tiny_model_dir("sdxl", "single_file")
    argv = train_argv(model, data, tmp_path / "out", "--tokenizer_cache_dir", str(model.parent / f"{model.stem}_tokenizers"),
                      "--network_train_unet_only", "--cache_latents",
                      "--cache_text_encoder_outputs", "--gradient_checkpointing", "--fp8_base",
                      "--optimizer_type", "AdamW8bit", "--lowram", "--no_half_vae", "--disable_mmap_load_safetensors",
                      steps=2, name="low")
    assert run_sdxl(argv) == 0
    path = tmp_path / "out" / "low.safetensors"
    sd = lora_tensors(path)
    assert all(k.startswith("lora_unet_") for k in sd)
    assert any(sd[k].abs().sum() > 0 for k in sd if k.endswith("lora_up.weight"))
    assert all(torch.isfinite(v).all() for v in sd.values())
    assert lora_metadata(path)["ss_fp8_base"] == "True"


def _poisoned_trainer():
    import sdxl_train_network as script

    class Poisoned(script.SdxlNetworkTrainer):
        def load_model(self):
            model = super().load_model()
            with torch.no_grad():  # what an fp16 SDXL VAE does on some images: overflow
                model.vae.encoder.conv_in.weight.mul_(1e38)
            return model

    return Poisoned


@pytest.mark.parametrize("cache", [True, False])
def test_nan_latents_stop_with_cause_and_fix(tiny_model_dir, data, tmp_path, cache):
    from library.errors import SdtkError

    argv = train_argv(tiny_model_dir("sdxl"), data, tmp_path / "out", *(["--cache_latents"] if cache else []), steps=1)
    with pytest.raises(SdtkError, match=r"NaN/inf.*--no_half_vae.*--vae"):
        run_sdxl(argv, _poisoned_trainer())
    assert not list((tmp_path / "out").glob("*.safetensors"))


def _error(capsys) -> str:
    return capsys.readouterr().err


def test_wrong_family_names_the_right_script(tiny_model_dir, data, tmp_path, capsys):
    from tests.trainer_fixtures import run_in_process

    assert run_sdxl(train_argv(tiny_model_dir("sd1"), data, tmp_path / "a")) == 1
    err = _error(capsys)
    assert "SD1.x" in err and "use train_network.py" in err
    assert run_in_process(train_argv(tiny_model_dir("sdxl"), data, tmp_path / "b")) == 1
    err = _error(capsys)
    assert "SDXL" in err and "use sdxl_train_network.py" in err


def test_bad_input_is_refused_before_any_work(tiny_model_dir, data, tmp_path, capsys):
    missing = tmp_path / "no_model"  # every error below must come before the model is loaded
    base = train_argv(missing, data, tmp_path / "out")
    cases = [
        (["--cache_text_encoder_outputs", "--network_train_unet_only", "--shuffle_caption"], "shuffle_caption"),
        (["--cache_text_encoder_outputs"], "--network_train_unet_only"),
        (["--text_encoder_lr", "1e-4", "1e-4", "1e-4"], "1 or 2 values"),
        (["--max_token_length", "100"], "max_token_length"),
    ]
    for extra, expected in cases:
        assert run_sdxl([*base, *extra]) == 1
        err = _error(capsys)
        assert expected in err and "no_model" not in err, (extra, err)
    # per-subset caption shuffling in a dataset config is caught before loading too
    sub = next(p for p in data.iterdir() if p.is_dir())
    cfg = tmp_path / "data.toml"
    cfg.write_text(f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = '{sub}'\n"
                   "caption_extension = '.caption'\ncaption_tag_dropout_rate = 0.2\n", encoding="utf-8")
    argv = [a for a in base if a not in ("--train_data_dir", str(data))]
    assert run_sdxl([*argv, "--dataset_config", str(cfg), "--cache_text_encoder_outputs",
                     "--network_train_unet_only"]) == 1
    err = _error(capsys)
    assert "caption_tag_dropout_rate=0.2" in err and "no_model" not in err


def test_bucket_steps_must_suit_sdxl(tiny_model_dir, data, tmp_path, capsys):
    argv = train_argv(tiny_model_dir("sdxl"), data, tmp_path / "out", "--enable_bucket", "--bucket_reso_steps", "16",
                      "--min_bucket_reso", "32", "--max_bucket_reso", "128")
    assert run_sdxl(argv) == 1
    assert "multiple of 32" in _error(capsys)


def test_entry_script_runs_as_a_file(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "sdxl_train_network.py"), "--help"], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0 and "--cache_text_encoder_outputs" in proc.stdout

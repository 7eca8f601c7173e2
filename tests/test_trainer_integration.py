"""train_network.py end to end on the tiny SD1 model: learning, saving, metadata, plugins, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.trainer_fixtures import lora_metadata, lora_tensors, make_dataset, run_in_process, train_argv

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("train_data"))


def _fixed_triples_loss(model_dir: Path, image: Path, caption: str, lora_file: Path | None) -> float:
    """Mean epsilon-MSE over fixed (image, noise, timestep) triples, with or without the LoRA applied."""
    import networks.lora as lora
    from diffusers import DDPMScheduler

    from library.models.loading import load_models
    from library.training import noise as N
    from library.training.family import get_family_adapter

    m = load_models(str(model_dir))
    fam = get_family_adapter(m.family)
    if lora_file is not None:
        net, sd = lora.create_network_from_weights(1.0, str(lora_file), m.vae, m.text_encoders[0], m.unet)
        net.apply_to(m.text_encoders[0], m.unet, True, True)
        net.load_state_dict(sd)
    img = Image.open(image).convert("RGB").resize((64, 64))
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 127.5 - 1
    alphas = DDPMScheduler.from_config(m.scheduler_config).alphas_cumprod
    g = torch.Generator().manual_seed(0)
    losses = []
    with torch.no_grad():
        latents = m.vae.encode(x[None]).latent_dist.mean * m.vae.config.scaling_factor
        cond = fam.encode_prompts(m.text_encoders, m.tokenizers, [caption], None, None, torch.device("cpu"))
        for t in (100, 300, 500, 700, 900):
            for _ in range(2):
                noise = torch.randn(latents.shape, generator=g)
                ts = torch.tensor([t])
                pred = fam.predict(m.unet, N.add_noise(alphas, latents, noise, ts), ts, cond)
                losses.append(torch.nn.functional.mse_loss(pred, noise).item())
    return float(np.mean(losses))


def test_learning_happens_on_one_image(tiny_model_dir, tmp_path):
    model = tiny_model_dir("sd1")
    data = make_dataset(tmp_path / "one", names=("astronaut",))
    argv = train_argv(model, data, tmp_path / "out", "--network_alpha", "4", "--network_train_unet_only", steps=30)
    argv[argv.index("--learning_rate") + 1] = "1e-2"
    assert run_in_process(argv) == 0
    image = next((data / "1_sks").glob("*.png"))
    before = _fixed_triples_loss(model, image, "a photo of sks astronaut", None)
    after = _fixed_triples_loss(model, image, "a photo of sks astronaut", tmp_path / "out" / "lora.safetensors")
    assert after < 0.85 * before, (before, after)


def test_epoch_and_step_names_and_keep_last_n(tiny_model_dir, data, tmp_path):
    model = tiny_model_dir("sd1")
    out = tmp_path / "out"
    # 4 images, batch 2 -> 2 steps per epoch; 3 epochs
    argv = train_argv(model, data, out, "--train_batch_size", "2", "--max_train_epochs", "3",
                      "--save_every_n_epochs", "1", "--save_last_n_epochs", "1", "--save_every_n_steps", "1",
                      "--save_last_n_steps", "2", "--save_state", "--save_last_n_epochs_state", "1", steps=100)
    assert run_in_process(argv) == 0
    names = sorted(p.name for p in out.iterdir())
    # epoch 1 was dropped when epoch 2 was saved; epoch 3 is the final file; steps keep the last 2 (+ current)
    assert "lora-000002.safetensors" in names and "lora-000001.safetensors" not in names
    assert "lora-000003.safetensors" not in names and "lora.safetensors" in names
    assert "lora-000002-state" in names and "lora-000001-state" not in names and "lora-state" in names
    steps = sorted(n for n in names if n.startswith("lora-step") and n.endswith(".safetensors"))
    assert steps == ["lora-step00000004.safetensors", "lora-step00000005.safetensors",
                     "lora-step00000006.safetensors"], steps
    md = lora_metadata(out / "lora.safetensors")
    assert md["ss_steps"] == "6" and md["ss_epoch"] == "3" and md["ss_num_epochs"] == "3"
    assert not [n for n in names if n.startswith(".sdtk-tmp")]


def test_default_names_without_output_name(tiny_model_dir, data, tmp_path):
    model = tiny_model_dir("sd1")
    argv = train_argv(model, data, tmp_path, "--train_batch_size", "4", "--max_train_epochs", "2",
                      "--save_every_n_epochs", "1", "--save_every_n_steps", "2", steps=100)
    i = argv.index("--output_name")
    del argv[i : i + 2]
    assert run_in_process(argv) == 0
    assert {p.name for p in tmp_path.iterdir()} >= {"epoch-000001.safetensors", "at-step00000002.safetensors",
                                                    "last.safetensors"}


def test_metadata_full_and_minimal(tiny_model_dir, data, tmp_path):
    model = tiny_model_dir("sd1")
    argv = train_argv(model, data, tmp_path / "full", "--training_comment", "hello", "--metadata_title", "My LoRA",
                      "--metadata_author", "me", "--metadata_description", "desc", "--metadata_license", "MIT",
                      "--metadata_tags", "a,b", "--min_snr_gamma", "5", "--clip_skip", "2", steps=1)
    assert run_in_process(argv) == 0
    md = lora_metadata(tmp_path / "full" / "lora.safetensors")
    assert md["ss_network_module"] == "networks.lora" and md["ss_network_dim"] == "4"
    assert md["ss_network_alpha"] == "1.0" and md["ss_base_model_version"] == "sd_v1"
    assert md["ss_training_comment"] == "hello" and md["ss_min_snr_gamma"] == "5.0" and md["ss_clip_skip"] == "2"
    assert md["ss_seed"] == "7" and md["ss_steps"] == "1" and md["ss_num_train_images"] == "4"
    assert md["ss_optimizer"].endswith("AdamW") and md["ss_learning_rate"] == "0.001"
    assert json.loads(md["ss_tag_frequency"])["1_sks"]["a photo of sks astronaut"] == 1
    assert json.loads(md["ss_datasets"])[0]["num_train_images"] == 4
    assert md["modelspec.title"] == "My LoRA" and md["modelspec.author"] == "me"
    assert md["modelspec.architecture"] == "stable-diffusion-v1/lora" and md["modelspec.license"] == "MIT"
    assert md["sshs_model_hash"] and md["sshs_legacy_hash"]
    argv = train_argv(model, data, tmp_path / "min", "--no_metadata", steps=1)
    assert run_in_process(argv) == 0
    md = lora_metadata(tmp_path / "min" / "lora.safetensors")
    assert not [k for k in md if k.startswith("ss_") and k not in (
        "ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args")]
    assert md["ss_network_dim"] == "4" and "modelspec.architecture" in md


def test_lycoris_locon_trains_and_saves(tiny_model_dir, data, tmp_path):
    pytest.importorskip("lycoris")
    model = tiny_model_dir("sd1")
    argv = train_argv(model, data, tmp_path, "--network_args", "algo=locon", "conv_dim=4", "conv_alpha=1", steps=2)
    argv[argv.index("--network_module") + 1] = "lycoris.kohya"
    assert run_in_process(argv) == 0
    sd = lora_tensors(tmp_path / "lora.safetensors")
    assert any(k.startswith("lora_unet_") for k in sd) and any("conv" in k or "resnets" in k for k in sd)
    up = [v for k, v in sd.items() if k.endswith("lora_up.weight")]
    assert up and any(v.abs().sum() > 0 for v in up)  # trained: up weights start at zero
    md = lora_metadata(tmp_path / "lora.safetensors")
    assert md["ss_network_module"] == "lycoris.kohya" and "algo" in json.loads(md["ss_network_args"])


def test_cache_latents_grad_accum_checkpointing_bf16(tiny_model_dir, data, tmp_path):
    model = tiny_model_dir("sd1")
    argv = train_argv(model, data, tmp_path, "--cache_latents", "--gradient_accumulation_steps", "2",
                      "--gradient_checkpointing", "--mixed_precision", "bf16", "--save_precision", "fp16",
                      "--lr_scheduler", "linear", "--max_grad_norm", "0.5", steps=2)
    assert run_in_process(argv) == 0
    sd = lora_tensors(tmp_path / "lora.safetensors")
    assert all(v.dtype == torch.float16 for k, v in sd.items() if not k.endswith("alpha"))


def test_nan_loss_stops_and_saves_state(tiny_model_dir, data, tmp_path, capsys):
    model = tiny_model_dir("sd1")
    argv = train_argv(model, data, tmp_path, "--network_train_unet_only", steps=5)
    argv[argv.index("--learning_rate") + 1] = "1e30"  # the first update blows the weights up
    assert run_in_process(argv) == 1
    err = capsys.readouterr().err
    assert "NaN/inf at step 2" in err and "learning rate" in err
    state = tmp_path / "lora-step00000001-state"
    assert json.loads((state / "train_state.json").read_text())["progress"]["global_step"] == 1


def test_output_dir_not_writable(tiny_model_dir, data, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert run_in_process(train_argv(tiny_model_dir("sd1"), data, blocker / "out", steps=1)) == 1
    assert "--output_dir" in capsys.readouterr().err


def test_unknown_network_module(tiny_model_dir, data, tmp_path, capsys):
    argv = train_argv(tiny_model_dir("sd1"), data, tmp_path, steps=1)
    argv[argv.index("--network_module") + 1] = "networks.nope"
    assert run_in_process(argv) == 1
    assert "networks.nope" in capsys.readouterr().err


def test_missing_tracker_package_is_named(tiny_model_dir, data, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec  # the test extra installs tensorboard: make it look absent
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    argv = train_argv(tiny_model_dir("sd1"), data, tmp_path, "--log_with", "tensorboard", "--logging_dir",
                      str(tmp_path / "logs"), steps=1)
    assert run_in_process(argv) == 1
    assert "pip install 'sdtk[log]'" in capsys.readouterr().err


def test_sd2_v_prediction_model(tiny_model_dir, data, tmp_path):
    from tools.make_tiny_model import make_tiny_model
    from library.models.families import Family

    model = make_tiny_model(Family.SD2, "diffusers", tmp_path / "sd2v", v_parameterization=True)
    argv = train_argv(model, data, tmp_path / "out", "--v2", "--v_parameterization", "--min_snr_gamma", "5", steps=2)
    assert run_in_process(argv) == 0
    md = lora_metadata(tmp_path / "out" / "lora.safetensors")
    assert md["ss_base_model_version"] == "sd_v2_v" and md["ss_v2"] == "True"
    assert md["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert md["modelspec.prediction_type"] == "v"


def test_sdxl_model_is_refused_with_the_right_script(tiny_model_dir, data, tmp_path, capsys):
    assert run_in_process(train_argv(tiny_model_dir("sdxl"), data, tmp_path, steps=1)) == 1
    assert "sdxl_train_network.py" in capsys.readouterr().err


def test_xformers_without_cuda_is_explained(tiny_model_dir, data, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    assert run_in_process(train_argv(tiny_model_dir("sd1"), data, tmp_path, "--xformers", steps=1)) == 1
    assert "--sdpa" in capsys.readouterr().err


def test_continue_from_network_weights(tiny_model_dir, data, tmp_path):
    model = tiny_model_dir("sd1")
    assert run_in_process(train_argv(model, data, tmp_path / "a", steps=2)) == 0
    first = lora_tensors(tmp_path / "a" / "lora.safetensors")
    argv = train_argv(model, data, tmp_path / "b", "--network_weights", str(tmp_path / "a" / "lora.safetensors"),
                      steps=1)
    argv[argv.index("--learning_rate") + 1] = "1e-12"  # barely moves: the result is the loaded weights
    assert run_in_process(argv) == 0
    second = lora_tensors(tmp_path / "b" / "lora.safetensors")
    key = next(k for k in first if k.endswith("lora_up.weight") and first[k].abs().sum() > 0)
    torch.testing.assert_close(second[key], first[key], atol=1e-6, rtol=0)


def test_network_weights_from_another_family(tiny_model_dir, data, tmp_path, capsys):
    import networks.lora as lora
    from library.models.families import Family
    from library.models.tiny import build_tiny_model

    xl = build_tiny_model(Family.SDXL)
    net = lora.create_network(1.0, 4, 1.0, xl.vae, xl.text_encoders, xl.unet)
    net.apply_to(xl.text_encoders, xl.unet, True, True)
    net.save_weights(str(tmp_path / "xl.safetensors"), None, {"ss_base_model_version": "sdxl_base_v1-0"})
    argv = train_argv(tiny_model_dir("sd1"), data, tmp_path / "out", "--network_weights",
                      str(tmp_path / "xl.safetensors"), steps=1)
    assert run_in_process(argv) == 1
    err = capsys.readouterr().err
    assert "xl.safetensors" in err and ("SDXL" in err or "sdxl" in err)


def test_half_precision_training_loads_a_half_file_without_a_float32_copy(tiny_model_dir, data, tmp_path):
    """With --mixed_precision the UNet ends in half precision: load keeps the file's dtype (no float32
    copy of the model in RAM); in float32 training the weights are read as float32."""
    import train_network
    from library.config.args import parse_args
    from library.models.loading import load_models
    from library.models.saving import save_model
    from library.training.trainer import NetworkTrainer

    half = tmp_path / "half.safetensors"
    save_model(load_models(str(tiny_model_dir("sd1"))), half, "safetensors", "fp16")
    tok = tiny_model_dir("sd1", "single_file")
    tok = tok.parent / f"{tok.stem}_tokenizers"
    for precision, expected in (("bf16", torch.float16), ("no", torch.float32)):
        argv = train_argv(half, data, tmp_path, "--mixed_precision", precision, "--tokenizer_cache_dir", str(tok))
        model = NetworkTrainer(parse_args(train_network.SCRIPT, argv)).load_model()
        assert {p.dtype for p in model.unet.parameters()} == {expected}, precision


def test_skip_cache_check_trusts_existing_latent_files(tiny_model_dir, tmp_path):
    """--cache_latents_to_disk rebuilds caches another setting produced; --skip_cache_check keeps them."""
    data = make_dataset(tmp_path / "data", names=("astronaut", "coffee"))
    model = tiny_model_dir("sd1")
    base = ("--cache_latents", "--cache_latents_to_disk", "--network_train_unet_only")
    assert run_in_process(train_argv(model, data, tmp_path / "a", *base, steps=1)) == 0
    files = sorted(data.rglob("*_sdtk.safetensors"))
    assert len(files) == 2
    stamps = [f.stat().st_mtime_ns for f in files]
    # another resize interpolation makes the caches stale for these runs
    other = ("--resize_interpolation", "lanczos")
    assert run_in_process(train_argv(model, data, tmp_path / "b", *base, *other, "--skip_cache_check", steps=1)) == 0
    assert [f.stat().st_mtime_ns for f in files] == stamps  # trusted as they are
    assert run_in_process(train_argv(model, data, tmp_path / "c", *base, *other, steps=1)) == 0
    assert all(f.stat().st_mtime_ns != s for f, s in zip(files, stamps))  # checked: rebuilt


def test_save_n_epoch_ratio_saves_about_n_times(tiny_model_dir, data, tmp_path):
    """kohya: --save_n_epoch_ratio N saves every floor(epochs / N) epochs (at least every epoch)."""
    argv = train_argv(tiny_model_dir("sd1"), data, tmp_path, "--train_batch_size", "4", "--max_train_epochs", "7",
                      "--save_n_epoch_ratio", "3", "--network_train_unet_only", steps=1000)
    assert run_in_process(argv) == 0
    # 7 epochs / 3 -> every 2 epochs; the last epoch is the final file
    assert sorted(p.name for p in tmp_path.glob("lora*.safetensors")) == [
        "lora-000002.safetensors", "lora-000004.safetensors", "lora-000006.safetensors", "lora.safetensors"]



def _mask_dataset(root: Path, value: int) -> tuple[Path, Path]:
    """Images with captions in ``root/img`` and same-stem mask images (R channel = ``value``) in ``root/mask``."""
    from tests.data_fixtures import copy_photo

    img, mask = root / "img", root / "mask"
    mask.mkdir(parents=True)
    for n in ("astronaut", "coffee"):
        p = copy_photo(n, img, max_side=96)
        p.with_suffix(".caption").write_text(f"a photo of {n}", encoding="utf-8")
        with Image.open(p) as im:
            Image.new("RGB", im.size, (value, 0, 0)).save(mask / f"{p.stem}.png")
    return img, mask


def test_masked_loss_with_conditioning_data_dir(tiny_model_dir, tmp_path):
    """--masked_loss reads kohya's mask images from --conditioning_data_dir: a full mask trains exactly as
    no mask at all; an empty mask gives zero loss, so the LoRA stays untrained."""
    from tests.trainer_fixtures import assert_same_tensors

    model = tiny_model_dir("sd1")
    results = {}
    for value in (255, 0):
        img, mask = _mask_dataset(tmp_path / f"data{value}", value)
        out = tmp_path / f"out{value}"
        argv = train_argv(model, img, out, "--conditioning_data_dir", str(mask), "--masked_loss", steps=2)
        assert run_in_process(argv) == 0
        results[value] = lora_tensors(out / "lora.safetensors")
    plain = train_argv(model, tmp_path / "data255" / "img", tmp_path / "plain", "--conditioning_data_dir",
                       str(tmp_path / "data0" / "mask"), steps=2)  # masks present but --masked_loss off
    assert run_in_process(plain) == 0
    assert_same_tensors(results[255], lora_tensors(tmp_path / "plain" / "lora.safetensors"))
    ups = [v for k, v in results[0].items() if k.endswith("lora_up.weight")]
    assert ups and all(v.abs().sum() == 0 for v in ups)
    assert any(v.abs().sum() > 0 for k, v in results[255].items() if k.endswith("lora_up.weight"))


def test_masked_loss_mask_subsets_in_a_dataset_config(tiny_model_dir, tmp_path, capsys):
    """kohya accepts ControlNet-style subsets (conditioning_data_dir = masks) in the TOML with --masked_loss only."""
    img, mask = _mask_dataset(tmp_path / "data", 255)
    config = tmp_path / "data.toml"
    config.write_text(f'[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "{img.as_posix()}"\n'
                      f'conditioning_data_dir = "{mask.as_posix()}"\n', encoding="utf-8")
    argv = train_argv(tiny_model_dir("sd1"), img, tmp_path / "out", "--dataset_config", str(config), steps=1)
    i = argv.index("--train_data_dir")
    del argv[i : i + 2]
    assert run_in_process(argv) == 1
    err = capsys.readouterr().err
    assert "ControlNet datasets are not supported" in err and "add --masked_loss" in err
    assert run_in_process(argv + ["--masked_loss"]) == 0
    assert (tmp_path / "out" / "lora.safetensors").is_file()


def test_network_weights_continue_training_with_dim_from_weights(tiny_model_dir, data, tmp_path):
    """--network_weights are loaded whether the network is sized by flags or by the file (--dim_from_weights)."""
    from tests.trainer_fixtures import assert_same_tensors

    model = tiny_model_dir("sd1")
    assert run_in_process(train_argv(model, data, tmp_path / "a", "--network_dim", "8", steps=2)) == 0
    first = tmp_path / "a" / "lora.safetensors"
    for extra in (["--network_dim", "8"], ["--dim_from_weights"]):
        out = tmp_path / extra[0].strip("-")
        argv = train_argv(model, data, out, "--network_weights", str(first), *extra, steps=1)
        argv[argv.index("--learning_rate") + 1] = "1e-12"  # one negligible step: the result is what was loaded
        assert run_in_process(argv) == 0
        assert_same_tensors(lora_tensors(out / "lora.safetensors"), lora_tensors(first), atol=1e-6)

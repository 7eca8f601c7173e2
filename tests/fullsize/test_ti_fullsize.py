"""train_textual_inversion.py on full-size SD1.5 and sdxl_train_textual_inversion.py on full-size SDXL (random
weights, real vocabularies, no tokenizer folder): 2 steps at 64 px, the files' layout, gen_img.py rendering
the token."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.fullsize.helpers import run_script_peak

pytestmark = pytest.mark.fullsize

TOKEN = "mychar"  # not a token of CLIP's vocabulary (kohya refuses words it knows)


def ti_args(model: Path, data: Path, out: Path, *extra: object) -> list[object]:
    """Two steps at 64 px; kohya's object templates (the photos' captions name 'sks', not the token)."""
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--resolution", "64",
            "--output_dir", out, "--token_string", TOKEN, "--init_word", "person", "--num_vectors_per_token", "2",
            "--use_object_template", "--max_train_steps", "2", "--learning_rate", "5e-3", "--seed", "7",
            "--max_data_loader_n_workers", "0", "--cache_latents", *extra]


def gen_with_and_without(model: Path, emb: Path, tmp_path: Path) -> list[np.ndarray]:
    """gen_img.py at 64 px, 3 steps, with the embedding loaded: the token's prompt, then the prompt without it."""
    from PIL import Image

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"a photo of {TOKEN} --d 5\na photo of --d 5\n", encoding="utf-8")
    out = tmp_path / "images"
    log, _ = run_script_peak("gen_img.py", "--ckpt", model, "--textual_inversion_embeddings", emb, "--from_file",
                             prompts, "--W", "64", "--H", "64", "--steps", "3", "--outdir", out,
                             "--sequential_file_name")
    assert "2 image(s) written" in log
    return [np.asarray(Image.open(out / f"im_00000{i}.png").convert("RGB")).astype(np.int16) for i in (1, 2)]


def check_vectors(sd: dict, shapes: dict[str, tuple[int, int]]) -> None:
    assert {k: tuple(v.shape) for k, v in sd.items()} == shapes
    assert all(torch.isfinite(v).all() for v in sd.values())


def test_sd1(full_model, photos, tmp_path):
    out = tmp_path / "out"
    log, peak = run_script_peak("train_textual_inversion.py", *ti_args(full_model("sd1"), photos("ti_sd1"), out))
    assert "using sdtk's bundled CLIP vocabulary" in log
    assert f"the tokenizer gets tokens {TOKEN} {TOKEN}1 (ids 49408-49409)" in log  # after CLIP's 49,408 tokens
    print(f"SD1.5 textual inversion: peak RSS {peak:.1f} GiB")
    path = out / f"{TOKEN}.safetensors"
    sd = load_file(path)
    check_vectors(sd, {"emb_params": (2, 768)})
    with safe_open(str(path), "pt") as f:
        md = f.metadata()
    assert md["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"
    assert md["ss_token_string"] == TOKEN and md["ss_num_vectors_per_token"] == "2"
    with_token, without = gen_with_and_without(full_model("sd1"), path, tmp_path)
    assert with_token.std() > 5 and (with_token != without).any(axis=-1).mean() > 0.1


def test_sdxl(full_model, photos, tmp_path):
    out = tmp_path / "out"
    # bf16: the frozen UNet in half precision (the text encoders stay float32 on the CPU)
    log, peak = run_script_peak("sdxl_train_textual_inversion.py",
                                *ti_args(full_model("sdxl"), photos("ti_sdxl"), out, "--mixed_precision", "bf16"),
                                timeout=900)
    assert log.count("using sdtk's bundled CLIP vocabulary") == 2
    assert "tokenizer 2 gets tokens" in log
    print(f"SDXL textual inversion: peak RSS {peak:.1f} GiB")
    path = out / f"{TOKEN}.safetensors"
    sd = load_file(path)
    check_vectors(sd, {"clip_l": (2, 768), "clip_g": (2, 1280)})
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["modelspec.architecture"] == "stable-diffusion-xl-v1-base/textual-inversion"
    with_token, without = gen_with_and_without(full_model("sdxl"), path, tmp_path)
    assert with_token.std() > 5 and (with_token != without).any(axis=-1).mean() > 0.1

"""gen_img.py --highres_fix_*: kohya's two-stage generation, checked against diffusers' own pipelines.

The first stage must equal a plain generation at the small size (same seed and steps); the final
image must equal diffusers' img2img pipeline run on the upscaled first image with the prompt's
strength and seed + 1 (kohya's second-stage seed).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import gen_img

ARGS = ["--W", "128", "--H", "128", "--steps", "3", "--sampler", "ddim", "--sequential_file_name"]


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def _pipe(path, family: str, img2img: bool):
    import diffusers

    name = ("StableDiffusionXL" if family == "sdxl" else "StableDiffusion") + ("Img2Img" if img2img else "")
    name += "Pipeline"
    extra = {} if family == "sdxl" else dict(safety_checker=None, requires_safety_checker=False)
    pipe = getattr(diffusers, name).from_pretrained(str(path), local_files_only=True, **extra)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _close(a: np.ndarray, b: np.ndarray, tol: int = 1) -> None:
    assert a.shape == b.shape
    assert int(np.abs(a - b).max()) <= tol, f"max pixel difference {np.abs(a - b).max()}"


@pytest.mark.integration
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_highres_fix_stages_equal_diffusers(tiny_model_dir, tmp_path, family):
    torch.set_num_threads(1)
    path = tiny_model_dir(family)
    out = tmp_path / "out"
    rc = gen_img.main(["--ckpt", str(path), "--prompt", "a cat --n blurry --d 5", *ARGS, "--highres_fix_scale", "0.5",
                       "--highres_fix_steps", "2", "--strength", "0.6", "--highres_fix_save_1st", "--outdir", str(out)])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["im_0000001.png", "im_1000001.png"]  # kohya's stage prefix
    first, final = _png(out / "im_0000001.png"), _png(out / "im_1000001.png")
    assert first.shape == (64, 64, 3) and final.shape == (128, 128, 3)
    ref_kw = dict(negative_prompt="blurry", guidance_scale=7.5)
    with torch.no_grad():
        ref_first = _pipe(path, family, False)("a cat", width=64, height=64, num_inference_steps=2,
                                               generator=torch.Generator("cpu").manual_seed(5), **ref_kw).images[0]
        up = ref_first.resize((128, 128), resample=Image.LANCZOS)
        ref_final = _pipe(path, family, True)("a cat", image=up, strength=0.6, num_inference_steps=3,
                                              generator=torch.Generator("cpu").manual_seed(6), **ref_kw).images[0]
    _close(first, np.asarray(ref_first, dtype=np.int16))
    _close(final, np.asarray(ref_final, dtype=np.int16))
    meta = json.loads(Image.open(out / "im_1000001.png").text["sdtk"])
    assert meta["seed"] == 5 and meta["strength"] == 0.6 and meta["width"] == 128
    assert meta["highres_fix"]["first_width"] == 64 and meta["highres_fix"]["steps"] == 2
    assert Image.open(out / "im_0000001.png").text["steps"] == "2"


@pytest.mark.integration
def test_highres_fix_latents_upscaling_equals_diffusers_on_latents(tiny_model_dir, tmp_path):
    torch.set_num_threads(1)
    path = tiny_model_dir("sd1")
    out = tmp_path / "out"
    rc = gen_img.main(["--ckpt", str(path), "--prompt", "a dog --d 9", *ARGS, "--highres_fix_scale", "0.5",
                       "--highres_fix_latents_upscaling", "--outdir", str(out)])
    assert rc == 0
    assert [p.name for p in out.iterdir()] == ["im_1000001.png"]  # first stage not saved by default
    final = _png(out / "im_1000001.png")
    with torch.no_grad():
        latents = _pipe(path, "sd1", False)("a dog", width=64, height=64, num_inference_steps=28, output_type="latent",
                                            generator=torch.Generator("cpu").manual_seed(9)).images
        up = torch.nn.functional.interpolate(latents, size=(16, 16), mode="bilinear")
        ref = _pipe(path, "sd1", True)("a dog", image=up, strength=0.8, num_inference_steps=3,
                                       generator=torch.Generator("cpu").manual_seed(10)).images[0]
    _close(final, np.asarray(ref, dtype=np.int16))
    # the latent path differs from the image path (no VAE round trip between the stages)
    rc = gen_img.main(["--ckpt", str(path), "--prompt", "a dog --d 9", *ARGS, "--highres_fix_scale", "0.5",
                       "--outdir", str(tmp_path / "img")])
    assert rc == 0 and np.abs(_png(tmp_path / "img" / "im_1000001.png") - final).max() > 0


@pytest.mark.parametrize("extra,message", [
    (["--highres_fix_scale", "0"], "--highres_fix_scale: must be > 0 and <= 1"),
    (["--highres_fix_scale", "1.5"], "--highres_fix_scale: must be > 0 and <= 1"),
    (["--highres_fix_scale", "0.2"], "the first stage of a 128x128 image would be 0x0"),
    (["--highres_fix_save_1st"], "--highres_fix_save_1st is a highres fix setting: give --highres_fix_scale"),
    (["--highres_fix_scale", "0.5", "--highres_fix_strength", "0.5"], "used only with --image_path"),
    (["--highres_fix_scale", "0.5", "--highres_fix_upscaler", "tools.latent_upscaler"],
     "--highres_fix_upscaler is not supported by sdtk"),
    (["--highres_fix_scale", "0.5", "--highres_fix_steps", "0"], "--highres_fix_steps"),
])
def test_highres_fix_bad_values_one_line_error(tiny_model_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    rc = gen_img.main(["--ckpt", str(tiny_model_dir("sd1")), "--prompt", "a", *ARGS, *extra, "--outdir", str(out)])
    assert rc == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and message in err[0], err
    assert not out.exists() or not list(out.iterdir())


@pytest.mark.integration
def test_highres_fix_with_img2img_first_stage_uses_highres_strength(tiny_model_dir, tmp_path):
    """kohya: with --image_path the first stage is img2img of the source (resized) with --highres_fix_strength,
    and the output has the --W/--H size, not the source's."""
    torch.set_num_threads(1)
    path = tiny_model_dir("sd1")
    src = tmp_path / "src.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 80, 3), dtype=np.uint8)).save(src)
    out = tmp_path / "out"
    rc = gen_img.main(["--ckpt", str(path), "--prompt", "a cat --d 3", *ARGS, "--image_path", str(src),
                       "--highres_fix_scale", "0.5", "--highres_fix_steps", "3", "--highres_fix_strength", "0.5",
                       "--highres_fix_save_1st", "--outdir", str(out)])
    assert rc == 0
    first, final = _png(out / "im_0000001.png"), _png(out / "im_1000001.png")
    assert first.shape == (64, 64, 3) and final.shape == (128, 128, 3)
    source = Image.open(src).convert("RGB").resize((64, 64), resample=Image.LANCZOS)
    with torch.no_grad():
        ref = _pipe(path, "sd1", True)("a cat", image=source, strength=0.5, num_inference_steps=3,
                                       generator=torch.Generator("cpu").manual_seed(3)).images[0]
    _close(first, np.asarray(ref, dtype=np.int16))

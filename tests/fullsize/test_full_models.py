"""Full-model training on the full-size models: train_db.py (SD1.5, reg images, TE stopped, bf16, checkpointing),
finetune/prepare_buckets_latents.py + fine_tune.py (SD1.5, metadata, text encoder, disk latents) and
sdxl_train.py (kohya's 24 GB low-memory recipe: full bf16, fused Adafactor, caches)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from library.models.families import Family

from tests.fullsize.helpers import run_script_peak
from tests.trainer_fixtures import assert_same_tensors, make_dataset

pytestmark = pytest.mark.fullsize

GIB = 2**30


def full_args(model: Path, data: Path, out: Path, name: str, *extra: object) -> list[object]:
    """Two steps at 64 px, batch 1, saved as one original-layout .safetensors file."""
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--resolution", "64",
            "--output_dir", out, "--output_name", name, "--max_train_steps", "2", "--train_batch_size", "1",
            "--seed", "7", "--max_data_loader_n_workers", "0", "--save_model_as", "safetensors", *extra]


def compare_to_base(base: Path, trained: Path) -> dict[str, dict[str, int]]:
    """``{part: {"same": n, "changed": n}}`` over the original-layout keys of ``base``, tensor by tensor
    (``"<part> matrices"``: the tensors of two or more dimensions only).

    ``trained`` must hold every key of ``base`` with its shape; a tensor counts as unchanged when it
    equals the base's value in the trained file's dtype (what an untouched weight becomes on a cast).
    """
    parts = {"model.diffusion_model.": "unet", "first_stage_model.": "vae", "cond_stage_model.": "te",
             "conditioner.embedders.0.": "te1", "conditioner.embedders.1.": "te2"}
    counts: dict[str, dict[str, int]] = {}
    with safe_open(str(base), "pt") as b, safe_open(str(trained), "pt") as t:
        assert set(t.keys()) >= set(b.keys()), sorted(set(b.keys()) - set(t.keys()))[:5]
        for key in b.keys():
            x, y = b.get_tensor(key), t.get_tensor(key)
            assert x.shape == y.shape, key
            assert not y.is_floating_point() or torch.isfinite(y).all(), key
            part = next((p for k, p in parts.items() if key.startswith(k)), "other")
            same = torch.equal(x.to(y.dtype), y)
            for tally in [part] + ([f"{part} matrices"] if y.ndim >= 2 else []):  # conv / linear / embeddings
                counts.setdefault(tally, {"same": 0, "changed": 0})["same" if same else "changed"] += 1
    return counts


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def diffusers_config_folder(model, folder: Path) -> Path:
    """The configs (no weights) of a diffusers folder for ``model``: what ``from_single_file(config=...)``
    reads instead of the hub."""
    from library.models.saving import _model_index
    from library.utils.atomic import write_json

    index = _model_index(model)
    write_json(folder / "model_index.json", index)
    write_json(folder / "scheduler" / "scheduler_config.json",
               dict(model.scheduler_config, _class_name=index["scheduler"][1]))
    model.unet.save_config(str(folder / "unet"))
    model.vae.save_config(str(folder / "vae"))
    model.text_encoders[0].config.save_pretrained(str(folder / "text_encoder"))
    model.tokenizers[0].save_pretrained(str(folder / "tokenizer"))
    return folder


def test_train_db_sd15_reg_images_te_stop_bf16(full_model, photos, tmp_path):
    from diffusers import StableDiffusionPipeline

    from library.models.loading import load_models

    base = full_model("sd1")
    reg = make_dataset(tmp_path / "reg", names=("coffee", "rocket"), token="dog")
    out = tmp_path / "out"
    log, peak = run_script_peak("train_db.py", *full_args(
        base, photos("db_data"), out, "db", "--reg_data_dir", reg, "--prior_loss_weight", "1.0",
        "--stop_text_encoder_training", "1", "--mixed_precision", "bf16", "--gradient_checkpointing",
        "--cache_latents", "--learning_rate", "1e-4"), timeout=600)
    assert "2 train images with repeats, 2 reg images" in log
    assert "using sdtk's bundled CLIP vocabulary" in log
    m = re.search(r"memory before activations: ~([\d.]+) GiB \(([\d.]+) M trained", log)
    # UNet 859.5 M + CLIP-L text encoder 123.1 M (position ids are buffers)
    assert m and 980 < float(m.group(2)) < 985, log[-3000:]
    print(f"train_db.py SD1.5: peak RSS {peak:.1f} GiB, planned {m.group(1)} GiB before activations")
    final = out / "db.safetensors"
    md = metadata(final)
    assert md["modelspec.architecture"] == "stable-diffusion-v1" and md["modelspec.prediction_type"] == "epsilon"
    counts = compare_to_base(base, final)
    assert counts["vae"]["changed"] == 0  # never trained
    # the text encoder trained for one step, the UNet for two: most tensors moved
    for part in ("unet", "te"):
        assert counts[part]["changed"] > counts[part]["same"], counts

    # diffusers' single-file loader (offline: the configs from sdtk's reading of the file) reads what sdtk reads
    ours = load_models(str(final), dtype=None)
    config = diffusers_config_folder(ours, tmp_path / "config")
    pipe = StableDiffusionPipeline.from_single_file(str(final), config=str(config), local_files_only=True,
                                                    safety_checker=None, torch_dtype=torch.float32)
    unet = pipe.unet.state_dict()
    assert unet["conv_in.weight"].shape == (320, 4, 3, 3)
    assert unet["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"].shape == (320, 768)
    te = pipe.text_encoder.state_dict()
    token_table = next(v for k, v in te.items() if k.endswith("embeddings.token_embedding.weight"))
    assert token_table.shape == (49408, 768)  # the real vocabulary
    assert_same_tensors(unet, {k: v.float() for k, v in ours.unet.state_dict().items()})
    assert_same_tensors(te, {k: v.float() for k, v in ours.text_encoders[0].state_dict().items()})


def test_prepare_buckets_latents_then_fine_tune_sd15(full_model, photos, tmp_path):
    base = full_model("sd1")
    images = photos("ft_data") / "1_sks"
    cap = tmp_path / "meta_cap.json"
    cap.write_text(json.dumps({p.stem: {"caption": p.with_suffix(".caption").read_text(), "tags": "photo, sks"}
                               for p in sorted(images.glob("*.png"))}), encoding="utf-8")
    lat = tmp_path / "meta_lat.json"
    log, prep_peak = run_script_peak("finetune/prepare_buckets_latents.py", images, cap, lat, base,
                                     "--max_resolution", "64,64", "--min_bucket_reso", "64", "--max_bucket_reso",
                                     "128", "--bucket_reso_steps", "64")
    assert "latents: 2 images encoded" in log
    meta = json.loads(lat.read_text())
    assert len(meta) == 2
    for entry in meta.values():
        assert entry["train_resolution"] == [64, 64] and max(entry["image_size"]) == 96 and entry["caption"]
    caches = sorted(images.glob("*_64x64_sdtk.safetensors"))
    assert len(caches) == 2

    out = tmp_path / "out"
    log, peak = run_script_peak("fine_tune.py", *full_args(
        base, images, out, "ft", "--in_json", lat, "--train_text_encoder", "--learning_rate", "1e-4",
        "--learning_rate_te", "5e-5", "--cache_latents_to_disk", "--save_precision", "fp16"), timeout=600)
    assert "latents: 0 images encoded, 2 valid disk caches reused" in log  # the pre-pass's files
    print(f"prepare_buckets_latents.py: peak RSS {prep_peak:.1f} GiB; fine_tune.py SD1.5: peak RSS {peak:.1f} GiB")
    final = out / "ft.safetensors"
    with safe_open(str(final), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys() if k.endswith(".weight")} == {"F16"}  # --save_precision
    counts = compare_to_base(base, final)
    assert counts["vae"]["changed"] == 0
    for part in ("unet", "te"):
        assert counts[part]["changed"] > counts[part]["same"], counts
    assert metadata(final)["modelspec.architecture"] == "stable-diffusion-v1"


LOW_MEMORY = ("--mixed_precision", "bf16", "--full_bf16", "--optimizer_type", "Adafactor", "--optimizer_args",
              "scale_parameter=False", "relative_step=False", "warmup_init=False", "--fused_backward_pass",
              "--gradient_checkpointing", "--cache_latents", "--cache_text_encoder_outputs")


def test_sdxl_train_low_memory_recipe(full_model, photos, tmp_path):
    base = full_model("sdxl")
    out = tmp_path / "out"
    # lr 1e-3: bf16 weights round updates below ~2**-8 of a weight away, and two steps must show
    log, peak = run_script_peak("sdxl_train.py", *full_args(base, photos("xl_full_data"), out, "xl", *LOW_MEMORY,
                                                           "--learning_rate", "1e-3"), timeout=600)
    print(f"sdxl_train.py low-memory recipe: peak RSS {peak:.1f} GiB")
    assert "text-encoder outputs: 2 captions encoded" in log
    m = re.search(r"memory before activations: ~([\d.]+) GiB \(([\d.]+) M trained.*gradients ([\d.]+) GiB", log)
    assert m and 2560 < float(m.group(2)) < 2570 and float(m.group(3)) == 0, log[-3000:]  # 2.567 B, fused: none
    assert peak < 20, f"the 24 GB recipe peaked at {peak:.1f} GiB"
    final = out / "xl.safetensors"
    md = metadata(final)
    assert md["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    with safe_open(str(final), "pt") as f:
        assert f.get_slice("model.diffusion_model.input_blocks.0.0.weight").get_dtype() == "BF16"  # as trained
        assert f.get_slice("model.diffusion_model.out.2.weight").get_shape() == [4, 320, 3, 3]
    counts = compare_to_base(base, final)
    for part in ("vae", "te1", "te2"):  # frozen (their outputs were cached)
        assert counts[part]["changed"] == 0, counts
    # every conv / linear weight moved; norm weights near 1 may not (an lr-sized step is below half a bf16 ulp)
    mats = counts["unet matrices"]
    assert mats["changed"] >= 0.95 * (mats["changed"] + mats["same"]), counts
    final.unlink()  # 5 GB

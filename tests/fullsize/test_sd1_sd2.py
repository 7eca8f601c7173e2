"""train_network.py on full-size SD1.5 (with text-encoder LoRA) and SD2.x v-prediction; gen_img.py on SD1.5."""

from __future__ import annotations

import pytest
import torch

from tests.fullsize.helpers import assert_images, gen_two_images, lora_modules, run_script, train_args
from tests.trainer_fixtures import lora_metadata, lora_tensors

pytestmark = pytest.mark.fullsize

TE_PARTS = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")


def sd_unet_names() -> set[str]:
    """kohya's default SD1/SD2 UNet LoRA modules (diffusers names): 16 transformers, 10 Linear each + proj_in/out."""
    blocks = [f"down_blocks_{b}_attentions_{a}" for b in range(3) for a in range(2)]
    blocks += ["mid_block_attentions_0"] + [f"up_blocks_{b}_attentions_{a}" for b in (1, 2, 3) for a in range(3)]
    per = [f"attn{i}_{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out_0")] + ["ff_net_0_proj", "ff_net_2"]
    names = set()
    for b in blocks:
        names |= {f"lora_unet_{b}_proj_in", f"lora_unet_{b}_proj_out"}
        names |= {f"lora_unet_{b}_transformer_blocks_0_{p}" for p in per}
    return names


def te_names(layers: int) -> set[str]:
    return {f"lora_te_text_model_encoder_layers_{i}_{p}" for i in range(layers) for p in TE_PARTS}


@pytest.fixture(scope="module")
def sd1_lora(full_model, photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("sd1_out")
    log = run_script("train_network.py", *train_args(full_model("sd1"), photos("sd1_data"), out, "sd1"))
    return out / "sd1.safetensors", log


def test_sd1_trains_unet_and_text_encoder_lora(sd1_lora):
    path, log = sd1_lora
    assert "using sdtk's bundled CLIP vocabulary" in log  # a bare single file: no tokenizer setup
    sd = lora_tensors(path)
    mods = lora_modules(sd)
    assert set(mods) == sd_unet_names() | te_names(12)
    assert len(mods) == 192 + 72
    assert sd["lora_te_text_model_encoder_layers_11_mlp_fc1.lora_up.weight"].shape == (3072, 4)
    assert sd["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"].shape == (4, 768)
    # SD1.5 cross-attention reads CLIP's 768 features; proj_in is a 1x1 conv
    assert sd["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"].shape == (4, 768)
    assert sd["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"].shape == (4, 1280, 1, 1)
    assert all(torch.isfinite(t).all() for t in sd.values())
    # both parts learned: lora_up starts at zero, two steps move it (SD1 conditions on the last layer)
    for prefix in ("lora_te_", "lora_unet_"):
        assert any(sd[k].abs().sum() > 0 for k in sd if k.startswith(prefix) and k.endswith("lora_up.weight")), prefix
    md = lora_metadata(path)
    assert md["ss_base_model_version"] == "sd_v1" and md["ss_v2"] == "False"
    assert md["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert md["ss_network_dim"] == "4" and md["ss_network_alpha"] == "4.0"


def test_gen_img_sd1_with_the_lora(full_model, sd1_lora, tmp_path):
    images = gen_two_images(full_model("sd1"), sd1_lora[0], tmp_path)
    assert_images(images, lora_changes_them=True)


def test_sd2_v_prediction(full_model, photos, tmp_path):
    out = tmp_path / "out"
    log = run_script("train_network.py", *train_args(full_model("sd2v"), photos("sd2_data"), out, "sd2",
                                                     "--v2", "--v_parameterization"))
    assert "(v-prediction)" in log
    path = out / "sd2.safetensors"
    sd = lora_tensors(path)
    mods = lora_modules(sd)
    # the file has OpenCLIP ViT-H's 24 layers; SD2 uses the penultimate one, so 23 layers get LoRA (kohya)
    assert set(mods) == sd_unet_names() | te_names(23)
    assert sd["lora_te_text_model_encoder_layers_22_mlp_fc1.lora_up.weight"].shape == (4096, 4)
    assert sd["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"].shape == (4, 1024)
    # SD2: cross-attention reads 1024 features; proj_in is Linear (use_linear_projection)
    to_k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    assert sd[f"{to_k}.lora_down.weight"].shape == (4, 1024)
    assert sd["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"].shape == (4, 1280)
    assert all(torch.isfinite(t).all() for t in sd.values())
    assert any(sd[k].abs().sum() > 0 for k in sd if k.startswith("lora_te_") and k.endswith("lora_up.weight"))
    md = lora_metadata(path)
    assert md["ss_v2"] == "True" and md["ss_base_model_version"] == "sd_v2_v"  # kohya's version string
    assert md["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora" and md["modelspec.prediction_type"] == "v"

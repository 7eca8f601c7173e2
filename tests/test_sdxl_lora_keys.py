"""Full-size SDXL (UNet and both text encoders on the meta device): the complete key set of sdtk's default
LoRA against kohya's sgm naming, its tensor shapes, and the sgm <-> diffusers module map checked
through diffusers' own original-checkpoint converter. Run with ``pytest -m slow``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

CONFIG = json.loads((Path(__file__).resolve().parents[1] / "library/models/configs/sdxl.json").read_text())


@pytest.fixture(scope="module")
def full():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel(**CONFIG["unet"])
        te1 = CLIPTextModel(CLIPTextConfig(**CONFIG["text_encoders"][0]["config"]))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**CONFIG["text_encoders"][1]["config"]))
    return unet, te1, te2


def _kohya_te_names(prefix: str, layers: int) -> set[str]:
    parts = ["self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2"]
    return {f"{prefix}_text_model_encoder_layers_{i}_{p}" for i in range(layers) for p in parts}


def _kohya_unet_names() -> set[str]:
    """kohya's default SDXL UNet LoRA modules, from the sgm architecture: (block, transformer depth)."""
    blocks = [("input_blocks_4_1", 2), ("input_blocks_5_1", 2), ("input_blocks_7_1", 10), ("input_blocks_8_1", 10),
              ("middle_block_1", 10)] + [(f"output_blocks_{i}_1", 10) for i in (0, 1, 2)] + \
             [(f"output_blocks_{i}_1", 2) for i in (3, 4, 5)]
    per_block = [f"attn{a}_{p}" for a in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out_0")] + ["ff_net_0_proj",
                                                                                                 "ff_net_2"]
    names = set()
    for block, depth in blocks:
        names |= {f"lora_unet_{block}_proj_in", f"lora_unet_{block}_proj_out"}
        names |= {f"lora_unet_{block}_transformer_blocks_{d}_{p}" for d in range(depth) for p in per_block}
    return names


def test_complete_default_key_set_and_shapes(full):
    from networks import lora

    unet, te1, te2 = full
    net = lora.create_network(1.0, 4, 1, None, [te1, te2], unet)
    unet_names = {m.lora_name for m in net.unet_loras}
    te_names = {m.lora_name for m in net.text_encoder_loras}
    assert len(unet_names) == 722 and unet_names == _kohya_unet_names()
    assert te_names == _kohya_te_names("lora_te1", 12) | _kohya_te_names("lora_te2", 32)
    assert len(te_names) == 72 + 192
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert set(shapes) == {f"{n}.{s}" for n in unet_names | te_names for s in ("lora_down.weight", "lora_up.weight",
                                                                               "alpha")}
    # real SDXL dimensions at a few sgm places: cross-attention keys read the 2048 text features
    assert shapes["lora_unet_input_blocks_7_1_transformer_blocks_9_attn2_to_k.lora_down.weight"] == (4, 2048)
    assert shapes["lora_unet_input_blocks_7_1_transformer_blocks_9_attn2_to_k.lora_up.weight"] == (1280, 4)
    assert shapes["lora_unet_output_blocks_5_1_transformer_blocks_1_ff_net_0_proj.lora_up.weight"] == (5120, 4)
    assert shapes["lora_unet_middle_block_1_proj_in.lora_down.weight"] == (4, 1280)
    assert shapes["lora_te2_text_model_encoder_layers_31_mlp_fc1.lora_up.weight"] == (5120, 4)
    assert shapes["lora_te1_text_model_encoder_layers_11_self_attn_q_proj.lora_down.weight"] == (4, 768)
    assert shapes["lora_te1_text_model_encoder_layers_0_mlp_fc2.alpha"] == ()


def test_sgm_module_map_round_trips_through_diffusers_converter(full):
    """Our diffusers -> sgm names, fed to diffusers' sgm -> diffusers checkpoint converter, come back unchanged."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from library.models.unet_layout import UNetLayout

    unet = full[0]
    layout = UNetLayout(CONFIG["unet"])
    sd = {k: torch.empty(0) for k in unet.state_dict()}  # names only
    original = {"model.diffusion_model." + layout.to_original(k): v for k, v in sd.items()}
    assert len(original) == len(sd)
    back = convert_ldm_unet_checkpoint(original, dict(CONFIG["unet"]))
    assert set(back) == set(sd)
    # and the mapping inverts on every module with weights (those a LoRA / LoCon can adapt)
    for name, module in unet.named_modules():
        if list(module.parameters(recurse=False)):
            assert layout.to_diffusers(layout.to_original(name)) == name

"""Stable Diffusion 2.x: one OpenCLIP ViT-H text encoder (penultimate layer; diffusers drops the last),
512-base (epsilon) or 768-v (v-prediction) — the same family, told apart by ``--v_parameterization``."""

from __future__ import annotations

from typing import Mapping

from library.models.families.base import Family, TinyTextEncoder, register
from library.models.families.sd1 import SD1, SDAdapter

ARCH_V2_512 = "stable-diffusion-v2-512"
ARCH_V2_768_V = "stable-diffusion-v2-768-v"


class SD2(Family):
    value = "sd2"
    pretty = "SD2.x"
    v2 = True
    adapter_class = SDAdapter
    tokenizer_ids = (("stabilityai/stable-diffusion-2", "tokenizer"),)
    tokenizer_pads = ("!",)  # OpenCLIP's tokenizer pads with "!" (kohya sets it the same way)
    te_prefixes = (("cond_stage_model.model.", True),)
    pads_last_te_layer = True
    modelspec_architectures = (ARCH_V2_512, ARCH_V2_768_V)
    tiny_text_encoders = (TinyTextEncoder(32, "gelu", pad_token="!"),)

    def detect_keys(self, keys: set[str], config: Mapping | None) -> bool:
        return "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in keys

    def detect_diffusers(self, unet_config: Mapping, te_config: Mapping, model_index: Mapping) -> bool:
        return te_config.get("hidden_act") == "gelu" or unet_config.get("cross_attention_dim") == 1024

    def full_config(self, v_parameterization: bool = False) -> dict:
        cfg = super().full_config(v_parameterization)
        if not v_parameterization:  # the shipped config is 768-v's; 512-base has 64x64 latents
            cfg["unet"]["sample_size"] = 64
            cfg["vae"]["sample_size"] = 512
        return cfg

    def modelspec_architecture(self, v_parameterization: bool) -> str:
        return ARCH_V2_768_V if v_parameterization else ARCH_V2_512

    def resolution(self, v_parameterization: bool) -> tuple[int, int]:
        return (768, 768) if v_parameterization else (512, 512)

    def tiny_unet_config(self) -> dict:
        return dict(SD1.tiny_unet_config(self), attention_head_dim=(2, 2, 4, 4), use_linear_projection=True)


SD2_FAMILY = register(SD2())

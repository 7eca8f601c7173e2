"""State-dict conversion between diffusers/transformers components and the original single-file layout.

Reading uses diffusers' own single-file converters (``diffusers.loaders.single_file_utils``);
writing is their inverse, derived from the architecture (see :mod:`library.models.unet_layout`).
Tests check that ``original -> diffusers -> original`` is bit-identical and that diffusers' own
loader reads what we write.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch

from library.models.families import Family, FamilyFacts
from library.models.unet_layout import UNetLayout

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

# Where each text encoder lives in the original layout, and whether it is in OpenCLIP layout:
# ``TE_PREFIXES[family]`` = ``family.te_prefixes`` (each family module states its own).
TE_PREFIXES = FamilyFacts("te_prefixes")

Tensor = torch.Tensor


def component_prefixes(family: Family) -> list[str]:
    return [UNET_PREFIX, VAE_PREFIX] + [p for p, _ in Family(family).te_prefixes]


# ----------------------------------------------------------------------------------------- UNet
def unet_to_original(sd: Mapping[str, Tensor], unet_config: Mapping) -> dict[str, Tensor]:
    layout = UNetLayout(unet_config)
    return {UNET_PREFIX + layout.to_original(k): v for k, v in sd.items()}


def unet_from_original(ckpt: Mapping[str, Tensor], unet_config: Mapping) -> dict[str, Tensor]:
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    return convert_ldm_unet_checkpoint(ckpt, dict(unet_config))


# ------------------------------------------------------------------------------------------ VAE
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _vae_key_to_original(key: str, n_up: int) -> str:
    k = key.replace("conv_norm_out", "norm_out")
    k = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)", r"encoder.down.\1.block.\2", k)
    k = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0", r"encoder.down.\1.downsample", k)

    def up(m: re.Match) -> str:
        return f"decoder.up.{n_up - 1 - int(m.group(1))}.{m.group(2)}"

    k = re.sub(r"^decoder\.up_blocks\.(\d+)\.(resnets\.\d+|upsamplers\.0)", up, k)
    k = re.sub(r"(decoder\.up\.\d+)\.resnets\.(\d+)", r"\1.block.\2", k)
    k = re.sub(r"(decoder\.up\.\d+)\.upsamplers\.0", r"\1.upsample", k)
    k = k.replace("mid_block.resnets.0", "mid.block_1").replace("mid_block.resnets.1", "mid.block_2")
    if "mid_block.attentions.0." in k:
        head, tail = k.split("mid_block.attentions.0.")
        name, param = tail.rsplit(".", 1)
        k = f"{head}mid.attn_1.{_VAE_ATTN[name]}.{param}"
    return k.replace("conv_shortcut", "nin_shortcut")


def vae_to_original(sd: Mapping[str, Tensor], vae_config: Mapping) -> dict[str, Tensor]:
    n_up = len(vae_config["up_block_types"])
    out = {}
    for key, value in sd.items():
        new = _vae_key_to_original(key, n_up)
        if ".mid.attn_1." in new and new.endswith("weight") and value.ndim == 2:
            value = value.reshape(*value.shape, 1, 1)  # the original attention uses 1x1 convolutions
        out[VAE_PREFIX + new] = value
    return out


def vae_from_original(ckpt: Mapping[str, Tensor], vae_config: Mapping) -> dict[str, Tensor]:
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    if not any(k.startswith(VAE_PREFIX) for k in ckpt):  # a standalone VAE file: keys start at encoder./decoder.
        ckpt = {VAE_PREFIX + k: v for k, v in ckpt.items()}
    return convert_ldm_vae_checkpoint(ckpt, dict(vae_config))


# -------------------------------------------------------------------------------- text encoders
def _strip_text_model(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k.removeprefix("text_model."): v for k, v in sd.items()}


def clip_to_original(sd: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """HF CLIP text model (with or without the ``text_model.`` wrapper) -> ``<prefix>text_model.…``."""
    return {prefix + "text_model." + k: v for k, v in _strip_text_model(sd).items() if k != "text_projection.weight"}


def clip_from_original(ckpt: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint

    return _strip_text_model(convert_ldm_clip_checkpoint(ckpt, remove_prefix=prefix))


_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def open_clip_to_original(sd: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """HF CLIP text model -> OpenCLIP layout (q/k/v fused into ``in_proj``, projection transposed)."""
    sd = _strip_text_model(sd)
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in sd.items():
        if key == "embeddings.token_embedding.weight":
            out[prefix + "token_embedding.weight"] = value
        elif key == "embeddings.position_embedding.weight":
            out[prefix + "positional_embedding"] = value
        elif key.startswith("final_layer_norm."):
            out[prefix + "ln_final." + key.split(".")[-1]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
        elif key.startswith("encoder.layers."):
            _, _, n, rest = key.split(".", 3)
            mod, param = rest.rsplit(".", 1)
            if mod in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((n, param), {})[mod[-6]] = value
            else:
                out[f"{prefix}transformer.resblocks.{n}.{_OPEN_CLIP_LAYER[mod]}.{param}"] = value
        else:
            raise KeyError(f"unexpected text-encoder parameter {key!r}")
    for (n, param), parts in qkv.items():
        out[f"{prefix}transformer.resblocks.{n}.attn.in_proj_{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def open_clip_from_original(ckpt: Mapping[str, Tensor], prefix: str, model) -> dict[str, Tensor]:
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    sub = {k: v for k, v in ckpt.items() if k.startswith(prefix)}
    return _strip_text_model(convert_open_clip_checkpoint(model, sub, prefix=prefix))


def te_layer_count(keys, prefix: str, open_clip: bool) -> int:
    pat = re.compile(re.escape(prefix) + (r"transformer\.resblocks\.(\d+)\." if open_clip else r"text_model\.encoder\.layers\.(\d+)\."))
    return 1 + max((int(m.group(1)) for k in keys if (m := pat.match(k))), default=-1)


def sd2_dummy_last_layer(te_sd: Mapping[str, Tensor], prefix: str, n_layers: int) -> dict[str, Tensor]:
    """SD2's text encoder uses the penultimate layer, so diffusers drops the last of OpenCLIP's layers.

    When no original last layer is available, write a copy of the previous one (as kohya does) so the
    file has the standard layer count; the layer is never used for SD2 conditioning.
    """
    src = f"{prefix}transformer.resblocks.{n_layers - 1}."
    dst = f"{prefix}transformer.resblocks.{n_layers}."
    return {dst + k[len(src) :]: v.clone() for k, v in te_sd.items() if k.startswith(src)}

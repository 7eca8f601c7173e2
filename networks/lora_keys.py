"""LoRA key names exactly as kohya sd-scripts writes them, and model-family detection.

A kohya LoRA file stores, per adapted module ``<name>``: ``<name>.lora_down.weight`` (rank x in
[x k x k]), ``<name>.lora_up.weight`` (out x rank [x 1 x 1]) and ``<name>.alpha`` (scalar). Names:

* SD1/SD2 UNet: ``lora_unet_`` + diffusers module path with ``.`` -> ``_``
  (``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``).
* SDXL UNet: ``lora_unet_`` + the original Stability (sgm) module path
  (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``), because kohya trains SDXL with
  its own sgm-layout UNet; sdtk trains diffusers' UNet and maps names via
  :class:`library.models.unet_layout.UNetLayout`.
* Text encoders: ``lora_te_`` (SD1/SD2) or ``lora_te1_`` / ``lora_te2_`` (SDXL) + the path inside the
  transformers CLIP model *with* its ``text_model.`` prefix
  (``lora_te_text_model_encoder_layers_0_self_attn_q_proj``). transformers 5's ``CLIPTextModel`` has
  no ``text_model`` submodule any more; the prefix is added so files stay kohya-compatible.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import torch

from library.models.families import Family

PREFIX_UNET = "lora_unet"
PREFIX_TE = "lora_te"
PREFIX_TE1 = "lora_te1"
PREFIX_TE2 = "lora_te2"

SUFFIX_DOWN = "lora_down.weight"
SUFFIX_UP = "lora_up.weight"
SUFFIX_ALPHA = "alpha"

_SGM_UNET_PREFIXES = ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")
_DIFFUSERS_UNET_PREFIXES = ("lora_unet_down_blocks_", "lora_unet_mid_block_", "lora_unet_up_blocks_")
# SD1/SD2 transformer blocks have depth 1; SDXL's have depth 2 or 10. A diffusers-style UNet key with
# a second transformer block therefore comes from an SDXL LoRA saved with diffusers names (e.g. by
# diffusers' own training scripts converted to kohya style), which ComfyUI and A1111 also accept.
_RE_DEEP_TRANSFORMER = re.compile(r"^lora_unet_(down_blocks|mid_block|up_blocks)_.*_transformer_blocks_[1-9]")


def te_prefix(index: int | None) -> str:
    """``lora_te`` for a single text encoder, ``lora_te1`` / ``lora_te2`` for SDXL's (index 1 or 2)."""
    return PREFIX_TE if index is None else f"{PREFIX_TE}{index}"


def text_encoder_lora_name(prefix: str, module_path: str) -> str:
    """``encoder.layers.0.mlp.fc1`` -> ``lora_te_text_model_encoder_layers_0_mlp_fc1``."""
    if not module_path.startswith("text_model."):
        module_path = "text_model." + module_path
    return f"{prefix}.{module_path}".replace(".", "_")


def unet_lora_name(module_path: str, layout: Any | None = None) -> str:
    """UNet module path -> kohya name; ``layout`` (a ``UNetLayout``) maps to sgm names for SDXL."""
    if layout is not None:
        module_path = layout.to_original(module_path)
    return f"{PREFIX_UNET}.{module_path}".replace(".", "_")


def uses_sdxl_layout(family: Family | None) -> bool:
    """Whether LoRA modules of ``family`` are named in SDXL's layout (te1/te2 prefixes, sgm UNet paths):
    a format fact each family states (``Family.lora_key_layout``)."""
    return family is not None and family.lora_key_layout == "sdxl"


def family_of_models(unet: Any, text_encoders: list | None = None) -> Family:
    """Family of a diffusers ``UNet2DConditionModel`` (plus text encoders, used as a tie-breaker).

    SDXL has size/crop conditioning (``addition_embed_type == "text_time"``) and two text encoders;
    SD2 uses linear projections in its transformer blocks, SD1 1x1 convolutions.
    """
    cfg = getattr(unet, "config", {}) or {}
    get = cfg.get if hasattr(cfg, "get") else lambda k, d=None: getattr(cfg, k, d)
    if get("addition_embed_type", None) == "text_time" or (text_encoders is not None and len(text_encoders) == 2):
        return Family.SDXL
    if get("use_linear_projection", False):
        return Family.SD2
    return Family.SD1


def family_from_metadata(metadata: Mapping[str, str] | None) -> Family | None:
    """Family named by kohya's ``ss_base_model_version`` / ``ss_v2`` or ``modelspec.architecture``."""
    if not metadata:
        return None
    version = metadata.get("ss_base_model_version", "")
    if version.startswith("sdxl"):
        return Family.SDXL
    if version.startswith("sd_v2"):
        return Family.SD2
    if version.startswith("sd_v1"):
        return Family.SD1
    arch = metadata.get("modelspec.architecture", "")
    if arch:
        from library.models.modelspec import family_from_architecture

        fam = family_from_architecture(arch)
        if fam is not None:
            return fam
    if metadata.get("ss_v2") == "True":
        return Family.SD2
    return None


def family_of_weights(weights_sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> Family | None:
    """Which family a LoRA state dict was made for, from its key layout (and metadata for SD1 vs SD2).

    Returns ``None`` when the keys do not tell (e.g. a file with no recognisable LoRA keys). SD1 and
    SD2 share a layout; they differ in ``proj_in`` (1x1 conv in SD1, linear in SD2), used when the
    metadata is silent.
    """
    keys = list(weights_sd.keys())
    if any(k.startswith((PREFIX_TE1 + "_", PREFIX_TE2 + "_")) or k.startswith(_SGM_UNET_PREFIXES) for k in keys):
        return Family.SDXL
    if any(_RE_DEEP_TRANSFORMER.match(k) for k in keys) or family_from_metadata(metadata) is Family.SDXL:
        return Family.SDXL
    if not any(k.startswith((PREFIX_TE + "_", PREFIX_UNET + "_")) for k in keys):
        return None
    named = family_from_metadata(metadata)
    if named is not None and named is not Family.SDXL:
        return named
    for k in keys:
        if k.endswith("proj_in." + SUFFIX_DOWN) and k.startswith(_DIFFUSERS_UNET_PREFIXES):
            return Family.SD1 if weights_sd[k].dim() == 4 else Family.SD2
    return Family.SD1


def split_key(key: str) -> tuple[str, str] | None:
    """``lora_unet_x.lora_down.weight`` -> (``lora_unet_x``, ``lora_down.weight``); None if not LoRA."""
    if "." not in key:
        return None
    name, _, suffix = key.partition(".")
    return name, suffix


def dims_and_alphas(weights_sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, int], dict[str, float]]:
    """Per-module rank (rows of ``lora_down``) and alpha; files without alpha get alpha = rank (kohya)."""
    dims: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for key, value in weights_sd.items():
        parts = split_key(key)
        if parts is None:
            continue
        name, suffix = parts
        if suffix == SUFFIX_ALPHA:
            alphas[name] = float(value.detach().float().item())
        elif suffix == SUFFIX_DOWN:
            dims[name] = int(value.shape[0])
    for name, dim in dims.items():
        alphas.setdefault(name, float(dim))
    return dims, {n: a for n, a in alphas.items() if n in dims}


def sdxl_diffusers_name_aliases(unet: torch.nn.Module, layout: Any) -> dict[str, str]:
    """For an SDXL UNet: ``lora_unet_<diffusers path>`` -> ``lora_unet_<sgm path>`` of every Linear/Conv2d.

    Used to read SDXL LoRAs whose UNet keys use diffusers names; sdtk always writes sgm names.
    """
    aliases = {}
    for path, module in unet.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            try:
                aliases[unet_lora_name(path)] = unet_lora_name(path, layout)
            except KeyError:  # a module the original layout does not name
                continue
    return aliases


def rename_modules(weights_sd: Mapping[str, torch.Tensor], aliases: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """``weights_sd`` with module prefixes renamed through ``aliases`` (others unchanged)."""
    out = {}
    for key, value in weights_sd.items():
        name, dot, suffix = key.partition(".")
        out[f"{aliases.get(name, name)}{dot}{suffix}"] = value
    return out


_RE_TE_WITHOUT_TEXT_MODEL = re.compile(r"^(lora_te[12]?)_(encoder|embeddings|final_layer_norm)_")


def add_text_model_prefix(weights_sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Insert the missing ``text_model_`` into text-encoder keys (``lora_te_encoder_...``).

    Tools that name modules from transformers 5's ``CLIPTextModel`` (which lost its ``text_model``
    submodule), e.g. LyCORIS run on transformers 5, write such keys; A1111 and kohya expect
    ``lora_te_text_model_encoder_...``. Use on foreign files before loading, or to repair them.
    """
    return {_RE_TE_WITHOUT_TEXT_MODEL.sub(r"\1_text_model_\2_", k): v for k, v in weights_sd.items()}

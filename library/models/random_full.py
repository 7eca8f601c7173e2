"""Full-size SD1.5 / SD2.x / SDXL base models with random weights, written as downloaded single files.

The architectures are the real ones (the shipped configs in ``library/models/configs``: SD1.5 UNet +
CLIP ViT-L/14 with 12 layers; SD2.x UNet + OpenCLIP ViT-H with 23 used layers and the unused 24th
in the file; SDXL base UNet + CLIP ViT-L + OpenCLIP bigG with 32 layers and a 1280 projection), every
text encoder with the real 49,408-token table. Used by the ``fullsize`` test tier and the benchmarks,
where real shapes matter (index arithmetic, memory, speed) but trained weights do not.

Building is cheap: the modules are created on the meta device in the file's precision, then given
uninitialised memory and filled in place (normal weights scaled by ``1/sqrt(fan_in)``, embeddings with
std 0.02, norms weight 1 / bias 0, other biases 0) instead of running each layer's default
initialisation in float32. Every tensor is seeded from ``(seed, its name)``, so a file is the same
for a seed whatever order the tensors are visited in.

The file is what a user downloads: original-layout keys from sdtk's own writer
(:func:`library.models.saving.to_original_state_dict`), no sdtk metadata (the family and
architecture must be detected from the keys), plus the keys real checkpoints carry that no
diffusers component uses (the DDPM schedule of SD1/SD2 files, SD1's ``position_ids``, OpenCLIP's
``logit_scale`` and SD2's ``text_projection``).
"""

from __future__ import annotations

import logging
import math
import zlib
from pathlib import Path

import torch

from library.models.families import Family

logger = logging.getLogger(__name__)

# bump when the weights or the keys written change, so kept copies (SDTK_FULLSIZE_DIR) are rebuilt
BUILD_VERSION = 1
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32}


def _fill_(module: torch.nn.Module, prefix: str, seed: int) -> None:
    """Fill every parameter and buffer of ``module`` (on uninitialised CPU memory) in place."""
    norms = (torch.nn.LayerNorm, torch.nn.GroupNorm)
    for mod_name, mod in module.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            full = f"{prefix}{mod_name}.{p_name}"
            with torch.no_grad():
                if isinstance(mod, norms):
                    p.fill_(1.0 if p_name == "weight" else 0.0)
                elif p_name == "bias" or p.ndim < 2:
                    p.zero_()
                else:
                    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(full.encode()))
                    std = 0.02 if isinstance(mod, torch.nn.Embedding) else 1.0 / math.sqrt(p[0].numel())
                    p.normal_(0.0, std, generator=g)
        for b_name, b in mod.named_buffers(recurse=False):
            if b_name == "position_ids":  # CLIP's [1, 77] token positions
                b.copy_(torch.arange(b.shape[-1]).expand_as(b))
            else:
                raise RuntimeError(f"random_full: no fill rule for buffer {prefix}{mod_name}.{b_name}")


def _materialise(module: torch.nn.Module, dtype: torch.dtype, prefix: str, seed: int) -> torch.nn.Module:
    # torch's own ``to``: diffusers' override warns about keeping modules in float32, which none of these need
    module = torch.nn.Module.to(module, dtype=dtype).to_empty(device="cpu")
    _fill_(module, prefix, seed)
    return module.eval().requires_grad_(False)


def random_full_model(family: Family, v_prediction: bool = False, dtype: torch.dtype = torch.float16,
                      seed: int = 0):
    """The full-size model of ``family`` with random weights, as a :class:`~library.models.loading.LoadedModel`.

    Holds the whole model in ``dtype`` (SDXL in fp16: about 6.9 GB; SD1.5: 2.1 GB; SD2.x: 2.6 GB).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    from library.models.loading import LoadedModel, _te_class, shipped_model_config

    cfg = shipped_model_config(family, v_prediction)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg["unet"])
        vae = AutoencoderKL.from_config(cfg["vae"])
        tes = [_te_class(t["cls"])(CLIPTextConfig(**t["config"])) for t in cfg["text_encoders"]]
    unet = _materialise(unet, dtype, "unet.", seed)
    vae = _materialise(vae, dtype, "vae.", seed)
    tes = [_materialise(te, dtype, f"te{i + 1}.", seed) for i, te in enumerate(tes)]
    return LoadedModel(family, unet, vae, tes, [], dict(cfg["scheduler"]), v_prediction, cfg)


def _ldm_schedule(n: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> dict[str, torch.Tensor]:
    """The DDPM buffers SD1/SD2 (LDM) checkpoints carry at top level (scaled-linear betas)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, 0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    return {"betas": betas.float(), "alphas_cumprod": alphas_cumprod.float(), "alphas_cumprod_prev": prev.float(),
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt().float(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt().float()}


def unused_original_keys(family: Family, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """Keys real single files of ``family`` have that no diffusers component reads."""
    if family is Family.SD1:
        extra = _ldm_schedule()
        extra["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
        return extra
    logit_scale = torch.tensor(math.log(1 / 0.07), dtype=dtype)
    if family is Family.SD2:
        g = torch.Generator().manual_seed(seed)
        proj = (torch.randn(1024, 1024, generator=g) / 32.0).to(dtype)
        return {**_ldm_schedule(), "cond_stage_model.model.text_projection": proj,
                "cond_stage_model.model.logit_scale": logit_scale}
    return {"conditioner.embedders.1.model.logit_scale": logit_scale}


def write_random_full_checkpoint(family: Family, path: str | Path, v_prediction: bool = False,
                                 precision: str = "fp16", seed: int = 0) -> Path:
    """Build the random full-size model of ``family`` and write it as a ``.safetensors`` single file."""
    from library.models.saving import to_original_state_dict
    from library.utils.atomic import save_safetensors

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: a full-size random model is written as .safetensors")
    dtype = DTYPES[precision]
    model = random_full_model(family, v_prediction, dtype, seed)
    sd = to_original_state_dict(model)
    del model
    sd.update(unused_original_keys(family, dtype, seed))
    save_safetensors(sd, path, {"format": "pt"})
    logger.info("wrote random full-size %s model (%d tensors, %s) to %s", family.pretty, len(sd), precision, path)
    return path

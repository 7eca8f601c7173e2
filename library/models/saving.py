"""Save a base model as a single file in the original layout or as a diffusers folder, atomically.

``--save_model_as``: ``safetensors`` / ``ckpt`` (single file) or ``diffusers`` / ``diffusers_safetensors``
(folder); ``--save_precision``: ``fp16`` / ``bf16`` / ``float`` (``None`` keeps each tensor's dtype).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
import torch

from library.errors import ModelSaveError
from library.models import original_layout as ol
from library.models.checkpoint import METADATA_CONFIG_KEY, CheckpointReader
from library.models.loaded import LoadedModel
from library.utils.atomic import atomic_dir, save_safetensors, save_torch, write_json

logger = logging.getLogger(__name__)

PRECISIONS = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": torch.float32}
SAVE_FORMATS = ("safetensors", "ckpt", "diffusers", "diffusers_safetensors")


def precision_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in PRECISIONS:
        raise ModelSaveError(f"--save_precision {name!r} is not one of {', '.join(PRECISIONS)}")
    return PRECISIONS[name]


def _cast(sd: dict, dtype: torch.dtype | None) -> dict:
    if dtype is None:
        return sd
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


def to_original_state_dict(model: LoadedModel, dtype: torch.dtype | None = None, dry_run: bool = False) -> dict:
    """The model's weights under original-layout keys (``dry_run``: meta tensors, for key names only)."""

    def sd_of(m) -> dict:
        sd = m.state_dict()
        return {k: v.to("meta") for k, v in sd.items()} if dry_run else sd

    out = ol.unet_to_original(sd_of(model.unet), model.model_config["unet"])
    out.update(ol.vae_to_original(sd_of(model.vae), model.model_config["vae"]))
    for te, (prefix, open_clip) in zip(model.text_encoders, model.family.te_prefixes):
        te_sd = sd_of(te)
        part = ol.open_clip_to_original(te_sd, prefix) if open_clip else ol.clip_to_original(te_sd, prefix)
        if model.family.pads_last_te_layer:
            n = te.config.num_hidden_layers
            part.update(ol.sd2_dummy_last_layer(part, prefix, n))
        out.update(part)
    return _cast(out, dtype)


def save_single_file(model: LoadedModel, path: str | Path, save_dtype: torch.dtype | None = None,
                     metadata: dict[str, str] | None = None, epoch: int = 0, global_step: int = 0) -> None:
    """Write the model in the original layout (``.safetensors`` or ``.ckpt`` by suffix).

    Keys the source file had but no component uses (EMA weights, SD2's unused last text-encoder
    layer, ...) are copied back from the source file, so ``load -> save`` loses nothing.
    """
    path = Path(path)
    sd = to_original_state_dict(model, save_dtype)
    if model.passthrough_keys and model.source and Path(model.source).is_file():
        reader = CheckpointReader(model.source, allow_pickle=True)
        extra = reader.read(model.passthrough_keys)
        sd.update(_cast(extra, save_dtype))  # the source's own last SD2 layer wins over the dummy copy
    meta = {METADATA_CONFIG_KEY: json.dumps(model.model_config)}
    meta.update(metadata or {})
    if path.suffix.lower() == ".safetensors":
        save_safetensors(sd, path, meta)
    elif path.suffix.lower() in (".ckpt", ".pt"):
        save_torch({"state_dict": sd, "epoch": epoch, "global_step": global_step, **meta}, path)
    else:
        raise ModelSaveError(f"{path}: a single-file model must end in .safetensors or .ckpt")
    logger.info("saved %s model to %s", model.family.pretty, path)


def _model_index(model: LoadedModel) -> dict:
    import diffusers

    family = model.family
    idx = {
        "_class_name": family.pipeline_name,
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", family.scheduler_name],
        "text_encoder": ["transformers", type(model.text_encoders[0]).__name__],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    for i, te in enumerate(model.text_encoders[1:], start=2):
        idx.update({f"text_encoder_{i}": ["transformers", type(te).__name__],
                    f"tokenizer_{i}": ["transformers", "CLIPTokenizer"]})
    idx.update(family.model_index_extras())
    return idx


def save_diffusers(model: LoadedModel, folder: str | Path, save_dtype: torch.dtype | None = None,
                   use_safetensors: bool = True) -> None:
    """Write a diffusers folder (replacing ``folder`` atomically as a whole)."""
    with atomic_dir(folder) as tmp:
        index = _model_index(model)
        write_json(tmp / "model_index.json", index)
        sched = dict(model.scheduler_config, _class_name=index["scheduler"][1])
        write_json(tmp / "scheduler" / "scheduler_config.json", sched)
        _save_component(model.unet, tmp / "unet", save_dtype, use_safetensors, "diffusion_pytorch_model")
        _save_component(model.vae, tmp / "vae", save_dtype, use_safetensors, "diffusion_pytorch_model")
        for i, (te, tok) in enumerate(zip(model.text_encoders, model.tokenizers)):
            sfx = "" if i == 0 else f"_{i + 1}"
            _save_component(te, tmp / f"text_encoder{sfx}", save_dtype, use_safetensors, "model")
            tok.save_pretrained(str(tmp / f"tokenizer{sfx}"))
    logger.info("saved %s model to %s (diffusers)", model.family.pretty, folder)


def _save_component(module, folder: Path, dtype, use_safetensors: bool, stem: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if hasattr(module, "save_config"):  # diffusers ModelMixin
        module.save_config(str(folder))
    else:  # transformers PreTrainedModel
        module.config.save_pretrained(str(folder))
    sd = _cast(module.state_dict(), dtype)
    if use_safetensors:
        save_safetensors(sd, folder / f"{stem}.safetensors", {"format": "pt"})
    else:
        save_torch(sd, folder / ("pytorch_model.bin" if stem == "model" else f"{stem}.bin"))


def save_model(model: LoadedModel, path: str | Path, save_model_as: str, save_precision: str | None = None,
               metadata: dict[str, str] | None = None) -> None:
    """Save in one of kohya's ``--save_model_as`` formats."""
    dtype = precision_dtype(save_precision)
    if save_model_as in ("diffusers", "diffusers_safetensors"):
        save_diffusers(model, path, dtype, use_safetensors=save_model_as == "diffusers_safetensors")
    elif save_model_as in ("safetensors", "ckpt"):
        path = Path(path)
        want = "." + save_model_as
        if path.suffix.lower() != want:
            path = path.with_suffix(want)
        save_single_file(model, path, dtype, metadata)
    else:
        raise ModelSaveError(f"--save_model_as {save_model_as!r} is not one of {', '.join(SAVE_FORMATS)}")

"""Saving a trained full model in kohya's formats: original-layout single file or diffusers folder.

kohya's rule for the format (``train_db.py``, ``fine_tune.py``, ``sdxl_train.py``):

- ``--save_model_as ckpt | safetensors``: one file in the original (Stability AI) layout, which
  A1111, ComfyUI and diffusers' ``from_single_file`` load;
- ``--save_model_as diffusers | diffusers_safetensors``: a diffusers folder (weights as ``.bin``
  or ``.safetensors``);
- no ``--save_model_as``: the layout of the source model (a file stays a file, a folder a
  folder), with ``.safetensors`` weights only when ``--use_safetensors`` is given.

Weights are written tensor by tensor (:mod:`.stream_save`: safetensors, and torch's zip format for
``.ckpt`` / ``.bin``), so a save never holds a second full copy of the model.
Every output is written atomically (temp name, then rename).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from library.errors import ModelSaveError
from library.models import original_layout as ol
from library.models.checkpoint import METADATA_CONFIG_KEY, CheckpointReader
from library.models.families import Family
from library.training.targets.stream_save import save_safetensors_streaming, save_torch_streaming
from library.utils.atomic import atomic_dir, write_json

logger = logging.getLogger(__name__)

# keys of a source file that must not be copied into a trained model: the source's EMA weights
# are of the untrained model (kohya copies them; a loader that prefers EMA would undo the training)
_STALE_PREFIXES = ("model_ema.",)


@dataclass(frozen=True)
class SaveFormat:
    """How a full model is written: one original-layout file or a diffusers folder."""

    single_file: bool
    safetensors: bool

    @property
    def suffix(self) -> str:
        """What follows the output name: ``.safetensors`` / ``.ckpt``, or nothing for a folder."""
        if not self.single_file:
            return ""
        return ".safetensors" if self.safetensors else ".ckpt"

    @property
    def name(self) -> str:
        if self.single_file:
            return "safetensors" if self.safetensors else "ckpt"
        return "diffusers_safetensors" if self.safetensors else "diffusers"


def resolve_format(save_model_as: str | None, use_safetensors: bool, source: str | None) -> SaveFormat:
    """kohya's choice of format (see the module docstring)."""
    if save_model_as is None:
        single = source is not None and Path(source).is_file()
        return SaveFormat(single, bool(use_safetensors))
    kind = save_model_as.lower()
    return SaveFormat(kind in ("ckpt", "safetensors"), bool(use_safetensors) or "safetensors" in kind)


def check_output_path(path: Path, fmt: SaveFormat) -> None:
    """Refuse to replace a file with a folder or a folder with a file (nothing is written).

    Raises:
        ModelSaveError: ``path`` exists and is of the other kind.
    """
    if fmt.single_file and path.is_dir():
        raise ModelSaveError(f"{path} is a folder, but --save_model_as {fmt.name} writes a file there; "
                             "remove it or choose another --output_name")
    if not fmt.single_file and path.exists() and not path.is_dir():
        raise ModelSaveError(f"{path} is a file, but --save_model_as {fmt.name} writes a diffusers folder there; "
                             "remove it or choose another --output_name / --output_dir")


def original_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The model's weights under original-layout keys, as references (no copy of the weights)."""
    from library.models.saving import to_original_state_dict

    sd = to_original_state_dict(model, None)
    if model.passthrough_keys and model.source and Path(model.source).is_file():
        keep = [k for k in model.passthrough_keys if not k.startswith(_STALE_PREFIXES)]
        if keep:  # e.g. SD2's unused last text-encoder layer: the source's own wins over the dummy copy
            sd.update(CheckpointReader(model.source, allow_pickle=True).read(keep))
    return sd


def save_full_model(model: Any, path: Path, fmt: SaveFormat, save_dtype: torch.dtype | None,
                    metadata: dict[str, str], epoch: int, global_step: int) -> None:
    """Write ``model`` (a ``LoadedModel`` being trained) to ``path`` in ``fmt``."""
    check_output_path(path, fmt)
    if fmt.single_file:
        meta = {METADATA_CONFIG_KEY: json.dumps(model.model_config), **metadata}
        sd = original_state_dict(model)
        if fmt.safetensors:
            save_safetensors_streaming(sd, path, meta, save_dtype)
        else:
            save_torch_streaming({"state_dict": sd, "epoch": epoch, "global_step": global_step, **meta}, path,
                                 save_dtype)
    else:
        save_diffusers_streaming(model, path, save_dtype, fmt.safetensors)
    logger.info("saved %s model to %s (%s)", model.family.pretty, path, fmt.name)


def save_diffusers_streaming(model: Any, folder: Path, save_dtype: torch.dtype | None, use_safetensors: bool) -> None:
    """A diffusers folder (replacing ``folder`` atomically as a whole), weights written per tensor."""
    from library.models.saving import _model_index

    with atomic_dir(folder) as tmp:
        index = _model_index(model)
        write_json(tmp / "model_index.json", index)
        write_json(tmp / "scheduler" / "scheduler_config.json",
                   dict(model.scheduler_config, _class_name=index["scheduler"][1]))
        _component(model.unet, tmp / "unet", save_dtype, use_safetensors, "diffusion_pytorch_model")
        _component(model.vae, tmp / "vae", save_dtype, use_safetensors, "diffusion_pytorch_model")
        for i, (te, tok) in enumerate(zip(model.text_encoders, model.tokenizers)):
            sfx = "" if i == 0 else f"_{i + 1}"
            _component(te, tmp / f"text_encoder{sfx}", save_dtype, use_safetensors, "model")
            tok.save_pretrained(str(tmp / f"tokenizer{sfx}"))


def _component(module: torch.nn.Module, folder: Path, dtype: torch.dtype | None, use_safetensors: bool,
               stem: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if hasattr(module, "save_config"):  # diffusers ModelMixin
        module.save_config(str(folder))
    else:  # transformers PreTrainedModel
        module.config.save_pretrained(str(folder))
    sd = module.state_dict()
    if use_safetensors:
        save_safetensors_streaming(sd, folder / f"{stem}.safetensors", {"format": "pt"}, dtype)
    else:
        save_torch_streaming(sd, folder / ("pytorch_model.bin" if stem == "model" else f"{stem}.bin"), dtype)


def full_model_metadata(s: Any, family: Family) -> dict[str, str]:
    """SAI modelspec of a full checkpoint (what kohya writes into full-model saves)."""
    from library.models.modelspec import build_modelspec

    a = s.args
    resolution = a.resolution
    if not resolution and s.group.datasets and s.group.datasets[0].params.resolution:
        resolution = tuple(s.group.datasets[0].params.resolution)
    timesteps = None
    if a.min_timestep is not None or a.max_timestep is not None:
        timesteps = (a.min_timestep or 0, a.max_timestep or 1000)
    return build_modelspec(family, v_parameterization=s.v_prediction, lora=False, is_stable_diffusion_ckpt=True,
                           resolution=resolution, title=a.metadata_title or a.output_name,
                           author=a.metadata_author, description=a.metadata_description,
                           license=a.metadata_license, tags=a.metadata_tags, timesteps=timesteps,
                           clip_skip=a.clip_skip)

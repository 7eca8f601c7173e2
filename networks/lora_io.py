"""Reading and writing LoRA files, and checking a file fits a model before loading it."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from library.errors import ModelLoadError, ModelSaveError
from library.models.families import Family
from library.models.hashes import precalculate_safetensors_hashes
from library.utils.atomic import save_safetensors, save_torch
from networks import lora_keys as keys

logger = logging.getLogger(__name__)


def load_state_dict_file(file: str | os.PathLike | None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a ``.safetensors`` file or a torch pickle (``.ckpt``/``.pt``/``.bin``).

    Raises:
        ModelLoadError: missing or unreadable file.
    """
    if file is None:
        raise ModelLoadError("no LoRA file given")
    path = Path(file)
    if not path.is_file():
        raise ModelLoadError(f"LoRA file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                metadata = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            return tensors, metadata
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors and torch raise many types for corrupt files
        raise ModelLoadError(f"cannot read LoRA file {path}: {e}") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ModelLoadError(f"{path} does not hold a state dict")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}, {}


def _family_text(family: Family | None) -> str:
    return "SD1.x/SD2.x" if family is None else family.pretty


def check_compatible(
    weights_sd: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None,
    network: Any | None,
    file: Any,
    base_family: Family | None = None,
) -> None:
    """Raise a clear :class:`ModelLoadError` if a LoRA state dict does not fit the model.

    Checks the model family (from key layout / metadata) and, when ``network`` is given, that every
    tensor of the file whose module exists in the network has the network's shape.
    """
    if base_family is None and network is not None:
        base_family = network.family
    file_family = keys.family_of_weights(weights_sd, metadata)
    if base_family is not None and file_family is not None:
        sdxl_mismatch = keys.uses_sdxl_layout(file_family) != keys.uses_sdxl_layout(base_family)
        sd12_known = keys.family_from_metadata(metadata) is not None or any("proj_in" in k for k in weights_sd)
        if sdxl_mismatch or (file_family.root is not base_family.root and sd12_known):
            script = base_family.train_network_script
            raise ModelLoadError(
                f"{file}: this LoRA was made for {_family_text(file_family)} but the base model is "
                f"{_family_text(base_family)}; use a base model of the LoRA's family "
                f"(SDXL LoRAs: sdxl_train_network.py, SD1.x/SD2.x: train_network.py — current script: {script})"
            )
    if network is None:
        return
    own = network.state_dict()
    wrong_shape, rank_only = [], True
    for key, value in weights_sd.items():
        if key in own and own[key].shape != value.shape:
            wrong_shape.append(f"{key}: file {tuple(value.shape)}, model {tuple(own[key].shape)}")
            if key.endswith(keys.SUFFIX_DOWN):
                rank_only &= value.shape[1:] == own[key].shape[1:]
            elif key.endswith(keys.SUFFIX_UP):
                rank_only &= value.shape[0] == own[key].shape[0]
    if wrong_shape:
        hint = (
            "its ranks differ from --network_dim/conv_dim: pass --dim_from_weights to take them from the file"
            if rank_only
            else f"it was made for a model with other layer sizes (another {_family_text(file_family)} variant?)"
        )
        shown = "; ".join(wrong_shape[:3]) + (f"; and {len(wrong_shape) - 3} more" if len(wrong_shape) > 3 else "")
        raise ModelLoadError(f"{file}: {len(wrong_shape)} tensors do not fit this model — {hint}. {shown}")


def save_network_weights(
    state_dict: Mapping[str, torch.Tensor], file: str | os.PathLike, dtype: torch.dtype | None, metadata: Mapping[str, str] | None
) -> None:
    """Write a LoRA state dict atomically as kohya does.

    ``.safetensors`` files get ``sshs_model_hash`` / ``sshs_legacy_hash`` added to the metadata
    (computed on the tensors as written); other suffixes are written with ``torch.save`` (no metadata).

    Raises:
        ModelSaveError: the destination cannot be written.
    """
    tensors = {k: v.detach().clone().to("cpu", dtype=dtype or v.dtype).contiguous() for k, v in state_dict.items()}
    if Path(file).suffix == ".safetensors":
        meta = {str(k): str(v) for k, v in (metadata or {}).items()}
        meta["sshs_model_hash"], meta["sshs_legacy_hash"] = precalculate_safetensors_hashes(tensors, meta)
        try:
            save_safetensors(tensors, file, meta)
        except OSError as e:
            raise ModelSaveError(f"cannot write {file}: {e}") from e
    else:
        try:
            save_torch(tensors, file)
        except OSError as e:
            raise ModelSaveError(f"cannot write {file}: {e}") from e

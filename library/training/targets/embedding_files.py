"""Embedding files: what textual inversion writes and what ``--weights`` reads.

Written (atomically):

* ``.safetensors`` (sdtk's default), kohya's layout: ``{"emb_params": [n, D]}`` for SD 1.x / 2.x,
  ``{"clip_l": [n, 768], "clip_g": [n, 1280]}`` for SDXL; metadata: SAI ModelSpec
  (``.../textual-inversion``), ``ss_token_string``, ``ss_num_vectors_per_token``, steps and epoch.
* ``.pt`` / ``.ckpt`` (only with ``--save_model_as pt`` / ``ckpt``; kohya's default is ``pt``), a
  pickle: SD 1.x / 2.x in A1111's layout ``{"string_to_token": {"*": 265}, "string_to_param":
  {"*": [n, D]}, "name": TOKEN, "step": steps, "sd_checkpoint": None, "sd_checkpoint_name": None}``
  (kohya pickles ``{"emb_params": ...}`` instead; A1111, ComfyUI and diffusers read both); SDXL
  ``{"clip_l": ..., "clip_g": ...}`` as kohya and A1111 write it (A1111 reads every value of an SDXL
  file as a tensor, so nothing else goes in).

Read by ``--weights``: every layout gen_img reads (:func:`library.inference.textual_inversion.parse_embedding`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from library.config.settings import flag_values
from library.errors import ConfigError

A1111_STAR_TOKEN_ID = 265  # the id of "*" in CLIP's vocabulary, as A1111 records it


def embedding_metadata(s: Any, args: Any, steps: int, epoch: int) -> dict[str, str]:
    """Safetensors metadata of one save: the session's keys, this save's counters and ModelSpec."""
    from library.models.modelspec import build_modelspec

    a = args
    resolution = a.resolution
    if not resolution and s.group.datasets and s.group.datasets[0].params.resolution:
        resolution = tuple(s.group.datasets[0].params.resolution)
    timesteps = None
    if a.min_timestep is not None or a.max_timestep is not None:
        timesteps = (a.min_timestep or 0, a.max_timestep or 1000)
    flags = flag_values(a)
    extra = {k: flags[f"metadata_{k}"] for k in ("usage_hint", "trigger_phrase", "thumbnail", "preprocessor",
                                                 "is_negative_embedding") if flags[f"metadata_{k}"]}
    md = {**s.metadata, "ss_steps": str(steps), "ss_epoch": str(epoch)}
    md.update(build_modelspec(s.model.family, v_parameterization=s.v_prediction, lora=False, textual_inversion=True,
                              resolution=resolution, title=a.metadata_title or a.output_name,
                              author=a.metadata_author, description=a.metadata_description,
                              license=a.metadata_license, tags=a.metadata_tags, merged_from=a.metadata_merged_from,
                              timesteps=timesteps, clip_skip=a.clip_skip, extra=extra))
    return md


def save_embedding(path: Path, tensors: dict[str, torch.Tensor], s: Any, args: Any, steps: int, epoch: int) -> None:
    """Write ``tensors`` (``{key: [n, D]}``) to ``path`` in the format its suffix names (see the module doc)."""
    from library.utils.atomic import save_safetensors, save_torch

    if path.suffix == ".safetensors":
        save_safetensors(tensors, path, embedding_metadata(s, args, steps, epoch))
    elif s.model.family.n_text_encoders > 1 or len(tensors) != 1:
        save_torch(dict(tensors), path)
    else:
        (vectors,) = tensors.values()
        save_torch({"string_to_token": {"*": A1111_STAR_TOKEN_ID}, "string_to_param": {"*": vectors},
                    "name": args.token_string, "step": steps, "sd_checkpoint": None, "sd_checkpoint_name": None},
                   path)


def read_embedding_file(path: str, allow_pickle: bool) -> list[torch.Tensor]:
    """``--weights``: the ``[n, D]`` vectors per text encoder of an embedding file (any layout gen_img reads)."""
    from library.inference.textual_inversion import parse_embedding, read_state

    where = f"--weights {path}"
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{where}: file not found")
    state = read_state(p, allow_pickle, "--weights")
    return parse_embedding(state, where)

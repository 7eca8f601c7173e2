"""Stability AI ModelSpec metadata (``modelspec.*`` keys) as kohya sd-scripts writes it.

ModelSpec (https://github.com/Stability-AI/ModelSpec) is the metadata A1111, ComfyUI and model
hubs read to tell which base architecture a file belongs to. kohya writes it into every LoRA and
checkpoint it saves (even with ``--no_metadata``); sdtk writes the same keys with the same values, so
tools that sort or filter LoRAs by ``modelspec.architecture`` treat sdtk's files like kohya's.

Values, per kohya's ``library/sai_model_spec.py``:

==========================  ====================================================================
key                         value
==========================  ====================================================================
sai_model_spec              ``1.0.1``
architecture                ``stable-diffusion-v1`` / ``stable-diffusion-v2-512`` /
                            ``stable-diffusion-v2-768-v`` / ``stable-diffusion-xl-v1-base``,
                            plus ``/lora`` or ``/textual-inversion`` for adapters
implementation              ``https://github.com/Stability-AI/generative-models`` for SDXL LoRAs,
                            textual inversion and full checkpoints; ``diffusers`` for SD1/SD2 LoRAs
title                       ``--metadata_title`` or the output name; default ``LoRA@<timestamp>``
resolution                  ``WxH``; default 512x512, 768x768 (SD2 v), 1024x1024 (SDXL)
prediction_type             ``epsilon`` or ``v``
date                        ISO-8601 local time of the save, whole seconds
implementation_version      ``sdtk/<version>`` (kohya: ``sd-scripts/<commit>``)
author, description,        only when given
license, tags, merged_from,
usage_hint, trigger_phrase,
thumbnail, timestep_range,
encoder_layer (clip skip)
==========================  ====================================================================
"""

from __future__ import annotations

import datetime
from typing import Mapping

from library.models.families import Family, families

SPEC_VERSION = "1.0.1"

# each family module states its own architecture ids; kohya's names for them:
ARCH_SD_V1 = Family.SD1.modelspec_architecture(False)  # "stable-diffusion-v1"
ARCH_SD_V2_512 = Family.SD2.modelspec_architecture(False)  # "stable-diffusion-v2-512"
ARCH_SD_V2_768_V = Family.SD2.modelspec_architecture(True)  # "stable-diffusion-v2-768-v"
ARCH_SD_XL_V1_BASE = Family.SDXL.modelspec_architecture(False)  # "stable-diffusion-xl-v1-base"

ADAPTER_LORA = "lora"
ADAPTER_TEXTUAL_INVERSION = "textual-inversion"

IMPL_STABILITY_AI = "https://github.com/Stability-AI/generative-models"
IMPL_DIFFUSERS = "diffusers"

PRED_TYPE_EPSILON = "epsilon"
PRED_TYPE_V = "v"

TITLE_KEY = "modelspec.title"
ARCHITECTURE_KEY = "modelspec.architecture"


def _implementation_version() -> str:
    try:
        from importlib.metadata import version

        return f"sdtk/{version('sdtk')}"
    except Exception:  # not installed as a distribution (running from a checkout)
        return "sdtk/0.1.0"


def architecture(family: Family | str, v_parameterization: bool, lora: bool, textual_inversion: bool = False) -> str:
    """The ``modelspec.architecture`` id, e.g. ``stable-diffusion-v2-768-v/lora``."""
    arch = Family(family).modelspec_architecture(v_parameterization)
    if lora:
        arch += f"/{ADAPTER_LORA}"
    elif textual_inversion:
        arch += f"/{ADAPTER_TEXTUAL_INVERSION}"
    return arch


def family_from_architecture(arch: str) -> Family | None:
    """Inverse of :func:`architecture` (adapter suffix ignored); ``None`` for other architectures.

    A variant family sharing its base's architecture string maps to the base (the first registered)."""
    base = arch.split("/")[0]
    for family in families():
        if base in family.modelspec_architectures:
            return family
    return None


def resolution_string(resolution: int | str | tuple[int, ...] | list[int] | None, family: Family, v_parameterization: bool) -> str:
    """``"WxH"`` from an int, ``"W,H"`` string or (W, H); the family's default when ``None``."""
    if resolution is None:
        reso: tuple[int, ...] = tuple(Family(family).resolution(v_parameterization))
    elif isinstance(resolution, str):
        reso = tuple(int(s) for s in resolution.split(","))
    elif isinstance(resolution, int):
        reso = (resolution, resolution)
    else:
        reso = tuple(int(r) for r in resolution)
    if len(reso) == 1:
        reso = (reso[0], reso[0])
    return f"{reso[0]}x{reso[1]}"


def build_modelspec(
    family: Family | str,
    v2: bool | None = None,
    v_parameterization: bool = False,
    lora: bool = True,
    resolution: int | str | tuple[int, ...] | list[int] | None = None,
    title: str | None = None,
    *,
    timestamp: float | None = None,
    textual_inversion: bool = False,
    is_stable_diffusion_ckpt: bool | None = None,
    author: str | None = None,
    description: str | None = None,
    license: str | None = None,
    tags: str | None = None,
    merged_from: str | None = None,
    timesteps: tuple[int, int] | int | None = None,
    clip_skip: int | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The ``modelspec.*`` metadata of a saved model or adapter, as kohya writes it.

    Args:
        family: base-model family. ``v2=True`` with ``family="sd1"`` is treated as SD2 (kohya's flag).
        v2: kohya's ``--v2``; optional since the family already says it.
        v_parameterization: the model predicts v (``--v_parameterization``).
        lora: an adapter of type LoRA (``/lora`` suffix).
        resolution: training resolution (int, ``"W,H"`` or (W, H)); ``None`` for the family default.
        title: ``--metadata_title`` (kohya's trainer passes the output name when unset).
        timestamp: seconds since the epoch of the save (default: now); gives ``date`` and default title.
        textual_inversion: an embedding (``/textual-inversion`` suffix).
        is_stable_diffusion_ckpt: a full checkpoint in the original layout (implementation = sgm).
        author, description, license, tags, merged_from: ``--metadata_*`` values, written when given.
        timesteps: ``(min, max)`` training timesteps, written as ``modelspec.timestep_range``.
        clip_skip: written as ``modelspec.encoder_layer``.
        extra: more fields (``usage_hint``, ``trigger_phrase``, ``thumbnail``...), with or without the
            ``modelspec.`` prefix.

    Returns:
        ``{"modelspec.<field>": str}``; every value is a string (safetensors metadata requirement).
    """
    family = Family(family)
    if v2 and family is Family.SD1:
        family = Family.SD2
    if timestamp is None:
        timestamp = datetime.datetime.now().timestamp()
    if not lora and not textual_inversion and is_stable_diffusion_ckpt is None:
        is_stable_diffusion_ckpt = True
    sgm = (lora and family.modelspec_lora_sgm) or textual_inversion or bool(is_stable_diffusion_ckpt)
    if title is None:
        title = ("LoRA" if lora else "TextualInversion" if textual_inversion else "Checkpoint") + f"@{timestamp}"

    fields: dict[str, str | None] = {
        "sai_model_spec": SPEC_VERSION,
        "architecture": architecture(family, v_parameterization, lora, textual_inversion),
        "implementation": IMPL_STABILITY_AI if sgm else IMPL_DIFFUSERS,
        "title": title,
        "resolution": resolution_string(resolution, family, v_parameterization),
        "description": description,
        "author": author,
        "date": datetime.datetime.fromtimestamp(int(timestamp)).isoformat(),
        "license": license,
        "tags": tags,
        "merged_from": merged_from,
        "prediction_type": PRED_TYPE_V if v_parameterization else PRED_TYPE_EPSILON,
        "timestep_range": None,
        "encoder_layer": None if clip_skip is None else str(clip_skip),
        "implementation_version": _implementation_version(),
    }
    if timesteps is not None:
        ts = (timesteps, timesteps) if isinstance(timesteps, (int, str)) else tuple(timesteps)
        if len(ts) == 1:
            ts = (ts[0], ts[0])
        fields["timestep_range"] = f"{ts[0]},{ts[1]}"
    for key, value in (extra or {}).items():
        fields[key.removeprefix("modelspec.")] = value
    return {f"modelspec.{k}": str(v) for k, v in fields.items() if v is not None}

"""Load a Stable Diffusion base model — single file (original layout) or diffusers folder — offline.

One entry point, :func:`load_models`, with kohya's options (``--pretrained_model_name_or_path``,
``--v2``, ``--v_parameterization``, ``--vae``, ``--tokenizer_cache_dir``). The family (SD1.x, SD2.x,
SDXL) is detected from the file's keys or the folder's configs. Single files are read tensor by
tensor into meta-initialised models, so peak memory stays near one copy of the weights.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Iterable

import torch

from library.errors import ModelLoadError
from library.models import original_layout as ol
from library.models.checkpoint import CheckpointReader
from library.models.families import Family, detection_order
from library.models.loaded import LoadedModel, te_config_dict
from library.models.tokenizers import load_tokenizers

__all__ = ["LoadedModel", "detect_family_from_keys", "load_models", "load_single_file", "load_diffusers_folder",
           "load_vae", "shipped_model_config"]

_te_config_dict = te_config_dict  # the older private name (benchmarks)

logger = logging.getLogger(__name__)


def shipped_model_config(family: Family, v_parameterization: bool = False) -> dict:
    """The diffusers configs of the real architecture of ``family`` (shipped with sdtk, never downloaded)."""
    return Family(family).full_config(v_parameterization)


# --------------------------------------------------------------------------------- detection
def detect_family_from_keys(keys: Iterable[str], path: str, config: dict | None = None) -> Family:
    """The family of an original-layout checkpoint from its keys (and its embedded sdtk ``config``,
    which tells variant families apart from their base); a clear error for LoRAs, VAEs, refiners."""
    keys = set(keys)
    if any(k.startswith(("lora_unet_", "lora_te", "lora_")) or ".lora_down." in k or ".lora_A." in k for k in keys):
        raise ModelLoadError(
            f"{path} is a LoRA (network weights), not a base model: pass a base checkpoint with "
            "--pretrained_model_name_or_path and the LoRA with --network_weights"
        )
    for family in detection_order():
        if family.matches_keys(keys, config):
            return family
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        raise ModelLoadError(f"{path} is an SDXL refiner checkpoint; sdtk trains SDXL base models only")
    if any(k.startswith(("encoder.conv_in", "decoder.conv_in", "first_stage_model.")) for k in keys) and not any(
        k.startswith("model.diffusion_model.") for k in keys
    ):
        raise ModelLoadError(f"{path} is a VAE, not a full model: pass it with --vae and a base model separately")
    raise ModelLoadError(
        f"{path} is not a Stable Diffusion checkpoint sdtk recognises (no SD1.x/SD2.x/SDXL text-encoder keys found)"
    )


def _check_family(family: Family, v2: bool, expected: Iterable[Family] | None, path: str) -> None:
    if expected is not None and not any(family.is_a(f) for f in expected):
        raise ModelLoadError(
            f"{path} is an {family.pretty} model; use {family.train_network_script} for it "
            f"(this script trains {', '.join(f.pretty for f in expected)})"
        )
    if v2 and not family.v2:
        raise ModelLoadError(f"{path} is an {family.pretty} model but --v2 was given; --v2 is only for SD2.x models")
    if family.v2 and not v2:
        logger.warning("%s is an SD2.x model; treating it as if --v2 had been given", path)


# ------------------------------------------------------------------------------- construction
def _te_class(name: str):
    import transformers

    if name not in ("CLIPTextModel", "CLIPTextModelWithProjection"):
        raise ModelLoadError(f"unsupported text encoder class {name!r}")
    return getattr(transformers, name)


def _empty_models(cfg: dict):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(cfg["unet"])
        vae = AutoencoderKL.from_config(cfg["vae"])
        tes = [_te_class(t["cls"])(CLIPTextConfig(**t["config"])) for t in cfg["text_encoders"]]
    return unet, vae, tes


def _assign(model, sd: dict, what: str, path: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    wrong = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or wrong:
        detail = f"missing {missing[:3]}" if missing else f"shape mismatch for {wrong[:3]}"
        raise ModelLoadError(
            f"{path}: the {what} weights do not fit the expected architecture ({detail}); "
            "the file may be damaged, or of a model type sdtk does not support"
        )
    model.load_state_dict({k: sd[k] for k in own}, strict=True, assign=True)
    model.eval().requires_grad_(False)


def load_single_file(path: str, *, v2: bool = False, v_parameterization: bool = False, allow_pickle: bool = False,
                     dtype: torch.dtype | None = torch.float32, expected: Iterable[Family] | None = None,
                     skip_vae: bool = False, mmap: bool = True):
    """Load UNet, VAE and text encoders from an original-layout file. Returns (LoadedModel without tokenizers)."""
    reader = CheckpointReader(path, allow_pickle=allow_pickle, mmap=mmap)
    cfg = reader.embedded_model_config()
    family = detect_family_from_keys(reader.keys(), path, cfg)
    _check_family(family, v2, expected, path)
    if cfg is not None and cfg.get("family") != family.value:
        cfg = None
    if cfg is None:
        cfg = shipped_model_config(family, v_parameterization)
    v_param = v_parameterization or cfg["scheduler"].get("prediction_type") == "v_prediction"
    if v_param:  # --v_parameterization overrides what an embedded config says
        cfg["scheduler"]["prediction_type"] = "v_prediction"
    unet, vae, tes = _empty_models(cfg)

    _assign(unet, ol.unet_from_original(reader.read_prefix(ol.UNET_PREFIX, dtype), cfg["unet"]), "UNet", path)
    if not skip_vae:
        _assign(vae, ol.vae_from_original(reader.read_prefix(ol.VAE_PREFIX, dtype), cfg["vae"]), "VAE", path)
    for te, (prefix, open_clip) in zip(tes, family.te_prefixes):
        raw = reader.read_prefix(prefix, dtype)
        sd = ol.open_clip_from_original(raw, prefix, te) if open_clip else ol.clip_from_original(raw, prefix)
        if hasattr(te, "text_model"):  # CLIPTextModelWithProjection keeps the wrapper in transformers 5
            sd = {k if k.startswith("text_projection") else "text_model." + k: v for k, v in sd.items()}
        _assign(te, sd, "text encoder", path)
        del raw

    model = LoadedModel(family, unet, vae, tes, [], copy.deepcopy(cfg["scheduler"]), v_param, cfg, str(path))
    produced = set(original_keys_of(model))
    model.passthrough_keys = [k for k in reader.keys() if k not in produced]
    return model


def original_keys_of(model: LoadedModel) -> list[str]:
    """Original-layout keys that saving ``model`` produces (names only; no tensor is copied)."""
    from library.models.saving import to_original_state_dict

    return list(to_original_state_dict(model, dry_run=True).keys())


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _diffusers_family(folder: Path) -> Family:
    unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
    te_cfg = _read_json(folder / "text_encoder" / "config.json")
    index = _read_json(folder / "model_index.json")
    for family in detection_order():
        if family.matches_diffusers(unet_cfg, te_cfg, index):
            return family
    raise ModelLoadError(f"{folder}: a diffusers model of no family sdtk knows")


def load_diffusers_folder(folder: str, *, v2: bool = False, v_parameterization: bool = False,
                          dtype: torch.dtype | None = torch.float32, expected: Iterable[Family] | None = None,
                          skip_vae: bool = False, mmap: bool = True):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    root = Path(folder)
    if not (root / "unet" / "config.json").exists():
        raise ModelLoadError(f"{folder} is not a diffusers model folder (unet/config.json not found)")
    family = _diffusers_family(root)
    _check_family(family, v2, expected, folder)
    kw = _pretrained_kwargs(dtype, mmap)
    _quiet_transformers()
    try:
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **kw)
        vae = None if skip_vae else AutoencoderKL.from_pretrained(folder, subfolder="vae", **kw)
        te_names = family.text_encoder_classes
        tes = [_te_class(cls).from_pretrained(folder, subfolder="text_encoder" + ("" if i == 0 else f"_{i + 1}"), **kw)
               for i, cls in enumerate(te_names)]
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{folder}: cannot load the diffusers model ({str(e).splitlines()[0][:160]})") from e
    sched_path = root / "scheduler" / "scheduler_config.json"
    sched = json.loads(sched_path.read_text()) if sched_path.exists() else shipped_model_config(family)["scheduler"]
    v_param = v_parameterization or sched.get("prediction_type") == "v_prediction"
    if v_param:
        sched["prediction_type"] = "v_prediction"
    for m in [unet, vae, *tes]:
        if m is not None:
            m.eval().requires_grad_(False)
    cfg = {
        "family": family.value,
        "unet": dict(unet.config),
        "vae": dict(vae.config) if vae is not None else shipped_model_config(family)["vae"],
        "text_encoders": [{"cls": type(t).__name__, "config": te_config_dict(t)} for t in tes],
        "scheduler": sched,
    }
    return LoadedModel(family, unet, vae, tes, [], sched, v_param, cfg, str(folder))


def _quiet_transformers() -> None:
    from transformers.utils import logging as tlog

    tlog.disable_progress_bar()


def _pretrained_kwargs(dtype: torch.dtype | None, mmap: bool) -> dict:
    """``from_pretrained`` options: offline, the dtype (None keeps the files'), and no mmap when asked."""
    kw: dict = dict(local_files_only=True)
    if dtype is not None:
        kw["torch_dtype"] = dtype
    if not mmap:
        kw["disable_mmap"] = True
    return kw


def load_vae(path: str, vae_config: dict, dtype: torch.dtype | None = torch.float32, allow_pickle: bool = False,
             mmap: bool = True):
    """Load a VAE given with ``--vae``: a diffusers folder, or a single file (standalone VAE or full model)."""
    from diffusers import AutoencoderKL

    p = Path(path)
    if p.is_dir():
        sub = "vae" if (p / "vae" / "config.json").exists() else None
        try:
            vae = AutoencoderKL.from_pretrained(path, subfolder=sub, **_pretrained_kwargs(dtype, mmap))
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"--vae {path}: not a diffusers VAE folder ({str(e).splitlines()[0][:160]})") from e
    else:
        reader = CheckpointReader(path, allow_pickle=allow_pickle, mmap=mmap)
        keys = reader.keys()
        prefix = ol.VAE_PREFIX if any(k.startswith(ol.VAE_PREFIX) for k in keys) else ""
        if not any(k.startswith(prefix + "encoder.conv_in") for k in keys):
            raise ModelLoadError(f"--vae {path}: no VAE weights found in this file")
        from accelerate import init_empty_weights

        with init_empty_weights():
            vae = AutoencoderKL.from_config(vae_config)
        sd = reader.read([k for k in keys if k.startswith(prefix + "encoder.") or k.startswith(prefix + "decoder.")
                          or k.startswith(prefix + "quant_conv") or k.startswith(prefix + "post_quant_conv")], dtype)
        sd = {ol.VAE_PREFIX + k[len(prefix):]: v for k, v in sd.items()}
        _assign(vae, ol.vae_from_original(sd, vae_config), "VAE", path)
    return vae.eval().requires_grad_(False)


def load_models(path: str, *, v2: bool = False, v_parameterization: bool = False, vae: str | None = None,
                tokenizer_cache_dir: str | None = None, allow_pickle: bool = False,
                dtype: torch.dtype | None = torch.float32, expected: Iterable[Family] | None = None,
                with_tokenizers: bool = True, mmap: bool = True) -> LoadedModel:
    """Load a base model with kohya's options, fully offline.

    Args:
        path: a diffusers folder, or a ``.safetensors`` (``.ckpt`` with ``allow_pickle``) file in the original layout.
        v2: kohya's ``--v2`` (SD2.x); checked against what the file contains.
        v_parameterization: the model predicts v (SD2 768-v models and their fine-tunes).
        vae: optional ``--vae`` replacing the model's VAE.
        tokenizer_cache_dir: kohya's ``--tokenizer_cache_dir``.
        dtype: weights are converted to this dtype while reading (``None`` keeps the file's dtype).
        expected: the families the calling script supports (wrong one -> error naming the right script).
        with_tokenizers: also find the tokenizers (not needed to convert or merge single files).
        mmap: memory-map safetensors files (False: kohya's ``--disable_mmap_load_safetensors``).
    """
    if path is None or str(path).strip() == "":
        raise ModelLoadError("no base model given: pass --pretrained_model_name_or_path")
    p = Path(path)
    if not p.exists():
        hint = " (model ids from the hub are not used: sdtk works offline; give a local file or folder)" \
            if "/" in str(path) and not str(path).startswith((".", "/")) else ""
        raise ModelLoadError(f"{path}: no such file or folder{hint}")
    if p.is_dir():
        model = load_diffusers_folder(str(p), v2=v2, v_parameterization=v_parameterization, dtype=dtype,
                                      expected=expected, skip_vae=vae is not None, mmap=mmap)
        tok_folder = p
    else:
        model = load_single_file(str(p), v2=v2, v_parameterization=v_parameterization, allow_pickle=allow_pickle,
                                 dtype=dtype, expected=expected, skip_vae=vae is not None, mmap=mmap)
        tok_folder = None
    if vae is not None:
        model.vae = load_vae(vae, model.model_config["vae"], dtype=dtype, allow_pickle=allow_pickle, mmap=mmap)
    if with_tokenizers:
        model.tokenizers = load_tokenizers(model.family, tok_folder, tokenizer_cache_dir)
        check_vocabularies(model, path)
    logger.info("loaded %s model from %s%s", model.family.pretty, path, " (v-prediction)" if model.v_parameterization else "")
    return model


def check_vocabularies(model: LoadedModel, path) -> None:
    """A tokenizer larger than its text encoder's token table would index past it at the first caption."""
    for i, (tok, te) in enumerate(zip(model.tokenizers, model.text_encoders)):
        rows = te.get_input_embeddings().num_embeddings
        if len(tok) > rows:
            raise ModelLoadError(
                f"{path}: tokenizer {i + 1} has {len(tok)} tokens but text encoder {i + 1} has only {rows} token "
                "embeddings; pass the tokenizer that belongs to this model with --tokenizer_cache_dir "
                "(or use its diffusers folder, which contains it)")

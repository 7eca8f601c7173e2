"""Merge LoRAs into an SD1.x/SD2.x checkpoint, or several LoRAs into one (kohya's ``networks/merge_lora.py``).

    python networks/merge_lora.py --sd_model base.safetensors --models a.safetensors b.safetensors \\
        --ratios 0.8 0.5 --save_to merged.safetensors --save_precision fp16
    python networks/merge_lora.py --models a.safetensors b.safetensors --ratios 1 1 --save_to ab.safetensors

With ``--sd_model`` (a single file or a diffusers folder) each LoRA's delta ``ratio * alpha / rank *
up @ down`` is added to its module (Linear, 1x1 and kxk conv / LoCon); the model is saved as a single
file (``.safetensors`` / ``.ckpt``) or, for a ``--save_to`` without suffix, a diffusers folder.
Without it the LoRAs are merged into one LoRA exactly as kohya does (see docs/lora_tools.md). SDXL:
``networks/sdxl_merge_lora.py``. An existing ``--save_to`` is replaced (as kohya) but atomically.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from library.errors import ConfigError, ModelLoadError  # noqa: E402
from library.models.families import Family  # noqa: E402
from networks import lora_keys as keys  # noqa: E402
from networks import lora_math  # noqa: E402
from networks import lora_tools_common as common  # noqa: E402

logger = logging.getLogger("merge_lora")


def build_parser(sdxl: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    if not sdxl:
        p.add_argument("--v2", action="store_true", help="the model is SD2.x (detected from the file; checked if given)")
    common.add_precision_args(p)
    p.add_argument("--sd_model", type=str, default=None,
                   help="model to merge into (.safetensors/.ckpt or diffusers folder); omit to merge LoRAs into one LoRA")
    p.add_argument("--save_to", type=str, default=None, help="output: .safetensors or .ckpt (a folder: diffusers)")
    p.add_argument("--models", type=str, nargs="*", help="LoRA files to merge")
    p.add_argument("--ratios", type=float, nargs="*", help="ratio of each LoRA")
    if sdxl:
        p.add_argument("--lbws", type=str, nargs="*",
                       help='layer-block weights per model, JSON lists of 12/17/20/26 numbers, e.g. "[1,0,0,1,...]"')
    p.add_argument("--no_metadata", action="store_true", help="do not write modelspec metadata (minimum ss_* is kept)")
    p.add_argument("--concat", action="store_true", help="concatenate ranks instead of adding factors (LoRA output only)")
    p.add_argument("--shuffle", action="store_true", help="shuffle the rank order of the merged LoRA (LoRA output only)")
    return p


# ------------------------------------------------------------------------------- into a model
def module_map(model) -> dict[str, torch.nn.Module]:
    """kohya LoRA name -> Linear/Conv2d of the loaded model, for every such module (not only kohya's targets)."""
    from library.models.unet_layout import UNetLayout

    layout = UNetLayout(model.unet.config) if keys.uses_sdxl_layout(model.family) else None
    out: dict[str, torch.nn.Module] = {}
    for path, mod in model.unet.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            out[keys.unet_lora_name(path, layout)] = mod
    several = len(model.text_encoders) > 1
    for i, te in enumerate(model.text_encoders):
        prefix = keys.te_prefix(i + 1 if several else None)
        for path, mod in te.named_modules():
            if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
                out[keys.text_encoder_lora_name(prefix, path)] = mod
    return out


@torch.no_grad()
def merge_into_model(model, files: Sequence[common.LoRAFile], ratios: Sequence[float], dtype: torch.dtype,
                     lbws: Sequence[dict[int, float]] | None = None) -> int:
    """Add every LoRA's delta into the model's weights (computed in float32, stored in ``dtype``).

    Args:
        lbws: per file, layer-block weights ``{block index: weight}`` (see ``common.parse_lbws``).

    Returns:
        The number of module updates made.

    Raises:
        ModelLoadError: a LoRA's shapes do not fit the model, or none of its modules exists in it.
    """
    targets = module_map(model)
    done = 0
    lbws = lbws or [{} for _ in files]
    for f, ratio, lbw in zip(files, ratios, lbws):
        missing = [n for n in f.modules if n not in targets]
        if len(missing) == len(f.modules):
            raise ModelLoadError(f"{f.path}: none of its {len(f.modules)} modules exists in the model; is it a LoRA for this model family?")
        if missing:
            logger.warning("%s: %d modules not found in the model (skipped), e.g. %s", f.path, len(missing), missing[:3])
        for name, fac in f.modules.items():
            mod = targets.get(name)
            if mod is None:
                continue
            block_w = lbw.get(common.lbw_block_index(name, True), 1.0) if lbw else 1.0  # kohya: SDXL indices
            delta = lora_math.delta_weight(fac.up, fac.down, fac.scale * ratio * block_w)
            w = mod.weight
            if delta.numel() != w.numel() or delta.shape[:2] != w.shape[:2]:
                raise ModelLoadError(f"{f.path}: module {name} has shape {tuple(delta.shape)} but the model's weight is "
                                     f"{tuple(w.shape)}; the LoRA was made for another model")
            # SD2 LoRAs made for 1x1-conv proj_in merge into linear proj_in (and back) by reshaping.
            w.data = (w.data.float() + delta.reshape(w.shape)).to(dtype)
            done += 1
        logger.info("merged %s (ratio %s)", f.path, ratio)
    return done


def cast_in_place(model, dtype: torch.dtype | None) -> None:
    """Convert the model's components to ``dtype`` one tensor at a time, each float32 tensor freed as it goes.

    Saving casts too, but as a whole copy of the state dict next to the model: for SDXL merged in
    float32 and saved in fp16 that is 7 GB more on top of 14 GB (the merge was killed on 24 GB machines).
    """
    if dtype is None:
        return
    for m in [model.unet, model.vae, *model.text_encoders]:
        if m is not None:
            torch.nn.Module.to(m, dtype=dtype)


def base_family(path: str) -> Family:
    """Family of a base model without loading it (keys of a single file, or a diffusers folder's configs)."""
    import json

    from library.models.checkpoint import CheckpointReader
    from library.models.loading import detect_family_from_keys

    p = Path(path)
    if p.is_dir():
        cfg = p / "unet" / "config.json"
        if not cfg.is_file():
            raise ModelLoadError(f"--sd_model {path}: not a diffusers model folder (unet/config.json not found)")
        return Family.SDXL if json.loads(cfg.read_text()).get("addition_embed_type") == "text_time" else Family.SD1
    if not p.exists():
        raise ModelLoadError(f"--sd_model {path}: no such file or folder")
    return detect_family_from_keys(CheckpointReader(p, allow_pickle=True).keys(), path)


def merge_to_checkpoint(args: argparse.Namespace, files: list[common.LoRAFile], sdxl: bool,
                        lbws: list[dict[int, float]]) -> None:
    from library.models.loading import load_models
    from library.models.modelspec import build_modelspec
    from library.models.saving import save_diffusers, save_single_file

    tool = "networks/sdxl_merge_lora.py" if sdxl else "networks/merge_lora.py"
    family = base_family(args.sd_model)
    if keys.uses_sdxl_layout(family) != sdxl:
        right = "networks/merge_lora.py" if sdxl else "networks/sdxl_merge_lora.py"
        raise ConfigError(f"--sd_model {args.sd_model} is an {family.pretty} model; {tool} merges into "
                          f"{'SDXL' if sdxl else 'SD1.x/SD2.x'} models — use {right}")
    out = Path(args.save_to)
    folder_out = out.suffix == ""
    if not folder_out and out.suffix.lower() not in (".safetensors", ".ckpt"):
        raise ConfigError(f"--save_to {out}: a merged model must end in .safetensors or .ckpt (or be a folder for diffusers)")
    merge_dtype = common.dtype_of(args.precision)
    save_dtype = common.dtype_of(args.save_precision) or merge_dtype
    from library.training.memory import tune_allocator

    tune_allocator()  # large tensors freed while merging and casting go back to the system at once
    model = load_models(args.sd_model, v2=getattr(args, "v2", False), dtype=merge_dtype, allow_pickle=True,
                        with_tokenizers=folder_out)
    n = merge_into_model(model, files, args.ratios, merge_dtype, lbws)
    logger.info("%d module weights updated", n)
    cast_in_place(model, save_dtype)
    metadata = None
    if not args.no_metadata:
        metadata = build_modelspec(model.family, v_parameterization=model.v_parameterization, lora=False,
                                   title=out.stem, is_stable_diffusion_ckpt=True,
                                   merged_from=common.merged_from([args.sd_model, *args.models]))
    if folder_out:
        save_diffusers(model, out, save_dtype)
    else:
        save_single_file(model, out, save_dtype, metadata)


# ------------------------------------------------------------------------------ into one LoRA
def merge_lora_files(files: Sequence[common.LoRAFile], ratios: Sequence[float], concat: bool = False,
                     shuffle: bool = False, lbws: Sequence[dict[int, float]] | None = None,
                     ) -> tuple[dict[str, torch.Tensor], dict[str, int], dict[str, float]]:
    """kohya's LoRA + LoRA merge, factor by factor.

    Each module's factors are scaled by ``s = sqrt(alpha / alpha_first) * ratio`` (``|s|`` for
    ``lora_up``, so a negative ratio flips the delta) and summed, or concatenated along the rank with
    ``concat``. Alpha and (without ``concat``) rank are those of the first file that has the module.
    Layer-block weights multiply both factors (so their square scales the delta), as in kohya.
    The sum of factors is not the sum of deltas (cross terms); ``svd_merge_lora.py`` merges exactly.

    Returns:
        ``(state_dict, dims, alphas)`` of the merged LoRA (dims/alphas per module, first seen).

    Raises:
        ConfigError: ranks differ for a module without ``concat``.
    """
    merged: dict[str, torch.Tensor] = {}
    base_alpha: dict[str, float] = {}
    base_dim: dict[str, int] = {}
    lbws = lbws or [{} for _ in files]
    for f, ratio, lbw in zip(files, ratios, lbws):
        for name, fac in f.modules.items():
            block_w = lbw.get(common.lbw_block_index(name, True), 1.0) if lbw else 1.0
            base_alpha.setdefault(name, fac.alpha)
            base_dim.setdefault(name, fac.rank)
            s = math.sqrt(fac.alpha / base_alpha[name]) * ratio
            for suffix, t, s_used, cat_dim in ((keys.SUFFIX_UP, fac.up, abs(s) * block_w, 1),
                                               (keys.SUFFIX_DOWN, fac.down, s * block_w, 0)):
                key = f"{name}.{suffix}"
                if key not in merged:
                    merged[key] = t * s_used
                elif concat:
                    merged[key] = torch.cat([merged[key], t * s_used], dim=cat_dim)
                elif merged[key].shape != t.shape:
                    raise ConfigError(f"{f.path}: module {name} has shape {tuple(t.shape)} but an earlier LoRA has "
                                      f"{tuple(merged[key].shape)} (different ranks?); use --concat, or svd_merge_lora.py")
                else:
                    merged[key] = merged[key] + t * s_used
    for name, alpha in base_alpha.items():
        merged[f"{name}.{keys.SUFFIX_ALPHA}"] = torch.tensor(alpha)
        if shuffle:
            down_k, up_k = f"{name}.{keys.SUFFIX_DOWN}", f"{name}.{keys.SUFFIX_UP}"
            perm = torch.randperm(merged[down_k].shape[0])
            merged[down_k], merged[up_k] = merged[down_k][perm], merged[up_k][:, perm]
    return merged, base_dim, base_alpha


def merge_to_lora(args: argparse.Namespace, files: list[common.LoRAFile], family: Family | None,
                  lbws: list[dict[int, float]]) -> None:
    out = common.require_save_to(args.save_to)
    merge_dtype = common.dtype_of(args.precision)
    save_dtype = common.dtype_of(args.save_precision) or merge_dtype
    sd, dims, alphas = merge_lora_files(files, args.ratios, args.concat, args.shuffle, lbws)
    sd = {k: v.to(merge_dtype) for k, v in sd.items()}
    first_meta = files[0].metadata
    v2 = next((f.metadata["ss_v2"] for f in files if "ss_v2" in f.metadata), None)
    base_model = next((f.metadata["ss_base_model_version"] for f in files if "ss_base_model_version" in f.metadata), None)
    metadata = common.minimum_network_metadata(v2, base_model, common.same_or_dynamic(dims.values()),
                                               common.same_or_dynamic(alphas.values()))
    if not args.no_metadata:
        v_param = first_meta.get("modelspec.prediction_type") == "v" or (base_model or "").endswith("_v")
        metadata.update(common.lora_modelspec(family, v_param, out, common.merged_from(args.models)))
    common.save_lora(sd, out, save_dtype, metadata)


def run(args: argparse.Namespace, sdxl: bool) -> int:
    tool = "networks/sdxl_merge_lora.py" if sdxl else "networks/merge_lora.py"
    args.ratios = common.check_ratios(args.models, args.ratios)
    lbws, _ = common.parse_lbws(getattr(args, "lbws", None), len(args.models))
    if not args.save_to:
        raise ConfigError("--save_to is required (the output file)")
    if args.sd_model is not None and (args.concat or args.shuffle):
        raise ConfigError("--concat and --shuffle only apply when merging LoRAs into a LoRA (without --sd_model)")
    files = common.load_loras(args.models, dtype=torch.float32)
    family = common.require_lora_family(files, sdxl, tool)
    if args.sd_model is not None:
        merge_to_checkpoint(args, files, sdxl, lbws)
    else:
        merge_to_lora(args, files, family if family is not None else (Family.SDXL if sdxl else None), lbws)
    logger.info("saved %s", args.save_to)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return common.run_tool(build_parser(sdxl=False), lambda a: run(a, sdxl=False), argv)


if __name__ == "__main__":
    sys.exit(main())

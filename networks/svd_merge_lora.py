"""Merge LoRAs of any ranks into one LoRA of a chosen rank by SVD (kohya's ``networks/svd_merge_lora.py``).

    python networks/svd_merge_lora.py --models a.safetensors b.safetensors --ratios 0.7 0.5 \\
        --new_rank 16 --new_conv_rank 8 --save_to merged.safetensors --save_precision fp16

For each module, the sum of the deltas ``sum_i ratio_i * alpha_i / rank_i * up_i @ down_i`` is
decomposed and truncated to ``--new_rank`` (``--new_conv_rank`` for kxk convs, default
``--new_rank``), factors clamped at their 0.99 quantile as kohya does, alpha = rank. The sum is kept
factored (its rank is at most the sum of the input ranks), so no full-size matrix is built. Modules
whose summed rank is below the target are zero-padded to it (the delta is unchanged). Works for
SD1.x/SD2.x and SDXL LoRAs alike; all inputs must be of one family. ``--lbws``: kohya's layer-block
weights (lists of 12 or 20 use SDXL block numbering, 17 or 26 SD1/SD2's).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from library.errors import ConfigError  # noqa: E402
from networks import lora_math  # noqa: E402
from networks import lora_tools_common as common  # noqa: E402

logger = logging.getLogger("svd_merge_lora")
CLAMP_QUANTILE = 0.99  # kohya's fixed value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_precision_args(p)
    p.add_argument("--save_to", type=str, default=None, help="output file: .safetensors, .ckpt, .pt or .pth")
    p.add_argument("--models", type=str, nargs="*", help="LoRA files to merge")
    p.add_argument("--ratios", type=float, nargs="*", help="ratio of each LoRA")
    p.add_argument("--lbws", type=str, nargs="*",
                   help='layer-block weights per model, JSON lists of 12/17/20/26 numbers (12/20: SDXL blocks)')
    p.add_argument("--new_rank", type=int, default=4, help="rank of the merged LoRA")
    p.add_argument("--new_conv_rank", type=int, default=None, help="rank for kxk conv modules; default --new_rank")
    p.add_argument("--device", type=str, default=None, help="device for the SVDs, e.g. cuda; default cpu")
    p.add_argument("--no_metadata", action="store_true", help="do not write modelspec metadata (minimum ss_* is kept)")
    return p


def merge_module(parts: list[tuple[common.LoRAFactors, float]], rank: int, device: str | torch.device,
                 clamp_q: float | None = CLAMP_QUANTILE) -> common.LoRAFactors:
    """SVD-merge one module's ``(factors, ratio)`` pairs into factors of ``rank`` (capped by its shape), alpha = rank."""
    shape = parts[0][0].weight_shape
    for fac, _ in parts:
        if fac.weight_shape != shape:
            raise ConfigError(f"a module has shape {fac.weight_shape} in one LoRA and {shape} in another; "
                              "the LoRAs are for different models")
    a = torch.cat([lora_math.as_matrices(f.up.to(device), f.down)[0] * (r * f.scale) for f, r in parts], dim=1)
    b = torch.cat([lora_math.as_matrices(f.up, f.down.to(device))[1] for f, _ in parts], dim=0)
    rank = min(rank, shape[0], int(torch.tensor(shape[1:]).prod()))  # kohya: rank <= min(out, in)
    u, s, vh = lora_math.svd_of_product(a, b)
    a, b = lora_math.truncate(u, s, vh, rank, clamp_q=clamp_q, pad_to=rank)
    up, down = lora_math.to_lora_shapes(a.cpu(), b.cpu(), shape)
    return common.LoRAFactors(down, up, float(rank))


def svd_merge(args: argparse.Namespace) -> int:
    ratios = common.check_ratios(args.models, args.ratios)
    lbws, lbw_sdxl = common.parse_lbws(args.lbws, len(args.models))
    out = common.require_save_to(args.save_to)
    if args.new_rank < 1 or (args.new_conv_rank is not None and args.new_conv_rank < 1):
        raise ConfigError("--new_rank and --new_conv_rank must be at least 1")
    conv_rank = args.new_conv_rank if args.new_conv_rank is not None else args.new_rank
    merge_dtype = common.dtype_of(args.precision)
    save_dtype = common.dtype_of(args.save_precision) or merge_dtype
    files = common.load_loras(args.models, dtype=merge_dtype)
    known = {f.family for f in files if f.family is not None}
    if len(known) > 1:
        found = ", ".join(f"{Path(f.path).name}: {f.family.pretty if f.family else 'unknown'}" for f in files)
        raise ConfigError(f"the LoRAs are for different model families ({found}); merge LoRAs of one family only")
    family = next(iter(known), None)

    names: dict[str, list[tuple[common.LoRAFactors, float]]] = {}
    for f, ratio, lbw in zip(files, ratios, lbws):
        for name, fac in f.modules.items():
            block_w = lbw.get(common.lbw_block_index(name, lbw_sdxl), 1.0) if lbw else 1.0
            names.setdefault(name, []).append((fac.__class__(fac.down.float(), fac.up.float(), fac.alpha), ratio * block_w))
    device = args.device or "cpu"
    merged: dict[str, common.LoRAFactors] = {}
    with torch.no_grad():
        for name, parts in tqdm(names.items(), desc="svd merge", disable=None):
            target = conv_rank if parts[0][0].is_conv3x3 else args.new_rank
            merged[name] = merge_module(parts, target, device)

    metadata_src = next((f.metadata for f in files if f.metadata), {})
    v2, base_model = metadata_src.get("ss_v2"), metadata_src.get("ss_base_model_version")
    network_args = {"conv_dim": conv_rank, "conv_alpha": conv_rank}  # kohya writes it even without conv modules
    metadata = common.minimum_network_metadata(v2, base_model, str(args.new_rank), str(args.new_rank), network_args)
    if not args.no_metadata:
        v_param = metadata_src.get("modelspec.prediction_type") == "v" or (base_model or "").endswith("_v")
        metadata.update(common.lora_modelspec(family, v_param, out, common.merged_from(args.models)))
    sd = {k: v.to(merge_dtype) for k, v in common.factors_state_dict(merged).items()}
    common.save_lora(sd, out, save_dtype, metadata)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return common.run_tool(build_parser(), svd_merge, argv)


if __name__ == "__main__":
    sys.exit(main())

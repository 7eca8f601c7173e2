"""Change a LoRA's rank by SVD (kohya's ``networks/resize_lora.py``, same flags).

    python networks/resize_lora.py --model lora32.safetensors --save_to lora8.safetensors --new_rank 8
    python networks/resize_lora.py --model lora.safetensors --save_to dyn.safetensors --new_rank 64 \\
        --dynamic_method sv_fro --dynamic_param 0.9 --verbose

Each module's delta ``alpha / rank * up @ down`` is decomposed exactly (from its factors, never as a
full matrix) and truncated to ``--new_rank`` (``--new_conv_rank`` for kxk convs; default
``--new_rank``), or to the rank a ``--dynamic_method`` picks (``--new_rank`` is then the cap). Alpha
keeps each module's scale (``new_alpha = alpha / rank * new_rank``), so at full rank the delta is
unchanged. A ``--new_rank`` above the file's rank is refused (kohya would pad with empty components);
modules already below the target keep their rank. Metadata: ``ss_network_dim`` / ``ss_network_alpha``
updated, ``ss_training_comment`` notes the resize, hashes recomputed.
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

logger = logging.getLogger("resize_lora")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_precision_args(p, merge=False)
    p.add_argument("--new_rank", type=int, default=4, help="rank of the output (the cap with --dynamic_method)")
    p.add_argument("--new_conv_rank", type=int, default=None, help="rank for kxk conv modules; default --new_rank")
    p.add_argument("--save_to", type=str, default=None, help="output file: .safetensors, .ckpt, .pt or .pth")
    p.add_argument("--model", type=str, default=None, help="LoRA file to resize")
    p.add_argument("--device", type=str, default=None, help="device for the SVDs, e.g. cuda; default cpu")
    p.add_argument("--verbose", action="store_true", help="print the retained share of each module")
    p.add_argument("--dynamic_method", type=str, default=None, choices=[None, *lora_math.DYNAMIC_METHODS],
                   help="choose each module's rank from its singular values (--new_rank is the cap)")
    p.add_argument("--dynamic_param", type=float, default=None, help="target of --dynamic_method")
    return p


def resize_module(fac: common.LoRAFactors, rank: int, method: str | None, param: float | None,
                  device: str | torch.device) -> tuple[common.LoRAFactors, lora_math.Retained]:
    """Resize one module to ``rank`` (or the dynamic choice, capped at ``rank``), keeping its scale."""
    a, b = lora_math.as_matrices(fac.up.to(device), fac.down.to(device))
    u, s, vh = lora_math.svd_of_product(a, b)
    new_rank = lora_math.pick_rank(s, rank, method, param)
    stats = lora_math.retained(s, new_rank)
    a, b = lora_math.truncate(u, s, vh, new_rank)
    up, down = lora_math.to_lora_shapes(a.cpu(), b.cpu(), fac.weight_shape)
    return common.LoRAFactors(down, up, fac.scale * new_rank), stats


def check_ranks(lf: common.LoRAFile, new_rank: int, new_conv_rank: int | None, dynamic: bool) -> None:
    """Refuse a target rank above the file's: a resize can only drop components."""
    if new_rank < 1 or (new_conv_rank is not None and new_conv_rank < 1):
        raise ConfigError("--new_rank and --new_conv_rank must be at least 1")
    if dynamic:
        return  # --new_rank is only a cap there
    linear = [f.rank for f in lf.modules.values() if not f.is_conv3x3]
    conv = [f.rank for f in lf.modules.values() if f.is_conv3x3]
    if linear and new_rank > max(linear):
        raise ConfigError(f"--new_rank {new_rank} is larger than the rank of {lf.path} ({max(linear)}); resizing "
                          "can only lower the rank — choose --new_rank <= the current rank")
    if conv and new_conv_rank is not None and new_conv_rank > max(conv):
        raise ConfigError(f"--new_conv_rank {new_conv_rank} is larger than the conv rank of {lf.path} ({max(conv)}); "
                          "choose --new_conv_rank <= the current conv rank")


def resize(args: argparse.Namespace) -> int:
    out = common.require_save_to(args.save_to)
    if not args.model:
        raise ConfigError("--model is required: the LoRA file to resize")
    if args.dynamic_method and not args.dynamic_param:
        raise ConfigError(f"--dynamic_method {args.dynamic_method} needs --dynamic_param (e.g. 0.9 for sv_fro)")
    lf = common.load_lora(args.model, dtype=None)  # factors go to float32 one module at a time
    check_ranks(lf, args.new_rank, args.new_conv_rank, bool(args.dynamic_method))
    conv_rank = args.new_conv_rank if args.new_conv_rank is not None else args.new_rank
    save_dtype = common.dtype_of(args.save_precision) or torch.float32
    device = args.device or "cpu"
    old_dim = max(f.rank for f in lf.modules.values())
    resized: dict[str, common.LoRAFactors] = {}
    fro: list[float] = []
    with torch.no_grad():
        for name, fac in tqdm(lf.modules.items(), desc="resizing", disable=None):
            target = conv_rank if fac.is_conv3x3 else args.new_rank
            if not args.dynamic_method:
                target = min(target, fac.rank)  # modules already smaller keep their rank
            new, st = resize_module(fac, target, args.dynamic_method, args.dynamic_param, device)
            resized[name] = common.LoRAFactors(new.down.to(save_dtype), new.up.to(save_dtype), new.alpha)
            if st.fro_retained == st.fro_retained:  # not NaN (all-zero module)
                fro.append(st.fro_retained)
            if args.verbose:
                line = (f"{name:75} | sum(S) retained: {st.sum_retained:.1%}, fro retained: {st.fro_retained:.1%}, "
                        f"max(S) ratio: {st.max_ratio:0.1f}")
                if args.dynamic_method:
                    line += f", dynamic | dim: {st.rank}, alpha: {resized[name].alpha}"
                tqdm.write(line)
    if args.verbose and fro:
        t = torch.tensor(fro)
        print(f"Average Frobenius norm retention: {t.mean().item():.2%} | std: {t.std(unbiased=False).item():0.3f}")

    metadata = dict(lf.metadata)
    comment = metadata.get("ss_training_comment", "")
    if args.dynamic_method:
        metadata["ss_training_comment"] = f"Dynamic resize with {args.dynamic_method}: {args.dynamic_param} from {old_dim}; {comment}"
        metadata["ss_network_dim"] = metadata["ss_network_alpha"] = "Dynamic"
    else:
        conv_desc = "" if args.new_rank == conv_rank else f" (conv: {conv_rank})"
        metadata["ss_training_comment"] = f"dimension is resized from {old_dim} to {args.new_rank}{conv_desc}; {comment}"
        metadata["ss_network_dim"] = str(args.new_rank)
        linear_alphas = [f.alpha for n, f in resized.items() if not lf.modules[n].is_conv3x3]
        metadata["ss_network_alpha"] = str(linear_alphas[-1] if linear_alphas else next(iter(resized.values())).alpha)
    for k in ("sshs_model_hash", "sshs_legacy_hash"):
        metadata.pop(k, None)  # recomputed on the new tensors by save_lora
    sd = common.factors_state_dict(resized)
    sd.update(lf.other)
    common.save_lora(sd, out, save_dtype, metadata)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return common.run_tool(build_parser(), resize, argv)


if __name__ == "__main__":
    sys.exit(main())

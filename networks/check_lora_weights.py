"""Inspect a LoRA file: per-tensor statistics, per-module delta norms, zero / NaN / inf detection.

    python networks/check_lora_weights.py lora.safetensors [-s]

Prints kohya's lines first (``key,shape,mean(|w|),min(|w|)`` for every ``lora_up`` / ``lora_down``
tensor; ``-s`` / ``--show_all_keys`` adds every other tensor), then one line per module with its
rank, alpha and the Frobenius norm of its delta ``alpha / rank * up @ down``, and a summary.
Exit status: 0 when all values are finite, 1 when any tensor holds NaN or inf (named on stderr).
All-zero modules (e.g. an untrained ``lora_up``) are reported but are not an error.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from networks import lora_math  # noqa: E402
from networks import lora_tools_common as common  # noqa: E402
from networks.lora_io import load_state_dict_file  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", type=str, help="LoRA file to check")
    p.add_argument("-s", "--show_all_keys", action="store_true", help="also list tensors that are not lora_up/lora_down")
    return p


def tensor_line(key: str, value: torch.Tensor) -> str:
    """kohya's line: ``key,(d0-d1-...),mean(|w|),min(|w|)``."""
    v = value.float().abs()
    shape = str(tuple(value.shape)).replace(", ", "-")
    if v.numel() == 0:
        return f"{key},{shape},nan,nan"
    return f"{key},{shape},{v.mean().item()},{v.min().item()}"


def module_report(name: str, fac: common.LoRAFactors) -> tuple[str, float]:
    """One line about a module and the norm of its delta (NaN when a factor is not finite)."""
    a, b = lora_math.as_matrices(fac.up, fac.down)
    # ||A B||_F = ||R_a R_b^T||_F from thin QRs: exact and cheap even for large layers.
    _, ra = torch.linalg.qr(a) if torch.isfinite(a).all() else (None, a)
    _, rb = torch.linalg.qr(b.T) if torch.isfinite(b).all() else (None, b.T)
    norm = float(torch.linalg.norm(ra @ rb.T)) * abs(fac.scale) if ra.shape[1] == rb.shape[1] else float("nan")
    kind = "conv3x3" if fac.is_conv3x3 else "conv1x1" if fac.is_conv else "linear"
    return f"{name},{kind},rank={fac.rank},alpha={fac.alpha:g},delta_norm={norm:.6g}", norm


def check(args: argparse.Namespace) -> int:
    tensors, _ = load_state_dict_file(args.file)
    lf = common.load_lora(args.file, dtype=None)
    lora_keys = [k for k in tensors if ".lora_up" in k or ".lora_down" in k]
    print(f"number of LoRA modules: {len(lora_keys)}")
    shown = list(lora_keys)
    if args.show_all_keys:
        shown += [k for k in tensors if k not in set(lora_keys)]
        print(f"number of all modules: {len(shown)}")
    for key in shown:
        print(tensor_line(key, tensors[key]))

    print("module,kind,rank,alpha,delta_norm")
    norms, zero = [], []
    for name, fac in lf.modules.items():
        line, norm = module_report(name, fac)
        print(line)
        if norm == 0.0:
            zero.append(name)
        elif math.isfinite(norm):
            norms.append(norm)
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    ranks = sorted({f.rank for f in lf.modules.values()})
    family = lf.family.pretty if lf.family else "unknown"
    print(f"summary: {len(lf.modules)} modules ({family}), ranks {ranks}, "
          f"{len(zero)} all-zero, {len(bad)} tensors with NaN/inf"
          + (f", delta norm mean {sum(norms) / len(norms):.6g} max {max(norms):.6g}" if norms else ""))
    if zero:
        print(f"all-zero modules (no effect): {', '.join(zero[:10])}" + (" ..." if len(zero) > 10 else ""))
    if bad:
        print(f"error: {len(bad)} tensors contain NaN or inf: {', '.join(bad[:5])}" + (" ..." if len(bad) > 5 else ""),
              file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return common.run_tool(build_parser(), check, argv)


if __name__ == "__main__":
    sys.exit(main())

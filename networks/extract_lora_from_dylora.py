"""Split a DyLoRA file into plain LoRAs of every smaller rank (kohya's ``networks/extract_lora_from_dylora.py``).

    python networks/extract_lora_from_dylora.py --model dylora.safetensors --save_to lora.safetensors --unit 4

writes ``lora-0004.safetensors``, ``lora-0008.safetensors``, ... one file per multiple of ``--unit``
below the file's largest rank, as kohya does. A rank-``r`` file holds each module's first ``r``
ranks (``lora_down[:r]``, ``lora_up[:, :r]``) and the *same* alpha, so it computes
``alpha / r * up[:, :r] @ down[:r]``: exactly what ``networks.dylora`` trained when it drew ``r``
ranks. Metadata: ``ss_network_dim`` set to ``r``, ``ss_training_comment`` notes the split, hashes
recomputed. Every file is written atomically.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.errors import ConfigError  # noqa: E402
from networks import lora_tools_common as common  # noqa: E402

logger = logging.getLogger("extract_lora_from_dylora")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--unit", type=int, default=None, help="rank step of the split (the DyLoRA's unit)")
    p.add_argument("--save_to", type=str, default=None,
                   help="base name of the outputs: .safetensors, .ckpt, .pt or .pth; -<rank:04d> is added to each")
    p.add_argument("--model", type=str, default=None, help="DyLoRA file to split")
    return p


def truncate(lf: common.LoRAFile, rank: int) -> dict[str, common.LoRAFactors]:
    """Each module's first ``rank`` ranks with its alpha unchanged (modules of lower rank stay whole)."""
    return {name: common.LoRAFactors(f.down[:rank].contiguous(), f.up[:, :rank].contiguous(), f.alpha)
            for name, f in lf.modules.items()}


def output_path(save_to: Path, rank: int) -> Path:
    """kohya's naming: ``<stem>-<rank:04d><suffix>`` beside ``save_to``."""
    return save_to.with_name(f"{save_to.stem}-{rank:04d}{save_to.suffix}")


def split(args: argparse.Namespace) -> int:
    save_to = common.require_save_to(args.save_to)
    if not args.model:
        raise ConfigError("--model is required: the DyLoRA file to split")
    if args.unit is None or args.unit < 1:
        raise ConfigError("--unit is required and must be at least 1 (use the unit= the DyLoRA was trained with)")
    lf = common.load_lora(args.model, dtype=None)  # slicing keeps the file's dtype
    max_rank = max(f.rank for f in lf.modules.values())
    if max_rank % args.unit:
        raise ConfigError(f"--unit {args.unit} does not divide the rank of {args.model} ({max_rank}); "
                          "use the unit= the DyLoRA was trained with")
    if args.unit >= max_rank:
        raise ConfigError(f"--unit {args.unit} leaves nothing to extract: {args.model} has rank {max_rank}")
    logger.info("max rank %d: writing ranks %s", max_rank, list(range(args.unit, max_rank, args.unit)))
    comment = lf.metadata.get("ss_training_comment", "")
    for rank in range(args.unit, max_rank, args.unit):
        metadata = dict(lf.metadata)
        metadata["ss_training_comment"] = f"split from DyLoRA, rank {max_rank} to {rank}; {comment}"
        metadata["ss_network_dim"] = str(rank)
        sd = common.factors_state_dict(truncate(lf, rank))
        sd.update(lf.other)
        common.save_lora(sd, output_path(save_to, rank), None, metadata)  # sshs_* hashes recomputed
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return common.run_tool(build_parser(), split, argv)


if __name__ == "__main__":
    sys.exit(main())

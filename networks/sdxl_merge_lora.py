"""Merge LoRAs into an SDXL checkpoint, or several SDXL LoRAs into one (kohya's ``networks/sdxl_merge_lora.py``).

    python networks/sdxl_merge_lora.py --sd_model sd_xl_base_1.0.safetensors --models a.safetensors \\
        --ratios 0.8 --save_to merged.safetensors --save_precision fp16

Same flags and behaviour as ``networks/merge_lora.py`` (see its docstring and docs/lora_tools.md), for
SDXL models and LoRAs (UNet keys in the original sgm layout, text encoders ``lora_te1_`` /
``lora_te2_``), plus kohya's ``--lbws`` layer-block weights (one JSON list per model, 12/17/20/26
entries for BASE, IN00-IN11, MID, OUT00-OUT11; see docs/lora_tools.md).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from networks import lora_tools_common as common  # noqa: E402
from networks.merge_lora import build_parser, run  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(sdxl=True)
    parser.description = __doc__
    return common.run_tool(parser, lambda a: run(a, sdxl=True), argv)


if __name__ == "__main__":
    sys.exit(main())

"""Generate images with a Stable Diffusion 1.x / 2.x / SDXL model and LoRAs, with kohya's gen_img flags.

    python gen_img.py --ckpt model.safetensors --outdir out --prompt "a cat (sitting:1.2) --n blurry --d 42" \\
        --steps 30 --sampler euler_a --network_module networks.lora --network_weights my_lora.safetensors \\
        --network_mul 0.8
    python gen_img.py --ckpt sdxl.safetensors --from_file prompts.txt --images_per_prompt 4 --batch_size 4 --bf16

See docs/gen_img.md. The family (SD1.x, SD2.x, SDXL) is detected from the weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SCRIPT = "gen_img"


def main(argv: list[str] | None = None) -> int:
    """Parse -> load -> generate (library/inference/cli.py). Returns the process exit code."""
    from library.inference.cli import run_gen_img

    return run_gen_img(SCRIPT, argv)


if __name__ == "__main__":
    sys.exit(main())

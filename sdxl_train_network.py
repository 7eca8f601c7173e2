"""Train a LoRA (or any ``--network_module``) on SDXL, with kohya's flags.

    accelerate launch sdxl_train_network.py --config_file run.toml
    python sdxl_train_network.py --pretrained_model_name_or_path sd_xl_base_1.0.safetensors \\
        --dataset_config data.toml --output_dir out --output_name my_lora --network_module networks.lora \\
        --network_dim 16 --network_train_unet_only --cache_latents --cache_text_encoder_outputs

The training template is train_network.py's; this script adds the SDXL stages of
library/training/sdxl_stage.py: the SDXL model family (two text encoders, pooled embedding,
size/crop time ids: library/models/families/sdxl.py), 32-px buckets and text-encoder output
caching (library/data/te_cache.py). See docs/sdxl.md for the low-memory recipe.
SD1.x/SD2.x models: use train_network.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from library.training.sdxl_stage import SdxlStage  # noqa: E402
from library.training.trainer import NetworkTrainer  # noqa: E402

SCRIPT = "sdxl_train_network"


class SdxlNetworkTrainer(SdxlStage, NetworkTrainer):
    """:class:`NetworkTrainer` for SDXL base models (kohya's ``SdxlNetworkTrainer``; the SDXL stages are
    :class:`~library.training.sdxl_stage.SdxlStage`'s)."""

    script_name = SCRIPT


def main(argv: list[str] | None = None) -> int:
    """Parse -> build -> run. Returns the process exit code."""
    from library.training.cli import run_training

    return run_training(SCRIPT, SdxlNetworkTrainer, argv)


if __name__ == "__main__":
    sys.exit(main())

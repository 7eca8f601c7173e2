"""Train a LoRA (or any ``--network_module``) on Stable Diffusion 1.x / 2.x, with kohya's flags.

    accelerate launch train_network.py --config_file run.toml
    python train_network.py --pretrained_model_name_or_path MODEL --dataset_config data.toml \\
        --output_dir out --output_name my_lora --network_module networks.lora --network_dim 16

See docs/lora_training.md. SDXL models: use sdxl_train_network.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from library.training.cli import run_training  # noqa: E402

SCRIPT = "train_network"


def main(argv: list[str] | None = None, trainer_cls=None) -> int:
    """Parse -> build -> run. Returns the process exit code."""
    if trainer_cls is None:
        from library.training.trainer import NetworkTrainer as trainer_cls
    return run_training(SCRIPT, trainer_cls, argv)


if __name__ == "__main__":
    sys.exit(main())

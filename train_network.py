"""Train a LoRA (or any ``--network_module``) on Stable Diffusion 1.x / 2.x, with kohya's flags.

    accelerate launch train_network.py --config_file run.toml
    python train_network.py --pretrained_model_name_or_path MODEL --dataset_config data.toml \\
        --output_dir out --output_name my_lora --network_module networks.lora --network_dim 16

See docs/lora_training.md. SDXL models: use sdxl_train_network.py.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from library.errors import SdtkError  # noqa: E402

SCRIPT = "train_network"


def configure_logging(args) -> None:
    level = getattr(args, "console_log_level", None) or "INFO"
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if getattr(args, "console_log_file", None):
        handlers.append(logging.FileHandler(args.console_log_file, encoding="utf-8"))
    fmt = "%(message)s" if getattr(args, "console_log_simple", False) else "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, handlers=handlers, force=True)
    for noisy in ("diffusers", "transformers", "accelerate", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None, trainer_cls=None) -> int:
    """Parse -> build -> run. Returns the process exit code."""
    from library.config.args import parse_args

    try:
        args = parse_args(SCRIPT, argv)
        if args.output_config:
            return 0  # parse_args wrote the effective config
        configure_logging(args)
        if trainer_cls is None:
            from library.training.trainer import NetworkTrainer as trainer_cls
        final = trainer_cls(args).train()
        if final is not None:
            print(f"LoRA saved to {final}")
            if args.sample_prompts:
                print(f"sample images in {Path(args.output_dir) / 'sample'}")
        return 0
    except SdtkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""SDXL fine-tuning: train a whole SDXL base model, with kohya's flags.

    accelerate launch sdxl_train.py --pretrained_model_name_or_path sd_xl_base_1.0.safetensors \\
        --dataset_config data.toml --output_dir out --output_name my_sdxl --save_model_as safetensors \\
        --mixed_precision bf16 --full_bf16 --optimizer_type Adafactor --learning_rate 1e-6 \\
        --gradient_checkpointing --cache_latents --cache_text_encoder_outputs

DreamBooth folders or fine-tuning metadata (``--in_json``, whose ``image_size`` gives SDXL's
original size). The UNet is trained (``--block_lr``: 23 per-block learning rates), both text
encoders with ``--train_text_encoder`` (``--learning_rate_te1`` / ``--learning_rate_te2``; 0 leaves
one frozen); frozen encoders can be cached (``--cache_text_encoder_outputs``). The template is
train_network.py's with the full-model target (library/training/targets/full_model.py) and the
SDXL family and caching of library/training/sdxl_stage.py. See docs/fine_tune.md. SD1.x/SD2.x: fine_tune.py.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

from library.errors import ConfigError  # noqa: E402
from library.models.families import Family  # noqa: E402
from library.training.targets.full_model import TextEncoderPlan  # noqa: E402
from library.training.sdxl_stage import SdxlStage  # noqa: E402
from library.training.targets.full_trainer import FullModelTrainer  # noqa: E402

SCRIPT = "sdxl_train"
UNET_NUM_BLOCKS_FOR_BLOCK_LR = 23  # kohya: embeddings, 9 input, 3 middle, 9 output blocks, out


def parse_block_lr(text: str | None) -> list[float] | None:
    """``--block_lr``: exactly 23 comma-separated learning rates, or None."""
    if not text:
        return None
    try:
        lrs = [float(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"--block_lr {text!r}: every value must be a number") from None
    if len(lrs) != UNET_NUM_BLOCKS_FOR_BLOCK_LR or any(lr < 0 for lr in lrs):
        raise ConfigError(f"--block_lr needs {UNET_NUM_BLOCKS_FOR_BLOCK_LR} learning rates >= 0 (embeddings, 9 input "
                          f"blocks, 3 middle, 9 output, out), got {len(lrs)}")
    return lrs


def block_index(original_name: str) -> int:
    """kohya's block of a UNet parameter, from its original-layout name (``input_blocks.4.1...``)."""
    head, _, rest = original_name.partition(".")
    if head in ("time_embed", "label_emb"):
        return 0
    if head == "out":
        return 22
    offset = {"input_blocks": 1, "middle_block": 10, "output_blocks": 13}.get(head)
    if offset is None:
        raise ConfigError(f"--block_lr: unexpected UNet parameter {original_name!r}")
    return offset + int(rest.split(".")[0])


def block_param_groups(lrs: list[float]) -> Callable[[Any], list[dict[str, Any]]]:
    """``unet -> param groups`` of ``--block_lr``; blocks at 0 are frozen and left out (kohya)."""

    def groups(unet: Any) -> list[dict[str, Any]]:
        from library.models.unet_layout import UNetLayout

        layout = UNetLayout(unet.config)
        blocks: list[list[Any]] = [[] for _ in lrs]
        for name, p in unet.named_parameters():
            blocks[block_index(layout.to_original(name))].append(p)
        out = []
        for lr, params in zip(lrs, blocks):
            if lr == 0:
                for p in params:
                    p.requires_grad_(False)
            elif params:
                out.append({"params": params, "lr": lr})
        return out

    return groups


class SdxlTrainer(FullModelTrainer, SdxlStage):
    """kohya's ``sdxl_train.py``: the full-model target with the SDXL family and TE-output caching."""

    script_name = SCRIPT
    tracker_name = "finetuning"
    other_scripts = {Family.SD1: "train_db.py or fine_tune.py", Family.SD2: "train_db.py or fine_tune.py"}

    def text_encoder_plans(self) -> list[TextEncoderPlan]:
        a = self.args
        if not a.train_text_encoder:
            return [TextEncoderPlan(False), TextEncoderPlan(False)]
        lrs = [a.learning_rate_te1, a.learning_rate_te2]
        return [TextEncoderPlan(lr is None or lr != 0, lr) for lr in lrs]

    def unet_param_groups(self) -> Any:
        lrs = parse_block_lr(self.args.block_lr)
        return block_param_groups(lrs) if lrs else None

    def preflight(self) -> None:
        a = self.args
        if a.fp8_base:
            raise ConfigError("--fp8_base stores a frozen UNet in float8; sdxl_train.py trains the UNet itself")
        parse_block_lr(a.block_lr)
        FullModelTrainer.preflight(self)
        if a.cache_text_encoder_outputs:  # per-subset caption options must not change the captions either
            self.check_te_cacheable()


def main(argv: list[str] | None = None, trainer_cls: Any = None) -> int:
    """Parse -> build -> run. Returns the process exit code."""
    from library.training.cli import run_training

    return run_training(SCRIPT, trainer_cls or SdxlTrainer, argv)


if __name__ == "__main__":
    sys.exit(main())

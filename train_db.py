"""DreamBooth: train a whole Stable Diffusion 1.x / 2.x model on your images, with kohya's flags.

    accelerate launch train_db.py --config_file run.toml
    python train_db.py --pretrained_model_name_or_path model.safetensors --train_data_dir data \\
        --reg_data_dir reg --prior_loss_weight 1.0 --output_dir out --output_name my_model \\
        --resolution 512 --learning_rate 1e-6 --max_train_steps 1600 --save_model_as safetensors

The UNet and the text encoder are trained (the text encoder until ``--stop_text_encoder_training``
steps; ``-1``: not at all); regularization images (``--reg_data_dir`` or ``is_reg`` subsets)
weigh ``--prior_loss_weight``. The result is a full checkpoint (``--save_model_as``). The training
template and loop are train_network.py's; only the target differs
(library/training/targets/full_model.py). See docs/dreambooth.md. SDXL models: sdxl_train.py.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from library.errors import ConfigError  # noqa: E402
from library.training.targets.full_model import TextEncoderPlan  # noqa: E402
from library.training.targets.full_trainer import FullModelTrainer  # noqa: E402

SCRIPT = "train_db"
logger = logging.getLogger(SCRIPT)


class DreamBoothTrainer(FullModelTrainer):
    """kohya's ``train_db.py``: UNet and text encoder, TE training stopped at a step."""

    script_name = SCRIPT
    tracker_name = "dreambooth"

    def text_encoder_plans(self) -> list[TextEncoderPlan]:
        stop = self.args.stop_text_encoder_training
        return [TextEncoderPlan(stop is None or stop > 0, self.args.learning_rate_te)]

    def stop_text_encoder_step(self) -> int | None:
        stop = self.args.stop_text_encoder_training
        return stop if stop is not None and stop > 0 else None

    def preflight(self) -> None:
        a = self.args
        if a.fp8_base:
            raise ConfigError("--fp8_base stores a frozen UNet in float8; train_db.py trains the UNet itself "
                              "(use --mixed_precision / --full_bf16 to save memory)")
        if a.no_token_padding and a.max_token_length and a.max_token_length > 75:
            raise ConfigError("--no_token_padding works with 75-token captions only; drop --max_token_length")
        super().preflight()

    def encode_text(self, s: Any, batch: dict[str, Any]) -> Any:
        cond = super().encode_text(s, batch)
        if not self.args.no_token_padding:
            return cond
        from library.models.families import Conditioning

        # CLIP's text attention is causal: the states before the padding do not depend on it, so
        # cutting them to the longest caption of the batch equals encoding without padding
        ids = s.family.tokenize(s.model.tokenizers, batch["captions"], None)[0][:, 0]  # [B, 77]
        eos = s.model.tokenizers[0].eos_token_id
        length = int(((ids == eos).int().argmax(dim=1) + 1).max())
        return Conditioning(cond.hidden_states[:, :length], cond.pooled)


def main(argv: list[str] | None = None, trainer_cls: Any = None) -> int:
    """Parse -> build -> run. Returns the process exit code."""
    from library.training.cli import run_training

    return run_training(SCRIPT, trainer_cls or DreamBoothTrainer, argv)


if __name__ == "__main__":
    sys.exit(main())

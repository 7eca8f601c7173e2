"""Textual inversion: learn a new word (token embedding) for a concept on SD 1.x / 2.x, with kohya's flags.

    accelerate launch train_textual_inversion.py --config_file run.toml
    python train_textual_inversion.py --pretrained_model_name_or_path model.safetensors \\
        --train_data_dir data --output_dir out --token_string mychar --init_word girl \\
        --num_vectors_per_token 4 --resolution 512 --learning_rate 5e-3 --max_train_steps 1500 \\
        --use_object_template --cache_latents

Only the new token vectors train; the UNet, VAE and text encoder stay frozen. Captions must
contain ``--token_string`` unless ``--use_object_template`` / ``--use_style_template`` is given.
The result is ``<output_name>.safetensors`` (kohya's ``emb_params`` layout; ``--save_model_as pt``
for A1111's pickle), which gen_img.py (``--textual_inversion_embeddings``), A1111, ComfyUI and
diffusers load. The training template and loop are train_network.py's; only the target differs
(library/training/targets/embeddings.py). See docs/textual_inversion.md. SDXL:
sdxl_train_textual_inversion.py.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from library.training.targets.embedding_trainer import EmbeddingTrainer  # noqa: E402

SCRIPT = "train_textual_inversion"


class TextualInversionTrainer(EmbeddingTrainer):
    """kohya's ``TextualInversionTrainer``: one embedding for the SD 1.x / 2.x text encoder."""

    script_name = SCRIPT


def main(argv: list[str] | None = None, trainer_cls: Any = None) -> int:
    """Parse -> build -> run. Returns the process exit code."""
    from library.training.cli import run_training

    return run_training(SCRIPT, trainer_cls or TextualInversionTrainer, argv)


if __name__ == "__main__":
    sys.exit(main())

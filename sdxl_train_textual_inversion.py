"""Textual inversion for SDXL: learn a new word for both text encoders at once, with kohya's flags.

    accelerate launch sdxl_train_textual_inversion.py --pretrained_model_name_or_path sd_xl_base_1.0.safetensors \\
        --train_data_dir data --output_dir out --token_string mychar --init_word girl \\
        --num_vectors_per_token 4 --resolution 1024 --mixed_precision bf16 --learning_rate 5e-3 \\
        --max_train_steps 1500 --use_object_template --cache_latents --gradient_checkpointing

One embedding per text encoder (CLIP ViT-L and OpenCLIP ViT-bigG), trained together; the UNet,
VAE and text encoders stay frozen. The result is one file with ``clip_l`` [n, 768] and ``clip_g``
[n, 1280] tensors, the layout A1111, ComfyUI and diffusers read for SDXL (gen_img.py:
``--textual_inversion_embeddings``). The template is train_textual_inversion.py's with the SDXL
family of library/training/sdxl_stage.py. See docs/textual_inversion.md.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from library.models.families import Family  # noqa: E402
from library.training.sdxl_stage import SdxlStage  # noqa: E402
from library.training.targets.embedding_trainer import EmbeddingTrainer  # noqa: E402

SCRIPT = "sdxl_train_textual_inversion"


class SdxlTextualInversionTrainer(EmbeddingTrainer, SdxlStage):
    """kohya's ``SdxlTextualInversionTrainer``: the embeddings target with the SDXL family."""

    script_name = SCRIPT
    other_scripts = {Family.SD1: "train_textual_inversion.py", Family.SD2: "train_textual_inversion.py"}


def main(argv: list[str] | None = None, trainer_cls: Any = None) -> int:
    """Parse -> build -> run. Returns the process exit code."""
    from library.training.cli import run_training

    return run_training(SCRIPT, trainer_cls or SdxlTextualInversionTrainer, argv)


if __name__ == "__main__":
    sys.exit(main())

"""Extended Textual Inversion (XTI, "P+"): one embedding per UNet cross-attention layer, SD 1.x, kohya's flags.

    python train_textual_inversion_XTI.py --pretrained_model_name_or_path sd15.safetensors \\
        --train_data_dir data --output_dir out --token_string mytoy --init_word toy \\
        --num_vectors_per_token 2 --resolution 512 --learning_rate 5e-3 --max_train_steps 1500 \\
        --use_object_template --cache_latents

Like train_textual_inversion.py, but the token gets its own ``n`` vectors for each of the 16
cross-attention layers of the UNet (IN01 ... OUT11), trained together; everything else stays frozen.
The result is ``<output_name>.safetensors`` in kohya's XTI layout (one ``[n, D]`` tensor per layer
name; ``--save_model_as pt`` for kohya's pickle), which ``gen_img.py --XTI_embeddings`` reads. SD 2.x
and SDXL are not supported (use train_textual_inversion.py / sdxl_train_textual_inversion.py). See
docs/textual_inversion.md and library/training/targets/xti.py.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from library.training.targets.xti import XTITrainer  # noqa: E402

SCRIPT = "train_textual_inversion_XTI"


def main(argv: list[str] | None = None, trainer_cls: Any = None) -> int:
    """Parse -> build -> run. Returns the process exit code."""
    from library.training.cli import run_training

    return run_training(SCRIPT, trainer_cls or XTITrainer, argv)


if __name__ == "__main__":
    sys.exit(main())

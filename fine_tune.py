"""Native fine-tuning: train a whole Stable Diffusion 1.x / 2.x model from a metadata file, with kohya's flags.

    python finetune/prepare_buckets_latents.py images meta_cap.json meta_lat.json model.safetensors \\
        --max_resolution 512,512 --mixed_precision no            # optional: buckets + cached latents
    accelerate launch fine_tune.py --pretrained_model_name_or_path model.safetensors \\
        --train_data_dir images --in_json meta_lat.json --dataset_repeats 1 --resolution 512 \\
        --output_dir out --output_name my_model --learning_rate 2e-6 --train_text_encoder

The dataset comes from ``--in_json`` (kohya's ``{image: {caption, tags, image_size, train_resolution}}``
JSON or ``.jsonl`` lines) or from ``metadata_file`` subsets of a dataset TOML. The UNet is trained,
the text encoder with ``--train_text_encoder`` (``--learning_rate_te``). The template and loop are
train_network.py's, the target is the full model (library/training/targets/full_model.py).
See docs/fine_tune.md. SDXL models: sdxl_train.py.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from library.errors import ConfigError  # noqa: E402
from library.training.targets.full_model import TextEncoderPlan  # noqa: E402
from library.training.targets.full_trainer import FullModelTrainer  # noqa: E402

SCRIPT = "fine_tune"


def require_metadata_datasets(group: Any, script: str) -> None:
    """kohya's fine-tuning scripts read metadata datasets only; folders of images are DreamBooth's."""
    kinds = {sub.kind for d in group.datasets for sub in d.params.subsets}
    if kinds - {"finetune"}:
        raise ConfigError(f"{script}.py trains from metadata: give --in_json with --train_data_dir (or "
                          "metadata_file subsets in --dataset_config); for folders of images use train_db.py")


class FineTuneTrainer(FullModelTrainer):
    """kohya's ``fine_tune.py``: the UNet, and the text encoder with ``--train_text_encoder``."""

    script_name = SCRIPT
    tracker_name = "finetuning"

    def text_encoder_plans(self) -> list[TextEncoderPlan]:
        return [TextEncoderPlan(bool(self.args.train_text_encoder), self.args.learning_rate_te)]

    def preflight(self) -> None:
        a = self.args
        if a.fp8_base:
            raise ConfigError("--fp8_base stores a frozen UNet in float8; fine_tune.py trains the UNet itself")
        if not a.in_json and not a.dataset_config:
            raise ConfigError("fine_tune.py needs --in_json (the metadata file) with --train_data_dir, or a "
                              "--dataset_config with metadata_file subsets")
        super().preflight()

    def build_dataset_group(self, seed: int, world: int) -> Any:
        group = super().build_dataset_group(seed, world)
        require_metadata_datasets(group, SCRIPT)
        return group


def main(argv: list[str] | None = None, trainer_cls: Any = None) -> int:
    """Parse -> build -> run. Returns the process exit code."""
    from library.training.cli import run_training

    return run_training(SCRIPT, trainer_cls or FineTuneTrainer, argv)


if __name__ == "__main__":
    sys.exit(main())

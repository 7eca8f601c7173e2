"""Train a LoRA (or any ``--network_module``) on SDXL, with kohya's flags.

    accelerate launch sdxl_train_network.py --config_file run.toml
    python sdxl_train_network.py --pretrained_model_name_or_path sd_xl_base_1.0.safetensors \\
        --dataset_config data.toml --output_dir out --output_name my_lora --network_module networks.lora \\
        --network_dim 16 --network_train_unet_only --cache_latents --cache_text_encoder_outputs

The training template is train_network.py's; this script adds the SDXL model family (two text
encoders, pooled embedding, size/crop time ids: library/training/family_sdxl.py) and
text-encoder output caching (library/data/te_cache.py). See docs/sdxl.md for the low-memory recipe.
SD1.x/SD2.x models: use train_network.py.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from library.errors import ConfigError  # noqa: E402
from library.models.families import Family  # noqa: E402
from library.training.trainer import NetworkTrainer  # noqa: E402

SCRIPT = "sdxl_train_network"
logger = logging.getLogger(SCRIPT)


class SdxlNetworkTrainer(NetworkTrainer):
    """:class:`NetworkTrainer` for SDXL base models (kohya's ``SdxlNetworkTrainer``)."""

    script_name = SCRIPT

    def __init__(self, args: Any):
        super().__init__(args)
        self.te_cache = None  # library.data.te_cache.TextEncoderOutputCache when caching

    def expected_families(self) -> tuple[Family, ...]:
        return (Family.SDXL,)

    def preflight(self) -> None:
        a = self.args
        if a.clip_skip:
            logger.warning("--clip_skip has no effect on SDXL: the penultimate layers of both text encoders are used")
        if a.cache_text_encoder_outputs:  # refuse before loading anything (the TOML may set per-subset options)
            from library.config.dataset_config import build_blueprint_for_args
            from library.data.te_cache import check_cacheable

            blueprint = build_blueprint_for_args(vars(a))
            check_cacheable([s for d in blueprint.datasets for s in d.subsets], not a.network_train_unet_only)

    def build_dataset_group(self, seed: int, world: int) -> Any:
        group = super().build_dataset_group(seed, world)
        bad = sorted({d.params.bucket_reso_steps for d in group.datasets
                      if d.enable_bucket and d.params.bucket_reso_steps % 32})
        if bad:  # the SDXL UNet halves the latents three times: sides must be multiples of 32 px
            raise ConfigError(f"bucket_reso_steps {bad[0]} is not a multiple of 32, which SDXL needs; use 32 or 64")
        return group

    def cache_text_encoder_outputs(self, group: Any, model: Any, accelerator: Any) -> None:
        """``--cache_text_encoder_outputs(_to_disk)``: encode every caption now, then free the encoders."""
        import torch

        from library.data import te_cache

        a = self.args
        if not a.cache_text_encoder_outputs:
            return
        family = self.family_adapter(model.family)

        def encode(captions: list[str]):
            with torch.no_grad(), accelerator.autocast():
                return family.encode_prompts(model.text_encoders, model.tokenizers, captions, a.max_token_length,
                                             None, accelerator.device, weighted=bool(a.weighted_captions))

        fingerprint = te_cache.encoder_fingerprint(model.text_encoders, model.tokenizers, a.max_token_length,
                                                   weighted=bool(a.weighted_captions))
        kwargs = dict(to_disk=bool(a.cache_text_encoder_outputs_to_disk), batch_size=a.vae_batch_size or 1,
                      skip_cache_check=bool(a.skip_cache_check), progress=accelerator.is_main_process)
        if kwargs["to_disk"] and accelerator.num_processes > 1 and not accelerator.is_main_process:
            accelerator.wait_for_everyone()  # the main process writes the files; the others then reuse them
            self.te_cache, _ = te_cache.cache_text_encoder_outputs(group.samples(), encode, fingerprint, **kwargs)
        else:
            self.te_cache, _ = te_cache.cache_text_encoder_outputs(group.samples(), encode, fingerprint, **kwargs)
            if kwargs["to_disk"] and accelerator.num_processes > 1:
                accelerator.wait_for_everyone()
        if not a.highvram:  # only sampling needs them now; they run in float32 on the CPU
            for te in model.text_encoders:
                te.to("cpu", dtype=torch.float32)
            if accelerator.device.type == "cuda":
                torch.cuda.empty_cache()

    def encode_text(self, s: Any, batch: dict[str, Any]):
        if self.te_cache is not None:
            return self.te_cache.conditioning(batch["captions"], s.accelerator.device)
        return super().encode_text(s, batch)


def main(argv: list[str] | None = None) -> int:
    """Parse -> build -> run. Returns the process exit code."""
    from library.training.cli import run_training

    return run_training(SCRIPT, SdxlNetworkTrainer, argv)


if __name__ == "__main__":
    sys.exit(main())

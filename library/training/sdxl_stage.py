"""The SDXL stages every SDXL training script shares (kohya's ``SdxlNetworkTrainer`` behaviour).

:class:`SdxlStage` is a mixin for a :class:`~library.training.trainer.Trainer` of any method
(network, full model, embeddings): it accepts SDXL base models only, refuses buckets whose step
is not a multiple of 32 px (the SDXL UNet halves the latents three times), caches the text
encoders' outputs with ``--cache_text_encoder_outputs(_to_disk)`` (library/data/te_cache.py) and
conditions the UNet from that cache when it exists.

    class SdxlNetworkTrainer(SdxlStage, NetworkTrainer): ...
    class SdxlTrainer(FullModelTrainer, SdxlStage): ...
"""

from __future__ import annotations

import logging
from typing import Any

from library.errors import ConfigError
from library.models.families import Family
from library.training.trainer import Trainer

logger = logging.getLogger(__name__)

class SdxlStage(Trainer):
    """SDXL base models: family, 32-px buckets and text-encoder output caching for any training method."""

    def __init__(self, args: Any):
        super().__init__(args)
        self.te_cache = None  # library.data.te_cache.TextEncoderOutputCache when caching

    def expected_families(self) -> tuple[Family, ...]:
        return (Family.SDXL,)

    def preflight(self) -> None:
        """``--clip_skip`` has no effect; refuse a TE cache with captions that change (before loading anything)."""
        a = self.args
        if a.clip_skip:
            logger.warning("--clip_skip has no effect on SDXL: the penultimate layers of both text encoders are used")
        if a.cache_text_encoder_outputs:  # refuse before loading anything (the TOML may set per-subset options)
            self.check_te_cacheable()

    def check_te_cacheable(self) -> None:
        """Every subset's captions must stay the same between epochs to be cached (the dataset TOML's per-subset
        options included). That no text encoder is trained is a flag rule (library/config/flags/rules.py),
        checked when the flags are parsed."""
        from library.config.dataset_config import build_blueprint_for_args
        from library.data.te_cache import check_cacheable

        blueprint = build_blueprint_for_args(vars(self.args))
        check_cacheable([s for d in blueprint.datasets for s in d.subsets], train_text_encoder=False)

    def build_dataset_group(self, seed: int, world: int) -> Any:
        group = super().build_dataset_group(seed, world)
        problems = sorted({Family.SDXL.check_bucket_steps(d.params.bucket_reso_steps) or ""
                           for d in group.datasets if d.enable_bucket} - {""})
        if problems:  # the family's bucket multiple (SDXL: its UNet halves the latents three times)
            raise ConfigError(problems[0])
        return group

    def cache_text_encoder_outputs(self, group: Any, model: Any, accelerator: Any) -> None:
        """``--cache_text_encoder_outputs(_to_disk)``: encode every caption now, then free the encoders."""
        import torch

        from library.data import te_cache
        from library.training.distributed import main_process_first

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
        # on disk: the main process writes the files; the others then reuse them
        self.te_cache, _ = main_process_first(
            accelerator, lambda: te_cache.cache_text_encoder_outputs(group.samples(), encode, fingerprint, **kwargs),
            kwargs["to_disk"])
        if not a.highvram:  # only sampling needs them now; they run in float32 on the CPU
            for te in model.text_encoders:
                te.to("cpu", dtype=torch.float32)
            if accelerator.device.type == "cuda":
                torch.cuda.empty_cache()

    def encode_text(self, s: Any, batch: dict[str, Any]):
        if self.te_cache is not None:
            return self.te_cache.conditioning(batch["captions"], s.accelerator.device)
        return super().encode_text(s, batch)

"""DeepSpeed flags (kohya's ``library/deepspeed_utils.py``), declared once for every script.

The full-model scripts implement them (library/training/deepspeed_plugin.py); every other
covered script refuses them: a network or embedding is a few MB, so ZeRO's partitioning of
optimizer state and weights has nothing to save there (multi-process data parallel without
DeepSpeed is exact and as fast).
"""

from __future__ import annotations

from library.config.flags.base import DONE, F, Support, in_group, unsupported
from library.config.flags.scripts import COVERED_SCRIPTS, FULL_TRAINERS

_REFUSED = unsupported("only the full-model scripts (train_db.py, fine_tune.py, sdxl_train.py) use DeepSpeed")
_ZERO3_INIT = unsupported("sdtk reads the model from its checkpoint before ZeRO-3 partitions it (zero.Init at "
                          "construction would partition the frozen parts too); stage 3 works without it")


def _declare(support: Support, scripts: tuple[str, ...]) -> list:
    done = support.implemented
    return [
        F("--deepspeed", bool, False, support,
          "Train with DeepSpeed ZeRO through accelerate (pip install 'sdtk[deepspeed]'); launch with "
          "accelerate launch / torchrun for several processes.", scripts=scripts),
        F("--zero_stage", int, 2, support,
          "DeepSpeed ZeRO stage: 0 plain data parallel, 1 partitions optimizer state, 2 also gradients, "
          "3 also the weights.", choices=[0, 1, 2, 3], scripts=scripts),
        F("--offload_optimizer_device", str, None, support,
          "DeepSpeed: keep optimizer state (and its step) on cpu or nvme (ZeRO-Offload: DeepSpeed's CPU Adam, "
          "so --optimizer_type AdamW; nvme needs --zero_stage 3).", choices=[None, "cpu", "nvme"], scripts=scripts),
        F("--offload_optimizer_nvme_path", str, None, support,
          "DeepSpeed: folder on an NVMe drive for --offload_optimizer_device nvme.", scripts=scripts),
        F("--offload_param_device", str, None, support,
          "DeepSpeed: keep the partitioned weights on cpu or nvme (--zero_stage 3).",
          choices=[None, "cpu", "nvme"], scripts=scripts),
        F("--offload_param_nvme_path", str, None, support,
          "DeepSpeed: folder on an NVMe drive for --offload_param_device nvme.", scripts=scripts),
        F("--zero3_init_flag", bool, False, _ZERO3_INIT if done else support,
          "DeepSpeed: construct the model under deepspeed.zero.Init (ZeRO stage 3).", scripts=scripts),
        F("--zero3_save_16bit_model", bool, False, support,
          "DeepSpeed ZeRO-3: kohya's switch to gather the weights for saving; sdtk's saves under stage 3 always "
          "gather the whole model (in the model's dtype), with or without it.", scripts=scripts),
        F("--fp16_master_weights_and_gradients", bool, False, support,
          "DeepSpeed: keep master weights and gradients in fp16 (needs --mixed_precision fp16, --zero_stage 2 "
          "and --offload_optimizer_device cpu).", scripts=scripts),
    ]


FLAGS = in_group("training", [
    *_declare(DONE, FULL_TRAINERS),
    *_declare(_REFUSED, tuple(s for s in COVERED_SCRIPTS if s not in FULL_TRAINERS)),
])

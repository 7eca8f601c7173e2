"""A base model in memory: its components plus what is needed to save it again losslessly."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from library.models.families import Family

# the CLIPTextConfig fields sdtk records in a model config (embedded in the files it saves)
TE_CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "max_position_embeddings", "hidden_act", "projection_dim", "bos_token_id", "eos_token_id",
                  "pad_token_id", "layer_norm_eps")


@dataclass
class LoadedModel:
    """The components of a base model, plus what is needed to save it again losslessly."""

    family: Family
    unet: Any
    vae: Any
    text_encoders: list
    tokenizers: list
    scheduler_config: dict
    v_parameterization: bool = False
    model_config: dict = field(default_factory=dict)
    source: str | None = None
    # original-layout keys of the source file that no component uses (EMA weights, SD2's unused last
    # text-encoder layer, position_ids, ...); they are copied back when saving in the original layout.
    passthrough_keys: list[str] = field(default_factory=list)

    @property
    def v2(self) -> bool:
        return self.family.v2


def te_config_dict(te: Any) -> dict:
    """The recorded config of a transformers CLIP text encoder."""
    return {k: getattr(te.config, k) for k in TE_CONFIG_KEYS}

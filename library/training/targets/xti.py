"""Extended Textual Inversion (XTI, "P+") training on SD 1.x: one embedding per UNet cross-attention layer.

Built on the textual-inversion target (:mod:`.embeddings`) and trainer (:mod:`.embedding_trainer`):

* Tokens: for each of the 16 layers of :data:`~library.models.xti.XTI_LAYERS`, the token's ``n`` kohya
  tokens with the layer's name (``TOKEN_in01``, ``TOKEN1_in01``, ..., ``TOKEN_out11`` ...; ``16 n`` in all,
  layer by layer, consecutive ids after the vocabulary). Only their ``[16 n, D]`` rows train (the
  embeddings target's :class:`~.embeddings.ExtendedEmbedding`); the table and every model weight stay
  frozen.
* Conditioning: captions are tokenized once with the first layer's tokens (``TOKEN`` -> ``TOKEN_in01
  TOKEN1_in01 ...``); for layer ``l`` the ids are shifted by ``l n`` to that layer's tokens and the 16 id
  sets go through the text encoder as one batch, giving ``[16, B, L, D]`` states
  (:attr:`~library.training.family.Conditioning.layers`). The UNet is hooked with
  :func:`~library.models.xti.enable_per_block_conditioning`, so each cross-attention layer sees its own.
  Weighted captions and sample prompts are weighted per layer alike; samples during training render with
  the per-layer states too (kohya's XTI script does not sample).
* Start vectors: every layer starts from the same ``n`` vectors as plain textual inversion would
  (``--init_word``'s tokens repeated, or the table's mean with noise). kohya's script indexes its init
  tokens as ``(i // 16) % len`` over the ``16 n`` rows, which mixes the layers' rows unevenly; sdtk
  starts each layer like a TI embedding.
* ``--weights``: an XTI file (kohya's layout) with the same vector count and width.
* Files: kohya's XTI layout ``{LAYER: [n, D]}`` (``.safetensors`` by default with the TI metadata: ModelSpec,
  ``ss_token_string``, ``ss_num_vectors_per_token``, plus ``ss_xti_layers``; ``.pt`` / ``.ckpt``: the
  same dict pickled, as kohya writes it), which ``gen_img.py --XTI_embeddings`` reads.
"""

from __future__ import annotations

from typing import Any

import torch

from library.config.settings import flag_values
from library.errors import ConfigError
from library.models.families import Family
from library.models.xti import (
    N_LAYERS, XTI_LAYERS, enable_per_block_conditioning, predict_per_block, read_xti_file, xti_state_dict,
)
from library.training.family import Conditioning
from library.training.targets.embedding_trainer import EmbeddingTrainer
from library.training.targets.embeddings import (
    EmbeddingTarget, TokenTable, check_new_tokens, initial_vectors, kohya_token_strings,
)

MID = XTI_LAYERS.index("MID")


class XTITarget(EmbeddingTarget):
    """``16 n`` new token vectors, ``n`` per cross-attention layer (see the module docstring)."""

    def __init__(self, args: Any):
        super().__init__(args)
        self.hooks = None

    @property
    def n(self) -> int:
        return int(self.args.num_vectors_per_token)

    def layer_strings(self, layer: int) -> list[str]:
        """The ``n`` tokens of one layer (index in ``XTI_LAYERS``)."""
        suffix = "_" + XTI_LAYERS[layer].lower()
        return [t + suffix for t in kohya_token_strings(self.args.token_string, self.n)]

    def token_strings(self) -> list[str]:
        return [t for layer in range(N_LAYERS) for t in self.layer_strings(layer)]

    def file_keys(self, family: Family) -> list[str]:
        return ["xti"]  # the state's key; files use the layer names (file_tensors)

    def build_tables(self, model: Any) -> list[TokenTable]:
        # the word itself is not added (captions are rewritten to layer tokens), but a known word would be
        # taken from every caption and prompt: refuse it as kohya does
        check_new_tokens(model.tokenizers[0], kohya_token_strings(self.args.token_string, self.n), "the tokenizer")
        tables = super().build_tables(model)
        (table,) = tables
        init = self._init_ids(model.tokenizers[0], "the tokenizer")
        start = initial_vectors(table.embedding.base.weight, self.n, init)  # one TI embedding's start ...
        with torch.no_grad():
            table.vectors.copy_(start.repeat(N_LAYERS, 1).to(table.vectors.dtype))  # ... for every layer
        return tables

    @property
    def first_id(self) -> int:
        return self.tables[0].ids[0]

    def read_weights(self, path: str) -> list[torch.Tensor]:
        vectors = read_xti_file(path, "--weights", bool(flag_values(self.args)["allow_pickle"]))
        if vectors.shape[1] != self.n:
            raise ConfigError(f"--weights {path} holds {vectors.shape[1]} vectors per layer, but "
                              f"--num_vectors_per_token is {self.n}; use --num_vectors_per_token {vectors.shape[1]}")
        return [vectors.reshape(-1, vectors.shape[-1])]

    def file_tensors(self, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        v = self.tables[0].vectors.detach()
        return xti_state_dict(v.to("cpu", dtype=dtype or v.dtype).reshape(N_LAYERS, self.n, -1))

    def finish(self, t: Any, model: Any, accelerator: Any, weight_dtype: torch.dtype) -> None:
        super().finish(t, model, accelerator, weight_dtype)
        if self.hooks is None:
            self.hooks = enable_per_block_conditioning(model.unet)

    def signature(self, s: Any) -> dict[str, Any]:
        return {**super().signature(s), "xti_layers": list(XTI_LAYERS)}

    def session_metadata(self, t: Any, s: Any, optimizer_text: str) -> dict[str, str]:
        return {**super().session_metadata(t, s, optimizer_text), "ss_xti_layers": ",".join(XTI_LAYERS)}


def per_layer_adapter(inner: Any, target: XTITarget) -> Any:
    """``inner`` (the TI trainer's family adapter) encoding every text once per layer (see the module doc).

    Its :meth:`encode` returns a :class:`Conditioning` with ``layers`` ``[16, B, L, D]`` (``hidden_states`` is
    the MID layer's), :meth:`apply_token_weights` weights each layer, :meth:`predict` feeds the hooked UNet.
    """
    base = type(inner)

    class PerLayer(base):  # type: ignore[misc, valid-type]
        def encode(self, text_encoders: list, tokenizers: list, token_ids: list[torch.Tensor],
                   clip_skip: int | None) -> Conditioning:
            ids = token_ids[0]  # [B, chunks, 77], the token written with the first layer's tokens
            first, n = target.first_id, target.n
            own = (ids >= first) & (ids < first + n)
            shifted = torch.cat([torch.where(own, ids + layer * n, ids) for layer in range(N_LAYERS)])
            cond = super().encode(text_encoders, tokenizers, [shifted], clip_skip)
            layers = cond.hidden_states.reshape(N_LAYERS, ids.shape[0], *cond.hidden_states.shape[1:])
            return Conditioning(layers[MID], cond.pooled, layers)

        def apply_token_weights(self, cond: Conditioning, weights: list[torch.Tensor], text_encoders: list,
                                keep_mean: bool = False) -> Conditioning:
            if cond.layers is None:
                return super().apply_token_weights(cond, weights, text_encoders, keep_mean)
            layers = torch.stack([super(PerLayer, self).apply_token_weights(
                Conditioning(layer), weights, text_encoders, keep_mean).hidden_states for layer in cond.layers])
            return Conditioning(layers[MID], cond.pooled, layers)

        def predict(self, unet: torch.nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                    cond: Conditioning, batch: dict[str, Any] | None = None) -> torch.Tensor:
            if cond.layers is None:
                return super().predict(unet, noisy_latents, timesteps, cond, batch)
            return predict_per_block(unet, noisy_latents, timesteps, cond.layers)

    PerLayer.__name__ = PerLayer.__qualname__ = f"PerLayer{base.__name__}"
    adapter = PerLayer()
    adapter.__dict__.update(vars(inner))
    return adapter


class XTITrainer(EmbeddingTrainer):
    """Train an XTI embedding on an SD 1.x model (kohya's ``train_textual_inversion_XTI.py``)."""

    script_name = "train_textual_inversion_XTI"
    other_scripts = {Family.SDXL: "sdxl_train_textual_inversion.py", Family.SD2: "train_textual_inversion.py"}

    def expected_families(self) -> tuple[Family, ...]:
        return (Family.SD1,)

    def make_target(self) -> XTITarget:
        self.target = XTITarget(self.args)
        return self.target

    def output_label(self) -> str:
        return "XTI embedding"

    def expand_text(self, text: str) -> str:
        """The token written as the first layer's ``n`` tokens (the encoder shifts them to each layer's)."""
        return text.replace(self.args.token_string, " ".join(self.target.layer_strings(0)))

    def family_adapter(self, family: Family) -> Any:
        return per_layer_adapter(super().family_adapter(family), self.target)

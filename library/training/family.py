"""The model-family interface the trainer talks to.

A family (SD1/SD2 here, SDXL in #5) knows how to turn captions into UNet conditioning, how to
call its UNet, which string names it in kohya's metadata and which diffusers pipeline renders
samples. The trainer never branches on the family; adding one means adding one adapter module
and registering it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

import torch

from library.models.families import Family


@dataclass
class Conditioning:
    """What a family's text encoding produces for the UNet.

    Attributes:
        hidden_states: ``[B, L, D]`` cross-attention states (``L`` = 77 or 75 * chunks + 2).
        pooled: ``[B, P]`` pooled text embedding (SDXL), else None.
        layers: ``[16, B, L, D]`` one state per UNet cross-attention layer (Extended Textual Inversion,
            :mod:`library.models.xti`), else None; ``hidden_states`` is then one of them.
    """

    hidden_states: torch.Tensor
    pooled: torch.Tensor | None = None
    layers: torch.Tensor | None = None

    def repeat(self, n: int) -> "Conditioning":
        rep = lambda t, dim=0: None if t is None else t.repeat_interleave(n, dim=dim)  # noqa: E731
        return Conditioning(rep(self.hidden_states), rep(self.pooled), rep(self.layers, 1))


class FamilyAdapter(ABC):
    """Family-specific behaviour behind one small interface (see module docstring)."""

    family: Family

    @abstractmethod
    def tokenize(self, tokenizers: list, captions: list[str], max_token_length: int | None) -> list[torch.Tensor]:
        """Token ids per tokenizer, each ``LongTensor[B, n_chunks, 77]``."""

    @abstractmethod
    def encode(self, text_encoders: list, tokenizers: list, token_ids: list[torch.Tensor],
               clip_skip: int | None) -> Conditioning:
        """Run the text encoder(s) on ``token_ids`` (from :meth:`tokenize`)."""

    @abstractmethod
    def predict(self, unet: torch.nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                cond: Conditioning, batch: dict[str, Any] | None = None) -> torch.Tensor:
        """UNet output ``[B, 4, h, w]`` for ``noisy_latents`` ``[B, 4, h, w]`` at ``timesteps`` ``[B]``."""

    @abstractmethod
    def base_model_version(self, v2: bool, v_parameterization: bool) -> str:
        """kohya's ``ss_base_model_version`` string."""

    @abstractmethod
    def pipeline_class(self) -> type:
        """The diffusers pipeline class that renders samples for this family."""

    def encode_prompts(self, text_encoders: list, tokenizers: list, prompts: list[str],
                       max_token_length: int | None, clip_skip: int | None, device: torch.device,
                       weighted: bool = False, keep_mean: bool = False) -> Conditioning:
        """Tokenize and encode ``prompts`` in one call (sampling, caching); ``weighted`` /
        ``keep_mean``: see :meth:`tokenize_weighted` and :meth:`apply_token_weights`."""
        if not weighted:
            ids = [t.to(device) for t in self.tokenize(tokenizers, prompts, max_token_length)]
            return self.encode(text_encoders, tokenizers, ids, clip_skip)
        ids, weights = self.tokenize_weighted(tokenizers, prompts, max_token_length)
        cond = self.encode(text_encoders, tokenizers, [t.to(device) for t in ids], clip_skip)
        return self.apply_token_weights(cond, weights, text_encoders, keep_mean=keep_mean)

    n_text_encoders = 1  # how many of the model's tokenizers/text encoders the family uses

    def tokenize_weighted(self, tokenizers: list, captions: list[str], max_token_length: int | None
                          ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``--weighted_captions``: ids as :meth:`tokenize` gives them for the captions without the
        attention syntax, and per-token weights, each ``[B, n_chunks, 77]`` per tokenizer."""
        from library.data.tokenize import tokenize_captions_weighted

        pairs = [tokenize_captions_weighted(tok, captions, max_token_length)
                 for tok in tokenizers[: self.n_text_encoders]]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def apply_token_weights(self, cond: Conditioning, weights: list[torch.Tensor], text_encoders: list,
                            keep_mean: bool = False) -> Conditioning:
        """Multiply each token's hidden state by its weight; the pooled embedding is not weighted.

        Weighted captions (training) use the plain product, as kohya does. ``keep_mean`` then
        rescales each sample so the mean of its states is unchanged, as the long-prompt-weighting
        pipelines kohya samples with do. The states of several text encoders are concatenated
        along features; each part gets its own tokenizer's weights (and its own rescaling).
        """
        from library.data.tokenize import merge_chunk_weights

        widths = [te.config.hidden_size for te in text_encoders[: self.n_text_encoders]]
        parts = []
        for part, w in zip(cond.hidden_states.split(widths, dim=-1), weights):
            w = merge_chunk_weights(w).to(part.device, part.dtype)
            weighted = part * w.unsqueeze(-1)
            if keep_mean and not bool((w == 1).all()):
                ratio = part.float().mean(dim=(1, 2)) / weighted.float().mean(dim=(1, 2))
                ratio = torch.where(torch.isfinite(ratio), ratio, torch.ones_like(ratio))  # a zero mean stays as is
                weighted = weighted * ratio.to(part.dtype)[:, None, None]
            parts.append(weighted)
        return Conditioning(torch.cat(parts, dim=-1), cond.pooled)


_REGISTRY: dict[Family, Callable[[], FamilyAdapter]] = {}


def register_family(family: Family) -> Callable:
    """Class decorator: register an adapter for ``family`` (duplicates are a programming error)."""

    def deco(cls):
        if family in _REGISTRY:
            raise RuntimeError(f"a family adapter for {family.value} is already registered")
        _REGISTRY[family] = cls
        return cls

    return deco


def get_family_adapter(family: Family) -> FamilyAdapter:
    """The adapter instance for ``family``."""
    import library.training.family_sd  # noqa: F401  (registers SD1/SD2)
    import library.training.family_sdxl  # noqa: F401  (registers SDXL)

    try:
        return _REGISTRY[family]()
    except KeyError:
        raise KeyError(f"no trainer adapter for model family {family.value}") from None

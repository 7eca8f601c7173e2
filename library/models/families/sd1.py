"""Stable Diffusion 1.x: one CLIP ViT-L text encoder, kohya's chunked long prompts.

Also the shared SD1/SD2 pieces: :func:`text_hidden_states` (``--clip_skip``), :func:`merge_chunks`
(long-prompt layout) and :class:`SDAdapter`, which SD2 reuses.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from library.models.families.base import Conditioning, Family, FamilyAdapter, register


def text_hidden_states(text_encoder: torch.nn.Module, input_ids: torch.Tensor, clip_skip: int | None) -> torch.Tensor:
    """CLIP hidden states ``[N, 77, D]`` for ``input_ids`` ``[N, 77]``.

    ``clip_skip`` k > 1 takes the output of the k-th layer from the end and applies the final
    layer norm, as kohya and A1111 do; None or 1 takes the last layer (normed).
    """
    if not clip_skip or clip_skip <= 1:
        return text_encoder(input_ids)[0]
    out = text_encoder(input_ids, output_hidden_states=True)
    hidden = out.hidden_states[-clip_skip]
    # transformers 5's CLIPTextModel has no ``text_model``; the projection variant still does
    inner = getattr(text_encoder, "text_model", text_encoder)
    return inner.final_layer_norm(hidden)


def merge_chunks(hidden: torch.Tensor, input_ids: torch.Tensor, eos_token_id: int, pad_is_eos: bool) -> torch.Tensor:
    """kohya's long-prompt layout: ``[B, n, 77, D]`` -> ``[B, 75 * n + 2, D]``.

    The first chunk's BOS state, the 75 middle states of every chunk, then the last chunk's
    final state. With one chunk it is the plain 77-token layout. For SD2 (pad token is not
    EOS) an empty chunk ("BOS EOS pad ...") has its first middle state replaced by the next
    one, so that chunk does not contribute a second EOS state (kohya's rule).

    Args:
        hidden: ``[B, n, 77, D]`` per-chunk states.
        input_ids: ``[B, n, 77]`` the ids that produced them.
    """
    b, n, length, d = hidden.shape
    if n == 1:
        return hidden[:, 0]
    middles = hidden[:, :, 1 : length - 1]  # [B, n, 75, D]
    if not pad_is_eos:
        empty = input_ids[:, :, 1] == eos_token_id  # [B, n]
        if empty.any():
            middles = middles.clone()
            middles[:, :, 0][empty] = middles[:, :, 1][empty]
    return torch.cat([hidden[:, 0, :1], middles.reshape(b, n * (length - 2), d), hidden[:, -1, -1:]], dim=1)


class SDAdapter(FamilyAdapter):
    """SD1.x and SD2.x: one text encoder, states of the last layer (or ``--clip_skip``'s), normed."""

    def tokenize(self, tokenizers: list, captions: list[str], max_token_length: int | None) -> list[torch.Tensor]:
        from library.data.tokenize import tokenize_captions

        return [tokenize_captions(tokenizers[0], captions, max_token_length)]

    def encode(self, text_encoders: list, tokenizers: list, token_ids: list[torch.Tensor],
               clip_skip: int | None) -> Conditioning:
        te, tok, ids = text_encoders[0], tokenizers[0], token_ids[0]
        b, n, length = ids.shape
        hidden = text_hidden_states(te, ids.reshape(b * n, length).to(te.device), clip_skip)
        hidden = hidden.reshape(b, n, length, hidden.shape[-1])
        pad_is_eos = tok.pad_token_id == tok.eos_token_id
        return Conditioning(merge_chunks(hidden, ids.to(hidden.device), tok.eos_token_id, pad_is_eos))

    def predict(self, unet: torch.nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                cond: Conditioning, batch: dict[str, Any] | None = None) -> torch.Tensor:
        return unet(noisy_latents, timesteps, cond.hidden_states, return_dict=False)[0]

    def prompt_hidden_states(self, text_encoder: torch.nn.Module, index: int, input_ids: torch.Tensor,
                             clip_skip: int | None) -> tuple[torch.Tensor, Any]:
        return text_hidden_states(text_encoder, input_ids, clip_skip), None

    def base_model_version(self, v2: bool, v_parameterization: bool) -> str:
        return ("sd_v2" if v2 else "sd_v1") + ("_v" if v_parameterization else "")


class SD1(Family):
    """SD1.x (512 px, epsilon)."""

    value = "sd1"
    pretty = "SD1.x"
    adapter_class = SDAdapter

    def detect_keys(self, keys: set[str], config: Mapping | None) -> bool:
        return any(k.startswith("cond_stage_model.transformer.") for k in keys)

    def detect_diffusers(self, unet_config: Mapping, te_config: Mapping, model_index: Mapping) -> bool:
        # no SDXL size embedding, OpenAI CLIP (quick_gelu) width 768 rather than SD2's OpenCLIP
        return unet_config.get("addition_embed_type") != "text_time" and not (
            te_config.get("hidden_act") == "gelu" or unet_config.get("cross_attention_dim") == 1024)

    def tiny_unet_config(self) -> dict:
        return dict(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=(32, 32, 64, 64),
            cross_attention_dim=32,
            attention_head_dim=4,
        )


SD1_FAMILY = register(SD1())

"""SDXL base: two CLIP text encoders, a pooled text embedding and size/crop time ids.

Conditioning, as kohya's SDXL strategy and diffusers' ``StableDiffusionXLPipeline`` build it:

* TE1 (CLIP ViT-L, 12 layers) and TE2 (OpenCLIP ViT-bigG, 32 layers) each give the hidden
  states of their *penultimate* layer, without the final layer norm (kohya reads TE1's
  ``hidden_states[11]``, i.e. the penultimate of 12; diffusers reads ``hidden_states[-2]`` of
  both). They are concatenated to ``768 + 1280 = 2048`` features.
* The pooled embedding is TE2's final (normed) state at the first EOS token, through its
  ``text_projection`` (1280 features).
* ``--max_token_length`` 150 / 225: each 75-token chunk is encoded alone and the chunks merged
  as for SD1/SD2; TE2's pad token is not EOS, but kohya does not apply SD2's empty-chunk fix for
  SDXL, and neither does sdtk. The pooled embedding comes from the first chunk.
* ``time_ids`` ``[B, 6]`` = (original h, w, crop top, left, target h, w) of each sample, passed
  with the pooled embedding as diffusers' ``added_cond_kwargs``.

``--clip_skip`` has no effect on SDXL (kohya warns and ignores it too).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import torch

from library.models.families.base import Conditioning, Family, FamilyAdapter, TinyTextEncoder, register
from library.models.families.sd1 import merge_chunks

logger = logging.getLogger(__name__)

BASE_MODEL_VERSION = "sdxl_base_v1-0"  # kohya's ss_base_model_version for SDXL base
ARCH_XL_V1_BASE = "stable-diffusion-xl-v1-base"


def penultimate_hidden_states(text_encoder: torch.nn.Module, input_ids: torch.Tensor
                              ) -> tuple[torch.Tensor, Any]:
    """Hidden states ``[N, 77, D]`` of the penultimate layer (no final norm) and the raw output."""
    out = text_encoder(input_ids, output_hidden_states=True, return_dict=True)
    return out.hidden_states[-2], out


def pooled_embedding(text_encoder: torch.nn.Module, last_hidden_state: torch.Tensor, input_ids: torch.Tensor,
                     eos_token_id: int) -> torch.Tensor:
    """TE2's pooled text embedding ``[N, P]``: the final state at the first EOS, projected.

    Args:
        last_hidden_state: ``[N, 77, D]`` final-layer-normed states.
        input_ids: ``[N, 77]``; a row without EOS pools position 0 (kohya's behaviour).
    """
    first_eos = (input_ids == eos_token_id).int().argmax(dim=1).to(last_hidden_state.device)
    pooled = last_hidden_state[torch.arange(last_hidden_state.shape[0], device=last_hidden_state.device), first_eos]
    proj = text_encoder.text_projection
    return proj(pooled.to(proj.weight.dtype))


def time_ids_from_batch(batch: dict[str, Any] | None, latents: torch.Tensor) -> torch.Tensor:
    """``[B, 6]`` float time ids from a batch's sizes (see module docstring).

    Without size information (``batch`` None or lacking the keys) every sample is taken as
    uncropped at its latent size x 8, as diffusers' pipeline does by default.
    """
    b, _, h, w = latents.shape
    if batch is not None and batch.get("original_sizes_hw") is not None:
        ids = torch.cat([batch["original_sizes_hw"], batch["crop_top_lefts"], batch["target_sizes_hw"]], dim=1)
        ids = ids[:b]
    else:
        ids = torch.tensor([[h * 8, w * 8, 0, 0, h * 8, w * 8]]).expand(b, 6)
    return ids.to(latents.device, torch.float32)


class SDXLAdapter(FamilyAdapter):
    """SDXL base: TE1 + TE2 penultimate states (2048 features), TE2 pooled output, time ids."""

    def tokenize(self, tokenizers: list, captions: list[str], max_token_length: int | None) -> list[torch.Tensor]:
        from library.data.tokenize import tokenize_captions

        return [tokenize_captions(tok, captions, max_token_length) for tok in tokenizers[:2]]

    def encode(self, text_encoders: list, tokenizers: list, token_ids: list[torch.Tensor],
               clip_skip: int | None) -> Conditioning:
        """Conditioning with ``hidden_states`` ``[B, 75n + 2, D1 + D2]`` and ``pooled`` ``[B, P]``."""
        te1, te2 = text_encoders[0], text_encoders[1]
        tok2 = tokenizers[1]
        states = []
        pooled = None
        for te, ids in ((te1, token_ids[0]), (te2, token_ids[1])):
            b, n, length = ids.shape
            flat = ids.reshape(b * n, length).to(te.device)
            hidden, out = penultimate_hidden_states(te, flat)
            hidden = hidden.reshape(b, n, length, hidden.shape[-1])
            # kohya merges TE2's chunks without SD2's empty-chunk substitution: pad_is_eos=True skips it
            states.append(merge_chunks(hidden, ids.to(hidden.device), -1, True))
            if te is te2:
                pooled = pooled_embedding(te2, out.last_hidden_state, flat, tok2.eos_token_id)
                pooled = pooled.reshape(b, n, -1)[:, 0]  # the first chunk's pooled output
        h1, h2 = states
        return Conditioning(torch.cat([h1, h2.to(h1.dtype)], dim=2), pooled)

    def predict(self, unet: torch.nn.Module, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                cond: Conditioning, batch: dict[str, Any] | None = None) -> torch.Tensor:
        time_ids = time_ids_from_batch(batch, noisy_latents)
        added = {"text_embeds": cond.pooled.to(noisy_latents.device, noisy_latents.dtype),
                 "time_ids": time_ids.to(noisy_latents.dtype)}
        hidden = cond.hidden_states.to(noisy_latents.device, noisy_latents.dtype)
        return unet(noisy_latents, timesteps, hidden, added_cond_kwargs=added, return_dict=False)[0]

    def prompt_hidden_states(self, text_encoder: torch.nn.Module, index: int, input_ids: torch.Tensor,
                             clip_skip: int | None) -> tuple[torch.Tensor, Any]:
        # gen_img: the penultimate layer by default, --clip_skip k the k-th from the end; no final norm
        out = text_encoder(input_ids, output_hidden_states=True, return_dict=True)
        return out.hidden_states[-(clip_skip or 2)], out

    def prompt_pooled(self, text_encoder: torch.nn.Module, index: int, output: Any, input_ids: torch.Tensor,
                      eos_token_id: int) -> torch.Tensor | None:
        if index != 1:
            return None
        return pooled_embedding(text_encoder, output.last_hidden_state, input_ids, eos_token_id)


class SDXL(Family):
    value = "sdxl"
    pretty = "SDXL"
    adapter_class = SDXLAdapter
    train_network_script = "sdxl_train_network.py"
    tokenizer_ids = (("openai/clip-vit-large-patch14", None), ("laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", None))
    tokenizer_pads = (None, "!")  # the second (OpenCLIP) tokenizer pads with "!"
    text_encoder_classes = ("CLIPTextModel", "CLIPTextModelWithProjection")
    te_prefixes = (("conditioner.embedders.0.transformer.", False), ("conditioner.embedders.1.model.", True))
    lora_key_layout = "sdxl"
    bucket_multiple = 32  # the UNet halves the latents three times
    supports_te_cache = True
    size_conditioning = True
    latent_scale = 0.13025
    pipeline_name = "StableDiffusionXLPipeline"
    scheduler_name = "EulerDiscreteScheduler"
    modelspec_lora_sgm = True
    modelspec_architectures = (ARCH_XL_V1_BASE,)
    default_resolution = (1024, 1024)
    tiny_text_encoders = (TinyTextEncoder(32, "quick_gelu"),
                          TinyTextEncoder(64, "gelu", projection=True, pad_token="!"))

    def detect_keys(self, keys: set[str], config: Mapping | None) -> bool:
        return "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys

    def detect_diffusers(self, unet_config: Mapping, te_config: Mapping, model_index: Mapping) -> bool:
        return unet_config.get("addition_embed_type") == "text_time"

    def base_model_version(self, v_parameterization: bool) -> str:
        return BASE_MODEL_VERSION

    def model_index_extras(self) -> dict:
        extras: dict = dict(force_zeros_for_empty_prompt=True)
        if self.base is not None:
            extras["_sdtk_family"] = self.value
        return extras

    def tiny_unet_config(self) -> dict:
        return dict(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64, 64),
            transformer_layers_per_block=(1, 2, 2),
            attention_head_dim=(2, 4, 4),
            cross_attention_dim=96,  # 32 (TE1) + 64 (TE2)
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=64 + 6 * 8,
        )


SDXL_FAMILY = register(SDXL())

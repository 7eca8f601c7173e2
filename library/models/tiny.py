"""Tiny random-weight SD1 / SD2 / SDXL models with the real module structure and names.

Used by the tests, the quickstart and the benchmarks. Every component has the same class,
block layout and parameter names as the full-size model, at tiny widths: 64 px images,
8x8 latents, text encoders of width 32 (SDXL's second text encoder: 64, so diffusers'
single-file loader can tell the two apart by width). Building a model takes about a second
and is deterministic for a given seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from library.models.families import Family
from library.models.loaded import LoadedModel, te_config_dict
from library.models.tokenizers import bytes_to_unicode

_bytes_to_unicode = bytes_to_unicode  # the older private name

# A small English word list: each becomes a single token of the tiny tokenizer, so short
# captions tokenize into a realistic number of tokens. Other words fall back to characters.
TINY_WORDS = (
    "a an the of and with in on at to for from by is are photo picture image painting drawing "
    "portrait close up closeup view high quality detailed best masterpiece background white black "
    "red green blue yellow orange brown gray grey pink purple dog cat person man woman girl boy "
    "face hair eyes sitting standing looking outdoors indoors grass tree sky cloud clouds water "
    "flower flowers house street city car rocket astronaut coffee cup motorcycle space star stars "
    "sks ohwx style token wall table window light dark sunny day night snow beach mountain"
).split()


def tiny_vocab_and_merges(words: tuple[str, ...] | list[str] = TINY_WORDS) -> tuple[dict[str, int], list[str]]:
    """A CLIP-style BPE vocabulary: all byte symbols (with and without ``</w>``), whole-word
    tokens for ``words`` built by left-to-right merges, then the two special tokens."""
    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges: list[str] = []
    seen = set(vocab_list)
    for word in words:
        chars = list(word)
        chars[-1] += "</w>"
        cur = chars[0]
        for nxt in chars[1:]:
            merged = cur + nxt
            if merged not in seen:
                merges.append(f"{cur} {nxt}")
                vocab_list.append(merged)
                seen.add(merged)
            cur = merged
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def tiny_tokenizer(pad_token: str = "<|endoftext|>"):
    """A ``CLIPTokenizer`` with the tiny vocabulary (SD2 and SDXL's second tokenizer pad with "!")."""
    from transformers import CLIPTokenizer

    vocab, merges = tiny_vocab_and_merges()
    tok = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], pad_token=pad_token)
    tok.model_max_length = 77
    return tok


@dataclass
class TinyModel:
    """The components of a tiny model, as diffusers/transformers objects."""

    family: Family
    unet: Any
    vae: Any
    text_encoders: list
    tokenizers: list
    scheduler_config: dict


def _text_encoder(vocab_size: int, width: int, act: str, with_projection: bool, tok) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=width * 2,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=width,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(cfg)


def unet_config(family: Family) -> dict:
    """Tiny UNet2DConditionModel config with the family's real block layout."""
    return Family(family).tiny_unet_config()


def vae_config(family: Family) -> dict:
    return Family(family).tiny_vae_config()


def scheduler_config(v_prediction: bool = False) -> dict:
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction" if v_prediction else "epsilon",
    )


def build_tiny_model(family: Family, seed: int = 0, v_prediction: bool = False) -> TinyModel:
    """Build a tiny random-weight model of ``family``; same seed, same weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    family = Family(family)
    try:
        toks, tes = [], []
        for spec in family.tiny_text_encoders:
            tok = tiny_tokenizer(pad_token=spec.pad_token)
            toks.append(tok)
            tes.append(_text_encoder(len(tok), spec.width, spec.act, spec.projection, tok))
        unet = UNet2DConditionModel(**unet_config(family))
        vae = AutoencoderKL(**vae_config(family))
    finally:
        torch.random.set_rng_state(gen_state)
    for m in [unet, vae, *tes]:
        m.eval().requires_grad_(False)
    return TinyModel(family, unet, vae, tes, toks, scheduler_config(v_prediction))


def tiny_loaded_model(family: Family, seed: int = 0, v_prediction: bool = False) -> LoadedModel:
    """A tiny model as a :class:`library.models.loaded.LoadedModel`, ready to save in either layout."""
    family = Family(family)
    m = build_tiny_model(family, seed=seed, v_prediction=v_prediction)
    cfg = {
        "family": family.value,
        "unet": unet_config(family),
        "vae": vae_config(family),
        "text_encoders": [{"cls": type(t).__name__, "config": te_config_dict(t)} for t in m.text_encoders],
        "scheduler": m.scheduler_config,
    }
    return LoadedModel(family, m.unet, m.vae, m.text_encoders, m.tokenizers, m.scheduler_config, v_prediction, cfg)

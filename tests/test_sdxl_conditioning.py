"""SDXL text conditioning and size/crop time ids on the tiny SDXL model, against diffusers' pipeline."""

from __future__ import annotations

import pytest
import torch

from library.errors import ConfigError
from library.models.families import Family
from library.models.tiny import build_tiny_model
from library.training.family import get_family_adapter

CPU = torch.device("cpu")
LONG = " ".join(["a photo of a red cat with blue eyes sitting on the grass"] * 9)  # > 75 tokens


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_model(Family.SDXL)


@pytest.fixture(scope="module")
def pipe(tiny):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=tiny.vae, text_encoder=tiny.text_encoders[0], text_encoder_2=tiny.text_encoders[1],
        tokenizer=tiny.tokenizers[0], tokenizer_2=tiny.tokenizers[1], unet=tiny.unet,
        scheduler=DDIMScheduler(**tiny.scheduler_config))


def _ours(tiny, prompts, max_token_length=None, clip_skip=None):
    adapter = get_family_adapter(Family.SDXL)
    with torch.no_grad():
        return adapter.encode_prompts(tiny.text_encoders, tiny.tokenizers, prompts, max_token_length, clip_skip, CPU)


def _diffusers(pipe, prompts):
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=CPU, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
    return embeds, pooled


def test_embeddings_equal_diffusers_encode_prompt(tiny, pipe):
    prompts = ["a photo of a cat with red eyes", "", "sks dog sitting on the beach at night"]
    ours = _ours(tiny, prompts)
    embeds, pooled = _diffusers(pipe, prompts)
    assert ours.hidden_states.shape == (3, 77, 96)  # 32 (TE1) + 64 (TE2) features
    assert ours.pooled.shape == (3, 64)
    torch.testing.assert_close(ours.hidden_states, embeds, rtol=0, atol=0)
    torch.testing.assert_close(ours.pooled, pooled, rtol=0, atol=0)


def test_penultimate_layers_without_final_norm(tiny):
    """Both halves are the penultimate layer's raw states (kohya: TE1 hidden_states[11] of 12 layers)."""
    ours = _ours(tiny, ["a cat"])
    ids1 = tiny.tokenizers[0](["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        out = tiny.text_encoders[0](ids1, output_hidden_states=True)
    n_layers = tiny.text_encoders[0].config.num_hidden_layers
    torch.testing.assert_close(ours.hidden_states[..., :32], out.hidden_states[n_layers - 1], rtol=0, atol=0)
    assert not torch.allclose(ours.hidden_states[..., :32], out.last_hidden_state)


def test_clip_skip_has_no_effect(tiny):
    a, b = _ours(tiny, ["a red car"]), _ours(tiny, ["a red car"], clip_skip=2)
    assert torch.equal(a.hidden_states, b.hidden_states) and torch.equal(a.pooled, b.pooled)


@pytest.mark.parametrize("max_len,chunks", [(150, 2), (225, 3)])
def test_long_prompt_chunks(tiny, pipe, max_len, chunks):
    ours = _ours(tiny, [LONG, "a cat"], max_len)
    assert ours.hidden_states.shape == (2, 75 * chunks + 2, 96)
    # diffusers truncates to one chunk: our first chunk (BOS + 75 tokens) and the pooled output
    # (taken from the first chunk, as kohya does) must match it
    embeds, pooled = _diffusers(pipe, [LONG, "a cat"])
    torch.testing.assert_close(ours.hidden_states[:, :76], embeds[:, :76], rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.pooled, pooled, rtol=0, atol=1e-6)
    # the second chunk's 75 middle states are those of its own 77-token encoding
    from library.data.tokenize import tokenize_captions

    ids2 = tokenize_captions(tiny.tokenizers[1], [LONG], max_len)[:, 1]  # [1, 77]
    with torch.no_grad():
        h2 = tiny.text_encoders[1](ids2, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(ours.hidden_states[:1, 76:151, 32:], h2[:, 1:76], rtol=0, atol=1e-6)


def test_te2_empty_chunk_is_not_substituted(tiny):
    """kohya leaves SDXL's TE2 empty chunks ("BOS EOS PAD ...") as they are (no SD2-style fix)."""
    from library.data.tokenize import tokenize_captions

    ours = _ours(tiny, ["a cat"], 150)
    ids2 = tokenize_captions(tiny.tokenizers[1], ["a cat"], 150)[:, 1]
    assert ids2[0, 1] == tiny.tokenizers[1].eos_token_id  # the second chunk is empty
    with torch.no_grad():
        h2 = tiny.text_encoders[1](ids2, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(ours.hidden_states[0, 76, 32:], h2[0, 1], rtol=0, atol=1e-6)
    assert not torch.allclose(h2[0, 1], h2[0, 2])  # the substitution would have changed it


def test_bad_max_token_length(tiny):
    with pytest.raises(ConfigError, match="75, 150 or 225"):
        _ours(tiny, ["a cat"], 100)
    from library.config.args import parse_args

    with pytest.raises(ConfigError, match="max_token_length"):
        parse_args("sdxl_train_network", ["--max_token_length", "100"])


def test_time_ids_are_passed_as_diffusers_builds_them(tiny, pipe):
    """predict() sends (original h, w, crop top, left, target h, w) from the batch as time_ids."""
    adapter = get_family_adapter(Family.SDXL)
    cond = _ours(tiny, ["a cat", "a dog"])
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 700])
    batch = {"original_sizes_hw": torch.tensor([[96, 128], [64, 64]]), "crop_top_lefts": torch.tensor([[0, 16], [0, 0]]),
             "target_sizes_hw": torch.tensor([[64, 64], [64, 64]])}
    with torch.no_grad():
        ours = adapter.predict(tiny.unet, latents, t, cond, batch)
        ids = torch.cat([pipe._get_add_time_ids((96, 128), (0, 16), (64, 64), torch.float32, 64),
                         pipe._get_add_time_ids((64, 64), (0, 0), (64, 64), torch.float32, 64)])
        ref = tiny.unet(latents, t, cond.hidden_states,
                        added_cond_kwargs={"text_embeds": cond.pooled, "time_ids": ids}).sample
        # without sizes: uncropped at the latent size x 8 (the pipeline's default)
        default = adapter.predict(tiny.unet, latents, t, cond, None)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    torch.testing.assert_close(default[1], ours[1], rtol=0, atol=0)  # sample 1 is uncropped 64x64
    assert (ours[0] - default[0]).abs().max() > 1e-4  # sample 0's size conditioning matters

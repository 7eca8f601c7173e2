"""The model-family contract, for every family (SD1, SD2, SDXL) on its tiny random model.

A family's adapter must turn captions into token ids, conditioning and a UNet prediction of the
documented shapes (one and several 77-token chunks); its pipeline class must render an image from
that conditioning; and a saved checkpoint must load back as the same model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from library.models.families import Family
from library.training.family import get_family_adapter
from tests.helpers_networks import pipeline_of, tiny_model

FAMILIES = [pytest.param(f, id=f.value) for f in (Family.SD1, Family.SD2, Family.SDXL)]
CAPTIONS = ["a photo of a dog", "a red car on a street, sunny day, high quality"]


def _pooled_width(m) -> int | None:
    """Width of the pooled text embedding the UNet takes (SDXL's ``text_embeds``), None if it takes none."""
    if m.unet.config.addition_embed_type != "text_time":
        return None
    return m.unet.config.projection_class_embeddings_input_dim - 6 * m.unet.config.addition_time_embed_dim


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("max_token_length,chunks", [(None, 1), (150, 2)], ids=["77", "150"])
def test_tokenize_encode_predict_shapes(family, max_token_length, chunks):
    m = tiny_model(family)
    adapter = get_family_adapter(family)
    assert adapter.family is family
    ids = adapter.tokenize(m.tokenizers, CAPTIONS, max_token_length)
    assert len(ids) == adapter.n_text_encoders == len(m.text_encoders)
    for t in ids:
        assert t.dtype == torch.long and t.shape == (2, chunks, 77)
    with torch.no_grad():
        cond = adapter.encode(m.text_encoders, m.tokenizers, ids, None)
    assert cond.hidden_states.shape == (2, 75 * chunks + 2, m.unet.config.cross_attention_dim)
    width = _pooled_width(m)
    assert (cond.pooled is None) if width is None else (cond.pooled.shape == (2, width))
    # the two captions differ, so their conditionings do
    assert not torch.allclose(cond.hidden_states[0], cond.hidden_states[1])

    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pred = adapter.predict(m.unet, latents, torch.tensor([10, 900]), cond)
    assert pred.shape == latents.shape and torch.isfinite(pred).all()
    assert not torch.allclose(pred[0], pred[1])


@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_class_renders_the_conditioning(family):
    m = tiny_model(family)
    adapter = get_family_adapter(family)
    pipe = pipeline_of(m)
    assert type(pipe) is adapter.pipeline_class()
    pipe.set_progress_bar_config(disable=True)

    def render(prompt: str) -> np.ndarray:
        with torch.no_grad():
            cond = adapter.encode_prompts(m.text_encoders, m.tokenizers, [prompt], None, None, torch.device("cpu"))
            neg = adapter.encode_prompts(m.text_encoders, m.tokenizers, [""], None, None, torch.device("cpu"))
        kw = dict(prompt_embeds=cond.hidden_states, negative_prompt_embeds=neg.hidden_states)
        if cond.pooled is not None:
            kw.update(pooled_prompt_embeds=cond.pooled, negative_pooled_prompt_embeds=neg.pooled)
        out = pipe(width=64, height=64, num_inference_steps=2, guidance_scale=5.0,
                   generator=torch.Generator().manual_seed(1), output_type="np", **kw)
        return out.images[0]

    dog, car = render("a photo of a dog"), render("a red car")
    assert dog.shape == (64, 64, 3) and np.isfinite(dog).all() and dog.std() > 0
    assert np.abs(dog - car).max() > 0  # the conditioning reaches the image


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_checkpoint_reloads_as_the_same_model(family, tiny_model_dir, tmp_path):
    """A diffusers folder saved as a single file (the layout users share) loads back as the same model.
    Bit-identical round trips of each layout: test_model_io.py."""
    from library.models.loading import load_models
    from library.models.saving import save_model

    src = load_models(str(tiny_model_dir(family.value)))
    save_model(src, tmp_path / "model.safetensors", "safetensors")
    again = load_models(str(tmp_path / "model.safetensors"), v2=family is Family.SD2, with_tokenizers=False)
    assert again.family is family and again.v_parameterization == src.v_parameterization
    for a, b in [(src.unet, again.unet), (src.vae, again.vae)] + list(zip(src.text_encoders, again.text_encoders)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    # and it predicts what the source predicts (equal weights; the loaded tensors' memory layout can pick
    # other CPU kernels, so the sums may round differently in the last bit)
    adapter = get_family_adapter(family)
    ids = adapter.tokenize(src.tokenizers, CAPTIONS[:1], None)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        preds = [adapter.predict(x.unet, latents, torch.tensor([500]),
                                 adapter.encode(x.text_encoders, src.tokenizers, ids, None)) for x in (src, again)]
    torch.testing.assert_close(preds[1], preds[0], rtol=1e-5, atol=1e-6)

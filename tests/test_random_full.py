"""The random-weight builder of the fullsize tier (library/models/random_full.py), on tiny modules: the fill
rules and their determinism. The full-size files themselves are checked by ``pytest -m fullsize``."""

from __future__ import annotations

import math

import torch

from library.models.families import Family
from library.models.random_full import _materialise, unused_original_keys
from library.models.tiny import build_tiny_model


def _meta_copy(module):
    import copy

    return copy.deepcopy(module).to("meta")


def test_fill_rules_and_determinism():
    te = build_tiny_model(Family.SD1).text_encoders[0]
    a = _materialise(_meta_copy(te), torch.float16, "te1.", seed=0)
    b = _materialise(_meta_copy(te), torch.float16, "te1.", seed=0)
    c = _materialise(_meta_copy(te), torch.float16, "te1.", seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    fc1 = "encoder.layers.0.mlp.fc1.weight"
    assert sa[fc1].dtype == torch.float16 and not torch.equal(sa[fc1], sc[fc1])
    assert abs(sa[fc1].float().std().item() * math.sqrt(sa[fc1].shape[1]) - 1) < 0.2  # 1 / sqrt(fan_in)
    assert (sa["encoder.layers.0.layer_norm1.weight"] == 1).all()
    assert (sa["encoder.layers.0.layer_norm1.bias"] == 0).all()
    assert (sa["encoder.layers.0.mlp.fc1.bias"] == 0).all()
    assert abs(sa["embeddings.token_embedding.weight"].float().std().item() - 0.02) < 0.004
    pos = [t for n, t in a.named_buffers() if n.endswith("position_ids")]
    assert all(torch.equal(p, torch.arange(p.shape[-1]).expand_as(p)) for p in pos)
    x = torch.randint(0, 300, (1, 77))
    assert torch.isfinite(a.float()(x).last_hidden_state).all()


def test_unet_fill_gives_finite_outputs():
    tiny = build_tiny_model(Family.SDXL)
    unet = _materialise(_meta_copy(tiny.unet), torch.float32, "unet.", seed=0)
    out = unet(torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 96),
               added_cond_kwargs={"text_embeds": torch.randn(1, 64), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])})
    assert torch.isfinite(out.sample).all() and 0.05 < out.sample.std().item() < 20


def test_unused_keys_of_real_files():
    sd1 = unused_original_keys(Family.SD1, torch.float16)
    assert sd1["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == torch.int64
    assert sd1["alphas_cumprod"].shape == (1000,) and abs(sd1["alphas_cumprod"][-1].item() - 0.0047) < 1e-3
    assert unused_original_keys(Family.SD2, torch.float16)["cond_stage_model.model.text_projection"].shape == (1024, 1024)
    assert set(unused_original_keys(Family.SDXL, torch.float16)) == {"conditioner.embedders.1.model.logit_scale"}

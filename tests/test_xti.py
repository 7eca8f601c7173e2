"""Extended Textual Inversion: the per-layer UNet conditioning (library/models/xti.py), gen_img.py
--XTI_embeddings (library/inference/xti.py) and train_textual_inversion_XTI.py.

The equalities are exact (CPU float32, one thread): 16 equal layer states give the plain UNet's output
bit for bit, and an XTI file whose 16 layers are the same vectors renders the image of the plain
embedding with those vectors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import gen_img
from library.errors import ConfigError
from library.models.families import Family
from library.models.loading import load_models
from library.models.tiny import build_tiny_model
from library.models.xti import (
    LAYER_MODULES, XTI_LAYERS, cross_attention_layers, enable_per_block_conditioning, predict_per_block,
)

COMMON = ["--W", "64", "--H", "64", "--steps", "3", "--sampler", "euler", "--scale", "5"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------- mechanism
def _inputs(seed: int = 0, batch: int = 2, width: int = 32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([10, 700][:batch]),
            torch.randn(batch, 77, width, generator=g))


def test_layer_names_match_kohyas_original_layout():
    assert len(XTI_LAYERS) == 16 and len(set(LAYER_MODULES.values())) == 16
    assert LAYER_MODULES["IN01"] == "down_blocks.0.attentions.0" and LAYER_MODULES["IN08"] == "down_blocks.2.attentions.1"
    assert LAYER_MODULES["MID"] == "mid_block.attentions.0"
    assert LAYER_MODULES["OUT03"] == "up_blocks.1.attentions.0" and LAYER_MODULES["OUT11"] == "up_blocks.3.attentions.2"


def test_equal_states_equal_the_plain_unet_bit_for_bit_and_each_layer_matters():
    unet = build_tiny_model(Family.SD1).unet
    x, t, c = _inputs()
    with torch.no_grad():
        plain = unet(x, t, c).sample
        with enable_per_block_conditioning(unet):
            same = predict_per_block(unet, x, t, c.expand(16, *c.shape).clone())
            assert torch.equal(same, plain)
            assert torch.equal(unet(x, t, c).sample, plain)  # a call without per-layer states is untouched
            other = torch.randn_like(c)
            changed = []
            for i in (0, 6, 15):  # IN01, MID, OUT11: changing one layer's states changes the output
                states = c.expand(16, *c.shape).clone()
                states[i] = other
                changed.append(float((predict_per_block(unet, x, t, states) - plain).abs().max()))
            assert min(changed) > 1e-5, changed
            # the hook really gives layer i (kohya's order) the i-th states
            seen = {}

            def record(i):
                def hook(module, args, kwargs, output):
                    seen[i] = kwargs["encoder_hidden_states"]
                return hook

            hooks = [m.register_forward_hook(record(i), with_kwargs=True)
                     for i, m in enumerate(cross_attention_layers(unet))]
            states = torch.randn(16, *c.shape)
            predict_per_block(unet, x, t, states)
            for h in hooks:
                h.remove()
            assert all(torch.equal(seen[i], states[i]) for i in range(16))
        assert torch.equal(unet(x, t, c).sample, plain)  # hooks removed


def test_per_block_gradients_reach_every_layer_and_bad_shapes_are_refused():
    unet = build_tiny_model(Family.SD1).unet
    x, t, c = _inputs(1)
    states = c.expand(16, *c.shape).clone().requires_grad_(True)
    with enable_per_block_conditioning(unet):
        predict_per_block(unet, x, t, states).square().mean().backward()
        assert all(float(states.grad[i].abs().sum()) > 0 for i in range(16))
        with pytest.raises(ValueError, match=r"must be \[16, batch 2"):
            predict_per_block(unet, x, t, torch.zeros(15, 2, 77, 32))
    with pytest.raises(ConfigError, match="SD 1.x UNet layout"):
        enable_per_block_conditioning(build_tiny_model(Family.SDXL).unet)


# ------------------------------------------------------------------------------------------- gen_img
def _run(args: list[str], out) -> np.ndarray:
    assert gen_img.main([*args, "--outdir", str(out)]) == 0
    (png,) = out.glob("*.png")
    return np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)


def _error(capsys, args: list[str], tmp_path) -> str:
    assert gen_img.main([*args, "--outdir", str(tmp_path / "err"), "--console_log_level", "ERROR"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def _word_vectors(model_dir, word: str) -> torch.Tensor:
    m = load_models(str(model_dir))
    ids = m.tokenizers[0](word, add_special_tokens=False).input_ids
    return m.text_encoders[0].get_input_embeddings().weight[ids].detach().clone()


def _xti_file(path, layers: list[torch.Tensor]) -> str:
    save_file({name: v.clone().contiguous() for name, v in zip(XTI_LAYERS, layers)}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def sd1(tiny_model_dir):
    return tiny_model_dir("sd1")


def test_gen_img_xti_with_equal_layers_renders_the_plain_embedding(sd1, tmp_path):
    photo = _word_vectors(sd1, "photo")  # two vectors
    (tmp_path / "ti").mkdir()
    (tmp_path / "xti").mkdir()
    save_file({"emb_params": photo}, str(tmp_path / "ti" / "MyThing.safetensors"))
    xti = _xti_file(tmp_path / "xti" / "MyThing.safetensors", [photo] * 16)
    # guidance with a negative prompt holding the word, weighting, negative scale (third batch part), batch of 2
    prompt = "a (mything:1.2) of a dog --n blurry mything --nl 3"
    args = ["--ckpt", str(sd1), *COMMON, "--seed", "3", "--prompt", prompt]
    plain = _run([*args, "--textual_inversion_embeddings", str(tmp_path / "ti" / "MyThing.safetensors")],
                 tmp_path / "plain")
    with_xti = _run([*args, "--XTI_embeddings", xti], tmp_path / "with_xti")
    assert np.array_equal(plain, with_xti)
    words = _run([*args[:-1], "a (photo:1.2) of a dog --n blurry photo --nl 3"], tmp_path / "words")
    assert int(np.abs(words - plain).max()) <= 1  # and that is the image of the word the vectors came from

    # one layer different: another image; a plain embedding next to the XTI one works too
    red = _word_vectors(sd1, "red dog")
    mixed = _xti_file(tmp_path / "xti" / "mixed.safetensors", [photo] * 7 + [red] + [photo] * 8)
    save_file({"emb_params": _word_vectors(sd1, "cat")}, str(tmp_path / "ti" / "kitty.safetensors"))
    args2 = ["--ckpt", str(sd1), *COMMON, "--seed", "3", "--prompt", "a mixed of a kitty"]
    other = _run([*args2, "--XTI_embeddings", mixed, "--textual_inversion_embeddings",
                  str(tmp_path / "ti" / "kitty.safetensors")], tmp_path / "mixed")
    base = _run(["--ckpt", str(sd1), *COMMON, "--seed", "3", "--prompt", "a photo of a cat"], tmp_path / "base")
    assert int(np.abs(other - base).max()) > 1


def test_gen_img_xti_bad_input_one_line_errors(sd1, tiny_model_dir, tmp_path, capsys):
    width = _word_vectors(sd1, "dog").shape[-1]
    args = ["--ckpt", str(sd1), *COMMON, "--prompt", "a cat", "--XTI_embeddings"]
    good = _xti_file(tmp_path / "good.safetensors", [torch.zeros(1, width)] * 16)
    for fam in ("sdxl", "sd2"):
        err = _error(capsys, ["--ckpt", str(tiny_model_dir(fam)), *COMMON, "--prompt", "a", "--XTI_embeddings", good],
                     tmp_path)
        assert "--XTI_embeddings" in err and "for SD 1.x models" in err, err
    save_file({"emb_params": torch.zeros(1, width)}, str(tmp_path / "plain.safetensors"))
    err = _error(capsys, [*args, str(tmp_path / "plain.safetensors")], tmp_path)
    assert "not an XTI embedding" in err and "--textual_inversion_embeddings" in err
    uneven = [torch.zeros(1, width)] * 15 + [torch.zeros(2, width)]
    assert "every layer must have the same" in _error(capsys, [*args, _xti_file(tmp_path / "u.safetensors", uneven)],
                                                      tmp_path)
    narrow = _xti_file(tmp_path / "narrow.safetensors", [torch.zeros(1, 7)] * 16)
    assert "width 7" in _error(capsys, [*args, narrow], tmp_path)
    assert "file not found" in _error(capsys, [*args, str(tmp_path / "none.safetensors")], tmp_path)
    torch.save({k: torch.zeros(1, width) for k in XTI_LAYERS}, tmp_path / "pickled.pt")
    assert "--allow_pickle" in _error(capsys, [*args, str(tmp_path / "pickled.pt")], tmp_path)
    assert "already a token" in _error(capsys, [*args, _xti_file(tmp_path / "a.safetensors", [torch.zeros(1, width)] * 16)],
                                       tmp_path)
    (tmp_path / "d").mkdir()
    save_file({"emb_params": torch.zeros(1, width)}, str(tmp_path / "d" / "good.safetensors"))
    err = _error(capsys, [*args, good, "--textual_inversion_embeddings", str(tmp_path / "d" / "good.safetensors")],
                 tmp_path)
    assert "also the word of" in err

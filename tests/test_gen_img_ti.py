"""gen_img.py --textual_inversion_embeddings: an embedding made of the vectors of existing words gives
the image (and the prompt embeddings) of those words; multi-vector expansion, weighting, case; SDXL
clip_l/clip_g; A1111 .pt with --allow_pickle; bad files give one-line errors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import gen_img
from library.inference import prompt_weighting as pw
from library.inference.textual_inversion import load_embeddings, read_embeddings
from library.models.loading import load_models

COMMON = ["--W", "64", "--H", "64", "--steps", "3", "--sampler", "euler", "--scale", "5"]


def _run(args: list[str], out) -> np.ndarray:
    assert gen_img.main([*args, "--outdir", str(out)]) == 0
    (png,) = out.glob("*.png")
    return np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)


def _vectors(model_dir, word: str) -> list[torch.Tensor]:
    """The input vectors ``[n, D]`` of ``word``'s tokens, per text encoder."""
    m = load_models(str(model_dir))
    out = []
    for tok, te in zip(m.tokenizers, m.text_encoders):
        ids = tok(word, add_special_tokens=False).input_ids
        out.append(te.get_input_embeddings().weight[ids].detach().clone())
    return out


def _error(capsys, args: list[str], tmp_path) -> str:
    assert gen_img.main([*args, "--outdir", str(tmp_path / "err"), "--console_log_level", "ERROR"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.fixture(scope="module")
def sd1(tiny_model_dir):
    return tiny_model_dir("sd1")


def test_sd1_words_equal_their_embeddings_images_and_states(sd1, tmp_path):
    photo, dog = _vectors(sd1, "photo")[0], _vectors(sd1, "dog")[0]
    assert photo.shape[0] == 2 and dog.shape[0] == 1  # "photo" is two tokens in the tiny vocabulary
    save_file({"emb_params": photo}, str(tmp_path / "MyPhoto.safetensors"))  # A1111 / kohya layout
    torch.save({"string_to_param": {"*": dog}, "name": "x", "step": 10}, tmp_path / "mydog.pt")  # A1111 .pt
    files = [str(tmp_path / "MyPhoto.safetensors"), str(tmp_path / "mydog.pt")]

    # prompt states: the multi-vector word expands to both vectors, weighted together, in any case
    m = load_models(str(sd1))
    words = load_embeddings(m, read_embeddings(files, allow_pickle=True))
    assert words.convert_prompt("a (MYPHOTO:1.3) of a mydog", m.tokenizers[0]) == \
        "a (myphoto myphoto_1:1.3) of a mydog"
    enc = lambda texts, conv=None: pw.encode_prompts(m.family, m.text_encoders, m.tokenizers, texts,  # noqa: E731
                                                     convert_prompt=conv).hidden_states
    got = enc(["a (MyPhoto:1.3) of a mydog, BREAK mydog"], words.convert_prompt)
    want = enc(["a (photo:1.3) of a dog, BREAK dog"])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (enc(["a myphoto of a mydog"]) - enc(["a photo of a dog"])).abs().max() > 1e-3  # not converted: differs

    args = ["--ckpt", str(sd1), *COMMON, "--seed", "3"]
    with_ti = _run([*args, "--prompt", "a (MyPhoto:1.3) of a mydog --n blurry mydog", "--allow_pickle",
                    "--textual_inversion_embeddings", *files], tmp_path / "ti")
    plain = _run([*args, "--prompt", "a (photo:1.3) of a dog --n blurry dog"], tmp_path / "plain")
    assert int(np.abs(with_ti - plain).max()) <= 1


def test_sdxl_clip_l_clip_g(tiny_model_dir, tmp_path):
    path = tiny_model_dir("sdxl")
    clip_l, clip_g = _vectors(path, "photo")
    assert clip_l.shape[-1] != clip_g.shape[-1]
    save_file({"clip_l": clip_l, "clip_g": clip_g}, str(tmp_path / "xlphoto.safetensors"))
    args = ["--ckpt", str(path), *COMMON, "--seed", "5"]
    with_ti = _run([*args, "--prompt", "a xlphoto of a cat", "--textual_inversion_embeddings",
                    str(tmp_path / "xlphoto.safetensors")], tmp_path / "ti")
    plain = _run([*args, "--prompt", "a photo of a cat"], tmp_path / "plain")
    assert int(np.abs(with_ti - plain).max()) <= 1
    # the vectors of both encoders are used: clip_g from another word changes the image
    save_file({"clip_l": clip_l, "clip_g": _vectors(path, "red dog")[1]}, str(tmp_path / "mixed.safetensors"))
    mixed = _run([*args, "--prompt", "a mixed of a cat", "--textual_inversion_embeddings",
                  str(tmp_path / "mixed.safetensors")], tmp_path / "mixed")
    assert int(np.abs(mixed - plain).max()) > 1


def test_bad_embeddings_give_one_line_errors(sd1, tiny_model_dir, tmp_path, capsys):
    args = ["--ckpt", str(sd1), *COMMON, "--prompt", "a cat", "--textual_inversion_embeddings"]
    width = _vectors(sd1, "dog")[0].shape[-1]

    def err(name: str, state: dict | None = None, extra: tuple = ()) -> str:
        if state is not None:
            save_file(state, str(tmp_path / name))
        return _error(capsys, [*args, str(tmp_path / name), *extra], tmp_path)

    narrow = err("narrow.safetensors", {"emb_params": torch.zeros(2, 7)})
    assert "width 7" in narrow and f"takes {width}" in narrow
    assert "unknown embedding layout" in err("odd.safetensors", {"a": torch.zeros(1, width), "b": torch.zeros(1)})
    assert "already a token" in err("a.safetensors", {"emb_params": torch.zeros(1, width)})  # "a" is in the vocab
    assert "file not found" in err("missing.safetensors")
    torch.save({"emb_params": torch.zeros(1, width)}, tmp_path / "pickled.pt")
    assert "--allow_pickle" in err("pickled.pt")
    assert "model is SD" in err("xl.safetensors", {"clip_l": torch.zeros(1, width), "clip_g": torch.zeros(1, 64)})
    xl = ["--ckpt", str(tiny_model_dir("sdxl")), *COMMON, "--prompt", "a", "--textual_inversion_embeddings"]
    save_file({"clip_l": torch.zeros(2, 32), "clip_g": torch.zeros(1, 64)}, str(tmp_path / "uneven.safetensors"))
    assert "same count" in _error(capsys, [*xl, str(tmp_path / "uneven.safetensors")], tmp_path)
    assert "SD 1.x/2.x embedding" in _error(capsys, [*xl, str(tmp_path / "narrow.safetensors")], tmp_path)

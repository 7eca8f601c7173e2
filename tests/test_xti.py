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
    """kohya's names are the original layout's blocks (IN04 = input_blocks.4.1, MID = middle_block.1, OUT03 =
    output_blocks.3.1); sdtk's layout map (derived from the UNet config) must agree with LAYER_MODULES."""
    from library.models.tiny import unet_config
    from library.models.unet_layout import diffusers_to_sgm_module_map

    original = diffusers_to_sgm_module_map(unet_config(Family.SD1), list(LAYER_MODULES.values()))
    for name, module in LAYER_MODULES.items():
        want = "middle_block.1" if name == "MID" else \
            f"{'input' if name.startswith('IN') else 'output'}_blocks.{int(name.lstrip('INOUT'))}.1"
        assert original[module] == want, name
    assert list(LAYER_MODULES) == list(XTI_LAYERS) and len(set(LAYER_MODULES.values())) == 16


def test_full_size_sd15_unet_has_the_16_layers_and_sdxl_is_refused():
    """The real SD1.5 architecture (built on the meta device: no weights) has kohya's 16 layers, taking CLIP-L's
    768-wide states; SDXL's layout is refused."""
    from diffusers import UNet2DConditionModel

    from library.models.loading import shipped_model_config

    unets = {}
    for family in (Family.SD1, Family.SDXL):
        with torch.device("meta"):
            unets[family] = UNet2DConditionModel.from_config(shipped_model_config(family, False)["unet"])
    layers = cross_attention_layers(unets[Family.SD1])
    assert [m.transformer_blocks[0].attn2.to_k.in_features for m in layers] == [768] * 16
    with pytest.raises(ConfigError, match="this UNet has 11 transformer blocks"):
        cross_attention_layers(unets[Family.SDXL])


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
    plain_flag = ["--ckpt", str(sd1), *COMMON, "--prompt", "a cat", "--textual_inversion_embeddings", good]
    assert "an Extended Textual Inversion file" in _error(capsys, plain_flag, tmp_path)  # the other flag's hint
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
    known = _xti_file(tmp_path / "a.safetensors", [torch.zeros(1, width)] * 16)  # "a" is in the vocabulary
    assert "already a token" in _error(capsys, [*args, known], tmp_path)
    (tmp_path / "d").mkdir()
    save_file({"emb_params": torch.zeros(1, width)}, str(tmp_path / "d" / "good.safetensors"))
    err = _error(capsys, [*args, good, "--textual_inversion_embeddings", str(tmp_path / "d" / "good.safetensors")],
                 tmp_path)
    assert "also the word of" in err


# ------------------------------------------------------------------------------------------- training
TOKEN = "mychar"


def run_xti(argv: list[str], trainer_cls=None) -> int:
    """train_textual_inversion_XTI.main(argv) in this process (accelerate's process-wide state reset first)."""
    from accelerate.state import AcceleratorState, GradientState

    import train_textual_inversion_XTI as script

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return script.main(argv, trainer_cls)


def xti_argv(model, data, out, *extra: str, steps: int = 4) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--resolution", "64",
            "--output_dir", str(out), "--token_string", TOKEN, "--max_train_steps", str(steps),
            "--learning_rate", "5e-2", "--seed", "7", "--max_data_loader_n_workers", "0", *extra]


@pytest.fixture(scope="module")
def xti_run(sd1, tmp_path_factory):
    """4 steps, 2 vectors per layer from --init_word photo, saves + states every 2 steps, a sample at the end."""
    from library.training.targets.xti import XTITrainer
    from tests.trainer_fixtures import make_dataset

    root = tmp_path_factory.mktemp("xti")
    data = make_dataset(root / "data", token=TOKEN)  # captions "a photo of mychar <name>"
    prompts = root / "prompts.txt"
    prompts.write_text(f"a (photo:1.1) of {TOKEN} --w 64 --h 64 --s 2 --d 3\n", encoding="utf-8")
    sessions = []

    class Capture(XTITrainer):
        def save_output(self, s, path, steps, epoch):
            sessions.append(s)
            super().save_output(s, path, steps, epoch)

    common = ("--num_vectors_per_token", "2", "--init_word", "photo", "--lr_scheduler", "cosine")
    argv = xti_argv(sd1, data, root / "out", *common, "--save_every_n_steps", "2", "--save_state",
                    "--sample_prompts", str(prompts), "--sample_every_n_steps", "4")
    assert run_xti(argv, Capture) == 0
    return data, root / "out", common, sessions[-1]


def test_xti_trains_only_the_layer_rows_into_kohyas_layout(sd1, xti_run):
    from safetensors import safe_open

    from tests.trainer_fixtures import assert_same_tensors

    _, out, _, s = xti_run
    fresh = load_models(str(sd1))
    assert_same_tensors(s.model.unet.state_dict(), fresh.unet.state_dict())
    assert_same_tensors(s.model.vae.state_dict(), fresh.vae.state_dict())
    assert not any(p.requires_grad for p in s.model.unet.parameters())
    trained = {k.replace("token_embedding.base.weight", "token_embedding.weight"): v
               for k, v in s.model.text_encoders[0].state_dict().items() if not k.endswith("token_embedding.new")}
    assert_same_tensors(trained, fresh.text_encoders[0].state_dict())  # every old row and weight
    tok, old = s.model.tokenizers[0], fresh.tokenizers[0]
    assert all(tok.get_vocab()[w] == i for w, i in old.get_vocab().items())
    ids = tok.convert_tokens_to_ids([f"{TOKEN}_in01", f"{TOKEN}1_in01", f"{TOKEN}_out11"])
    assert ids == [len(old), len(old) + 1, len(old) + 30]  # 16 layers x 2 vectors after the vocabulary

    file = out / f"{TOKEN}.safetensors"
    with safe_open(str(file), "pt") as f:
        assert list(f.keys()) == sorted(XTI_LAYERS)
        md = f.metadata()
        vec = torch.stack([f.get_tensor(k) for k in XTI_LAYERS])
    assert md["ss_token_string"] == TOKEN and md["ss_num_vectors_per_token"] == "2" and md["ss_steps"] == "4"
    assert md["ss_xti_layers"].split(",") == list(XTI_LAYERS)
    assert md["modelspec.architecture"] == "stable-diffusion-v1/textual-inversion"
    assert vec.shape == (16, 2, 32) and torch.equal(vec.reshape(32, 32), s.target.tables[0].vectors.detach())
    # every layer started at the rows of "photo" and was trained on its own
    photo = fresh.text_encoders[0].get_input_embeddings().weight[old("photo", add_special_tokens=False).input_ids]
    assert all(float((vec[i] - photo).abs().max()) > 1e-4 for i in range(16))
    assert float((vec[0] - vec[15]).abs().max()) > 1e-4
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == [
        f"{TOKEN}-step00000002.safetensors", f"{TOKEN}-step00000004.safetensors", f"{TOKEN}.safetensors"]
    assert len(list((out / "sample").glob("*.png"))) == 1  # sampled with the per-layer conditioning
    assert not any(p.name.startswith(".sdtk-tmp") for p in out.rglob("*"))


def test_xti_training_conditioning_is_gen_imgs_reading_of_the_file(sd1, xti_run, tmp_path):
    """The per-layer states the trainer computes for a prompt are those gen_img computes from the saved file;
    gen_img renders the token (the image differs from the prompt without it)."""
    from library.inference import prompt_weighting as pw
    from library.inference.xti import load_xti_embeddings, read_xti_embeddings

    _, out, _, s = xti_run
    prompt = f"a photo of {TOKEN} coffee"
    with torch.no_grad():
        training = s.family.encode_prompts(s.model.text_encoders, s.model.tokenizers, [prompt], None, None,
                                           torch.device("cpu")).layers
        m = load_models(str(sd1))
        xti = load_xti_embeddings(m, read_xti_embeddings([str(out / f"{TOKEN}.safetensors")]))
        reading = torch.stack([pw.encode_prompts(m.family, m.text_encoders, m.tokenizers, [prompt],
                                                 convert_prompt=c).hidden_states for c in xti.converters()])
    assert training.shape == (16, 1, 77, 32)
    torch.testing.assert_close(reading, training, rtol=0, atol=1e-5)
    assert float((training[0] - training[15]).abs().max()) > 1e-4  # the layers differ

    prompts = tmp_path / "p.txt"
    prompts.write_text(f"a photo of {TOKEN} --d 5\na photo of --d 5\n", encoding="utf-8")
    assert gen_img.main(["--ckpt", str(sd1), "--from_file", str(prompts), "--W", "64", "--H", "64", "--steps", "3",
                         "--sampler", "euler", "--XTI_embeddings", str(out / f"{TOKEN}.safetensors"),
                         "--outdir", str(tmp_path / "gen"), "--sequential_file_name"]) == 0
    with_token, without = (np.asarray(Image.open(tmp_path / "gen" / f"im_00000{i}.png"), dtype=np.int16)
                           for i in (1, 2))
    assert np.abs(with_token - without).max() > 0


def test_xti_samples_during_training_use_every_layer(xti_run):
    """The sampler gives the hooked UNet the per-layer states: dropping them (the MID layer's states for every
    layer) renders another image."""
    from library.training.family import Conditioning
    from library.training.sampling import SamplePrompt, generate

    _, _, _, s = xti_run
    m, cpu = s.model, torch.device("cpu")
    encode = lambda texts: s.family.encode_prompts(m.text_encoders, m.tokenizers, texts, None, None, cpu,  # noqa: E731
                                                   weighted=True, keep_mean=True)
    sp = SamplePrompt(prompt=f"a (photo:1.1) of {TOKEN}", width=64, height=64, sample_steps=2, seed=3)
    parts = {"unet": m.unet, "vae": m.vae, "text_encoder": m.text_encoders[0], "tokenizer": m.tokenizers[0]}

    def render(enc) -> np.ndarray:
        image = generate(s.family.pipeline_class(), parts, enc, sp, m.scheduler_config, "ddim", cpu, torch.float32)
        return np.asarray(image, dtype=np.int16)

    assert encode(["x"]).layers.shape[0] == 16
    per_layer = render(encode)
    assert np.abs(per_layer - render(lambda texts: Conditioning(encode(texts).hidden_states))).max() > 0
    assert np.array_equal(per_layer, render(encode))  # deterministic, so the difference is the layers'


def test_xti_resume_is_bit_identical(sd1, xti_run, tmp_path):
    from safetensors.torch import load_file

    from tests.trainer_fixtures import assert_same_tensors

    data, out, common, _ = xti_run
    argv = xti_argv(sd1, data, tmp_path, *common, "--resume", str(out / f"{TOKEN}-step00000002-state"))
    assert run_xti(argv) == 0
    assert_same_tensors(load_file(out / f"{TOKEN}.safetensors"), load_file(tmp_path / f"{TOKEN}.safetensors"))


def test_xti_weights_continue_from_an_xti_file_and_pt_is_kohyas_dict(sd1, xti_run, tmp_path):
    from safetensors.torch import load_file

    data, out, _, _ = xti_run
    start = load_file(out / f"{TOKEN}.safetensors")
    argv = xti_argv(sd1, data, tmp_path, "--num_vectors_per_token", "2", "--weights",
                    str(out / f"{TOKEN}.safetensors"), "--save_model_as", "pt", "--learning_rate", "1e-7", steps=1)
    assert run_xti(argv) == 0
    pt = torch.load(tmp_path / f"{TOKEN}.pt", weights_only=True)
    assert sorted(pt) == sorted(XTI_LAYERS)  # kohya's XTI .pt: the same dict, pickled
    # one AdamW step of 1e-7 from the file's vectors (not from --init_word or the table's mean)
    assert max(float((pt[k] - start[k]).abs().max()) for k in XTI_LAYERS) < 5e-7


def test_xti_bad_input_one_line_errors(sd1, tiny_model_dir, xti_run, tmp_path, capsys):
    data, out, _, _ = xti_run

    def err(model, *extra: str) -> str:
        assert run_xti(xti_argv(model, data, tmp_path / "out", *extra, "--console_log_level", "ERROR")) == 1
        line = capsys.readouterr().err.strip()
        assert line.startswith("error: ") and "\n" not in line, line
        return line

    assert "sdxl_train_textual_inversion.py" in err(tiny_model_dir("sdxl"))
    assert "use train_textual_inversion.py" in err(tiny_model_dir("sd2"))
    save_file({"emb_params": torch.zeros(2, 32)}, str(tmp_path / "plain.safetensors"))
    assert "not an XTI embedding" in err(sd1, "--weights", str(tmp_path / "plain.safetensors"))
    assert "use --num_vectors_per_token 2" in err(sd1, "--weights", str(out / f"{TOKEN}.safetensors"))
    assert "--num_vectors_per_token" in err(sd1, "--num_vectors_per_token", "0")
    assert "more than --num_vectors_per_token 1" in err(sd1, "--init_word", "photo")  # two tokens
    assert "--deepspeed is not supported by sdtk" in err(sd1, "--deepspeed")
    assert "'x' is already a token" in err(sd1, "--token_string", "x", "--use_object_template")  # a vocabulary entry
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing written

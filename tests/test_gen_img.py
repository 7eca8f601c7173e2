"""gen_img.py: images equal diffusers' pipelines (plain, with LoRAs, img2img), merge equals hooking,
prompt weighting / long prompts / inline options / seeds, negative scale, PNG metadata, bad input.

Equivalence runs gen_img.py for real on tiny models (64 px, 3 steps) and compares its PNGs with the
output of diffusers' own pipelines loaded from the same folder: same prompt, seed, scheduler, steps.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import gen_img
from library.errors import ConfigError
from library.inference import prompt_weighting as pw
from library.inference.prompts import PromptOptions, batches, parse_prompt, plan_images

COMMON = ["--W", "64", "--H", "64", "--steps", "3"]


# ------------------------------------------------------------------------------------ helpers
def _run(args: list[str], out) -> list[np.ndarray]:
    assert gen_img.main([*args, "--outdir", str(out)]) == 0
    files = sorted(out.glob("*.png"), key=lambda p: p.stat().st_mtime_ns)
    return [np.asarray(Image.open(f).convert("RGB"), dtype=np.int16) for f in files]


def _diffusers(path, family: str, sampler_cls: str, img2img: bool = False):
    import diffusers

    name = ("StableDiffusionXL" if family == "sdxl" else "StableDiffusion") + ("Img2Img" if img2img else "") + "Pipeline"
    extra = {} if family == "sdxl" else dict(safety_checker=None, requires_safety_checker=False)
    pipe = getattr(diffusers, name).from_pretrained(str(path), local_files_only=True, **extra)
    pipe.scheduler = getattr(diffusers, sampler_cls).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ref(pipe, prompt: str, negative: str, seed: int, **kw) -> np.ndarray:
    size = {} if "image" in kw else dict(width=64, height=64)
    out = pipe(prompt, negative_prompt=negative, num_inference_steps=3, guidance_scale=7.5,
               generator=torch.Generator("cpu").manual_seed(seed), **size, **kw)
    return np.asarray(out.images[0].convert("RGB"), dtype=np.int16)


def _make_lora(model_dir, path, seed: int) -> str:
    """A LoRA for the tiny model with random (nonzero) down and up weights, saved by networks.lora."""
    import networks.lora as lora
    from library.models.loading import load_models

    m = load_models(str(model_dir), with_tokenizers=False)
    tes = m.text_encoders if len(m.text_encoders) > 1 else m.text_encoders[0]
    net = lora.create_network(1.0, 4, 2.0, m.vae, tes, m.unet)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    net.save_weights(str(path), torch.float32, {})
    return str(path)


def _close(a: np.ndarray, b: np.ndarray, tol: int = 1) -> None:
    assert a.shape == b.shape
    assert int(np.abs(a - b).max()) <= tol, f"max pixel difference {np.abs(a - b).max()}"


# ------------------------------------------------------------------ equivalence with diffusers
@pytest.mark.integration
@pytest.mark.parametrize("family,sampler,cls", [("sd1", "euler_a", "EulerAncestralDiscreteScheduler"),
                                                ("sdxl", "ddim", "DDIMScheduler")])
def test_plain_generation_equals_diffusers(tiny_model_dir, tmp_path, family, sampler, cls):
    path = tiny_model_dir(family)
    # two images in one batch: each keeps its own seed's noise, as diffusers renders it alone
    got = _run(["--ckpt", str(path), "--prompt", "a photo of a cat --n blurry --d 7,11", "--sampler", sampler,
                "--images_per_prompt", "2", "--batch_size", "2", *COMMON], tmp_path / "out")
    pipe = _diffusers(path, family, cls)
    assert len(got) == 2
    _close(got[0], _ref(pipe, "a photo of a cat", "blurry", 7))
    _close(got[1], _ref(pipe, "a photo of a cat", "blurry", 11))
    assert np.abs(got[0] - got[1]).max() > 0


@pytest.mark.integration
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_lora_generation_equals_diffusers_load_lora_weights(tiny_model_dir, tmp_path, family):
    path = tiny_model_dir(family)
    lora = _make_lora(path, tmp_path / "l.safetensors", 1)
    args = ["--ckpt", str(path), "--prompt", "a red car --d 3", "--sampler", "euler", *COMMON]
    plain = _run(args, tmp_path / "plain")[0]
    hooked = _run([*args, "--network_module", "networks.lora", "--network_weights", lora], tmp_path / "hooked")[0]
    pipe = _diffusers(path, family, "EulerDiscreteScheduler")
    pipe.load_lora_weights(lora)
    _close(hooked, _ref(pipe, "a red car", "", 3))
    assert np.abs(hooked - plain).max() > 10  # the LoRA changes the image


@pytest.mark.integration
def test_two_loras_with_multipliers_and_merge(tiny_model_dir, tmp_path):
    path = tiny_model_dir("sd1")
    a, b = _make_lora(path, tmp_path / "a.safetensors", 1), _make_lora(path, tmp_path / "b.safetensors", 2)
    args = ["--ckpt", str(path), "--prompt", "a dog on the grass --d 5", "--sampler", "ddim", *COMMON,
            "--network_module", "networks.lora", "--network_weights", a, b, "--network_mul", "0.7", "-0.4"]
    hooked = _run(args, tmp_path / "hooked")[0]
    merged = _run([*args, "--network_merge"], tmp_path / "merged")[0]
    pipe = _diffusers(path, "sd1", "DDIMScheduler")
    pipe.load_lora_weights(a, adapter_name="a")
    pipe.load_lora_weights(b, adapter_name="b")
    pipe.set_adapters(["a", "b"], [0.7, -0.4])
    _close(hooked, _ref(pipe, "a dog on the grass", "", 5))
    _close(merged, hooked, tol=2)  # merged weights round differently than two hooked paths


@pytest.mark.integration
def test_img2img_equals_diffusers(tiny_model_dir, tmp_path):
    path = tiny_model_dir("sd1")
    rng = np.random.default_rng(0)
    src = tmp_path / "src.png"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(src)
    got = _run(["--ckpt", str(path), "--prompt", "a cat --d 9", "--image_path", str(src), "--strength", "0.7",
                "--sampler", "ddim", *COMMON], tmp_path / "out")[0]
    pipe = _diffusers(path, "sd1", "DDIMScheduler", img2img=True)
    _close(got, _ref(pipe, "a cat", "", 9, image=Image.open(src).convert("RGB"), strength=0.7))


# ------------------------------------------------------------------------ PNG and job options
@pytest.mark.integration
def test_png_text_chunks_long_prompt_and_from_file(tiny_model_dir, tmp_path):
    path = tiny_model_dir("sd1", "single_file")  # tokenizers in <stem>_tokenizers beside it
    long_prompt = ", ".join(["a photo of a red cat"] * 20)  # 120 tokens
    prompts = tmp_path / "p.txt"
    prompts.write_text(f"# comment\n{long_prompt} --n blurry --d 4 --s 2 --ss euler_a\n(sky:1.2) --d 6 --n dog --nl 2\n")
    lora = _make_lora(path, tmp_path / "l.safetensors", 3)
    rc = gen_img.main(["--ckpt", str(path), "--tokenizer_cache_dir", str(path.parent / f"{path.stem}_tokenizers"),
                       "--from_file", str(prompts), "--W", "64", "--H", "64", "--steps", "3",
                       "--max_embeddings_multiples", "2", "--emb_normalize_mode", "none", "--outdir",
                       str(tmp_path / "out"), "--network_module", "networks.lora", "--network_weights", lora,
                       "--network_mul", "0.5", "--sequential_file_name"])
    assert rc == 0
    first, second = Image.open(tmp_path / "out" / "im_000001.png"), Image.open(tmp_path / "out" / "im_000002.png")
    t = first.text
    assert t["prompt"] == long_prompt and t["negative-prompt"] == "blurry" and t["seed"] == "4"
    assert t["steps"] == "2" and t["sampler"] == "euler_a" and t["scale"] == "7.5"
    assert "Steps: 2, Sampler: euler_a, CFG scale: 7.5, Seed: 4, Size: 64x64" in t["parameters"]
    meta = json.loads(t["sdtk"])
    assert meta["max_embeddings_multiples"] == 2 and meta["family"] == "sd1" and meta["width"] == 64
    assert meta["model"] == path.name and meta["seed"] == 4
    assert meta["networks"] == [{"file": "l.safetensors", "module": "networks.lora", "multiplier": 0.5,
                                 "merged": False}]
    assert second.text["prompt"] == "(sky:1.2)" and second.text["steps"] == "3" and second.text["sampler"] == "ddim"
    assert second.text["negative-scale"] == "2.0" and "negative-scale" not in t


def test_negative_scale_hook_gives_kohyas_formula(tiny_model_dir):
    """Through the hook, diffusers' ``a + s (b - a)`` equals ``u + s (c - u) - ns (n - u)``."""
    from library.inference.generate import negative_scale_hook
    from library.models.loading import load_models
    from library.training.family import Conditioning

    m = load_models(str(tiny_model_dir("sd1")))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    n, c, u = (torch.randn(1, 77, 32, generator=g) for _ in range(3))
    t = torch.tensor(500)
    with torch.no_grad():
        pred = lambda e: m.unet(x, t, encoder_hidden_states=e, return_dict=False)[0]  # noqa: E731
        expected = pred(u) + 7.0 * (pred(c) - pred(u)) - 3.0 * (pred(n) - pred(u))
        with negative_scale_hook(m.unet, Conditioning(u), 7.0, 3.0):
            a, b = m.unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([n, c]), return_dict=False)[0].chunk(2)
        m.unet(x, t, encoder_hidden_states=c)  # the hook is gone afterwards
    torch.testing.assert_close(a + 7.0 * (b - a), expected, atol=1e-5, rtol=1e-4)


# -------------------------------------------------------------------------- prompt weighting
@pytest.mark.parametrize("text,expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.1 * 1.1 * 1.3), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.1 ** 4), (".", 1.1)]),
    ("[[faded]] (x: 0.5)", [("faded", 1 / 1.1 / 1.1), (" ", 1.0), ("x", 0.5)]),
    ("a BREAK b", [("a ", 1.0), ("BREAK", 1.0), (" b", 1.0)]),
    ("", [("", 1.0)]),
])
def test_parse_prompt_attention(text, expected):
    got = pw.parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


@pytest.mark.parametrize("family,clip_skip,diffusers_clip_skip", [("sd1", 2, 1), ("sd1", None, None),
                                                                   ("sdxl", None, None), ("sdxl", 3, 1)])
def test_clip_skip_matches_diffusers_encode_prompt(tiny_model_dir, family, clip_skip, diffusers_clip_skip):
    """kohya counts clip skip from 1 (last layer); diffusers from 0. SDXL's default is the penultimate layer."""
    path = tiny_model_dir(family)
    pipe = _diffusers(path, family, "DDIMScheduler")
    from library.models.loading import load_models

    m = load_models(str(path))
    enc = pw.encode_prompts(m.family, m.text_encoders, m.tokenizers, ["a photo of a cat"], clip_skip=clip_skip)
    with torch.no_grad():
        if family == "sd1" and clip_skip:
            # diffusers' own SD clip skip reads text_encoder.text_model, which transformers 5 removed:
            # the reference is its formula, final layer norm of hidden_states[-(clip_skip + 1)]
            te = pipe.text_encoder
            ids = pipe.tokenizer("a photo of a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
            ref = [te.final_layer_norm(te(ids, output_hidden_states=True).hidden_states[-(diffusers_clip_skip + 1)])]
        else:
            ref = pipe.encode_prompt("a photo of a cat", device="cpu", num_images_per_prompt=1,
                                     do_classifier_free_guidance=False, clip_skip=diffusers_clip_skip)
    torch.testing.assert_close(enc.hidden_states, ref[0])
    if family == "sdxl":
        torch.testing.assert_close(enc.pooled, ref[2])


def test_weighted_encoding_and_long_prompts(tiny_model_dir):
    from library.models.loading import load_models

    m = load_models(str(tiny_model_dir("sd2")))  # SD2: padding is not EOS
    tok = m.tokenizers[0]
    ids, weights, truncated = pw.tokenize_weighted(tok, "a (red:1.5) cat", 75)
    n = lambda text: len(tok(text, add_special_tokens=False).input_ids)  # noqa: E731
    assert ids == tok("a red cat", add_special_tokens=False).input_ids
    assert weights == [1.0] * n("a") + [1.5] * n("red") + [1.0] * n("cat")
    assert not truncated
    long = " ".join(["photo"] * 50)
    length = len(pw.tokenize_weighted(tok, long, 10**4)[0])
    assert 75 < length <= 150
    enc = pw.encode_prompts(m.family, m.text_encoders, m.tokenizers, [long, ""], max_embeddings_multiples=3)
    assert enc.hidden_states.shape[:2] == (2, 154)  # two whole 77-token chunks
    assert pw.encode_prompts(m.family, m.text_encoders, m.tokenizers, [long]).hidden_states.shape[1] == 77
    chunks, w = pw.chunk_ids(tok, *pw.tokenize_weighted(tok, long, 225)[:2], 2)
    rest = length - 75  # tokens in the second chunk, then EOS, then padding
    assert chunks[0, 0] == chunks[1, 0] == tok.bos_token_id and chunks[0, -1] == tok.eos_token_id
    assert chunks[1, rest + 1] == tok.eos_token_id and chunks[1, rest + 2] == tok.pad_token_id and w.shape == (154,)
    # a prompt of <= 75 tokens is encoded exactly as diffusers / transformers do
    ref_ids = tok("a photo of a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = m.text_encoders[0](ref_ids)[0]
    torch.testing.assert_close(pw.encode_prompts(m.family, m.text_encoders, m.tokenizers, ["a photo of a cat"])
                               .hidden_states, ref)
    # weighting scales token states; "original" keeps each sample's mean
    h = torch.randn(1, 4, 8) + 1.0
    wts = torch.tensor([[1.0, 2.0, 1.0, 0.5]])
    torch.testing.assert_close(pw.apply_weights(h, wts, "none"), h * wts[..., None])
    out = pw.apply_weights(h, wts, "original")
    torch.testing.assert_close(out.mean(), h.mean())
    torch.testing.assert_close(out / out[0, 0, 0], h * wts[..., None] / h[0, 0, 0])


# ------------------------------------------------------------------------------ prompt options
def test_inline_options_seeds_and_batches():
    d = PromptOptions(prompt="", steps=20)
    assert parse_prompt("a --w 100 --h 203", d).width == 96 and parse_prompt("a --h 203", d).height == 200
    with pytest.raises(ConfigError, match="at least 64x64"):
        parse_prompt("a --w 8", d)
    o = parse_prompt("a cat --n dog, blurry --W 640 --h 768 --s 9 --d 1,2 --l 5.5 --nl 2 --t 0.3 --ss euler_a --am 0.5",
                     d)
    assert (o.prompt, o.negative_prompt, o.width, o.height, o.steps, o.seeds) == ("a cat", "dog, blurry", 640, 768, 9,
                                                                                  (1, 2))
    assert (o.scale, o.negative_scale, o.strength, o.sampler, o.network_muls) == (5.5, 2.0, 0.3, "euler_a", (0.5,))
    with pytest.raises(ConfigError, match="--f is not supported by sdtk"):
        parse_prompt("a cat --f name.png", d)
    with pytest.raises(ConfigError, match="not understood"):
        parse_prompt("a cat --zz 3", d)
    with pytest.raises(ConfigError, match="dynamic prompt 'a {red|blue cat'.*never closed"):
        parse_prompt("a {red|blue cat", d)  # variants work (tests/test_dynamic_prompts.py); malformed ones fail
    with pytest.raises(ConfigError, match="unknown sampler"):
        parse_prompt("a cat --ss bogus", d)
    # seeds: given ones first (the last repeats), --seed alone for one image, else a seeded generator
    tasks = plan_images(["a --d 5", "b --d 1,-1"], d, images_per_prompt=3, seed=0)
    seeds = [t.seed for t in tasks]
    assert seeds[:4] == [5, 5, 5, 1] and len(set(seeds[4:])) == 2
    assert seeds == [t.seed for t in plan_images(["a --d 5", "b --d 1,-1"], d, images_per_prompt=3, seed=0)]
    assert [t.seed for t in plan_images(["a"], d, seed=123)] == [123]
    assert len({t.seed for t in plan_images(["a"], d, images_per_prompt=4, seed=123)}) == 4
    same = plan_images(["a", "b"], d, seed=1, iter_same_seed=True, n_iter=2)
    assert same[0].seed == same[1].seed != same[2].seed == same[3].seed
    groups = batches(plan_images(["a", "b --s 3", "c --s 3"], d, seed=1, images_per_prompt=2), 3)
    assert [len(g) for g in groups] == [2, 3, 1]


# ---------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("extra,message", [
    (["--ckpt", "{tmp}/missing.safetensors"], "no such file"),
    (["--sampler", "bogus"], "--sampler"),
    (["--network_module", "networks.lora", "--network_weights", "{lora}", "--network_mul", "1", "2"],
     "--network_mul has 2 values for 1"),
    (["--image_path", "{tmp}/nope.png"], "--image_path"),
    (["--mask_path", "m.png"], "--mask_path is not supported by sdtk"),
    (["--prompt", "a --f out.png"], "--f is not supported by sdtk"),
])
def test_bad_input_one_line_error(tiny_model_dir, tmp_path, capsys, extra, message):
    path = tiny_model_dir("sd1")
    lora = tmp_path / "l.safetensors"
    lora.write_bytes(b"x")
    args = ["--ckpt", str(path), "--prompt", "a cat", *COMMON, "--outdir", str(tmp_path / "out")]
    args += [a.format(tmp=tmp_path, lora=lora) for a in extra]
    assert gen_img.main(args) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_xformers_missing_names_the_extra(tiny_model_dir, tmp_path, capsys):
    pytest.importorskip("torch")
    try:
        import xformers  # noqa: F401
        pytest.skip("xformers is installed")
    except ImportError:
        pass
    rc = gen_img.main(["--ckpt", str(tiny_model_dir("sd1")), "--prompt", "a", "--xformers", *COMMON,
                       "--outdir", str(tmp_path / "o")])
    assert rc == 1 and "sdtk[xformers]" in capsys.readouterr().err


@pytest.mark.integration
def test_lycoris_network_hooked_equals_merged(tiny_model_dir, tmp_path):
    """A third-party module (lycoris.kohya, LoCon) through kohya's interface: hooked and merged agree, also
    at a multiplier other than 1 (lycoris 4.1 merges at 1 whatever it is given: plugin_compat)."""
    lk = pytest.importorskip("lycoris.kohya")
    from library.models.loading import load_models
    from library.training.plugin_compat import apply_fixes

    path = tiny_model_dir("sd1")
    apply_fixes("lycoris.kohya", lk)
    m = load_models(str(path))
    net = lk.create_network(1.0, 4, 2.0, m.vae, m.text_encoders[0], m.unet, algo="locon")
    net.apply_to(m.text_encoders[0], m.unet, True, True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    net.save_weights(str(tmp_path / "lyco.safetensors"), torch.float32, {})
    args = ["--ckpt", str(path), "--prompt", "a cat --d 1", "--sampler", "ddim", *COMMON,
            "--network_module", "lycoris.kohya", "--network_weights", str(tmp_path / "lyco.safetensors")]
    hooked = _run(args, tmp_path / "hooked")[0]
    merged = _run([*args, "--network_merge"], tmp_path / "merged")[0]
    plain = _run(args[:-4], tmp_path / "plain")[0]
    _close(merged, hooked, tol=2)
    assert np.abs(hooked - plain).max() > 10
    half = ["--network_mul", "0.5"]
    hooked_half = _run([*args, *half], tmp_path / "hooked_half")[0]
    merged_half = _run([*args, *half, "--network_merge"], tmp_path / "merged_half")[0]
    _close(merged_half, hooked_half, tol=2)
    assert np.abs(hooked_half - hooked).max() > 5 and np.abs(hooked_half - plain).max() > 5

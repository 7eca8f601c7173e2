"""Sample prompts (kohya's txt / toml / json), sampler names, cadence and images during training."""

from __future__ import annotations

import json
import re

import pytest

from library.errors import ConfigError
from library.inference.schedulers import SAMPLERS, make_scheduler
from library.training.sampling import SamplePrompt, image_file_name, load_prompts, parse_prompt_line, should_sample
from tests.trainer_fixtures import make_dataset, run_in_process, train_argv


def test_txt_line_with_every_option():
    sp = parse_prompt_line("a cat, best quality --n blurry, bad --w 768 --h 512 --d 42 --l 6.5 --s 20 --ss euler_a", 3)
    assert sp == SamplePrompt(prompt="a cat, best quality", negative_prompt="blurry, bad", width=768, height=512,
                              sample_steps=20, scale=6.5, seed=42, sample_sampler="euler_a", enum=3)


def test_txt_defaults_comments_and_blank_lines(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# a comment\n\nfirst prompt\nsecond --d 1\n", encoding="utf-8")
    prompts = load_prompts(f)
    assert [p.prompt for p in prompts] == ["first prompt", "second"]
    assert prompts[0] == SamplePrompt(prompt="first prompt", enum=0)  # kohya: 512x512, 30 steps, CFG 7.5
    assert prompts[1].seed == 1 and prompts[1].enum == 1


def test_toml_and_json(tmp_path):
    t = tmp_path / "p.toml"
    t.write_text('[prompt]\nwidth = 64\nsample_steps = 3\n\n[[prompt.subset]]\nprompt = "a dog"\nseed = 5\n\n'
                 '[[prompt.subset]]\nprompt = "a cat"\nnegative_prompt = "ugly"\nwidth = 128\n', encoding="utf-8")
    a, b = load_prompts(t)
    assert (a.prompt, a.width, a.sample_steps, a.seed) == ("a dog", 64, 3, 5)
    assert (b.prompt, b.width, b.negative_prompt, b.enum) == ("a cat", 128, "ugly", 1)
    j = tmp_path / "p.json"
    j.write_text(json.dumps([{"prompt": "x", "height": 96, "scale": 4}]), encoding="utf-8")
    (c,) = load_prompts(j)
    assert (c.prompt, c.height, c.scale) == ("x", 96, 4)
    j.write_text(json.dumps([{"prompt": "x", "hieght": 96}]), encoding="utf-8")
    with pytest.raises(ConfigError, match="hieght"):
        load_prompts(j)


def test_sampler_names_map_to_diffusers_schedulers():
    from library.models.tiny import scheduler_config

    expected = {"ddim": "DDIMScheduler", "euler_a": "EulerAncestralDiscreteScheduler", "k_lms": "LMSDiscreteScheduler",
                "dpmsolver++": "DPMSolverMultistepScheduler", "k_dpm_2_a": "KDPM2AncestralDiscreteScheduler"}
    for name, cls in expected.items():
        assert type(make_scheduler(name, scheduler_config())).__name__ == cls
    assert make_scheduler("dpmsolver++", scheduler_config()).config.algorithm_type == "dpmsolver++"
    for name in SAMPLERS:  # every kohya name builds
        make_scheduler(name, scheduler_config(v_prediction=True))
    with pytest.raises(ConfigError, match="euler_a"):
        make_scheduler("euler_b", scheduler_config())


def test_file_names_follow_kohya():
    assert re.fullmatch(r"lora_e000002_01_\d{14}_42\.png", image_file_name("lora", 1, 42, steps=10, epoch=2))
    assert re.fullmatch(r"000010_00_\d{14}\.png", image_file_name(None, 0, None, steps=10, epoch=None))


@pytest.mark.parametrize("kw, expected", [
    (dict(steps=0, epoch=None, every_n_steps=5, every_n_epochs=None, at_first=False), False),
    (dict(steps=0, epoch=None, every_n_steps=None, every_n_epochs=None, at_first=True), True),
    (dict(steps=10, epoch=None, every_n_steps=5, every_n_epochs=None, at_first=False), True),
    (dict(steps=11, epoch=None, every_n_steps=5, every_n_epochs=None, at_first=False), False),
    (dict(steps=10, epoch=2, every_n_steps=5, every_n_epochs=None, at_first=False), False),
    (dict(steps=10, epoch=None, every_n_steps=5, every_n_epochs=1, at_first=False), False),  # epochs win
    (dict(steps=10, epoch=2, every_n_steps=None, every_n_epochs=2, at_first=False), True),
    (dict(steps=10, epoch=3, every_n_steps=None, every_n_epochs=2, at_first=False), False),
])
def test_cadence(kw, expected):
    assert should_sample(**kw) is expected


@pytest.mark.integration
def test_samples_during_training(tiny_model_dir, tmp_path):
    data = make_dataset(tmp_path / "data", names=("astronaut", "coffee"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of sks astronaut --w 64 --h 64 --s 2 --d 42 --ss euler_a\n"
                       "a cup of coffee, " + "detailed " * 60 + "--n blurry --w 64 --h 64 --s 2 --l 5\n",
                       encoding="utf-8")
    out = tmp_path / "out"
    argv = train_argv(tiny_model_dir("sd1"), data, out, "--sample_prompts", str(prompts), "--sample_at_first",
                      "--sample_every_n_steps", "2", "--max_token_length", "150", "--clip_skip", "2",
                      "--cache_latents", steps=2)
    assert run_in_process(argv) == 0
    names = sorted(p.name for p in (out / "sample").iterdir())
    assert len(names) == 4, names
    assert re.fullmatch(r"lora_000000_00_\d{14}_42\.png", names[0])
    assert re.fullmatch(r"lora_000000_01_\d{14}\.png", names[1])
    assert re.fullmatch(r"lora_000002_00_\d{14}_42\.png", names[2])
    from PIL import Image

    with Image.open(out / "sample" / names[0]) as im:
        assert im.size == (64, 64)


@pytest.mark.integration
def test_sample_seed_makes_images_reproducible(tiny_model_dir, tmp_path):
    from library.models.loading import load_models
    from library.training.family import get_family_adapter
    from library.training.sampling import generate
    import numpy as np
    import torch

    m = load_models(str(tiny_model_dir("sd1")))
    fam = get_family_adapter(m.family)
    comps = {"unet": m.unet, "vae": m.vae, "text_encoder": m.text_encoders[0], "tokenizer": m.tokenizers[0]}
    enc = lambda texts: fam.encode_prompts(m.text_encoders, m.tokenizers, texts, None, None, torch.device("cpu"))
    sp = SamplePrompt("a dog", width=64, height=64, sample_steps=2, seed=3)
    imgs = [np.asarray(generate(fam.pipeline_class(), comps, enc, sp, m.scheduler_config, "ddim",
                                torch.device("cpu"), torch.float32)) for _ in range(2)]
    assert (imgs[0] == imgs[1]).all()
    other = generate(fam.pipeline_class(), comps, enc, SamplePrompt("a dog", width=64, height=64, sample_steps=2,
                                                                     seed=4), m.scheduler_config, "ddim",
                     torch.device("cpu"), torch.float32)
    assert (np.asarray(other) != imgs[0]).any()


def test_sample_prompts_read_attention_weights(tiny_model_dir, tmp_path):
    """kohya samples with long-prompt-weighting pipelines: "(word:1.0)" is the plain word, other weights change
    the image; unweighted prompts render exactly as before."""
    import numpy as np
    from PIL import Image

    data = make_dataset(tmp_path / "data", names=("astronaut",))
    prompts = tmp_path / "prompts.txt"
    opts = "--w 64 --h 64 --s 2 --d 5"
    prompts.write_text(f"a photo of dog {opts}\na (photo:1.0) of dog {opts}\na photo of (dog:1.8) {opts}\n",
                       encoding="utf-8")
    out = tmp_path / "out"
    argv = train_argv(tiny_model_dir("sd1"), data, out, "--sample_prompts", str(prompts), "--sample_at_first",
                      "--network_train_unet_only", steps=1)
    assert run_in_process(argv) == 0
    files = sorted((out / "sample").glob("lora_000000_*.png"))
    assert len(files) == 3
    plain, same, heavier = (np.asarray(Image.open(f).convert("RGB"), dtype=np.int16) for f in files)
    assert (plain == same).all()
    assert np.abs(plain - heavier).max() > 0


def test_weighted_prompt_keeps_the_mean_of_each_encoder():
    import torch

    from library.models.families import Family
    from library.models.tiny import build_tiny_model
    from library.training.family import get_family_adapter

    m = build_tiny_model(Family.SDXL)
    fam = get_family_adapter(Family.SDXL)
    enc = lambda t, **kw: fam.encode_prompts(m.text_encoders, m.tokenizers, [t], None, None, "cpu", **kw)  # noqa: E731
    with torch.no_grad():
        plain = enc("a photo of dog")
        weighted = enc("a (photo:1.6) of [dog]", weighted=True, keep_mean=True)
        raw = enc("a (photo:1.6) of [dog]", weighted=True)
    width = m.text_encoders[0].config.hidden_size
    for part in (slice(0, width), slice(width, None)):
        torch.testing.assert_close(weighted.hidden_states[..., part].mean(), plain.hidden_states[..., part].mean())
        assert not torch.allclose(raw.hidden_states[..., part].mean(), plain.hidden_states[..., part].mean())
    assert torch.equal(weighted.pooled, plain.pooled)


def test_samples_render_with_the_network_in_eval_mode(tiny_model_dir, tmp_path, monkeypatch):
    """No network dropout (and DyLoRA's full rank) in sample images: sampling switches the network to eval
    mode and back (recorded from the LoRA modules' own forward calls)."""
    import torch

    from networks.lora_modules import LoRAModule

    seen: list[tuple[bool, bool]] = []  # (grad enabled, module in training mode)
    original = LoRAModule.forward

    def recording_forward(self, *args, **kwargs):
        seen.append((torch.is_grad_enabled(), self.training))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LoRAModule, "forward", recording_forward)
    data = make_dataset(tmp_path / "data", names=("astronaut",))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a dog --w 64 --h 64 --s 1 --d 1\n", encoding="utf-8")
    argv = train_argv(tiny_model_dir("sd1"), data, tmp_path / "out", "--sample_prompts", str(prompts),
                      "--sample_every_n_steps", "1", "--network_dropout", "0.3", steps=2)
    assert run_in_process(argv) == 0
    sampling = [training for grad, training in seen if not grad]
    trainingsteps = [training for grad, training in seen if grad]
    assert sampling and not any(sampling)
    assert trainingsteps and all(trainingsteps)  # back in training mode after each sample

"""Unit tests of the trainer's feature functions against reference formulas / implementations."""

from __future__ import annotations

import math

import pytest
import torch

from library.errors import ConfigError, TrainingError
from library.training import loss as L
from library.training import noise as N


def _ddpm():
    from diffusers import DDPMScheduler

    from library.models.tiny import scheduler_config

    return DDPMScheduler.from_config(scheduler_config())


def test_add_noise_and_velocity_match_diffusers():
    sched = _ddpm()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([1, 500, 999])
    torch.testing.assert_close(N.add_noise(sched.alphas_cumprod, x0, noise, t), sched.add_noise(x0, noise, t))
    torch.testing.assert_close(N.velocity(sched.alphas_cumprod, x0, noise, t), sched.get_velocity(x0, noise, t))


def test_snr_and_min_snr_weights_reference_formula():
    # independent: scaled-linear betas -> alpha_bar -> snr, written out here
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    t = torch.tensor([0, 10, 200, 999])
    ref_snr = (abar[t] / (1 - abar[t])).float()
    snr = N.snr(_ddpm().alphas_cumprod, t)
    torch.testing.assert_close(snr, ref_snr, rtol=1e-4, atol=0)
    gamma = 5.0
    eps_w = L.min_snr_weight(snr, gamma, v_prediction=False)
    v_w = L.min_snr_weight(snr, gamma, v_prediction=True)
    for i in range(4):
        s = snr[i].item()
        assert eps_w[i].item() == pytest.approx(min(s, gamma) / s, rel=1e-6)
        assert v_w[i].item() == pytest.approx(min(s, gamma) / (s + 1), rel=1e-6)


def test_noise_offset_formula_and_per_sample_independence():
    latents = torch.zeros(2, 4, 8, 8)
    gens = N.sample_generators(1, 5, 0, 2)
    plain = N.make_noise(latents, N.sample_generators(1, 5, 0, 2))
    with_offset = N.make_noise(latents, gens, noise_offset=0.1)
    # the offset is one value per (sample, channel), constant over H and W
    diff = with_offset - plain
    assert torch.allclose(diff, diff[:, :, :1, :1].expand_as(diff), atol=1e-6)
    gens = N.sample_generators(1, 5, 0, 2)
    _ = [torch.randn((4, 8, 8), generator=g) for g in gens]
    offset_n = torch.stack([torch.randn((4, 1, 1), generator=g) for g in gens])
    torch.testing.assert_close(diff, (0.1 * offset_n).expand_as(diff))
    # sample 1's noise is the same whether drawn in a batch of 2 or alone at global index 1
    alone = N.make_noise(latents[:1], N.sample_generators(1, 5, 1, 1))
    torch.testing.assert_close(alone[0], plain[1])


def test_random_strength_offset():
    noise, n = torch.zeros(2, 4, 1, 1), torch.ones(2, 4, 1, 1)
    out = N.apply_noise_offset(noise, 0.2, torch.tensor([0.5, 1.0]), n)
    torch.testing.assert_close(out[:, 0, 0, 0], torch.tensor([0.1, 0.2]))


def test_timesteps_range_and_fixed():
    gens = N.sample_generators(0, 0, 0, 64)
    t = N.sample_timesteps(gens, 100, 200)
    assert t.min() >= 100 and t.max() < 200 and t.dtype == torch.long
    assert (N.sample_timesteps(gens, 300, 300) == 300).all()


def test_masked_loss_and_prior_weights():
    loss = torch.ones(1, 4, 4, 4)
    mask = torch.zeros(1, 32, 32)
    mask[:, :, :16] = 1  # left half of the image
    masked = L.apply_masks(loss, mask)
    assert masked[0, :, :, :2].eq(1).all() and masked[0, :, :, 2:].eq(0).all()
    w = L.prior_loss_weights(torch.tensor([False, True]), torch.tensor([1.0, 1.0]), 0.25)
    torch.testing.assert_close(w, torch.tensor([1.0, 0.25]))
    per = torch.tensor([[[[2.0]]], [[[4.0]]]])
    assert L.reduce_loss(per, w).item() == pytest.approx((2.0 + 1.0) / 2)


def test_merge_chunks_layout():
    from library.models.families.sd1 import merge_chunks

    b, d = 2, 3
    hidden = torch.arange(b * 2 * 77 * d, dtype=torch.float32).reshape(b, 2, 77, d)
    ids = torch.ones(b, 2, 77, dtype=torch.long)
    out = merge_chunks(hidden, ids, eos_token_id=9, pad_is_eos=True)
    assert out.shape == (b, 152, d)
    torch.testing.assert_close(out[:, 0], hidden[:, 0, 0])  # BOS of the first chunk
    torch.testing.assert_close(out[:, 1:76], hidden[:, 0, 1:76])
    torch.testing.assert_close(out[:, 76:151], hidden[:, 1, 1:76])
    torch.testing.assert_close(out[:, 151], hidden[:, 1, 76])  # last state of the last chunk
    assert merge_chunks(hidden[:, :1], ids[:, :1], 9, True).shape == (b, 77, d)
    # SD2: an empty second chunk ("BOS EOS pad...") has its first state replaced by the next one
    ids[0, 1, 1] = 9
    out2 = merge_chunks(hidden, ids, eos_token_id=9, pad_is_eos=False)
    torch.testing.assert_close(out2[0, 76], hidden[0, 1, 2])
    torch.testing.assert_close(out2[1, 76], hidden[1, 1, 1])


def test_clip_skip_matches_truncated_text_encoder():
    """kohya's clip_skip 2 == a text encoder with its last layer removed (its output is then normed)."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    from library.models.families import Family
    from library.models.tiny import build_tiny_model
    from library.training.family import get_family_adapter
    from library.training.sampling import make_scheduler

    m = build_tiny_model(Family.SD1)
    fam = get_family_adapter(Family.SD1)
    prompt = ["a photo of a dog"]
    # no clip skip: the same embeddings diffusers' pipeline computes
    pipe = StableDiffusionPipeline(vae=m.vae, text_encoder=m.text_encoders[0], tokenizer=m.tokenizers[0], unet=m.unet,
                                   scheduler=make_scheduler("ddim", m.scheduler_config), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    ours = fam.encode_prompts(m.text_encoders, m.tokenizers, prompt, None, None, torch.device("cpu"))
    ref, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
    torch.testing.assert_close(ours.hidden_states, ref)
    te = m.text_encoders[0]
    cfg = te.config.to_dict()
    cfg["num_hidden_layers"] -= 1
    short = CLIPTextModel(type(te.config)(**cfg)).eval()
    missing, unexpected = short.load_state_dict(te.state_dict(), strict=False)
    assert not missing and all(".layers.3." in k for k in unexpected)
    ids = m.tokenizers[0](prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        ref2 = short(ids)[0]
    ours2 = fam.encode_prompts(m.text_encoders, m.tokenizers, prompt, None, 2, torch.device("cpu"))
    torch.testing.assert_close(ours2.hidden_states, ref2)


@pytest.mark.parametrize("name", ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts"])
def test_lr_schedulers_match_diffusers(name):
    from diffusers.optimization import get_scheduler

    from library.training.lr_schedulers import build_lr_scheduler

    def lrs(make):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = make(opt)
        out = []
        for _ in range(20):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    warm = 0 if name == "constant" else 5
    ours = lrs(lambda o: build_lr_scheduler(o, name, 20, warm, num_cycles=2))
    kw = {"num_cycles": 2} if name == "cosine_with_restarts" else {}
    ref = lrs(lambda o: get_scheduler(name, o, num_warmup_steps=warm, num_training_steps=20, **kw))
    assert ours == pytest.approx(ref, abs=1e-9)


def test_lr_warmup_ratio_and_bad_combination():
    from library.training.lr_schedulers import build_lr_scheduler, resolve_steps

    assert resolve_steps(0.1, 200) == 20 and resolve_steps(7, 200) == 7
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ConfigError, match="constant_with_warmup"):
        build_lr_scheduler(opt, "constant", 10, 3)
    with pytest.raises(ConfigError, match="cosine"):
        build_lr_scheduler(opt, "cosine_typo", 10, 0)


def test_optimizers():
    from library.training.optimizers import build_optimizer, parse_optimizer_args

    assert parse_optimizer_args(["weight_decay=0.01", "betas=0.9,0.99", "foreach=False"]) == {
        "weight_decay": 0.01, "betas": (0.9, 0.99), "foreach": False}
    p = [torch.nn.Parameter(torch.zeros(2))]
    name, args, opt = build_optimizer("adamw", p, 1e-3, ["weight_decay=0.5"])
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["weight_decay"] == 0.5
    assert build_optimizer("torch.optim.SGD", p, 0.1)[2].__class__ is torch.optim.SGD
    with pytest.raises(ConfigError, match="not supported"):
        build_optimizer("NoSuchOptimizer", p, 1e-3)
    with pytest.raises(ConfigError, match="do not fit"):
        build_optimizer("AdamW", p, 1e-3, ["nonsense=1"])


def test_adamw8bit_steps_on_cpu():
    pytest.importorskip("bitsandbytes")
    from library.training.optimizers import build_optimizer

    p = torch.nn.Parameter(torch.ones(4096))
    _, _, opt = build_optimizer("AdamW8bit", [p], 1e-2)
    p.grad = torch.ones_like(p)
    opt.step()
    assert (p < 1).all()


def test_save_policy_keep_last_n():
    from library.training.saving import SavePolicy, epoch_name, step_name

    pol = SavePolicy(every_n_epochs=2, every_n_steps=100, last_n_epochs=2, last_n_steps=200)
    assert pol.save_at_epoch(2, 10) and not pol.save_at_epoch(3, 10) and not pol.save_at_epoch(10, 10)
    assert pol.removable_epoch(6) == 2 and pol.removable_epoch(4) is None
    assert pol.removable_step(500) == 200 and pol.removable_step(300) is None  # kohya: keep last 200 steps' saves
    assert epoch_name("x", 3) == "x-000003" and step_name(None, 100) == "at-step00000100"


def test_save_policy_from_flags():
    """Built once from the parsed flags; --save_n_epoch_ratio N overrides --save_every_n_epochs (about N saves)."""
    from argparse import Namespace

    from library.training.saving import SavePolicy

    flags = dict(save_every_n_epochs=4, save_n_epoch_ratio=None, save_every_n_steps=50, save_last_n_epochs=2,
                 save_last_n_steps=None, save_last_n_epochs_state=None, save_last_n_steps_state=100,
                 save_state=True, save_state_on_train_end=False)
    pol = SavePolicy.from_args(Namespace(**flags), num_epochs=10)
    assert (pol.every_n_epochs, pol.every_n_steps, pol.last_n_epochs, pol.last_n_steps_state) == (4, 50, 2, 100)
    assert pol.save_state and not pol.save_state_on_train_end
    assert SavePolicy.from_args(Namespace(**{**flags, "save_n_epoch_ratio": 3}), num_epochs=10).every_n_epochs == 3
    assert SavePolicy.from_args(Namespace(**{**flags, "save_n_epoch_ratio": 20}), num_epochs=10).every_n_epochs == 1
    # a script without some of the flags reads their declared defaults
    assert SavePolicy.from_args(Namespace(save_every_n_steps=7), num_epochs=1) == SavePolicy(every_n_steps=7)


def test_local_slices_cover_global_batch():
    from library.training.data import local_slice

    batch = [10, 11, 12]
    parts = [local_slice(batch, r, 2) for r in range(2)]
    assert [p.indices for p in parts] == [[10, 11], [12]] and [p.first_index for p in parts] == [0, 2]
    empty = local_slice([5], 1, 2)
    assert empty.n_real == 0 and empty.indices == [5] and empty.global_size == 1


def test_state_roundtrip_and_signature(tmp_path):
    from library.training.state import Progress, TrainState, load_state, save_state

    st = TrainState(progress=Progress(1, 7, 3, 10), network={"w": torch.ones(2)}, optimizer={"a": 1},
                    scheduler={"b": 2}, rng={"torch": torch.get_rng_state()}, signature={"dim": 4})
    save_state(tmp_path / "s", st)
    back = load_state(tmp_path / "s", {"dim": 4})
    assert back.progress == Progress(1, 7, 3, 10) and torch.equal(back.network["w"], torch.ones(2))
    with pytest.raises(TrainingError, match="dim: state has 4, this run has 8"):
        load_state(tmp_path / "s", {"dim": 8})
    (tmp_path / "s" / "optimizer.pt").unlink()
    with pytest.raises(TrainingError, match="missing optimizer.pt"):
        load_state(tmp_path / "s")


def test_derive_seed_is_stable():
    assert N.derive_seed(1, 2, 3) == N.derive_seed(1, 2, 3) != N.derive_seed(1, 2, 4)
    assert 0 <= N.derive_seed(2**40, -1) < 2**63 and not math.isnan(N.derive_seed(0))


def test_allocator_tuning_returns_freed_activations(tmp_path):
    """With the fixed mmap threshold, big buffers freed after a step go back to the system."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from library.training.memory import tune_allocator\n"
        "def anon():\n"
        "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('RssAnon')) // 1024\n"
        "if sys.argv[1] == 'on': assert tune_allocator()\n"
        "base = anon()\n"
        "for size in (32, 16, 8, 4, 2):  # freeing a big block raises glibc's dynamic threshold\n"
        "    bufs = [torch.ones(size * 2**20 // 4) for _ in range(8)]\n"
        "    del bufs\n"
        "print(anon() - base)\n"
    )
    import pathlib

    if not pathlib.Path("/proc/self/status").exists():
        pytest.skip("needs Linux /proc")
    root = pathlib.Path(__file__).resolve().parents[1]
    run = lambda mode: int(subprocess.run([sys.executable, "-c", code, mode], cwd=root, capture_output=True,  # noqa: E731
                                          text=True, check=True).stdout.split()[-1])
    assert run("on") < 8  # MB left behind: the freed buffers were returned

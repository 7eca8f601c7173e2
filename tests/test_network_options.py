"""LoRA network options of the trainer: --base_weights (merge before training), --scale_weight_norms
in the loop, schedule-free optimizers end to end, and the effective config / metadata of the toolbox
flags."""

from __future__ import annotations

import copy

import pytest
import torch

import networks.lora as lora
from library.errors import ConfigError
from library.models.families import Family
from library.models.tiny import build_tiny_model
from library.training.base_weights import base_weight_multipliers, merge_base_weights
from networks.lora_math import delta_weight
from tests.trainer_fixtures import lora_metadata, lora_tensors, make_dataset, run_in_process, train_argv


def _unet_out(m) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 77, m.unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return m.unet(x, torch.tensor([500]), encoder_hidden_states=ctx).sample


def _lora_file(tmp_path, m=None, conv_dim: int = 2):
    m = m or build_tiny_model(Family.SD1)
    net = lora.create_network(1.0, 4, 2, m.vae, m.text_encoders[0], m.unet, conv_dim=str(conv_dim))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in net.all_loras:
            mod.lora_up.weight.copy_(torch.randn(mod.lora_up.weight.shape, generator=g) * 0.1)
    path = tmp_path / "base.safetensors"
    net.save_weights(str(path), None, {})
    return path


def test_base_weights_merge_equals_the_hooked_lora(tmp_path):
    fresh = build_tiny_model(Family.SD1)
    hooked, merged = copy.deepcopy(fresh), copy.deepcopy(fresh)
    path = _lora_file(tmp_path, copy.deepcopy(fresh))
    net, sd = lora.create_network_from_weights(0.5, str(path), hooked.vae, hooked.text_encoders[0], hooked.unet)
    net.load_state_dict(sd, strict=False)
    net.apply_to(hooked.text_encoders[0], hooked.unet)
    plain = _unet_out(merged)
    assert merge_base_weights(lora, merged, [str(path)], [0.5]) == 1
    out = _unet_out(merged)
    assert not torch.allclose(out, plain, atol=1e-4)
    assert torch.allclose(out, _unet_out(hooked), atol=1e-4)
    # one weight by hand: W + 0.5 * alpha / rank * up @ down
    up = sd["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight"]
    down = sd["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"]
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    w0 = fresh.unet.get_submodule(name).weight
    w1 = merged.unet.get_submodule(name).weight
    assert torch.allclose(w1, w0 + 0.5 * (2 / 4) * up @ down, atol=1e-6)
    assert torch.allclose(w1 - w0, delta_weight(up, down, 0.5 * 2 / 4), atol=1e-6)


def test_base_weight_multipliers_follow_kohya(tmp_path):
    assert base_weight_multipliers(["a", "b"], None) == [1.0, 1.0]
    assert base_weight_multipliers(["a", "b"], [0.5]) == [0.5, 1.0]
    with pytest.raises(ConfigError, match="2 values for 1"):
        base_weight_multipliers(["a"], [0.5, 0.7])
    with pytest.raises(ConfigError, match="no such file"):
        merge_base_weights(lora, build_tiny_model(Family.SD1), [str(tmp_path / "missing.safetensors")], None)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("opt_data"), names=("astronaut", "coffee"))


@pytest.mark.integration
def test_base_weights_and_max_norm_in_a_run(tiny_model_dir, data, tmp_path):
    base = _lora_file(tmp_path)
    out = tmp_path / "out"
    argv = train_argv(tiny_model_dir("sd1"), data, out, "--base_weights", str(base), "--base_weights_multiplier", "0.5",
                      "--scale_weight_norms", "0.002", "--learning_rate", "1e-2", "--loss_type", "huber",
                      "--huber_schedule", "exponential", "--noise_offset", "0.05", "--adaptive_noise_scale", "0.01",
                      "--lr_scheduler", "warmup_stable_decay", "--lr_warmup_steps", "0.25", "--lr_decay_steps", "0.5",
                      "--lr_scheduler_min_lr_ratio", "0.1", steps=3)
    assert run_in_process(argv) == 0
    md = lora_metadata(out / "lora.safetensors")
    assert md["ss_base_weights"] == str([str(base)]) and md["ss_base_weights_multiplier"] == "[0.5]"
    assert md["ss_scale_weight_norms"] == "0.002" and md["ss_loss_type"] == "huber"
    assert md["ss_huber_schedule"] == "exponential" and md["ss_adaptive_noise_scale"] == "0.01"
    assert md["ss_lr_scheduler"] == "warmup_stable_decay" and md["ss_lr_decay_steps"] == "0.5"
    sd = lora_tensors(out / "lora.safetensors")
    names = {k.rsplit(".", 2)[0] for k in sd if k.endswith("lora_down.weight")}
    norms = []
    for n in names:
        up, down, alpha = sd[f"{n}.lora_up.weight"], sd[f"{n}.lora_down.weight"], sd[f"{n}.alpha"].item()
        norms.append(delta_weight(up.float(), down.float(), alpha / down.shape[0]).norm().item())
    assert max(norms) <= 0.002 * 1.001 and max(norms) > 0.001  # the norm cap was reached and held


@pytest.mark.integration
def test_schedule_free_run_and_effective_config(tiny_model_dir, data, tmp_path):
    pytest.importorskip("schedulefree")
    out = tmp_path / "out"
    extra = ("--optimizer_type", "adamwschedulefree", "--optimizer_args", "warmup_steps=1", "--min_snr_gamma", "5",
             "--multires_noise_iterations", "3", "--ip_noise_gamma", "0.05", "--zero_terminal_snr",
             "--debiased_estimation_loss", "--save_every_n_steps", "1", "--save_state")
    argv = train_argv(tiny_model_dir("sd1"), data, out, *extra, steps=2)
    assert run_in_process(argv) == 0
    md = lora_metadata(out / "lora.safetensors")
    assert md["ss_optimizer"] == "schedulefree.adamw_schedulefree.AdamWScheduleFree(warmup_steps=1)"
    assert md["ss_zero_terminal_snr"] == "True" and md["ss_multires_noise_iterations"] == "3"
    # resuming from the state saved at step 1 (in eval mode) gives the same final weights
    argv2 = train_argv(tiny_model_dir("sd1"), data, tmp_path / "resumed", *extra, "--resume",
                       str(out / "lora-step00000001-state"), steps=2)
    assert run_in_process(argv2) == 0
    a, b = lora_tensors(out / "lora.safetensors"), lora_tensors(tmp_path / "resumed" / "lora.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # the effective config lists the toolbox flags
    cfg = tmp_path / "effective.toml"
    assert run_in_process(train_argv(tiny_model_dir("sd1"), data, out, *extra, "--output_config", "--config_file",
                                     str(cfg))) == 0
    text = cfg.read_text()
    for key in ("optimizer_type", "min_snr_gamma", "multires_noise_iterations", "ip_noise_gamma", "zero_terminal_snr",
                "debiased_estimation_loss"):
        assert key in text, key

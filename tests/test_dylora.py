"""networks.dylora: training through train_network.py, kohya's file format, loading as a plain LoRA,
the rank split tool, the per-step rank draw and its gradients, network_args errors, SDXL key layout.

All on tiny real models (no mocks of the math). Save/load, merge, gradient checkpointing (with the
step's rank) and diffusers loading, as for every network module: tests/contracts/test_contract_networks.py.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from library.errors import ConfigError
from library.models.families import Family
from library.models.tiny import build_tiny_model
from networks import dylora, lora
from networks.extract_lora_from_dylora import main as extract_main
from tests.helpers_networks import te_arg as _te
from tests.helpers_networks import te_out as _te_out
from tests.helpers_networks import unet_out as _unet_out
from tests.trainer_fixtures import lora_metadata, lora_tensors, make_dataset, run_in_process, train_argv


def _randomize(net: dylora.DyLoRANetwork, seed: int = 1, std: float = 0.1) -> None:
    """Non-zero ``lora_up`` units (fresh ones are zero), so every rank changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.all_loras:
            for p in module.lora_up:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _dylora(m, dim: int = 8, alpha: float = 4, std: float = 0.1, **kw) -> dylora.DyLoRANetwork:
    net = dylora.create_network(1.0, dim, alpha, m.vae, _te(m), m.unet, **kw)
    _randomize(net, std=std)
    return net


@pytest.fixture
def sd1():
    return build_tiny_model(Family.SD1)


def test_train_network_writes_kohya_lora_file(tiny_model_dir, tmp_path):
    data = make_dataset(tmp_path / "data", names=("astronaut", "coffee"))
    argv = train_argv(tiny_model_dir("sd1"), data, tmp_path / "out", "--network_module", "networks.dylora",
                      "--network_dim", "8", "--network_alpha", "4", "--network_args", "unit=2", steps=3, name="dy")
    assert run_in_process(argv) == 0
    path = tmp_path / "out" / "dy.safetensors"
    sd, meta = lora_tensors(path), lora_metadata(path)

    m = build_tiny_model(Family.SD1)
    reference = lora.create_network(1.0, 8, 4, m.vae, _te(m), m.unet).state_dict()
    assert sd.keys() == reference.keys()  # lora_te_text_model_..., lora_unet_down_blocks_...
    assert all(sd[k].shape == reference[k].shape for k in sd)
    assert all(sd[k].item() == 4.0 for k in sd if k.endswith(".alpha"))
    assert any(sd[k].abs().sum() > 0 for k in sd if k.endswith("lora_up.weight"))  # it trained
    assert meta["ss_network_module"] == "networks.dylora"
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "4.0"
    assert '"unit": "2"' in meta["ss_network_args"]


def test_file_loads_as_plain_lora_with_same_outputs(sd1, tmp_path):
    net = _dylora(sd1, unit="2", conv_dim="8", conv_alpha="2")
    path = tmp_path / "dy.safetensors"
    net.save_weights(str(path), torch.float32, {})
    net.apply_to(_te(sd1), sd1.unet)
    net.eval()  # eval mode: all ranks, whatever rank the last step drew
    net.on_step_start(None, None)

    other = build_tiny_model(Family.SD1)
    base = _unet_out(other)
    plain, weights = lora.create_network_from_weights(1.0, str(path), other.vae, _te(other), other.unet)
    plain.load_weights(str(path))
    plain.apply_to(_te(other), other.unet)
    assert (_unet_out(other) - base).abs().max() > 1e-3
    torch.testing.assert_close(_unet_out(other), _unet_out(sd1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_te_out(other), _te_out(sd1), rtol=1e-5, atol=1e-6)
    assert {m.lora_dim for m in plain.all_loras} == {8} and len(weights) == len(net.state_dict())

    # and back into a DyLoRA network (resume / --dim_from_weights)
    again, _ = dylora.create_network_from_weights(1.0, str(path), None, _te(other), build_tiny_model(Family.SD1).unet, unit="2")
    again.load_weights(str(path))
    loaded = again.state_dict()
    for k, v in net.state_dict().items():
        assert torch.equal(loaded[k], v), k


def test_extracted_rank_r_lora_is_the_first_r_ranks(sd1, tmp_path):
    net = _dylora(sd1, unit="2", conv_dim="8")
    src = tmp_path / "dy.safetensors"
    net.save_weights(str(src), torch.float32, {"ss_network_dim": "8", "ss_training_comment": "x"})
    assert extract_main(["--model", str(src), "--save_to", str(tmp_path / "cut.safetensors"), "--unit", "2"]) == 0
    assert sorted(p.name for p in tmp_path.glob("cut-*")) == ["cut-0002.safetensors", "cut-0004.safetensors", "cut-0006.safetensors"]
    assert not list(tmp_path.glob("*.tmp*"))  # atomic writes leave no temporaries

    full = load_file(str(src))
    cut = load_file(str(tmp_path / "cut-0004.safetensors"))
    assert cut.keys() == full.keys()
    for k, v in cut.items():
        want = full[k][:4] if k.endswith("lora_down.weight") else full[k][:, :4] if k.endswith("lora_up.weight") else full[k]
        assert torch.equal(v, want), k
    meta = lora_metadata(tmp_path / "cut-0004.safetensors")
    assert meta["ss_network_dim"] == "4" and meta["ss_training_comment"].startswith("split from DyLoRA, rank 8 to 4")

    # the rank-4 LoRA computes exactly what DyLoRA trains when it draws 2 units
    net.apply_to(_te(sd1), sd1.unet)
    net.train()
    net.set_trained_units(2)
    other = build_tiny_model(Family.SD1)
    plain, _ = lora.create_network_from_weights(1.0, str(tmp_path / "cut-0004.safetensors"), None, _te(other), other.unet)
    plain.load_weights(str(tmp_path / "cut-0004.safetensors"))
    plain.apply_to(_te(other), other.unet)
    torch.testing.assert_close(_unet_out(other), _unet_out(sd1), rtol=1e-5, atol=1e-6)


def test_extract_refuses_bad_unit(sd1, tmp_path, capsys):
    src = tmp_path / "dy.safetensors"
    _dylora(sd1, unit="2").save_weights(str(src), torch.float32, {})
    assert extract_main(["--model", str(src), "--save_to", str(tmp_path / "c.safetensors"), "--unit", "3"]) == 1
    assert "--unit 3 does not divide the rank" in capsys.readouterr().err
    assert extract_main(["--model", str(src), "--save_to", str(tmp_path / "c.safetensors")]) == 1
    assert "--unit is required" in capsys.readouterr().err
    assert not list(tmp_path.glob("c*"))


def test_step_draw_limits_gradients_to_the_drawn_unit(sd1):
    net = _dylora(sd1, unit="2")
    net.apply_to(_te(sd1), sd1.unet, apply_text_encoder=False)
    net.prepare_grad_etc(None, sd1.unet)
    net.train()
    torch.manual_seed(3)
    draws = set()
    for _ in range(40):
        net.on_step_start(None, sd1.unet)
        draws.add(net.trained_units)
    assert draws == {1, 2, 3, 4}  # b uniform in 1 .. dim / unit

    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    for b in (1, 3):
        net.set_trained_units(b)
        net.zero_grad(set_to_none=True)
        sd1.unet(x, torch.tensor([10, 900]), ctx).sample.square().mean().backward()
        for module in net.unet_loras:
            for stack in (module.lora_down, module.lora_up):
                for i, p in enumerate(stack):
                    if i == b - 1:
                        assert p.grad is not None and p.grad.abs().sum() > 0, (module.lora_name, i)
                    else:  # frozen lower units and unused higher ones: no gradient at all
                        assert p.grad is None, (module.lora_name, i, b)

    # ranks above b * unit do not take part in the forward: zeroing them changes nothing
    net.set_trained_units(2)
    before = _unet_out(sd1)
    with torch.no_grad():
        for module in net.unet_loras:
            for p in list(module.lora_up)[2:]:
                p.zero_()
    torch.testing.assert_close(_unet_out(sd1), before)


def test_bad_network_args_are_clear_errors(sd1):
    def create(dim=8, **kw):
        return dylora.create_network(1.0, dim, 1, sd1.vae, _te(sd1), sd1.unet, **kw)

    with pytest.raises(ConfigError, match="--network_dim 8 is not a multiple of unit=3"):
        create(unit="3")
    with pytest.raises(ConfigError) as e:
        create(unit="two", foo="1", block_dims="2,2")
    msg = str(e.value)
    assert "unit='two' is invalid" in msg and "unknown key 'foo'" in msg
    assert "'block_dims' — it is an argument of networks.lora" in msg and "valid keys: unit, conv_dim" in msg
    with pytest.raises(ConfigError, match="conv_dim=4 must equal --network_dim"):
        create(conv_dim="4")
    with pytest.raises(ConfigError, match="module_dropout='2' is invalid"):
        create(module_dropout="2")


def test_sdxl_key_layout_matches_lora(tiny_model_dir, tmp_path):
    from test_sdxl_training import run_sdxl

    data = make_dataset(tmp_path / "data", names=("rocket",))
    argv = train_argv(tiny_model_dir("sdxl"), data, tmp_path / "out", "--network_module", "networks.dylora",
                      "--network_args", "unit=2", "conv_dim=4", steps=2, name="xl")
    assert run_sdxl(argv) == 0
    trained = lora_tensors(tmp_path / "out" / "xl.safetensors")

    m = build_tiny_model(Family.SDXL)
    ours = dylora.create_network(1.0, 4, 1, m.vae, m.text_encoders, m.unet, unit="2", conv_dim="4")
    theirs = lora.create_network(1.0, 4, 1, m.vae, m.text_encoders, m.unet, conv_dim="4")
    sd = ours.state_dict()
    assert sd.keys() == theirs.state_dict().keys() == trained.keys()
    assert any(k.startswith("lora_te1_text_model_") for k in sd) and any(k.startswith("lora_te2_text_model_") for k in sd)
    assert any(k.startswith("lora_unet_input_blocks_") for k in sd) and not any("down_blocks" in k for k in sd)
    path = tmp_path / "xl.safetensors"
    _randomize(ours)
    ours.save_weights(str(path), None, {})
    ours.apply_to(m.text_encoders, m.unet)
    other = build_tiny_model(Family.SDXL)
    plain, _ = lora.create_network_from_weights(1.0, str(path), None, other.text_encoders, other.unet)
    plain.load_weights(str(path))
    plain.apply_to(other.text_encoders, other.unet)
    torch.testing.assert_close(_unet_out(other), _unet_out(m), rtol=1e-5, atol=1e-6)


def test_max_norm_regularization_scales_the_units(sd1):
    net = _dylora(sd1, unit="2", std=1.0)
    scaled, mean_norm, max_norm = net.apply_max_norm_regularization(0.05, "cpu")
    assert scaled > 0 and max_norm <= 0.05 + 1e-6
    norms = [m.delta_weight(multiplier=1.0).norm().item() for m in net.all_loras]
    assert max(norms) <= 0.05 + 1e-5 and abs(sum(norms) / len(norms) - mean_norm) < 1e-5

"""networks.oft: kohya's OFT file format, identity at init, orthogonality, errors, training.

Runs on the tiny real diffusers models (no mocks of the math). Save/load, merge ≡ hooked and gradient
checkpointing, as for every network module: tests/contracts/test_contract_networks.py.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.errors import ConfigError, ModelLoadError
from library.models.families import Family
from library.models.tiny import build_tiny_model
from networks import oft
from library.network_contract import call_prepare_optimizer_params
from tests.trainer_fixtures import make_dataset, run_in_process, train_argv
from tests.trainer_fixtures import unet_out as _unet_out


def _randomize(net: oft.OFTNetwork, seed: int = 1, std: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.unet_ofts:
            module.oft_blocks.copy_(torch.randn(module.oft_blocks.shape, generator=g) * std)


def _kohya_rotated_weight(blocks: torch.Tensor, alpha: float, weight: torch.Tensor) -> torch.Tensor:
    """kohya's formula written out independently: Cayley R with the norm constraint alpha * out, then
    ``einsum("k n m, k n p -> k m p", R, W)`` (i.e. R^T per row group)."""
    k, n, _ = blocks.shape
    q = blocks - blocks.transpose(1, 2)
    norm = torch.norm(q.flatten())
    q = q * ((torch.clamp(norm, max=alpha * weight.shape[0]) + 1e-8) / (norm + 1e-8))
    eye = torch.eye(n).expand(k, n, n)
    r = torch.matmul(eye + q, (eye - q).inverse())
    return torch.einsum("k n m, k n p -> k m p", r, weight.reshape(k, n, -1)).reshape(weight.shape)


@pytest.fixture
def sd1():
    return build_tiny_model(Family.SD1)


def test_fresh_network_is_identity(sd1):
    base = _unet_out(sd1)
    net = oft.create_network(1.0, 4, 1e-3, sd1.vae, sd1.text_encoders[0], sd1.unet, enable_all_linear="True", enable_conv="True")
    net.apply_to(sd1.text_encoders[0], sd1.unet, True, True)
    assert torch.equal(_unet_out(sd1), base)  # oft_blocks start at zero: R = I exactly
    _randomize(net)
    assert not torch.allclose(_unet_out(sd1), base, atol=1e-4)  # and the hooks are live
    net.restore()
    assert torch.equal(_unet_out(sd1), base)


def test_kohya_key_names_shapes_and_targets(sd1):
    attn = oft.create_network(1.0, 4, 1e-3, sd1.vae, None, sd1.unet)
    sd = attn.state_dict()
    name = "oft_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert sd[f"{name}.oft_blocks"].shape == (4, 8, 8)  # out 32 -> 4 blocks of 8
    assert sd[f"{name}.alpha"].shape == () and sd[f"{name}.alpha"].item() == pytest.approx(1e-3)
    assert set(k.rsplit(".", 1)[1] for k in sd) == {"oft_blocks", "alpha"}
    names = {o.oft_name for o in attn.unet_ofts}
    assert "oft_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_out_0" in names
    assert "oft_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k" in names
    assert not any("_ff_" in n or "proj_in" in n or "resnets" in n for n in names)  # attention only by default

    full = oft.create_network(1.0, 4, 1e-3, sd1.vae, None, sd1.unet, enable_all_linear=True, enable_conv=True)
    names = {o.oft_name for o in full.unet_ofts}
    for expected in ("oft_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj",
                     "oft_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2",
                     "oft_unet_down_blocks_0_attentions_0_proj_in",  # 1x1 conv in SD1
                     "oft_unet_down_blocks_0_resnets_0_conv1", "oft_unet_down_blocks_0_resnets_0_time_emb_proj",
                     "oft_unet_down_blocks_2_resnets_0_conv_shortcut", "oft_unet_down_blocks_0_downsamplers_0_conv",
                     "oft_unet_up_blocks_0_upsamplers_0_conv"):
        assert expected in names, expected
    assert not any(n.startswith("lora_") or "text_model" in n for n in names)  # U-Net only
    conv = full.state_dict()["oft_unet_down_blocks_2_resnets_0_conv1.oft_blocks"]
    assert conv.shape == (4, 16, 16)  # out channels 64


def test_sdxl_gets_kohya_sgm_names():
    m = build_tiny_model(Family.SDXL)
    net = oft.create_network(1.0, 4, 1e-3, m.vae, m.text_encoders, m.unet, enable_all_linear="true", enable_conv="true")
    names = {o.oft_name for o in net.unet_ofts}
    for expected in ("oft_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                     "oft_unet_input_blocks_4_1_transformer_blocks_1_ff_net_2",
                     "oft_unet_input_blocks_7_1_proj_in",
                     "oft_unet_middle_block_1_transformer_blocks_0_attn2_to_k",
                     "oft_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_out_0",
                     "oft_unet_input_blocks_1_0_in_layers_2", "oft_unet_input_blocks_1_0_emb_layers_1",
                     "oft_unet_input_blocks_4_0_skip_connection", "oft_unet_input_blocks_3_0_op",
                     "oft_unet_middle_block_2_out_layers_3", "oft_unet_output_blocks_2_2_conv"):
        assert expected in names, expected
    assert not any("down_blocks" in n or "up_blocks" in n or "mid_block_" in n for n in names)


def test_rotation_is_orthogonal_and_matches_kohya_formula(sd1):
    net = oft.create_network(1.0, 4, 0.05, sd1.vae, None, sd1.unet, enable_all_linear=True, enable_conv=True)
    _randomize(net, std=0.3)  # large enough that the constraint clamps some layers
    clamped = 0
    for module in net.unet_ofts:
        r = module.rotation()
        eye = torch.eye(module.block_size).expand_as(r)
        torch.testing.assert_close(r.transpose(1, 2) @ r, eye, atol=2e-5, rtol=0)
        w = module.org_module.weight.detach()
        expected = _kohya_rotated_weight(module.oft_blocks.detach(), 0.05, w)
        torch.testing.assert_close(module.rotated_weight(w, r), expected, atol=2e-5, rtol=1e-4)
        q = module.oft_blocks - module.oft_blocks.transpose(1, 2)
        clamped += int(q.norm() > 0.05 * module.out_dim)
    assert clamped > 0
    # multiplier 0.5 blends halfway between I and R (kohya), so it is no longer orthogonal
    m = net.unet_ofts[0]
    torch.testing.assert_close(m.rotation(multiplier=0.5), 0.5 * (m.rotation() + torch.eye(m.block_size)))


def test_file_gives_blocks_alpha_and_targets(sd1, tmp_path):
    """The number of blocks, the constraint and the targeted layers come back from the file alone."""
    net = oft.create_network(1.0, 2, 3e-2, sd1.vae, None, sd1.unet, enable_all_linear=True, enable_conv=True)
    path = tmp_path / "oft.safetensors"
    net.save_weights(str(path), torch.float32, None)
    net2, _ = oft.create_network_from_weights(1.0, str(path), sd1.vae, None, sd1.unet)
    assert net2.dim == 2 and net2.alpha == pytest.approx(3e-2)
    assert set(net2.state_dict()) == set(load_file(str(path)))  # all linear + conv found from the names


def test_bad_arguments_give_clear_errors(sd1, tmp_path):
    with pytest.raises(ConfigError, match="conv_dim.*enable_conv"):
        oft.create_network(1.0, 4, 1e-3, sd1.vae, None, sd1.unet, conv_dim="4")
    with pytest.raises(ConfigError, match=r"(?s)enable_conv='maybe' is invalid.*valid keys: enable_all_linear, enable_conv"):
        oft.create_network(1.0, 4, 1e-3, sd1.vae, None, sd1.unet, enable_conv="maybe")
    with pytest.raises(ConfigError, match=r"--network_dim 3 .*number of blocks.*values that fit this model: 1, 2, 4, 8"):
        oft.create_network(1.0, 3, 1e-3, sd1.vae, None, sd1.unet)
    with pytest.raises(ConfigError, match="must be positive"):
        oft.create_network(1.0, 4, 0, sd1.vae, None, sd1.unet)
    assert oft.parse_oft_args({"enable_conv": "False", "dropout": None}) == oft.OFTArgs(False, False)

    net = oft.create_network(1.0, 4, 1e-3, sd1.vae, None, sd1.unet)
    with pytest.raises(ConfigError, match="U-Net only"):
        net.apply_to(None, sd1.unet, True, False)
    # a file with another number of blocks, and a file that is no OFT file
    other = oft.create_network(1.0, 2, 1e-3, sd1.vae, None, sd1.unet)
    other.save_weights(str(tmp_path / "two.safetensors"), None, None)
    with pytest.raises(ModelLoadError, match="--dim_from_weights"):
        net.load_weights(str(tmp_path / "two.safetensors"))
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 32)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(ModelLoadError, match="not a kohya OFT file"):
        oft.create_network_from_weights(1.0, str(tmp_path / "lora.safetensors"), sd1.vae, None, sd1.unet)
    with pytest.raises(ModelLoadError, match="none of its 1 tensors"):
        net.load_weights(str(tmp_path / "lora.safetensors"))
    sdxl = build_tiny_model(Family.SDXL)
    sdxl_net = oft.create_network(1.0, 4, 1e-3, sdxl.vae, None, sdxl.unet)
    sdxl_net.save_weights(str(tmp_path / "xl.safetensors"), None, None)
    with pytest.raises(ModelLoadError, match="made for SDXL"):
        net.load_weights(str(tmp_path / "xl.safetensors"))


def test_optimizer_params(sd1):
    net = oft.create_network(1.0, 4, 1e-3, sd1.vae, None, sd1.unet)
    groups, names = call_prepare_optimizer_params(net, [1e-5, 2e-5], 3e-4, 1e-3)
    assert names == ["unet"] and groups[0]["lr"] == 3e-4
    assert sum(p.numel() for p in groups[0]["params"]) == sum(p.numel() for p in net.parameters())
    groups, _ = call_prepare_optimizer_params(net, None, None, 1e-3)
    assert groups[0]["lr"] == 1e-3
    assert call_prepare_optimizer_params(net, None, 0.0, 1e-3) == ([], [])


@pytest.mark.integration
def test_train_network_with_oft(tiny_model_dir, tmp_path):
    model = tiny_model_dir("sd1")
    data = make_dataset(tmp_path / "data", names=("astronaut", "chelsea"))
    out = tmp_path / "out"
    argv = train_argv(model, data, out, "--network_module", "networks.oft", "--network_alpha", "1e-2",
                      "--network_train_unet_only", "--network_args", "enable_all_linear=True", steps=3, name="oft")
    # a NaN/inf loss would stop training with an error: rc 0 means every loss was finite
    assert run_in_process(argv) == 0
    sd = load_file(str(out / "oft.safetensors"))
    m = build_tiny_model(Family.SD1)
    expected = oft.create_network(1.0, 4, 1e-2, m.vae, None, m.unet, enable_all_linear=True).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    blocks = [v for k, v in sd.items() if k.endswith(".oft_blocks")]
    assert all(torch.isfinite(b).all() for b in blocks)
    assert sum(int(b.abs().max() > 0) for b in blocks) > len(blocks) // 2  # trained away from zero
    assert all(v.item() == pytest.approx(1e-2) for k, v in sd.items() if k.endswith(".alpha"))


@pytest.mark.integration
def test_sdxl_train_network_with_oft(tiny_model_dir, tmp_path):
    from accelerate.state import AcceleratorState, GradientState

    import sdxl_train_network

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    data = make_dataset(tmp_path / "data", names=("astronaut",))
    argv = train_argv(tiny_model_dir("sdxl"), data, tmp_path / "out", "--network_module", "networks.oft",
                      "--network_alpha", "1e-2", "--network_train_unet_only", steps=2, name="xl")
    assert sdxl_train_network.main(argv) == 0
    sd = load_file(str(tmp_path / "out" / "xl.safetensors"))
    names = {k.split(".")[0] for k in sd}
    assert "oft_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names
    assert "oft_unet_middle_block_1_transformer_blocks_0_attn2_to_out_0" in names
    assert all(n.startswith(("oft_unet_input_blocks_", "oft_unet_middle_block_", "oft_unet_output_blocks_")) for n in names)
    assert any(v.abs().max() > 0 for k, v in sd.items() if k.endswith(".oft_blocks"))

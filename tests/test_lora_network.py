"""networks.lora: module interface, hooking, key names, network_args, dropouts, optimizer groups.

Everything runs on the tiny real diffusers/transformers models (no mocks of the math). What every
network module must do (save/load, merge ≡ hooked, gradient checkpointing, diffusers loading) is in
tests/contracts/test_contract_networks.py.
"""

from __future__ import annotations

import pytest
import torch

from library.errors import ConfigError
from library.models.families import Family
from library.models.tiny import build_tiny_model
from networks import lora
from library.network_contract import NetworkCapabilities, call_prepare_optimizer_params, capabilities_of
from tests.helpers_networks import randomize_lora_up as _randomize_up
from tests.helpers_networks import te_arg as _te
from tests.helpers_networks import te_out as _te_out
from tests.helpers_networks import unet_out as _unet_out


@pytest.fixture
def sd1():
    return build_tiny_model(Family.SD1)


@pytest.fixture
def sdxl():
    return build_tiny_model(Family.SDXL)


def test_fresh_network_is_identity_and_nonzero_up_changes_output(sd1):
    base_unet, base_te = _unet_out(sd1), _te_out(sd1)
    net = lora.create_network(1.0, 4, 1, sd1.vae, _te(sd1), sd1.unet)
    net.apply_to(_te(sd1), sd1.unet)
    assert torch.equal(_unet_out(sd1), base_unet)  # lora_up starts at zero
    assert torch.equal(_te_out(sd1), base_te)
    _randomize_up(net)
    assert (_unet_out(sd1) - base_unet).abs().max() > 1e-3
    assert (_te_out(sd1) - base_te).abs().max() > 1e-3
    net.restore()  # unhooked: base behaviour again, base weights untouched
    assert torch.equal(_unet_out(sd1), base_unet)


def test_multiplier_and_alpha_scale_the_delta(sd1):
    net = lora.create_network(1.0, 4, 8, sd1.vae, _te(sd1), sd1.unet)
    net.apply_to(_te(sd1), sd1.unet)
    _randomize_up(net)
    module = net.unet_loras[1]  # a Linear (attn1.to_q)
    base = module.org_module
    x = torch.randn(2, 5, base.in_features)
    with torch.no_grad():
        plain = module.org_forward(x)
        d1 = base(x) - plain
        net.set_multiplier(0.5)
        d05 = base(x) - plain
        expected = x @ module.lora_down.weight.T @ module.lora_up.weight.T * (8 / 4)
    assert module.scale == 2.0
    torch.testing.assert_close(d1, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d05, 0.5 * d1, rtol=1e-5, atol=1e-6)


def test_sd1_key_names_exact(sd1):
    net = lora.create_network(1.0, 4, 1, sd1.vae, _te(sd1), sd1.unet)
    names = {m.lora_name for m in net.all_loras}
    for expected in (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2",
        "lora_unet_down_blocks_0_attentions_0_proj_in",
        "lora_unet_mid_block_attentions_0_proj_out",
        "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_v",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te_text_model_encoder_layers_0_self_attn_out_proj",
        "lora_te_text_model_encoder_layers_0_mlp_fc1",
        "lora_te_text_model_encoder_layers_3_mlp_fc2",
    ):
        assert expected in names
    # 6 Linear layers per CLIP layer; 12 modules per transformer block (no resnets without conv_dim)
    assert len(net.text_encoder_loras) == 6 * 4
    assert not any("resnets" in n or "samplers" in n for n in names)
    keys = set(net.state_dict())
    for n in names:
        assert {f"{n}.lora_down.weight", f"{n}.lora_up.weight", f"{n}.alpha"} <= keys
    assert len(keys) == 3 * len(names)
    # SD1's proj_in is a 1x1 conv, so its LoRA is too
    proj_in = net.state_dict()["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"]
    assert proj_in.shape == (4, 32, 1, 1)


def test_sdxl_key_names_use_sgm_layout(sdxl):
    net = lora.create_network(1.0, 4, 1, sdxl.vae, _te(sdxl), sdxl.unet, conv_dim=2)
    names = {m.lora_name for m in net.all_loras}
    for expected in (
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "lora_unet_input_blocks_4_1_transformer_blocks_1_ff_net_2",
        "lora_unet_input_blocks_7_1_proj_in",
        "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k",
        "lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_out_0",
        "lora_unet_output_blocks_5_1_proj_out",
        # LoCon on resnets / samplers: sgm part names
        "lora_unet_input_blocks_1_0_in_layers_2",
        "lora_unet_input_blocks_1_0_out_layers_3",
        "lora_unet_input_blocks_1_0_emb_layers_1",
        "lora_unet_input_blocks_4_0_skip_connection",
        "lora_unet_input_blocks_3_0_op",
        "lora_unet_middle_block_0_in_layers_2",
        "lora_unet_middle_block_2_out_layers_3",
        "lora_unet_output_blocks_2_2_conv",
        "lora_unet_output_blocks_5_2_conv",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te2_text_model_encoder_layers_3_mlp_fc2",
    ):
        assert expected in names, expected
    assert not any(n.startswith("lora_te_") for n in names)
    assert not any("down_blocks" in n or "up_blocks" in n or "mid_block_" in n for n in names)


def test_conv_dim_adds_locon_keys_with_kohya_ranks(sd1):
    plain = lora.create_network(1.0, 4, 1, sd1.vae, _te(sd1), sd1.unet)
    net = lora.create_network(1.0, 4, 1, sd1.vae, _te(sd1), sd1.unet, conv_dim="2", conv_alpha="0.5")
    sd = net.state_dict()
    extra = {m.lora_name for m in net.all_loras} - {m.lora_name for m in plain.all_loras}
    assert "lora_unet_down_blocks_0_resnets_0_conv1" in extra
    assert "lora_unet_down_blocks_0_downsamplers_0_conv" in extra
    assert "lora_unet_up_blocks_0_upsamplers_0_conv" in extra
    assert "lora_unet_up_blocks_1_resnets_0_conv_shortcut" in extra
    assert sd["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (2, 32, 3, 3)
    assert sd["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"].shape == (32, 2, 1, 1)
    assert sd["lora_unet_down_blocks_0_resnets_0_conv1.alpha"].item() == 0.5
    # Linear and 1x1 convs inside resnets get network_dim, as in kohya
    assert sd["lora_unet_down_blocks_0_resnets_0_time_emb_proj.lora_down.weight"].shape[0] == 4
    assert sd["lora_unet_up_blocks_1_resnets_0_conv_shortcut.lora_down.weight"].shape[:1] == (4,)
    # stride-2 downsampler conv: the LoRA down conv keeps the stride, so shapes line up in forward
    net.apply_to(_te(sd1), sd1.unet)
    _randomize_up(net)
    assert _unet_out(sd1).shape == (1, 4, 8, 8)


def test_bad_network_args_list_valid_keys(sd1):
    with pytest.raises(ConfigError) as e:
        lora.create_network(1.0, 4, 1, sd1.vae, _te(sd1), sd1.unet, conv_dimm="4", rank_dropout="1.5", algo="locon")
    msg = str(e.value)
    assert "unknown key 'conv_dimm'" in msg
    assert "rank_dropout='1.5' is invalid" in msg
    assert "lycoris.kohya" in msg  # algo is a LyCORIS argument
    assert "valid keys: conv_dim, conv_alpha, rank_dropout, module_dropout" in msg
    with pytest.raises(ConfigError, match="conv_dim='four' is invalid"):
        lora.create_network(1.0, 4, 1, sd1.vae, _te(sd1), sd1.unet, conv_dim="four")


def test_dropouts_act_only_in_training_mode(sd1):
    net = lora.create_network(1.0, 4, 1, sd1.vae, _te(sd1), sd1.unet, neuron_dropout=0.3, rank_dropout="0.3", module_dropout="0.3")
    assert net.unet_loras[0].dropout == 0.3 and net.unet_loras[0].rank_dropout == 0.3
    net.apply_to(_te(sd1), sd1.unet)
    _randomize_up(net)
    net.eval()
    a, b = _unet_out(sd1), _unet_out(sd1)
    assert torch.equal(a, b)
    net.set_network_dropout(None, None, None)
    assert torch.equal(_unet_out(sd1), a)  # eval mode: dropouts had no effect
    net.set_network_dropout(0.3, 0.3, 0.3)
    net.on_epoch_start(_te(sd1), sd1.unet)  # kohya: switches the network to training mode
    assert net.training
    torch.manual_seed(0)
    assert not torch.allclose(_unet_out(sd1), a)


def test_dropout_injected_by_kohya_trainer_is_accepted(sd1):
    net = lora.create_network(1.0, 4, 1, sd1.vae, _te(sd1), sd1.unet, neuron_dropout=None, dropout=None)
    assert net.unet_loras[0].dropout is None
    net = lora.create_network(1.0, 4, 1, sd1.vae, _te(sd1), sd1.unet, dropout="0.1")
    assert net.unet_loras[0].dropout == 0.1


def test_apply_unet_only_drops_text_encoder_modules(sd1):
    net = lora.create_network(1.0, 4, 1, sd1.vae, _te(sd1), sd1.unet)
    base_te = _te_out(sd1)
    net.apply_to(_te(sd1), sd1.unet, apply_text_encoder=False, apply_unet=True)
    _randomize_up(net)
    assert not any(k.startswith("lora_te") for k in net.state_dict())
    assert torch.equal(_te_out(sd1), base_te)
    groups, desc = net.prepare_optimizer_params(1e-5, 1e-4, 1e-3)
    assert desc == ["unet"] and groups[0]["lr"] == 1e-4


def test_prepare_optimizer_params_conventions(sdxl):
    net = lora.create_network(1.0, 4, 1, sdxl.vae, _te(sdxl), sdxl.unet)
    net.apply_to(_te(sdxl), sdxl.unet)
    groups, desc = net.prepare_optimizer_params(None, None, 1e-3)
    assert desc == ["textencoder", "unet"] and [g["lr"] for g in groups] == [1e-3, 1e-3]
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == len(list(net.get_trainable_params()))
    # one lr per text encoder (SDXL), through kohya's method name too
    groups, desc = net.prepare_optimizer_params_with_multiple_te_lrs([1e-5, 2e-5], 1e-4, 1e-3)
    assert desc == ["textencoder1", "textencoder2", "unet"] and [g["lr"] for g in groups] == [1e-5, 2e-5, 1e-4]
    # lr 0: the group is not trained (kohya)
    groups, desc = net.prepare_optimizer_params(0, 1e-4, 1e-3)
    assert desc == ["unet"]
    # LoRA+: lora_up weights in their own group at lr * ratio
    net2 = lora.create_network(1.0, 4, 1, sdxl.vae, _te(sdxl), sdxl.unet, loraplus_unet_lr_ratio="16")
    net2.apply_to(_te(sdxl), sdxl.unet, apply_text_encoder=False)
    groups, desc = net2.prepare_optimizer_params(None, 1e-4, 1e-3)
    assert desc == ["unet", "unet plus"] and groups[1]["lr"] == pytest.approx(1.6e-3)
    assert all(p.shape[1] == 4 for p in groups[1]["params"])  # lora_up: (out, rank)


def test_block_dims_and_block_lr_weights(sd1):
    dims = ",".join(["0"] + ["2"] * 12 + ["3"] * 12)  # 25 blocks for SD1/SD2
    net = lora.create_network(1.0, 4, 1, sd1.vae, _te(sd1), sd1.unet, block_dims=dims)
    sd = net.state_dict()
    assert sd["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"].shape[0] == 2
    assert sd["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"].shape[0] == 2  # block 12
    assert sd["lora_unet_up_blocks_1_attentions_0_proj_in.lora_down.weight"].shape[0] == 3
    with pytest.raises(ConfigError, match="block_dims needs 25 values"):
        lora.create_network(1.0, 4, 1, sd1.vae, _te(sd1), sd1.unet, block_dims="1,2,3")
    net = lora.create_network(1.0, 4, 1, sd1.vae, _te(sd1), sd1.unet, down_lr_weight="zeros", up_lr_weight="1,1,1,1,1,1,0.5,0.5,0.5,0.5,0.5,0.5")
    names = {m.lora_name for m in net.unet_loras}
    assert not any(n.startswith("lora_unet_down_blocks") for n in names)  # weight 0: no adapters
    net.apply_to(_te(sd1), sd1.unet)
    groups, desc = net.prepare_optimizer_params(None, 1e-4, 1e-3)
    lrs = dict(zip(desc, (g["lr"] for g in groups)))
    assert lrs["unet_block12"] == 1e-4  # mid block keeps 1.0
    assert lrs["unet_block16"] == 1e-4 and lrs["unet_block22"] == pytest.approx(5e-5)


def test_max_norm_regularization_returns_kohya_tuple(sd1):
    net = lora.create_network(1.0, 4, 4, sd1.vae, _te(sd1), sd1.unet)
    _randomize_up(net, std=1.0)
    keys_scaled, mean_norm, max_norm = net.apply_max_norm_regularization(0.5, "cpu")
    assert keys_scaled > 0 and max_norm <= 0.5 + 1e-5 and 0 < mean_norm <= max_norm
    for m in net.all_loras:
        assert m.delta_weight(multiplier=1.0).norm() <= 0.5 + 1e-4


def test_capabilities_declared_and_probed(sd1):
    net = lora.create_network(1.0, 4, 1, sd1.vae, _te(sd1), sd1.unet)
    caps = capabilities_of(net)
    assert caps is lora.LoRANetwork.SDTK_CAPABILITIES and caps.multiple_te_lrs and caps.on_step_start

    class OldNetwork(torch.nn.Module):  # a foreign kohya-era module: 2-argument method, list return
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(2))

        def prepare_optimizer_params(self, text_encoder_lr, unet_lr):
            return [{"params": [self.w], "lr": unet_lr}]

    foreign = OldNetwork()
    assert capabilities_of(foreign) == NetworkCapabilities()
    params, desc = call_prepare_optimizer_params(foreign, [1e-5, 2e-5], 1e-4, 1e-3)
    assert desc is None and params[0]["lr"] == 1e-4
    params, desc = call_prepare_optimizer_params(net, [1e-5], 1e-4, 1e-3)
    assert desc == ["textencoder", "unet"] and params[0]["lr"] == 1e-5


def test_lycoris_kohya_calling_convention(sd1):
    lycoris_kohya = pytest.importorskip("lycoris.kohya")
    # lycoris-lora 4.1.3's default preset also targets "TimestepEmbedding" and then names
    # time_embedding.linear_1 twice on diffusers UNets (its own assertion fails); a preset avoids it.
    net = lycoris_kohya.create_network(
        1.0, 4, 1, sd1.vae, _te(sd1), sd1.unet, neuron_dropout=None, algo="locon", preset="attn-mlp", conv_dim="4", conv_alpha="1", dropout=None
    )
    net.apply_to(_te(sd1), sd1.unet, True, True)
    params, desc = call_prepare_optimizer_params(net, 1e-4, 1e-4, 1e-3)
    assert params and sum(len(list(g["params"])) for g in params) > 0
    net.prepare_grad_etc(_te(sd1), sd1.unet)
    net.on_epoch_start(_te(sd1), sd1.unet)
    # the hooked UNet trains through the foreign module: gradients reach its parameters
    g = torch.Generator().manual_seed(0)
    out = sd1.unet(torch.randn(1, 4, 8, 8, generator=g), torch.tensor([10]), torch.randn(1, 77, 32, generator=g)).sample
    out.square().mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for g_ in params for p in g_["params"])


def _sgm_sdxl_unet_names() -> set[str]:
    """kohya's default SDXL UNet LoRA names, written out from the sgm architecture itself:
    (sgm block, transformer depth) for every SpatialTransformer of SDXL base."""
    blocks = [("input_blocks_4_1", 2), ("input_blocks_5_1", 2), ("input_blocks_7_1", 10), ("input_blocks_8_1", 10), ("middle_block_1", 10)]
    blocks += [(f"output_blocks_{i}_1", 10) for i in (0, 1, 2)] + [(f"output_blocks_{i}_1", 2) for i in (3, 4, 5)]
    per_block = [f"attn{a}_{p}" for a in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out_0")] + ["ff_net_0_proj", "ff_net_2"]
    names = set()
    for block, depth in blocks:
        names |= {f"lora_unet_{block}_proj_in", f"lora_unet_{block}_proj_out"}
        names |= {f"lora_unet_{block}_transformer_blocks_{d}_{p}" for d in range(depth) for p in per_block}
    return names


def test_full_size_sdxl_unet_key_set_matches_kohya():
    """Full-size SDXL UNet built on the meta device (no memory): 722 modules, sgm names, as kohya."""
    import json
    from pathlib import Path

    from diffusers import UNet2DConditionModel

    cfg = json.loads((Path(__file__).resolve().parents[1] / "library/models/configs/sdxl.json").read_text())["unet"]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
    net = lora.create_network(1.0, 4, 1, None, [None, None], unet)
    names = {m.lora_name for m in net.unet_loras}
    assert len(names) == 722
    assert names == _sgm_sdxl_unet_names()


def test_low_precision_base_keeps_its_dtype(sd1):
    sd1.unet.to(torch.bfloat16)
    net = lora.create_network(1.0, 4, 1, sd1.vae, _te(sd1), sd1.unet)  # fp32 adapters
    net.apply_to(_te(sd1), sd1.unet, apply_text_encoder=False)
    _randomize_up(net)
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g).bfloat16(), torch.randn(1, 77, 32, generator=g).bfloat16()
    with torch.no_grad():
        out = sd1.unet(x, torch.tensor([500]), ctx).sample
        net.set_multiplier(0.0)
        base = sd1.unet(x, torch.tensor([500]), ctx).sample
    assert out.dtype == torch.bfloat16 and (out.float() - base.float()).abs().max() > 1e-3


def test_sdxl_second_text_encoder_alone_keeps_te2_prefix(sdxl):
    net = lora.create_network(1.0, 4, 1, sdxl.vae, [None, sdxl.text_encoders[1]], sdxl.unet)
    assert net.text_encoder_loras and all(m.lora_name.startswith("lora_te2_text_model_") for m in net.text_encoder_loras)


def test_pre_calculation_and_restore(sd1):
    base = _unet_out(sd1)
    net = lora.create_network(0.8, 4, 1, sd1.vae, _te(sd1), sd1.unet)
    net.apply_to(_te(sd1), sd1.unet)
    _randomize_up(net)
    hooked = _unet_out(sd1)
    net.backup_weights()
    net.pre_calculation()
    torch.testing.assert_close(_unet_out(sd1), hooked, rtol=1e-4, atol=1e-5)  # merged, hooks off
    net.restore_weights()
    assert torch.equal(_unet_out(sd1), hooked)  # original weights back, hooks on
    net.set_enabled(False)
    assert torch.equal(_unet_out(sd1), base)

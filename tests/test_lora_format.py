"""LoRA files: kohya's format round trip, kohya-written files, family checks, metadata, and diffusers loading.

The diffusers tests are the real interoperability check: a file written by sdtk loads through
``pipe.load_lora_weights`` (diffusers' own kohya converter + peft) and gives the same UNet and text
encoder outputs as sdtk's hooked application.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from library.errors import ModelLoadError
from library.models.families import Family
from library.models.hashes import safetensors_file_hashes
from library.models.modelspec import build_modelspec
from library.models.tiny import build_tiny_model
from networks import lora
from tests.helpers_networks import pipeline_of
from tests.helpers_networks import randomize_lora_up as _randomize_up
from tests.helpers_networks import te_arg as _te
from tests.helpers_networks import te_out as _te_out
from tests.helpers_networks import unet_out as _unet_out


def _network(m, **kw) -> lora.LoRANetwork:
    net = lora.create_network(1.0, 4, 2, m.vae, _te(m), m.unet, **kw)
    _randomize_up(net)
    return net


@pytest.mark.parametrize("suffix,dtype", [(".safetensors", torch.float32), (".safetensors", torch.float16), (".pt", torch.float32)])
def test_save_load_round_trip_exact(tmp_path, suffix, dtype):
    m = build_tiny_model(Family.SD1)
    net = _network(m, conv_dim=2)
    path = tmp_path / f"x{suffix}"
    net.save_weights(str(path), dtype, {"ss_network_dim": "4"})
    saved = {k: v.to(dtype) for k, v in net.state_dict().items()}

    fresh = lora.create_network(1.0, 4, 1, m.vae, _te(m), m.unet, conv_dim=2)
    info = fresh.load_weights(str(path))
    assert not info.missing_keys and not info.unexpected_keys
    for k, v in fresh.state_dict().items():
        assert torch.equal(v.to(dtype), saved[k]), k
    assert fresh.unet_loras[0].scale == 2 / 4  # the loaded alpha sets the scale

    net2, sd = lora.create_network_from_weights(1.0, str(path), m.vae, _te(m), m.unet)
    assert set(sd) == set(saved) and len(net2.all_loras) == len(net.all_loras)
    if suffix == ".safetensors":
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
            assert all(f.get_tensor(k).dtype == dtype for k in f.keys())
        assert meta["ss_network_dim"] == "4"
        # sshs_model_hash is the hash of the tensor bytes actually written
        assert meta["sshs_model_hash"] == safetensors_file_hashes(path)[0]
        assert len(meta["sshs_legacy_hash"]) == 8


def test_file_with_kohya_keys_loads_with_per_module_ranks(tmp_path):
    """A file as kohya writes it (fp16, its own key list and ranks, one module without alpha)."""
    m = build_tiny_model(Family.SD1)
    g = torch.Generator().manual_seed(3)
    sd = {}
    modules = {
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": ((32, 32), 8, 4.0),
        "lora_te_text_model_encoder_layers_1_mlp_fc1": ((64, 32), 4, None),
        "lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_attn2_to_k": ((32, 32), 2, 1.0),
        "lora_unet_up_blocks_2_attentions_0_proj_out": ((32, 32, 1, 1), 4, 2.0),
    }
    for name, (shape, rank, alpha) in modules.items():
        out_f, in_f = shape[0], shape[1]
        extra = shape[2:]
        sd[f"{name}.lora_down.weight"] = torch.randn((rank, in_f, *extra), generator=g).half()
        sd[f"{name}.lora_up.weight"] = torch.randn((out_f, rank, *((1, 1) if extra else ())), generator=g).half()
        if alpha is not None:
            sd[f"{name}.alpha"] = torch.tensor(alpha).half()
    path = tmp_path / "kohya.safetensors"
    save_file(sd, str(path), {"ss_base_model_version": "sd_v1"})

    base_te = _te_out(m)
    net, weights = lora.create_network_from_weights(1.0, str(path), m.vae, _te(m), m.unet)
    assert {x.lora_name for x in net.all_loras} == set(modules)
    by_name = {x.lora_name: x for x in net.all_loras}
    assert by_name["lora_te_text_model_encoder_layers_0_self_attn_q_proj"].lora_dim == 8
    assert by_name["lora_te_text_model_encoder_layers_0_self_attn_q_proj"].scale == 0.5
    assert by_name["lora_te_text_model_encoder_layers_1_mlp_fc1"].scale == 1.0  # no alpha: alpha = rank
    net.apply_to(_te(m), m.unet)
    info = net.load_weights(str(path))
    # the only key kohya's file lacks is the alpha it never wrote; that module keeps alpha = rank
    assert info.missing_keys == ["lora_te_text_model_encoder_layers_1_mlp_fc1.alpha"] and not info.unexpected_keys
    assert by_name["lora_te_text_model_encoder_layers_1_mlp_fc1"].scale == 1.0
    assert (_te_out(m) - base_te).abs().max() > 1e-3


def test_family_mismatch_is_a_clear_error(tmp_path):
    sd1, sd2, sdxl = (build_tiny_model(f) for f in (Family.SD1, Family.SD2, Family.SDXL))
    xl_file, sd1_file = tmp_path / "xl.safetensors", tmp_path / "sd1.safetensors"
    _network(sdxl).save_weights(str(xl_file), torch.float32, {})
    _network(sd1).save_weights(str(sd1_file), torch.float32, {})
    with pytest.raises(ModelLoadError, match="this LoRA was made for SDXL but the base model is SD1.x"):
        lora.create_network_from_weights(1.0, str(xl_file), sd1.vae, _te(sd1), sd1.unet)
    with pytest.raises(ModelLoadError, match="made for SD1.x but the base model is SDXL"):
        lora.create_network_from_weights(1.0, str(sd1_file), sdxl.vae, _te(sdxl), sdxl.unet)
    with pytest.raises(ModelLoadError, match="made for SD1.x but the base model is SD2.x"):
        lora.create_network_from_weights(1.0, str(sd1_file), sd2.vae, _te(sd2), sd2.unet)
    net = lora.create_network(1.0, 4, 1, sd1.vae, _te(sd1), sd1.unet)
    with pytest.raises(ModelLoadError, match="made for SDXL"):
        net.load_weights(str(xl_file))
    # same family, other rank: point at --dim_from_weights
    net8 = lora.create_network(1.0, 8, 1, sd1.vae, _te(sd1), sd1.unet)
    with pytest.raises(ModelLoadError, match="--dim_from_weights"):
        net8.load_weights(str(sd1_file))
    with pytest.raises(ModelLoadError, match="does not exist"):
        net.load_weights(str(tmp_path / "missing.safetensors"))


def test_modelspec_values_per_family():
    ts = 1_700_000_000.0
    spec = build_modelspec(Family.SD1, lora=True, resolution=None, title="my lora", timestamp=ts)
    assert spec["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert spec["modelspec.implementation"] == "diffusers"
    assert spec["modelspec.resolution"] == "512x512" and spec["modelspec.prediction_type"] == "epsilon"
    assert spec["modelspec.title"] == "my lora" and spec["modelspec.sai_model_spec"] == "1.0.1"
    assert "modelspec.author" not in spec
    v = build_modelspec(Family.SD1, v2=True, v_parameterization=True, lora=True, timestamp=ts, author="me", tags="a,b")
    assert v["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora" and v["modelspec.resolution"] == "768x768"
    assert v["modelspec.prediction_type"] == "v" and v["modelspec.author"] == "me" and v["modelspec.tags"] == "a,b"
    assert v["modelspec.title"] == f"LoRA@{ts}"
    assert build_modelspec("sd2", lora=True, resolution="640,512", timestamp=ts)["modelspec.architecture"] == "stable-diffusion-v2-512/lora"
    assert build_modelspec("sd2", lora=True, resolution="640,512", timestamp=ts)["modelspec.resolution"] == "640x512"
    xl = build_modelspec(Family.SDXL, lora=True, resolution=(1024, 768), timestamp=ts, clip_skip=2)
    assert xl["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert xl["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert xl["modelspec.resolution"] == "1024x768" and xl["modelspec.encoder_layer"] == "2"
    assert all(isinstance(v, str) for v in xl.values())


@pytest.mark.parametrize(
    "family,network_args",
    [(Family.SD1, {}), (Family.SD1, {"conv_dim": "2", "conv_alpha": "1"}), (Family.SD2, {}), (Family.SDXL, {}), (Family.SDXL, {"conv_dim": "2"})],
)
def test_diffusers_load_lora_weights_gives_same_outputs(tmp_path, family, network_args):
    pytest.importorskip("peft")
    ours, theirs = build_tiny_model(family), build_tiny_model(family)
    net = _network(ours, **network_args)
    path = tmp_path / "lora.safetensors"
    net.save_weights(str(path), torch.float32, {})
    net.apply_to(_te(ours), ours.unet)

    pipe = pipeline_of(theirs)
    before = _unet_out(theirs)
    pipe.load_lora_weights(str(path))
    after = _unet_out(theirs)
    assert (after - before).abs().max() > 1e-3  # diffusers did apply it
    torch.testing.assert_close(after, _unet_out(ours), rtol=1e-5, atol=1e-5)
    for i in range(len(ours.text_encoders)):
        torch.testing.assert_close(_te_out(theirs, i), _te_out(ours, i), rtol=1e-5, atol=1e-5)
        assert (_te_out(theirs, i) - _te_out(build_tiny_model(family), i)).abs().max() > 1e-3


def test_sdxl_file_with_kohya_keys_loads(tmp_path):
    """An SDXL LoRA in kohya's layout (sgm UNet names, te1/te2) loads and acts on the right modules."""
    m = build_tiny_model(Family.SDXL)
    g = torch.Generator().manual_seed(5)
    modules = {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (64, 64, ()),
        "lora_unet_middle_block_1_proj_in": (64, 64, ()),
        "lora_unet_input_blocks_3_0_op": (32, 32, (3, 3)),  # LoCon on the first downsampler
        "lora_unet_output_blocks_3_0_in_layers_2": (64, 128, (3, 3)),  # resnet conv1 of up_blocks.1
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (32, 32, ()),
        "lora_te2_text_model_encoder_layers_1_mlp_fc2": (64, 128, ()),
    }
    sd = {}
    for name, (out_f, in_f, k) in modules.items():
        sd[f"{name}.lora_down.weight"] = torch.randn((4, in_f, *k), generator=g).to(torch.bfloat16)
        sd[f"{name}.lora_up.weight"] = torch.randn((out_f, 4, *((1, 1) if k else ())), generator=g).to(torch.bfloat16)
        sd[f"{name}.alpha"] = torch.tensor(2.0, dtype=torch.bfloat16)
    path = tmp_path / "kohya_sdxl.safetensors"
    save_file(sd, str(path), {"ss_base_model_version": "sdxl_base_v1-0"})

    base_unet, base_te2 = _unet_out(m), _te_out(m, 1)
    net, _ = lora.create_network_from_weights(1.0, str(path), m.vae, _te(m), m.unet)
    assert {x.lora_name for x in net.all_loras} == set(modules)
    by_name = {x.lora_name: x for x in net.all_loras}
    # the names resolved to the right diffusers modules
    assert by_name["lora_unet_input_blocks_3_0_op"].org_module is m.unet.down_blocks[0].downsamplers[0].conv
    assert by_name["lora_unet_output_blocks_3_0_in_layers_2"].org_module is m.unet.up_blocks[1].resnets[0].conv1
    assert by_name["lora_te2_text_model_encoder_layers_1_mlp_fc2"].org_module is m.text_encoders[1].text_model.encoder.layers[1].mlp.fc2
    net.apply_to(_te(m), m.unet)
    info = net.load_weights(str(path))
    assert not info.missing_keys and not info.unexpected_keys
    assert (_unet_out(m) - base_unet).abs().max() > 1e-3 and (_te_out(m, 1) - base_te2).abs().max() > 1e-3


@pytest.mark.parametrize("with_text_encoders", [True, False])
def test_sdxl_file_with_diffusers_unet_names_loads(tmp_path, with_text_encoders):
    """SDXL LoRAs whose UNet keys use diffusers names (as diffusers' scripts write them) are read too."""
    from library.models.unet_layout import UNetLayout
    from networks.lora_keys import sdxl_diffusers_name_aliases

    src, dst = build_tiny_model(Family.SDXL), build_tiny_model(Family.SDXL)
    net = _network(src)
    net.apply_to(_te(src), src.unet, apply_text_encoder=with_text_encoders)
    to_diffusers = {v: k for k, v in sdxl_diffusers_name_aliases(src.unet, UNetLayout(src.unet.config)).items()}
    sd = {}
    for k, v in net.state_dict().items():
        name, _, suffix = k.partition(".")
        sd[f"{to_diffusers.get(name, name)}.{suffix}"] = v
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn1_to_q.lora_up.weight" in sd
    path = tmp_path / "diffusers_names.safetensors"
    save_file(sd, str(path))

    loaded, weights = lora.create_network_from_weights(1.0, str(path), dst.vae, _te(dst), dst.unet)
    assert "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.lora_up.weight" in weights
    loaded.apply_to(_te(dst), dst.unet)
    info = loaded.load_weights(str(path))
    assert not info.missing_keys and not info.unexpected_keys
    torch.testing.assert_close(_unet_out(dst), _unet_out(src), rtol=1e-5, atol=1e-6)


def test_text_encoder_keys_without_text_model_are_repaired(tmp_path):
    """Files named from transformers 5's CLIPTextModel (no ``text_model``), e.g. by LyCORIS, still load."""
    src, dst = build_tiny_model(Family.SD1), build_tiny_model(Family.SD1)
    net = _network(src)
    net.apply_to(_te(src), src.unet)
    sd = {k.replace("lora_te_text_model_", "lora_te_"): v for k, v in net.state_dict().items()}
    assert "lora_te_encoder_layers_0_mlp_fc1.alpha" in sd
    path = tmp_path / "no_text_model.safetensors"
    save_file(sd, str(path))
    loaded = lora.create_network(1.0, 4, 1, dst.vae, _te(dst), dst.unet)
    loaded.apply_to(_te(dst), dst.unet)
    info = loaded.load_weights(str(path))
    assert not info.missing_keys and not info.unexpected_keys
    torch.testing.assert_close(_te_out(dst), _te_out(src), rtol=1e-5, atol=1e-6)

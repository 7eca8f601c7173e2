"""The network-module contract, for every network module sdtk ships and LyCORIS when it is installed.

Each module (``--network_module``) must: save and load its weights and the ``ss_*`` metadata it is given
exactly; give the hooked output when merged into the base weights; compute the same loss and gradients
with gradient checkpointing; and, where its file format is one diffusers reads, load through diffusers'
``load_lora_weights`` with the outputs sdtk computes. All on the tiny real SD1 model (the key layouts of
the other families are tested per module: test_lora_format.py, test_sdxl_lora_keys.py, test_oft.py).
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field

import pytest
import torch
from safetensors.torch import load_file

from library.models.families import Family
from library.network_contract import capabilities_of
from tests.helpers_networks import (pipeline_of, randomize_parameters, te_arg, te_out, tiny_model, unet_out,
                                    unet_step)
from tests.trainer_fixtures import lora_metadata


@dataclass(frozen=True)
class NetworkCase:
    """One network module with the arguments a user would give it.

    Attributes:
        module: the ``--network_module`` value.
        dim, alpha: ``--network_dim`` / ``--network_alpha``.
        args: ``--network_args`` as kohya passes them (strings).
        text_encoder: the module also adapts the text encoder (OFT is U-Net only).
        diffusers: diffusers' ``load_lora_weights`` reads its files.
        std: scale of the random weights that make the adapter act.
        pre_calculation: has gen_img's in-place merge (``backup_weights`` / ``pre_calculation``).
    """

    module: str
    dim: int = 4
    alpha: float = 2.0
    args: dict[str, str] = field(default_factory=dict)
    text_encoder: bool = True
    diffusers: bool = False
    std: float = 0.1
    pre_calculation: bool = True


CASES = {
    "lora": NetworkCase("networks.lora", diffusers=True),
    "locon": NetworkCase("networks.lora", args={"conv_dim": "2", "conv_alpha": "1"}, diffusers=True),
    "dylora": NetworkCase("networks.dylora", dim=8, alpha=4.0, args={"unit": "2", "conv_dim": "8", "conv_alpha": "2"},
                          diffusers=True),
    "oft": NetworkCase("networks.oft", alpha=1e-2, args={"enable_all_linear": "True", "enable_conv": "True"},
                       text_encoder=False, std=0.05),
    # LyCORIS' LoCon: kohya's lora_down / lora_up keys, conv layers included; no in-place merge for gen_img
    "lycoris-locon": NetworkCase("lycoris.kohya", args={"algo": "locon", "conv_dim": "2", "conv_alpha": "1"},
                                 pre_calculation=False),
}


def _params(names=CASES):
    return [pytest.param(CASES[n], id=n) for n in names]


def _module(case: NetworkCase):
    if case.module.startswith("lycoris."):
        mod = pytest.importorskip(case.module)
        from library.training.plugin_compat import apply_fixes

        apply_fixes(case.module, mod)  # as the trainer and gen_img do before using it
        return mod
    return importlib.import_module(case.module)


def _te(case: NetworkCase, m):
    return te_arg(m) if case.text_encoder else None


def _create(case: NetworkCase, m, multiplier: float = 1.0):
    """``create_network`` as train_network.py calls it."""
    return _module(case).create_network(multiplier, case.dim, case.alpha, m.vae, _te(case, m), m.unet,
                                        neuron_dropout=None, **case.args)


def _apply(case: NetworkCase, net, m, text_encoder: bool | None = None) -> None:
    net.apply_to(_te(case, m), m.unet, case.text_encoder if text_encoder is None else text_encoder, True)
    net.eval()  # inference: every rank (DyLoRA), no dropout


def _hooked(case: NetworkCase, m, multiplier: float = 1.0, text_encoder: bool | None = None):
    """A network created and applied to ``m``, with random weights so it acts (LyCORIS has its
    parameters only once applied)."""
    net = _create(case, m, multiplier)
    _apply(case, net, m, text_encoder)
    randomize_parameters(net, std=case.std)
    return net


def _outputs(case: NetworkCase, m) -> list[torch.Tensor]:
    return [unet_out(m)] + ([te_out(m)] if case.text_encoder else [])


def _assert_acts(case: NetworkCase, outs: list[torch.Tensor]) -> None:
    """The adapter changes every output it targets (so the equalities below cannot hold trivially)."""
    for base, out in zip(_outputs(case, tiny_model(Family.SD1)), outs):
        assert (out - base).abs().max() > 1e-3


@pytest.mark.parametrize("case", _params())
def test_save_load_round_trip_keeps_weights_and_metadata(case, tmp_path):
    m = tiny_model(Family.SD1)
    net = _hooked(case, m)
    expected = _outputs(case, m)
    _assert_acts(case, expected)
    path = tmp_path / "net.safetensors"
    metadata = {"ss_network_module": case.module, "ss_network_dim": str(case.dim), "ss_network_alpha": str(case.alpha),
                "ss_network_args": json.dumps(case.args), "ss_output_name": "contract", "ss_training_comment": "é ✓"}
    net.save_weights(str(path), torch.float32, dict(metadata))
    assert [p.name for p in tmp_path.iterdir()] == ["net.safetensors"]  # no temporaries left behind

    saved, weights = load_file(str(path)), net.state_dict()
    assert saved.keys() == weights.keys()
    for k, v in weights.items():
        assert saved[k].dtype == torch.float32 and torch.equal(saved[k], v.float()), k
    file_meta = lora_metadata(path)
    assert {k: file_meta.get(k) for k in metadata} == metadata

    # the file builds the network on a fresh model (gen_img, --dim_from_weights) ...
    m2 = tiny_model(Family.SD1)
    net2, weights_sd = _module(case).create_network_from_weights(1.0, str(path), m2.vae, _te(case, m2), m2.unet)
    assert set(weights_sd) == set(saved)
    _apply(case, net2, m2)
    assert set(net2.state_dict()) == set(saved)  # (LyCORIS registers its modules when applied)
    net2.load_weights(str(path))
    for a, b in zip(_outputs(case, m2), expected):
        assert torch.equal(a, b)
    # ... and loads into a network created with the same arguments (--network_weights)
    m3 = tiny_model(Family.SD1)
    net3 = _create(case, m3)
    _apply(case, net3, m3)
    net3.load_weights(str(path))
    for a, b in zip(_outputs(case, m3), expected):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", _params())
def test_merge_into_base_weights_equals_hooked_output(case):
    hooked, merged = tiny_model(Family.SD1), tiny_model(Family.SD1)
    net = _hooked(case, hooked, multiplier=0.7)
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    expected = _outputs(case, hooked)
    _assert_acts(case, expected)

    net2, _ = _module(case).create_network_from_weights(0.7, None, merged.vae, _te(case, merged), merged.unet,
                                                        weights_sd=weights)
    assert capabilities_of(net2).mergeable and net2.is_mergeable()
    net2.merge_to(_te(case, merged), merged.unet, weights, torch.float32, "cpu")
    for a, b in zip(_outputs(case, merged), expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    if case.pre_calculation:  # gen_img's in-place merge of the hooked network's own weights: the same
        net.backup_weights()
        net.pre_calculation()
        for a, b in zip(_outputs(case, hooked), expected):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        net.restore_weights()
        for a, b in zip(_outputs(case, hooked), expected):
            assert torch.equal(a, b)


@pytest.mark.parametrize("case", _params())
def test_gradient_checkpointing_gives_same_loss_and_gradients(case):
    m = tiny_model(Family.SD1)
    net = _hooked(case, m, text_encoder=False)
    net.prepare_grad_etc(_te(case, m), m.unet)
    net.train()
    m.unet.train()
    if capabilities_of(net).on_step_start:  # DyLoRA draws this step's rank: the recompute must see the same one
        torch.manual_seed(3)
        net.on_step_start(_te(case, m), m.unet)
    plain_loss, plain = unet_step(m, net)
    m.unet.enable_gradient_checkpointing()
    net.enable_gradient_checkpointing()
    loss, checkpointed = unet_step(m, net)
    assert plain and plain.keys() == checkpointed.keys()
    assert all(g.abs().sum() > 0 for g in plain.values())
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=0)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("case", _params(n for n, c in CASES.items() if c.diffusers))
def test_diffusers_load_lora_weights_gives_same_outputs(case, tmp_path):
    pytest.importorskip("peft")
    ours, theirs = tiny_model(Family.SD1), tiny_model(Family.SD1)
    net = _hooked(case, ours)
    path = tmp_path / "net.safetensors"
    net.save_weights(str(path), torch.float32, {})
    expected = _outputs(case, ours)
    _assert_acts(case, expected)

    pipeline_of(theirs).load_lora_weights(str(path))
    for a, b in zip(_outputs(case, theirs), expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

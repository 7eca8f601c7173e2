"""Helpers of the network-module tests: the text-encoder argument kohya's factories take, outputs of a
tiny model for fixed inputs, non-zero adapter weights, one training step's loss and gradients.

Not a pytest plugin: import from tests (``from tests.helpers_networks import ...``).
"""

from __future__ import annotations

import copy
import functools

import torch

from library.models.families import Family
from tests.trainer_fixtures import unet_out

__all__ = ["tiny_model", "te_arg", "te_out", "unet_out", "randomize_lora_up", "randomize_parameters", "unet_step",
           "pipeline_of"]


@functools.cache
def _built(family: Family):
    from library.models.tiny import build_tiny_model

    return build_tiny_model(family)


def tiny_model(family: Family):
    """A fresh copy of the tiny random model of ``family`` (``build_tiny_model``'s default seed), built once
    per session: tests hook, merge into and train their copy freely."""
    return copy.deepcopy(_built(family))


def te_arg(m):
    """What kohya's ``create_network`` takes as ``text_encoder``: the list for SDXL, else the one encoder."""
    return m.text_encoders if m.family is Family.SDXL else m.text_encoders[0]


def te_out(m, i: int = 0) -> torch.Tensor:
    """Penultimate hidden states ``[1, 77, D]`` of text encoder ``i`` for a fixed caption; no gradients."""
    ids = m.tokenizers[i]("a photo of a dog", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return m.text_encoders[i](ids, output_hidden_states=True).hidden_states[-2]


def randomize_lora_up(net, seed: int = 1, std: float = 0.1) -> None:
    """Non-zero ``lora_up`` weights (fresh ones are zero) for a :class:`networks.lora.LoRANetwork`."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.all_loras:
            module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=g) * std)


def randomize_parameters(net: torch.nn.Module, seed: int = 1, std: float = 0.1) -> None:
    """Every parameter of any network module drawn from N(0, std²), so the adapter changes outputs
    (fresh adapters are the identity: LoRA's up and OFT's blocks start at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)


def unet_step(m, net: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One backward pass of a squared-output loss through an SD1/SD2 UNet for fixed random inputs.

    Returns the loss and the gradient of every network parameter that received one (DyLoRA trains one
    unit per step, the others get none).
    """
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, m.unet.config.cross_attention_dim, generator=g)
    net.zero_grad(set_to_none=True)
    loss = m.unet(x, torch.tensor([10, 900]), ctx).sample.square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def pipeline_of(m):
    """The family's diffusers pipeline (its adapter's ``pipeline_class``) around the model's own components,
    with a DDIM scheduler; no copy, so loading a LoRA or an embedding into the pipeline changes ``m``."""
    import inspect

    from diffusers import DDIMScheduler

    from library.training.family import get_family_adapter

    cls = get_family_adapter(m.family).pipeline_class()
    components = {"unet": m.unet, "vae": m.vae, "scheduler": DDIMScheduler.from_config(m.scheduler_config)}
    for i, (te, tok) in enumerate(zip(m.text_encoders, m.tokenizers)):
        suffix = "" if i == 0 else f"_{i + 1}"  # text_encoder, text_encoder_2
        components.update({f"text_encoder{suffix}": te, f"tokenizer{suffix}": tok})
    params = inspect.signature(cls.__init__).parameters
    absent = {"safety_checker": None, "feature_extractor": None, "image_encoder": None, "requires_safety_checker": False}
    components.update({k: v for k, v in absent.items() if k in params})
    return cls(**components)

"""Placing the base model for training: frozen by default, cast, moved, attention and checkpointing.

Shared by every target; a target then unfreezes what it trains. Order matters for memory: the
frozen parts reach their training dtype before the optimizer exists.
"""

from __future__ import annotations

from typing import Any

import torch

from library.errors import ConfigError


def set_attention(unet: torch.nn.Module, args: Any) -> None:
    """``--xformers`` (diffusers' default attention is PyTorch's SDPA, which ``--sdpa`` asks for)."""
    if args.xformers:
        try:
            unet.enable_xformers_memory_efficient_attention()
        except Exception as e:  # xformers raises several types when missing / unsupported
            raise ConfigError(f"--xformers is not usable here ({e}); install xformers for your CUDA build or use "
                              "--sdpa") from e


def frozen_te_dtype(weight_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """A frozen text encoder's dtype: on the CPU low precision is slow and buys little (kohya keeps fp32 too)."""
    return weight_dtype if device.type != "cpu" else torch.float32


def place_models(args: Any, model: Any, device: torch.device, unet_dtype: torch.dtype,
                 te_dtypes: list[torch.dtype], checkpoint_tes: list[bool], train_unet_mode: bool = False) -> None:
    """Freeze and move the UNet and text encoders, set their modes and gradient checkpointing.

    Args:
        unet_dtype / te_dtypes: the dtype of each component on the device.
        checkpoint_tes: per text encoder, whether it gets gradient checkpointing (and train mode)
            under ``--gradient_checkpointing``.
        train_unet_mode: the UNet is in train mode even without checkpointing (full-model training).
    """
    model.unet.requires_grad_(False).to(device, dtype=unet_dtype)
    for te, dtype in zip(model.text_encoders, te_dtypes):
        te.requires_grad_(False)
        te.to(device, dtype=dtype)
    if args.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
        model.unet.train()
        for te, ckpt in zip(model.text_encoders, checkpoint_tes):
            if ckpt:
                te.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                te.train()
    else:
        model.unet.train(train_unet_mode)
        for te in model.text_encoders:
            te.eval()
    set_attention(model.unet, args)

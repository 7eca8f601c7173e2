"""LoRA adapters for ``Linear`` / ``Conv2d`` modules of the base model, and how they are placed.

The adapter hooks the base module by replacing its ``forward`` (as kohya does) instead of replacing
the module, so the base weights, their names and their state dict stay untouched and a diffusers or
transformers model keeps working with its own code paths (attention processors, gradient
checkpointing). Output::

    y = base(x) + lora_up(lora_down(x)) * multiplier * alpha / rank

``lora_down`` is a Linear (in -> rank) or a Conv2d with the base conv's kernel, stride and padding
(in -> rank); ``lora_up`` is a Linear (rank -> out) or a 1x1 Conv2d (rank -> out). ``lora_up`` starts at
zero, so a fresh adapter changes nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn.functional as F

from networks.lora_blocks import block_index


class ForwardHook(torch.nn.Module):
    """Base of the adapters that route a base layer's forward through their own (LoRA, OFT, DyLoRA).

    The base layer is kept in a list, not as an attribute, so it is not registered as a submodule
    (its weights must not appear in the adapter's state dict). Subclasses call :meth:`_hook_base`
    in ``__init__`` and use ``self.org_forward`` in ``forward``.
    """

    def _hook_base(self, org_module: torch.nn.Module) -> None:
        self._org = [org_module]
        self.org_forward: Any = None

    @property
    def org_module(self) -> torch.nn.Module:
        return self._org[0]

    def apply_to(self) -> None:
        """Route the base module's forward through this adapter."""
        if self.org_forward is not None:
            return
        self.org_forward = self.org_module.forward
        self.org_module.forward = self.forward

    def restore(self) -> None:
        """Undo :meth:`apply_to`: the base module computes its own output again."""
        if self.org_forward is None:
            return
        if self.org_module.__dict__.get("forward") is not None:
            del self.org_module.forward
        self.org_forward = None


class LoRAModule(ForwardHook):
    """LoRA adapter of one base module (state-dict keys ``lora_down.weight``, ``lora_up.weight``, ``alpha``).

    Args:
        lora_name: kohya key prefix, e.g. ``lora_unet_..._attn1_to_q``.
        org_module: the base ``nn.Linear`` or ``nn.Conv2d``; kept by reference, not registered.
        multiplier: strength of the delta (``--network_mul`` at inference, 1.0 in training).
        lora_dim: rank.
        alpha: scale numerator; ``None`` or 0 means alpha = rank (scale 1), as in kohya.
        dropout: neuron dropout on the rank activations (training mode only).
        rank_dropout: drop whole rank channels per sample (training mode only).
        module_dropout: skip the whole adapter for a step with this probability (training only).
    """

    def __init__(
        self,
        lora_name: str,
        org_module: torch.nn.Module,
        multiplier: float = 1.0,
        lora_dim: int = 4,
        alpha: float | torch.Tensor | None = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
    ):
        super().__init__()
        self.lora_name = lora_name
        self.lora_dim = int(lora_dim)
        if isinstance(org_module, torch.nn.Conv2d):
            in_dim, out_dim = org_module.in_channels, org_module.out_channels
            k, s, p = org_module.kernel_size, org_module.stride, org_module.padding
            self.lora_down = torch.nn.Conv2d(in_dim, self.lora_dim, k, s, p, bias=False)
            self.lora_up = torch.nn.Conv2d(self.lora_dim, out_dim, (1, 1), (1, 1), bias=False)
        elif isinstance(org_module, torch.nn.Linear):
            in_dim, out_dim = org_module.in_features, org_module.out_features
            self.lora_down = torch.nn.Linear(in_dim, self.lora_dim, bias=False)
            self.lora_up = torch.nn.Linear(self.lora_dim, out_dim, bias=False)
        else:
            raise TypeError(f"{lora_name}: LoRA supports Linear and Conv2d, not {type(org_module).__name__}")

        if isinstance(alpha, torch.Tensor):
            alpha = float(alpha.detach().float().item())
        alpha = float(self.lora_dim if alpha is None or alpha == 0 else alpha)
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32))
        self.scale = alpha / self.lora_dim

        # Same initialisation as Microsoft's LoRA and kohya: random down, zero up.
        torch.nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        torch.nn.init.zeros_(self.lora_up.weight)

        self.multiplier = multiplier
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.enabled = True
        self._hook_base(org_module)

    @property
    def is_conv(self) -> bool:
        return isinstance(self.lora_down, torch.nn.Conv2d)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        # The scale follows the loaded alpha (kohya keeps the alpha given at creation: a known FIXME).
        self.scale = float(self.alpha.detach().float().item()) / self.lora_dim

    # -- computation ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Base output plus the scaled low-rank delta.

        Args:
            x: input of the base module: (B, ..., in) for Linear, (B, in, H, W) for Conv2d.
        """
        org_out = self.org_forward(x, *args, **kwargs)
        if not self.enabled:
            return org_out
        if self.module_dropout is not None and self.training and torch.rand(1) < self.module_dropout:
            return org_out

        lx, rank, scale, up = self._down(x)
        if self.dropout is not None and self.training:
            lx = F.dropout(lx, p=self.dropout)
        if self.rank_dropout is not None and self.training:
            mask = torch.rand((lx.size(0), rank), device=lx.device) > self.rank_dropout
            if lx.dim() == 3:  # (B, tokens, rank): text encoder and transformer blocks
                mask = mask.unsqueeze(1)
            elif lx.dim() == 4:  # (B, rank, H, W): convolutions
                mask = mask.unsqueeze(-1).unsqueeze(-1)
            lx = lx * mask
            # Treat the dropped ranks as if the rank were smaller, keeping the expected delta.
            scale = scale * (1.0 / (1.0 - self.rank_dropout))
        lx = up(lx)
        # In place: the frozen Linear/Conv2d saves its input and weight for backward, never its
        # output, so adding into that buffer is autograd-safe and spares two output-sized buffers
        # per LoRA module, the scaled delta and the sum (SDXL fp32 LoRA training peak 13.6 -> 12.7
        # GB). The sum is computed in the wider dtype and rounded once into org_out's dtype.
        return org_out.add_(lx, alpha=self.multiplier * scale)

    def _down(self, x: torch.Tensor) -> tuple[torch.Tensor, int, float, Callable[[torch.Tensor], torch.Tensor]]:
        """The rank activations of ``x``, the rank and scale in use, and the up projection that
        maps them back (subclasses such as DyLoRA use fewer ranks)."""
        x = x.to(self.lora_down.weight.dtype)
        if _is_pointwise(self.lora_down) and x.dim() == 4:
            return _conv1x1(x, self.lora_down.weight), self.lora_dim, self.scale, self._up_1x1
        return self.lora_down(x), self.lora_dim, self.scale, self.lora_up

    def _up_1x1(self, lx: torch.Tensor) -> torch.Tensor:
        return _conv1x1(lx, self.lora_up.weight)

    def delta_weight(self, up: torch.Tensor | None = None, down: torch.Tensor | None = None, multiplier: float | None = None) -> torch.Tensor:
        """The weight change this adapter is equivalent to, in float32: multiplier * scale * up @ down.

        Args:
            up, down: weights to use instead of the module's own (e.g. from a file being merged).
            multiplier: defaults to the module's multiplier.

        Returns:
            A tensor of the base weight's shape: (out, in) or (out, in, k, k).
        """
        up = (self.lora_up.weight if up is None else up).float()
        down = (self.lora_down.weight if down is None else down).float()
        multiplier = self.multiplier if multiplier is None else multiplier
        if down.dim() == 2:
            w = up @ down
        elif down.shape[2:4] == (1, 1):
            w = (up.flatten(1) @ down.flatten(1)).unsqueeze(2).unsqueeze(3)
        else:
            # A kxk conv followed by a 1x1 conv is one kxk conv with these weights.
            w = F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
        return w * (multiplier * self.scale)

    @torch.no_grad()
    def merge_to(self, sd: Mapping[str, torch.Tensor] | None, dtype: torch.dtype | None, device: Any) -> None:
        """Add the delta into the base module's weight (kohya's ``LoRAInfModule.merge_to``).

        Args:
            sd: ``{"lora_up.weight", "lora_down.weight"[, "alpha"]}`` for this module, or ``None`` to use
                the module's own weights.
            dtype: dtype of the merged weight (default: the base weight's).
            device: where to compute.
        """
        up = down = None
        if sd is not None:
            up, down = sd["lora_up.weight"].to(device), sd["lora_down.weight"].to(device)
            if "alpha" in sd:
                self.alpha.fill_(float(sd["alpha"].float().item()))
                self.scale = float(self.alpha.item()) / self.lora_dim
        weight = self.org_module.weight
        merged = weight.to(device, torch.float32) + self.delta_weight(up, down).to(device)
        weight.data = merged.to(weight.device, dtype or weight.dtype)


def _is_pointwise(conv: torch.nn.Module) -> bool:
    """A bias-free 1x1 Conv2d without stride, padding, dilation or groups (a matmul over channels)."""
    return (isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.padding in ((0, 0), "valid") and conv.dilation == (1, 1) and conv.groups == 1
            and conv.bias is None and conv.padding_mode == "zeros")


def _conv1x1(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.conv2d(x, weight)`` for a 1x1 ``weight`` ``[O, I, 1, 1]`` and ``x`` ``[B, I, H, W]``, as a
    batched matmul ``[O, I] @ [B, I, H*W]``. On CPUs PyTorch runs rank-sized 1x1 convolutions
    through its slow im2col path (``_slow_conv2d``, ~2.7 ms per call forward for a 320-channel 32x32
    input); the matmul gives the same result up to float rounding in a fraction of it (issue 12)."""
    b, _, h, w = x.shape
    if x.is_contiguous():
        out = torch.matmul(weight.flatten(1), x.flatten(2))
    else:
        out = torch.matmul(weight.flatten(1), x.reshape(b, x.shape[1], h * w))
    return out.view(b, weight.shape[0], h, w)


def unet_layout_of(unet: Any) -> Any:
    from library.models.unet_layout import UNetLayout

    return UNetLayout(unet.config)


def _is_target(module: torch.nn.Module, names: Iterable[str]) -> bool:
    # Match the class or a base class by name, so subclasses (e.g. attention variants) still count.
    wanted = set(names)
    return any(cls.__name__ in wanted for cls in type(module).__mro__)


@dataclass
class RankPlan:
    """Where each adapter's rank and alpha come from (kohya's five creation patterns)."""

    lora_dim: int
    alpha: float | None
    conv_dim: int | None
    conv_alpha: float | None
    block_dims: list[int] | None
    block_alphas: list[float] | None
    conv_block_dims: list[int] | None
    conv_block_alphas: list[float] | None
    modules_dim: Mapping[str, int] | None
    modules_alpha: Mapping[str, float] | None
    is_sdxl: bool

    def rank_for(self, name: str, child: torch.nn.Module, is_unet: bool) -> tuple[int | None, float | None]:
        """(rank, alpha) of the adapter ``name`` over ``child``; rank None or 0 means no adapter."""
        # Linear layers and 1x1 convs use the main rank; kxk convs only get one with conv_dim.
        small = isinstance(child, torch.nn.Linear) or child.kernel_size == (1, 1)
        if self.modules_dim is not None:  # from a file: exactly the modules it has
            if name not in self.modules_dim:
                return None, None
            return self.modules_dim[name], (self.modules_alpha or {}).get(name)
        if is_unet and self.block_dims is not None:
            idx = block_index(name, self.is_sdxl)
            if small:
                return self.block_dims[idx], self.block_alphas[idx] if self.block_alphas else None
            if self.conv_block_dims is None:
                return None, None
            return self.conv_block_dims[idx], self.conv_block_alphas[idx] if self.conv_block_alphas else None
        if small:
            return self.lora_dim, self.alpha
        return (self.conv_dim, self.conv_alpha) if self.conv_dim is not None else (None, None)


def create_loras(
    root: torch.nn.Module,
    targets: Iterable[str],
    name_fn: Callable[[str], str],
    plan: RankPlan,
    is_unet: bool,
    make: Callable[[str, torch.nn.Module, int, float | None], LoRAModule],
) -> list[LoRAModule]:
    """Adapters for every Linear/Conv2d inside the ``targets`` modules of ``root`` (kohya's order)."""
    loras, seen = [], set()
    for name, module in root.named_modules():
        if not _is_target(module, targets):
            continue
        for child_name, child in module.named_modules():
            if not isinstance(child, (torch.nn.Linear, torch.nn.Conv2d)) or id(child) in seen:
                continue
            seen.add(id(child))
            lora_name = name_fn(f"{name}.{child_name}" if name else child_name)
            dim, alpha = plan.rank_for(lora_name, child, is_unet)
            if dim:
                loras.append(make(lora_name, child, dim, alpha))
    return loras

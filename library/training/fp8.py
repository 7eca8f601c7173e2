"""``--fp8_base``: keep the frozen base weights of Linear / Conv2d layers in float8 (e4m3fn).

Each weight is stored as float8 with one float32 scale per output channel (``w ~= w8 * scale``;
kohya casts without a scale, which flushes many small SD weights to zero) and is upcast to the
input's dtype only while its layer computes (in bf16 and fp32 the scale is applied to the layer's
output instead, see :func:`_weight_for`). The backward pass saves the float8 weight, not the
upcast copy, and upcasts again, so activations memory does not grow by a full-precision copy of
every layer. Weights are 1 byte per parameter: the SDXL UNet's 2.6 G parameters take 2.6 GB
instead of 5.1 GB (bf16) or 10.3 GB (fp32).

Storage is a ``uint8`` view of the float8 bytes, so ``module.to(dtype)`` (which converts every
floating-point tensor) leaves it alone while ``module.to(device)`` moves it. Quantize *before*
a network wraps the layers: the network then calls the float8 forward.
"""

from __future__ import annotations

import logging
from collections import Counter

import torch
import torch.nn.functional as F

from library.utils.mapped_pages import file_ranges, release_file_pages

logger = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` ``[out, ...]`` -> (float8 bytes as uint8, same shape; float32 scale ``[out]``)."""
    w = weight.detach().float()
    amax = w.reshape(w.shape[0], -1).abs().amax(dim=1).clamp(min=1e-12)
    scale = amax / FP8_MAX
    shape = (-1,) + (1,) * (w.dim() - 1)
    w8 = (w / scale.view(shape)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return w8.view(torch.uint8), scale


def _fp8_bytes_to_half(w8: torch.Tensor) -> torch.Tensor:
    """float8 e4m3fn bytes -> float16 holding exactly ``value * 2**-8``, with integer ops only.

    PyTorch's own float8 -> float conversion runs at ~0.2 G elements/s per CPU core, which made
    ``--fp8_base`` several times slower than fp32 on CPUs. The e4m3 bits ``s eeee mmm`` placed at
    fp16 bits 15 and 13..7 are an fp16 number with the same significand and an exponent 8 lower
    (the biases are 7 and 15), subnormals included: sign-extend the byte to 16 bits, shift left
    by 7 (the sign lands in bits 15 and 14), clear bit 14. ~6x faster; exact for every finite
    byte value (tested exhaustively). NaN bytes never occur: :func:`quantize` clamps.
    """
    h = w8.view(torch.int8).to(torch.int16)
    h.bitwise_left_shift_(7).bitwise_and_(~0x4000)
    return h.view(torch.float16)


def dequantize(w8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`quantize` (``w8`` uint8 bytes, ``scale`` float32 ``[out]``) in ``dtype``."""
    shape = (-1,) + (1,) * (w8.dim() - 1)
    if w8.device.type == "cpu":  # GPUs convert float8 natively and fast: one kernel is better there
        w = _fp8_bytes_to_half(w8).to(torch.float32)
        return w.mul_(scale.view(shape) * 256.0).to(dtype)
    return (w8.view(FP8).to(torch.float32) * scale.view(shape)).to(dtype)


def _weight_for(w8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight a layer computes with in ``dtype``, and the per-output-channel factor still to apply
    to its output (None: already in the weight).

    In bf16 and fp32 the scale goes on the output instead of the weight: the weight is then the float8
    value itself (times 2**-8 from the integer fast path on CPUs), exact in those dtypes, and the product
    with the scale is rounded once, on the output (at training resolutions much smaller than the
    weight). No float32 copy of the weight is made: SDXL ``--fp8_base --mixed_precision bf16`` LoRA
    training peaked at 7.0 GB with one, 5.2 GB without, at the same step time. fp16's range is too narrow
    for the unscaled products (1/scale times the real ones): there the weight is scaled, as before.
    """
    if dtype == torch.float16:
        return dequantize(w8, scale, dtype), None
    if w8.device.type == "cpu":  # the integer fast path gives the value times 2**-8
        return _fp8_bytes_to_half(w8).to(dtype), scale * 256.0
    return w8.view(FP8).to(dtype), scale


class _LinearFn(torch.autograd.Function):
    """``F.linear`` with a float8 weight, on 2-D inputs (rows x features)."""

    @staticmethod
    def forward(ctx, x, w8, scale, bias):  # noqa: D102
        ctx.save_for_backward(w8, scale)
        w, out_scale = _weight_for(w8, scale, x.dtype)
        if out_scale is None:
            return F.linear(x, w, None if bias is None else bias.to(x.dtype))
        out = F.linear(x, w).mul_(out_scale)
        return out if bias is None else out.add_(bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        w8, scale = ctx.saved_tensors
        w, out_scale = _weight_for(w8, scale, grad.dtype)
        if out_scale is not None:
            grad = (grad * out_scale).to(grad.dtype)
        return grad @ w, None, None, None


class _Conv2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w8, scale, bias, stride, padding, dilation, groups):  # noqa: D102
        ctx.save_for_backward(w8, scale)
        ctx.conf = (x.shape, stride, padding, dilation, groups)
        w, out_scale = _weight_for(w8, scale, x.dtype)
        if out_scale is None:
            return F.conv2d(x, w, None if bias is None else bias.to(x.dtype), stride, padding, dilation, groups)
        out = F.conv2d(x, w, None, stride, padding, dilation, groups).mul_(out_scale.view(1, -1, 1, 1))
        return out if bias is None else out.add_(bias.to(x.dtype).view(1, -1, 1, 1))

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None, None, None
        w8, scale = ctx.saved_tensors
        shape, stride, padding, dilation, groups = ctx.conf
        w, out_scale = _weight_for(w8, scale, grad.dtype)
        if out_scale is not None:
            grad = (grad * out_scale.view(1, -1, 1, 1)).to(grad.dtype)
        grad_x = torch.nn.grad.conv2d_input(shape, w, grad, stride, padding, dilation, groups)
        return grad_x, None, None, None, None, None, None, None


class _Fp8Mixin:
    """Shared by the float8 layer classes: ``weight`` is a read-only dequantized view."""

    @property
    def weight(self) -> torch.Tensor:  # for code that inspects shape/dtype/device
        return dequantize(self.weight_fp8, self.weight_scale.view(torch.float32), torch.float32)

    def _scale(self) -> torch.Tensor:
        return self.weight_scale.view(torch.float32)


class Fp8Linear(_Fp8Mixin, torch.nn.Linear):
    """``nn.Linear`` whose frozen weight is stored in float8 (made by :func:`apply_fp8`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The Function sees 2-D rows so that its output is a fresh tensor, not a view made inside
        # it: a LoRA wrapped around this layer adds its delta into the output in place, which
        # autograd forbids on a custom Function's view outputs.
        y = _LinearFn.apply(x.reshape(-1, x.shape[-1]), self.weight_fp8, self._scale(), self.bias)
        return y.view(*x.shape[:-1], y.shape[-1])


class Fp8Conv2d(_Fp8Mixin, torch.nn.Conv2d):
    """``nn.Conv2d`` (zero padding) whose frozen weight is stored in float8."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Conv2dFn.apply(x, self.weight_fp8, self._scale(), self.bias, self.stride, self.padding,
                               self.dilation, self.groups)


def _convert(module: torch.nn.Module, cls: type, mapped: list[tuple[int, int]] | None) -> int:
    """Quantize ``module``'s weight in place. With ``mapped`` (:func:`file_ranges`), the pages of the
    replaced weight in a memory-mapped model file are released (they stay resident until every tensor
    of that file is gone otherwise); returns their bytes."""
    w8, scale = quantize(module.weight)
    released = release_file_pages([module.weight.detach()], mapped) if mapped is not None else 0
    del module._parameters["weight"]
    module.register_buffer("weight_fp8", w8)
    module.register_buffer("weight_scale", scale.contiguous().view(torch.uint8))  # survives .to(dtype)
    module.__class__ = cls
    return released


def apply_fp8(model: torch.nn.Module) -> int:
    """Store the weights of every frozen Linear / zero-padded Conv2d of ``model`` in float8.

    Call before a network (LoRA) is applied to ``model``. Biases and other layers keep their
    dtype. Returns the number of converted layers.

    Raises:
        ValueError: a layer's weight requires grad (only frozen weights may be quantized).
    """
    n = released = 0
    before = sum(p.numel() * p.element_size() for p in model.parameters())
    mapped = file_ranges()
    # a weight shared by two layers (tied) is read again after its first conversion: keep its pages
    uses = Counter(m.weight.data_ptr() for m in model.modules() if type(m) in (torch.nn.Linear, torch.nn.Conv2d))
    shared = {ptr for ptr, count in uses.items() if count > 1}
    for name, m in model.named_modules():
        if type(m) is torch.nn.Linear:
            cls = Fp8Linear
        elif type(m) is torch.nn.Conv2d and m.padding_mode == "zeros" and not isinstance(m.padding, str):
            cls = Fp8Conv2d
        else:
            continue
        if m.weight.requires_grad:
            raise ValueError(f"{name}: --fp8_base only stores frozen weights; this one requires grad")
        released += _convert(m, cls, None if m.weight.data_ptr() in shared else mapped)
        n += 1
    after = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for n_, b in model.named_buffers() if n_.endswith(("weight_fp8", "weight_scale")))
    logger.info("fp8: %d layers stored in float8 (%.0f MB -> %.0f MB; %.0f MB of mapped file pages released)",
                n, before / 2**20, after / 2**20, released / 2**20)
    return n

"""Write a safetensors file tensor by tensor, so saving never holds a second full copy of the weights.

``safetensors.torch.save_file`` needs every tensor in CPU memory, in the saved dtype, at once:
for a model trained on a GPU (or saved in another precision) that is a whole second copy. The
format is simple enough to stream instead: an 8-byte little-endian header length, the JSON
header (dtype, shape and byte range of every tensor, plus ``__metadata__``), then the raw
bytes. Each tensor is moved to the CPU and cast on its own, written, and dropped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import torch

from library.utils.atomic import atomic_path

_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


def _target_dtype(t: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and t.is_floating_point() else t.dtype


def _header(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None,
            metadata: Mapping[str, str] | None) -> tuple[bytes, list[str]]:
    keys = sorted(tensors)
    header: dict[str, object] = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(v, str)]
        if bad:
            raise TypeError(f"safetensors metadata values must be str, not for keys {bad}")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for k in keys:
        t = tensors[k]
        dt = _target_dtype(t, dtype)
        n = t.numel() * torch.empty((), dtype=dt).element_size()
        header[k] = {"dtype": _NAMES[dt], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return raw, keys


def save_safetensors_streaming(tensors: Mapping[str, torch.Tensor], path: str | Path,
                               metadata: Mapping[str, str] | None = None, dtype: torch.dtype | None = None) -> None:
    """Write ``tensors`` (on any device) to ``path`` atomically, one tensor in CPU memory at a time.

    Args:
        tensors: name -> tensor; the tensors are only read.
        metadata: ``__metadata__`` (str -> str).
        dtype: cast floating-point tensors to this dtype while writing (``None`` keeps each one's).
    """
    raw, keys = _header(tensors, dtype, metadata)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for k in keys:
            t = tensors[k].detach()
            t = t.to("cpu", dtype=_target_dtype(t, dtype)).contiguous().reshape(-1)
            if t.numel():
                f.write(memoryview(t.view(torch.uint8).numpy()))
            del t

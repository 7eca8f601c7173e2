"""Write safetensors and torch (``.ckpt`` / ``.bin``) files tensor by tensor, so saving never holds a second
full copy of the weights.

``safetensors.torch.save_file`` needs every tensor in CPU memory, in the saved dtype, at once:
for a model trained on a GPU (or saved in another precision) that is a whole second copy. The
format is simple enough to stream instead: an 8-byte little-endian header length, the JSON
header (dtype, shape and byte range of every tensor, plus ``__metadata__``), then the raw
bytes. Each tensor is moved to the CPU and cast on its own, written, and dropped.
"""

from __future__ import annotations

import collections
import io
import json
import pickle
import random
import sys
import zipfile
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


# ----------------------------------------------------------------------------- torch.save's zip format, streamed
# ``torch.save`` pickles the object, then writes every storage it met: all of them must exist at
# once, so saving a model cast to another dtype (``--save_precision``) or held on a GPU needs a
# whole cast / CPU copy first. torch's format is a ZIP (stored, not compressed) holding
# ``data.pkl`` (the pickle, whose tensors name their storage by key), ``data/<key>`` (the raw
# bytes, 64-byte aligned so ``torch.load(mmap=True)`` can map them) and a few small records.
# Writing it here lets each tensor be moved and cast on its own when its record is written.
_ALIGN = 64
_PAD_ID = b"FB"  # the extra-field id torch's own writer pads local headers with


class _StorageRef:
    """Stands for the storage of one tensor in the pickle (written later as ``data/<key>``)."""

    def __init__(self, key: str, dtype: torch.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel


class _Pickler(pickle.Pickler):
    """Pickles tensors as ``torch.save`` does (``_rebuild_tensor_v2`` of a contiguous storage), but by
    reference: the tensors are collected in ``tensors`` and their bytes are written afterwards."""

    def __init__(self, file: io.BytesIO, dtype: torch.dtype | None):
        super().__init__(file, protocol=2)  # torch.save's default protocol
        self.cast = dtype
        self.tensors: list[tuple[str, torch.Tensor, torch.dtype]] = []

    def persistent_id(self, obj: object) -> object:
        if isinstance(obj, _StorageRef):
            storage_type = getattr(torch, torch.storage._dtype_to_storage_type_map()[obj.dtype])
            return ("storage", storage_type, obj.key, "cpu", obj.numel)
        return None

    def reducer_override(self, obj: object) -> object:
        if not isinstance(obj, torch.Tensor):
            return NotImplemented
        if type(obj) not in (torch.Tensor, torch.nn.Parameter):
            raise TypeError(f"cannot stream a {type(obj).__name__} into a torch file")
        dt = _target_dtype(obj, self.cast)
        key = str(len(self.tensors))
        self.tensors.append((key, obj, dt))
        shape = tuple(obj.shape)
        stride = torch.empty(shape, dtype=dt, device="meta").stride()
        return (torch._utils._rebuild_tensor_v2,
                (_StorageRef(key, dt, obj.numel()), 0, shape, stride, False, collections.OrderedDict()))


def _write_record(zf: zipfile.ZipFile, name: str, chunks: list[memoryview] | bytes, size: int) -> None:
    """One stored record whose data starts on a multiple of 64 bytes (padding in the local header's extra)."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = size
    start = zf.start_dir + 30 + len(name.encode("utf-8")) + 4  # the local header with an empty pad field
    info.extra = _PAD_ID + (pad := -start % _ALIGN).to_bytes(2, "little") + b"\0" * pad
    with zf.open(info, "w") as f:
        for c in [chunks] if isinstance(chunks, bytes) else chunks:
            f.write(c)


def save_torch_streaming(obj: object, path: str | Path, dtype: torch.dtype | None = None) -> None:
    """``torch.save(obj, path)`` atomically, with each tensor moved to the CPU and cast on its own.

    The file is what ``torch.save`` writes (``torch.load`` reads it, with ``weights_only`` and
    ``mmap``); tensors are saved contiguous, each with a storage of its own.

    Args:
        obj: plain containers (dict, list, tuple), numbers, strings and tensors.
        dtype: cast floating-point tensors to this dtype while writing (``None`` keeps each one's).
    """
    buf = io.BytesIO()
    pickler = _Pickler(buf, dtype)
    pickler.dump(obj)
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        small = [("data.pkl", buf.getvalue()), (".format_version", b"1"), (".storage_alignment", str(_ALIGN).encode()),
                 ("byteorder", sys.byteorder.encode())]
        for name, data in small:
            _write_record(zf, f"archive/{name}", data, len(data))
        for key, t, dt in pickler.tensors:
            flat = t.detach().to("cpu", dtype=dt).contiguous().reshape(-1)
            _write_record(zf, f"archive/data/{key}", [memoryview(flat.view(torch.uint8).numpy())] if flat.numel() else [],
                          flat.numel() * flat.element_size())
            del flat
        _write_record(zf, "archive/version", b"3\n", 2)
        sid = "".join(str(random.randrange(10)) for _ in range(40)).encode()  # torch's serialization_id: 40 digits
        _write_record(zf, "archive/.data/serialization_id", sid, len(sid))

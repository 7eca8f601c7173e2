"""Lazy, safe reading of single-file checkpoints (``.safetensors``; ``.ckpt`` only when allowed)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import torch

from library.errors import ModelLoadError

METADATA_CONFIG_KEY = "sdtk.model_config"
# when converting dtypes while reading, drop the file mapping after this many source bytes (see read)
_REMAP_BYTES = 256 * 2**20
# safetensors dtype names -> torch (reading without mmap)
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class CheckpointReader:
    """Read tensors of a checkpoint one at a time, so a full copy of the file is never held in memory."""

    def __init__(self, path: str | os.PathLike, allow_pickle: bool = False, mmap: bool = True):
        """``mmap=False`` (kohya's ``--disable_mmap_load_safetensors``) reads each tensor with plain
        file reads instead of memory-mapping the file: slower locally, faster on some network file
        systems, and the file's pages never count as this process's memory."""
        self.path = Path(path)
        self.mmap = mmap
        self._header: dict[str, dict] | None = None
        if not self.path.exists():
            raise ModelLoadError(f"{self.path}: file not found; check the path (--pretrained_model_name_or_path)")
        if self.path.is_dir():
            raise ModelLoadError(f"{self.path} is a folder but not a diffusers model (no model_index.json or unet/ found)")
        self._st = None
        self._sd: dict[str, torch.Tensor] | None = None
        suffix = self.path.suffix.lower()
        if suffix == ".safetensors":
            self._open_safetensors()
        elif suffix in (".ckpt", ".pt", ".pth", ".bin"):
            self._open_pickle(allow_pickle)
        else:
            raise ModelLoadError(
                f"{self.path}: unknown model file type {suffix!r}; use a .safetensors (or, with --allow_pickle, .ckpt) "
                "file in the original layout, or a diffusers model folder"
            )

    def _open_safetensors(self) -> None:
        from safetensors import safe_open

        try:
            if self.mmap:
                self._st = safe_open(str(self.path), framework="pt", device="cpu")
                self._keys = list(self._st.keys())
                self.metadata: dict[str, str] = self._st.metadata() or {}
            else:
                self._read_header()
        except Exception as e:
            raise ModelLoadError(
                f"{self.path} is not a readable safetensors file ({str(e).splitlines()[0][:120]}); "
                "it may be truncated or not a model — download it again"
            ) from e

    def _read_header(self) -> None:
        """The safetensors header (8-byte little-endian length, then JSON), checked against the file size."""
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= min(size - 8, 100 * 2**20):
                raise ValueError("invalid header length")
            header = json.loads(f.read(n))
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        for key, info in header.items():
            start, end = info["data_offsets"]
            dtype = _ST_DTYPES.get(info["dtype"])
            numel = 1
            for d in info["shape"]:
                numel *= d
            if dtype is None or not 0 <= start <= end <= size - self._data_start \
                    or end - start != numel * dtype.itemsize:
                raise ValueError(f"tensor {key!r} has an unknown dtype or lies outside the file")
        self._header = header
        self._keys = list(header)

    def _read_plain(self, key: str) -> torch.Tensor:
        info = self._header[key]
        start, end = info["data_offsets"]
        buf = bytearray(end - start)
        with open(self.path, "rb") as f:
            f.seek(self._data_start + start)
            if f.readinto(buf) != len(buf):
                raise ValueError("unexpected end of file")
        dtype = _ST_DTYPES[info["dtype"]]
        if not buf:
            return torch.empty(info["shape"], dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(info["shape"])

    def _open_pickle(self, allow_pickle: bool) -> None:
        if not allow_pickle:
            raise ModelLoadError(
                f"{self.path} is a pickle (.ckpt) file, which can run arbitrary code when loaded. Convert it to "
                ".safetensors, or pass --allow_pickle if you trust its source"
            )
        try:
            obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=self.mmap)
        except Exception as e:
            raise ModelLoadError(
                f"{self.path} could not be read as a PyTorch checkpoint ({type(e).__name__}: {str(e)[:120]}); "
                "it may be truncated or contain non-tensor objects — convert it to .safetensors with another tool"
            ) from e
        self.metadata = {}
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            if isinstance(obj.get(METADATA_CONFIG_KEY), str):
                self.metadata[METADATA_CONFIG_KEY] = obj[METADATA_CONFIG_KEY]
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ModelLoadError(f"{self.path} does not contain a state dict of tensors")
        self._sd = obj
        self._keys = list(obj.keys())

    def keys(self) -> list[str]:
        return self._keys

    def get(self, key: str) -> torch.Tensor:
        if self._sd is not None:
            return self._sd[key]
        try:
            return self._read_plain(key) if self._header is not None else self._st.get_tensor(key)
        except Exception as e:
            raise ModelLoadError(f"{self.path}: tensor {key!r} cannot be read ({e}); the file may be truncated") from e

    def shape(self, key: str) -> tuple[int, ...]:
        if self._sd is not None:
            return tuple(self._sd[key].shape)
        if self._header is not None:
            return tuple(self._header[key]["shape"])
        return tuple(self._st.get_slice(key).get_shape())

    def read(self, keys: Iterable[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        out = {}
        converted = 0
        for k in keys:
            t = self.get(k)
            if dtype is not None and t.is_floating_point() and t.dtype != dtype:
                converted += t.numel() * t.element_size()
                t = t.to(dtype)
                if converted >= _REMAP_BYTES and self._st is not None:
                    # the file's pages read so far stay mapped (and count as this process's memory)
                    # while the handle lives; converted tensors no longer need them: reopen
                    self._reopen()
                    converted = 0
            out[k] = t
        return out

    def _reopen(self) -> None:
        from safetensors import safe_open

        self._st = None
        self._st = safe_open(str(self.path), framework="pt", device="cpu")

    def read_prefix(self, prefix: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        return self.read([k for k in self._keys if k.startswith(prefix)], dtype)

    def embedded_model_config(self) -> dict | None:
        raw = self.metadata.get(METADATA_CONFIG_KEY)
        return json.loads(raw) if raw else None

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


class CheckpointReader:
    """Read tensors of a checkpoint one at a time, so a full copy of the file is never held in memory."""

    def __init__(self, path: str | os.PathLike, allow_pickle: bool = False):
        self.path = Path(path)
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
            self._st = safe_open(str(self.path), framework="pt", device="cpu")
            self._keys = list(self._st.keys())
        except Exception as e:
            raise ModelLoadError(
                f"{self.path} is not a readable safetensors file ({str(e).splitlines()[0][:120]}); "
                "it may be truncated or not a model — download it again"
            ) from e
        self.metadata: dict[str, str] = self._st.metadata() or {}

    def _open_pickle(self, allow_pickle: bool) -> None:
        if not allow_pickle:
            raise ModelLoadError(
                f"{self.path} is a pickle (.ckpt) file, which can run arbitrary code when loaded. Convert it to "
                ".safetensors, or pass --allow_pickle if you trust its source"
            )
        try:
            obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
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
            return self._st.get_tensor(key)
        except Exception as e:
            raise ModelLoadError(f"{self.path}: tensor {key!r} cannot be read ({e}); the file may be truncated") from e

    def shape(self, key: str) -> tuple[int, ...]:
        if self._sd is not None:
            return tuple(self._sd[key].shape)
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

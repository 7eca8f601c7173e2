"""Model hashes as kohya sd-scripts and the AUTOMATIC1111 ecosystem compute them.

Two families of hashes exist:

* **File hashes** used by stable-diffusion-webui to identify checkpoints: :func:`model_hash`
  (the old 8-hex-digit hash of 64 KiB at offset 1 MiB) and :func:`calculate_sha256` (SHA-256 of
  the whole file). kohya stores them for the base model in ``ss_sd_model_hash`` /
  ``ss_new_sd_model_hash``.
* **safetensors hashes** used by sd-webui-additional-networks and A1111's LoRA browser:
  :func:`addnet_hash_safetensors` (SHA-256 of everything after the JSON header, i.e. of the tensor
  bytes only, so editing user metadata does not change it) and :func:`addnet_hash_legacy` (the old
  partial hash, 8 hex digits of 64 KiB at offset 1 MiB of the serialized file). kohya writes them
  into each LoRA as ``sshs_model_hash`` / ``sshs_legacy_hash``, computed *before* saving by
  :func:`precalculate_safetensors_hashes` on an in-memory serialization that keeps only the ``ss_*``
  metadata (so a file later retitled by a user keeps its hashes).

The functions reproduce kohya's results bit for bit; ``tests/test_hashes.py`` checks them against
independent computations on real files.
"""

from __future__ import annotations

import hashlib
import io
import os
from typing import BinaryIO, Mapping

_BLOCK = 1024 * 1024
# The legacy hashes read 64 KiB starting 1 MiB into the file (files shorter than that hash b"").
_LEGACY_OFFSET = 0x100000
_LEGACY_LENGTH = 0x10000


def _legacy_digest(f: BinaryIO) -> str:
    m = hashlib.sha256()
    f.seek(_LEGACY_OFFSET)
    m.update(f.read(_LEGACY_LENGTH))
    return m.hexdigest()[0:8]


def model_hash(filename: str | os.PathLike) -> str:
    """Old stable-diffusion-webui model hash: 8 hex digits.

    Returns ``"NOFILE"`` / ``"IsADirectory"`` like kohya when the path is not a readable file, because
    the value goes into metadata rather than stopping a run.
    """
    try:
        with open(filename, "rb") as f:
            return _legacy_digest(f)
    except FileNotFoundError:
        return "NOFILE"
    except (IsADirectoryError, PermissionError):
        return "IsADirectory"


def calculate_sha256(filename: str | os.PathLike) -> str:
    """SHA-256 of the whole file (stable-diffusion-webui's new model hash), 64 hex digits.

    Same special return values as :func:`model_hash`.
    """
    try:
        h = hashlib.sha256()
        with open(filename, "rb") as f:
            for chunk in iter(lambda: f.read(_BLOCK), b""):
                h.update(chunk)
        return h.hexdigest()
    except FileNotFoundError:
        return "NOFILE"
    except (IsADirectoryError, PermissionError):
        return "IsADirectory"


def addnet_hash_legacy(f: BinaryIO) -> str:
    """``sshs_legacy_hash``: 8 hex digits of SHA-256 over 64 KiB at offset 1 MiB of a serialized file."""
    return _legacy_digest(f)


def addnet_hash_safetensors(f: BinaryIO) -> str:
    """``sshs_model_hash``: SHA-256 (64 hex digits) of a safetensors stream after its header.

    A safetensors file is ``<u64 little-endian header length N><N bytes JSON header><tensor bytes>``;
    only the tensor bytes are hashed.
    """
    h = hashlib.sha256()
    f.seek(0)
    n = int.from_bytes(f.read(8), "little")
    f.seek(n + 8)
    for chunk in iter(lambda: f.read(_BLOCK), b""):
        h.update(chunk)
    return h.hexdigest()


def safetensors_file_hashes(path: str | os.PathLike) -> tuple[str, str]:
    """``(addnet_hash_safetensors, addnet_hash_legacy)`` of a file on disk."""
    with open(path, "rb") as f:
        return addnet_hash_safetensors(f), addnet_hash_legacy(f)


def precalculate_safetensors_hashes(tensors: Mapping, metadata: Mapping[str, str] | None) -> tuple[str, str]:
    """Hashes to store in a LoRA's metadata before it is written, as kohya does.

    Args:
        tensors: the state dict that will be saved (name -> tensor, already in the save dtype).
        metadata: the metadata that will be saved; only its ``ss_*`` entries take part, because those
            are meant to be immutable while titles and descriptions may be edited later.

    Returns:
        ``(sshs_model_hash, sshs_legacy_hash)``. The model hash equals :func:`addnet_hash_safetensors`
        of the written file (the tensor bytes do not depend on the metadata); the legacy hash is that
        of the ``ss_*``-only serialization, exactly as kohya computes it.
    """
    from safetensors.torch import save

    ss_only = {k: v for k, v in (metadata or {}).items() if k.startswith("ss_")}
    data = save(dict(tensors), ss_only)
    buf = io.BytesIO(data)
    return addnet_hash_safetensors(buf), addnet_hash_legacy(buf)

"""library.models.hashes against independent computations on the raw bytes of real files."""

from __future__ import annotations

import hashlib
import io
import struct

import torch
from safetensors.torch import save, save_file

from library.models import hashes


def _tensors(n: int = 300_000) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    # > 1 MiB of tensor data, so the legacy hashes (64 KiB at offset 1 MiB) read real bytes
    return {"b.lora_down.weight": torch.randn(n, generator=g), "a.alpha": torch.tensor(4.0)}


def test_addnet_hash_safetensors_is_sha256_of_tensor_bytes(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file(_tensors(), str(path), {"ss_a": "1", "modelspec.title": "t"})
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    expected = hashlib.sha256(raw[8 + header_len :]).hexdigest()
    model_hash, legacy = hashes.safetensors_file_hashes(path)
    assert model_hash == expected and len(model_hash) == 64
    assert legacy == hashlib.sha256(raw[0x100000 : 0x110000]).hexdigest()[:8]


def test_precalculated_hashes_match_kohya_definition(tmp_path):
    tensors = _tensors()
    meta = {"ss_network_dim": "4", "ss_output_name": "x", "modelspec.title": "changes later", "sshs_model_hash": "old"}
    model_hash, legacy = hashes.precalculate_safetensors_hashes(tensors, meta)
    # model hash: independent of metadata, equal to the hash of the file as finally written
    path = tmp_path / "final.safetensors"
    save_file(tensors, str(path), {**meta, "modelspec.title": "edited by the user", "extra": "y"})
    assert model_hash == hashes.safetensors_file_hashes(path)[0]
    # legacy hash: of the serialization that keeps only ss_* metadata (kohya's definition)
    ss_only = save(tensors, {"ss_network_dim": "4", "ss_output_name": "x"})
    assert legacy == hashlib.sha256(ss_only[0x100000 : 0x110000]).hexdigest()[:8]
    # and it does change with the ss_* metadata, which is why kohya keeps only those keys
    assert hashes.precalculate_safetensors_hashes(tensors, {"ss_network_dim": "8" * 200})[1] != legacy


def test_small_file_legacy_hash_is_hash_of_nothing():
    buf = io.BytesIO(save({"x": torch.zeros(3)}))
    assert hashes.addnet_hash_legacy(buf) == hashlib.sha256(b"").hexdigest()[:8]


def test_file_hashes_and_missing_files(tmp_path):
    path = tmp_path / "model.ckpt"
    data = bytes(range(256)) * 5000  # 1.28 MB
    path.write_bytes(data)
    assert hashes.calculate_sha256(path) == hashlib.sha256(data).hexdigest()
    assert hashes.model_hash(path) == hashlib.sha256(data[0x100000 : 0x110000]).hexdigest()[:8]
    assert hashes.model_hash(tmp_path / "none") == "NOFILE"
    assert hashes.calculate_sha256(tmp_path / "none") == "NOFILE"
    assert hashes.calculate_sha256(tmp_path) == "IsADirectory"

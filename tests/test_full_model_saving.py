"""Full-model saving helpers: the streaming safetensors writer and kohya's choice of format."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from library.errors import ModelSaveError
from library.training.targets.full_saving import SaveFormat, check_output_path, resolve_format
from library.training.targets.stream_save import save_safetensors_streaming


def test_streaming_writer_matches_safetensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"b.w": torch.randn(3, 5, generator=g), "a.h": torch.randn(7, generator=g).half(),
               "c.bf": torch.randn(2, 2, generator=g).bfloat16(), "ids": torch.arange(6).reshape(2, 3),
               "scalar": torch.tensor(1.5), "empty": torch.zeros(0, 4), "flag": torch.tensor([True, False])}
    path = tmp_path / "s.safetensors"
    save_safetensors_streaming(tensors, path, {"k": "v"})
    back = load_file(path)
    assert back.keys() == tensors.keys()
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"k": "v"}
    save_safetensors_streaming(tensors, path, None, torch.float16)  # replaces the file atomically
    back = load_file(path)
    assert back["b.w"].dtype == torch.float16 and back["ids"].dtype == torch.int64
    assert torch.equal(back["b.w"], tensors["b.w"].half())
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]


def test_streaming_writer_refuses_non_text_metadata(tmp_path):
    with pytest.raises(TypeError):
        save_safetensors_streaming({"a": torch.ones(1)}, tmp_path / "x.safetensors", {"n": 1})  # type: ignore[dict-item]
    assert not list(tmp_path.iterdir())


def test_kohya_format_rules(tmp_path):
    f = tmp_path / "m.safetensors"
    f.write_bytes(b"")
    assert resolve_format(None, False, str(f)) == SaveFormat(True, False)  # file source -> .ckpt
    assert resolve_format(None, True, str(f)).suffix == ".safetensors"
    assert resolve_format(None, False, str(tmp_path)) == SaveFormat(False, False)  # folder -> diffusers, .bin
    assert resolve_format("safetensors", False, str(tmp_path)).suffix == ".safetensors"
    assert resolve_format("ckpt", False, None).suffix == ".ckpt"
    assert resolve_format("diffusers_safetensors", False, None) == SaveFormat(False, True)
    assert resolve_format("diffusers", True, None) == SaveFormat(False, True)  # --use_safetensors wins (kohya)
    with pytest.raises(ModelSaveError, match="is a file"):
        check_output_path(f, SaveFormat(False, True))
    with pytest.raises(ModelSaveError, match="is a folder"):
        check_output_path(tmp_path, SaveFormat(True, True))


def test_memory_plan_counts_weights_gradients_and_state():
    from library.training.targets.memory_plan import describe, memory_plan

    trained = [torch.nn.Parameter(torch.zeros(1024, 256))]  # 1 MiB float32
    frozen = [torch.zeros(512, 512, dtype=torch.float16)]  # 0.5 MiB
    plan = memory_plan(trained, frozen, "AdamW", fused=False, ema=True)
    mib = 2**20
    assert plan["weights"] == {"trained float32": mib, "frozen float16": mib // 2}
    assert plan["gradients"] == mib and plan["optimizer"] == 2 * mib and plan["ema"] == mib
    assert plan["total"] == mib * 5.5
    assert memory_plan(trained, frozen, "Adafactor", fused=True, ema=False)["gradients"] == 0
    assert "0.3 M trained parameters" in describe(plan)

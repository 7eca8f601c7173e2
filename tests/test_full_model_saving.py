"""Full-model saving helpers: the streaming safetensors and torch-file writers and kohya's choice of format."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from library.errors import ModelSaveError
from library.training.targets.full_saving import SaveFormat, check_output_path, resolve_format
from library.training.targets.stream_save import save_safetensors_streaming, save_torch_streaming


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


def test_streaming_torch_writer_is_read_by_torch_load(tmp_path):
    """The .ckpt / .bin writer: torch.load reads it (weights_only, mmap, and Python's zipfile checks its CRCs)."""
    import zipfile

    g = torch.Generator().manual_seed(0)
    sd = {"b.w": torch.randn(3, 5, generator=g), "a.h": torch.randn(7, generator=g).half(),
          "c.bf": torch.randn(2, 2, generator=g).bfloat16(), "ids": torch.arange(6).reshape(2, 3),
          "t": torch.randn(4, 6, generator=g).t(), "scalar": torch.tensor(1.5), "empty": torch.zeros(0, 4),
          "flag": torch.tensor([True, False])}
    obj = {"state_dict": sd, "epoch": 3, "global_step": 40, "modelspec.title": "x", "nested": [1, (2.5, "y")]}
    path = tmp_path / "m.ckpt"
    save_torch_streaming(obj, path)
    for kwargs in ({"weights_only": True}, {"weights_only": True, "mmap": True}):
        back = torch.load(path, **kwargs)
        assert {k: v for k, v in back.items() if k != "state_dict"} == {k: v for k, v in obj.items()
                                                                        if k != "state_dict"}
        assert back["state_dict"].keys() == sd.keys()
        for k, v in sd.items():
            assert back["state_dict"][k].dtype == v.dtype and torch.equal(back["state_dict"][k], v), k
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None  # every CRC right
        # torch's layout: 64-byte aligned data records (what mmap loading maps)
        for info in zf.infolist():
            if "/data/" in info.filename:
                assert (info.header_offset + 30 + len(info.filename) + len(info.extra)) % 64 == 0, info.filename
    save_torch_streaming(sd, path, torch.float16)  # --save_precision: cast while writing, atomically replaced
    back = torch.load(path, weights_only=True)
    assert back["b.w"].dtype == torch.float16 and torch.equal(back["b.w"], sd["b.w"].half())
    assert back["ids"].dtype == torch.int64 and back["c.bf"].dtype == torch.float16
    assert [p.name for p in tmp_path.iterdir()] == ["m.ckpt"]


_PEAK_SCRIPT = """
import sys, torch
from library.training.targets.stream_save import save_torch_streaming

def hwm():  # this process's own peak in MiB (ru_maxrss would start at the forking pytest's)
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024

torch.manual_seed(0)
sd = {f"w{i}": torch.randn(2048, 2048) for i in range(16)}  # 256 MiB of float32
save_torch_streaming({"w": torch.ones(4)}, sys.argv[1])  # warm up (imports, first allocations)
before = hwm()
if sys.argv[2] == "copy":  # what a plain torch.save of the cast model costs
    torch.save({k: v.half() for k, v in sd.items()}, sys.argv[1])
else:
    save_torch_streaming({"state_dict": sd}, sys.argv[1], torch.float16)
print(hwm() - before)
"""


def test_streaming_torch_writer_holds_one_cast_tensor_at_a_time(tmp_path):
    """Saving 256 MiB of float32 weights as fp16 adds a tensor or a few to the peak, not a 128 MiB copy."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    grown = {}
    for how in ("copy", "stream"):
        p = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(tmp_path / f"{how}.ckpt"), how], cwd=root,
                           capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(root), "PATH": ""})
        assert p.returncode == 0, p.stderr[-2000:]
        grown[how] = float(p.stdout.split()[-1])  # MiB
    assert grown["copy"] > 100, grown  # the measurement sees a full cast copy
    # one 8 MiB tensor, plus what glibc keeps of freed ones (its mmap threshold rises to at most 32 MiB);
    # this does not grow with the model (16 or 32 tensors: the same), the copy does
    assert grown["stream"] < 64, grown
    a = torch.load(tmp_path / "copy.ckpt", weights_only=True)
    b = torch.load(tmp_path / "stream.ckpt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


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

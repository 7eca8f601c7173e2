"""The model tools run for real (``main(argv)`` in-process) on tiny models of every family.

convert_diffusers20_original_sd: both directions bit-identical; precision; metadata; overwrite.
merge_models: weighted sum tensor by tensor; --unet_only; mixed families refused.
show_metadata: parseable JSON. Bad inputs: one ``error:`` line, exit 1, nothing written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tools import convert_diffusers20_original_sd as convert_tool
from tools import merge_models as merge_tool
from tools import show_metadata as show_tool

FAMILIES = ["sd1", "sd2", "sdxl"]


def _tok_dir(single_file: Path) -> Path:
    return single_file.parent / f"{single_file.stem}_tokenizers"


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert set(a) == set(b), f"key sets differ: {sorted(set(a) ^ set(b))[:5]}"
    for k in a:
        assert a[k].device.type != "meta" and b[k].device.type != "meta", k
        assert a[k].dtype == b[k].dtype, f"{k}: {a[k].dtype} != {b[k].dtype}"
        assert torch.equal(a[k], b[k]), f"{k} differs"


def _folder_tensors(folder: Path) -> dict:
    """Every tensor of a diffusers folder, keyed by ``component/name``."""
    out = {}
    for f in sorted(folder.glob("*/*.safetensors")):
        out.update({f"{f.parent.name}/{k}": v for k, v in load_file(f).items()})
    assert out, f"no weights in {folder}"
    return out


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(".sdtk-tmp-")]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# ------------------------------------------------------------------------------------ convert
@pytest.mark.parametrize("family", FAMILIES)
def test_convert_single_file_to_diffusers_and_back_is_bit_identical(family, tiny_model_dir, tmp_path):
    src = tiny_model_dir(family, "single_file")
    folder, back = tmp_path / "diffusers", tmp_path / "back.safetensors"
    args = [str(src), str(folder), "--use_safetensors", "--tokenizer_cache_dir", str(_tok_dir(src))]
    assert convert_tool.main(args) == 0
    assert (folder / "tokenizer").is_dir() and (folder / "model_index.json").exists()
    assert (family == "sdxl") == (folder / "tokenizer_2").is_dir()
    assert convert_tool.main([str(folder), str(back)]) == 0
    _assert_same_tensors(load_file(src), load_file(back))


@pytest.mark.parametrize("family", FAMILIES)
def test_convert_diffusers_to_single_file_and_back_is_bit_identical(family, tiny_model_dir, tmp_path):
    src = tiny_model_dir(family, "diffusers")
    single, folder = tmp_path / "model.safetensors", tmp_path / "again"
    assert convert_tool.main([str(src), str(single)]) == 0
    assert convert_tool.main([str(single), str(folder), "--use_safetensors", "--reference_model", str(src)]) == 0
    _assert_same_tensors(_folder_tensors(src), _folder_tensors(folder))
    # tokenizers came from --reference_model
    assert (folder / "tokenizer" / "tokenizer.json").read_text() == (src / "tokenizer" / "tokenizer.json").read_text()


def test_convert_precision_change_file_to_file_and_ckpt(tiny_model_dir, tmp_path, capsys):
    src = tiny_model_dir("sd1", "single_file")
    half, ckpt = tmp_path / "half.safetensors", tmp_path / "model.ckpt"
    assert convert_tool.main([str(src), str(half), "--save_precision_as", "fp16"]) == 0
    orig, got = load_file(src), load_file(half)
    assert set(orig) == set(got)
    for k, v in orig.items():
        expect = v.half() if v.is_floating_point() else v
        assert got[k].dtype == expect.dtype and torch.equal(got[k], expect), k
    # .ckpt output keeps kohya's epoch / global_step; reading it back needs --allow_pickle
    assert convert_tool.main([str(half), str(ckpt), "--epoch", "3", "--global_step", "42"]) == 0
    obj = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert (obj["epoch"], obj["global_step"]) == (3, 42)
    _assert_same_tensors(got, obj["state_dict"])
    back = tmp_path / "back.safetensors"
    assert convert_tool.main([str(ckpt), str(back)]) == 1
    assert "--allow_pickle" in _one_error_line(capsys)
    assert not back.exists()
    assert convert_tool.main([str(ckpt), str(back), "--allow_pickle"]) == 0
    _assert_same_tensors(got, load_file(back))


def test_convert_writes_metadata_and_show_metadata_prints_json(tiny_model_dir, tmp_path, capsys):
    src = tiny_model_dir("sd2", "single_file")
    out = tmp_path / "named.safetensors"
    assert convert_tool.main([str(src), str(out), "--metadata", "{'name': 'my model', 'resolution': 768}"]) == 0
    capsys.readouterr()
    assert show_tool.main([str(out)]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["name"] == "my model" and meta["resolution"] == "768"
    assert meta["sdtk.model_config"]["family"] == "sd2"  # JSON-valued entries are parsed
    assert show_tool.main(["--model", str(out), "--raw"]) == 0  # kohya's spelling
    raw = json.loads(capsys.readouterr().out)
    assert isinstance(raw["sdtk.model_config"], str)


def test_convert_v_parameterization_reaches_the_scheduler_config(tiny_model_dir, tmp_path):
    src = tiny_model_dir("sd2", "single_file")
    out = tmp_path / "v"
    args = [str(src), str(out), "--v2", "--v_parameterization", "--tokenizer_cache_dir", str(_tok_dir(src))]
    assert convert_tool.main(args) == 0
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction"
    single = tmp_path / "v.safetensors"
    assert convert_tool.main([str(src), str(single), "--v_parameterization"]) == 0
    with safe_open(str(single), "pt") as f:
        assert json.loads(f.metadata()["sdtk.model_config"])["scheduler"]["prediction_type"] == "v_prediction"


def test_convert_overwrites_existing_output_atomically(tiny_model_dir, tmp_path):
    src = tiny_model_dir("sd1", "single_file")
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"old contents")
    assert convert_tool.main([str(src), str(out)]) == 0
    _assert_same_tensors(load_file(src), load_file(out))
    assert _no_temp_files(tmp_path)


def test_convert_to_diffusers_without_tokenizers_fails_cleanly(tiny_model_dir, tmp_path, capsys):
    src = tiny_model_dir("sdxl", "single_file")
    out = tmp_path / "folder"
    assert convert_tool.main([str(src), str(out)]) == 1
    line = _one_error_line(capsys)
    assert "--tokenizer_cache_dir" in line and "--reference_model" in line
    assert not out.exists() and _no_temp_files(tmp_path)


@pytest.mark.parametrize("extra, expected", [
    (["--variant", "fp16"], "not supported"),
    (["--v1", "--v2"], "--v1 and --v2"),
    (["--fp16", "--save_precision_as", "bf16"], "conflicting precision"),
    (["--metadata", "__import__('os')"], "--metadata"),
])
def test_convert_rejects_bad_flags(extra, expected, tiny_model_dir, tmp_path, capsys):
    src = tiny_model_dir("sd1", "single_file")
    out = tmp_path / "out.safetensors"
    assert convert_tool.main([str(src), str(out), *extra]) == 1
    assert expected in _one_error_line(capsys)
    assert not out.exists()


# -------------------------------------------------------------------------------------- merge
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_merge_is_the_weighted_sum(family, tiny_model_dir, tmp_path):
    from tools.make_tiny_model import make_tiny_model
    from library.models.families import Family

    a = tiny_model_dir(family, "single_file")
    b = make_tiny_model(Family(family), "single_file", tmp_path / "b.safetensors", seed=1)
    out = merge_tool.main(["--models", str(a), str(b), "--ratios", "0.25", "0.75", "--output", str(tmp_path / "m")])
    assert out == 0
    ta, tb, tm = load_file(a), load_file(b), load_file(tmp_path / "m.safetensors")
    assert set(tm) == set(ta)
    differing = 0
    for k, va in ta.items():
        if va.is_floating_point():
            expect = 0.25 * va.float() + 0.75 * tb[k].float()
            differing += not torch.equal(va, tb[k])
        else:
            expect = va
        assert tm[k].dtype == expect.dtype and torch.equal(tm[k], expect), k
    assert differing > len(ta) // 2  # the two models really differ
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f, safe_open(str(a), "pt") as g:
        assert f.metadata()["sdtk.model_config"] == g.metadata()["sdtk.model_config"]


def test_merge_unet_only_fp16_and_default_ratios(tiny_model_dir, tmp_path):
    from library.models.loading import load_models
    from tools.make_tiny_model import make_tiny_model
    from library.models.families import Family

    a = tiny_model_dir("sd2", "single_file")
    b = make_tiny_model(Family.SD2, "single_file", tmp_path / "b.safetensors", seed=1)
    out = tmp_path / "m.safetensors"
    assert merge_tool.main(["--models", str(a), str(b), "--output", str(out), "--unet_only",
                            "--saving_precision", "fp16"]) == 0
    ta, tb, tm = load_file(a), load_file(b), load_file(out)
    for k, va in ta.items():
        if not va.is_floating_point():
            continue
        if k.startswith("model.diffusion_model."):
            expect = (0.5 * va.float() + 0.5 * tb[k].float()).half()
        else:
            expect = va.half()
        assert torch.equal(tm[k], expect), k
    model = load_models(str(out), dtype=None, with_tokenizers=False)  # the result is a loadable model
    assert model.family.value == "sd2"


def test_merge_refuses_mixed_families(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    args = ["--models", str(tiny_model_dir("sd1", "single_file")), str(tiny_model_dir("sdxl", "single_file")),
            "--output", str(out)]
    assert merge_tool.main(args) == 1
    line = _one_error_line(capsys)
    assert "different families" in line and "SD1.x" in line and "SDXL" in line
    assert not out.exists() and _no_temp_files(tmp_path)


@pytest.mark.parametrize("extra, expected", [
    (["--ratios", "1"], "--ratios"),
    (["--device", "no_such_device"], "--device"),
    pytest.param(["--device", "cuda"], "CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_merge_rejects_bad_flags(extra, expected, tiny_model_dir, tmp_path, capsys):
    a = str(tiny_model_dir("sd1", "single_file"))
    assert merge_tool.main(["--models", a, a, "--output", str(tmp_path / "m"), *extra]) == 1
    assert expected in _one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------- bad input
def _bad_input(kind: str, tmp_path: Path, tiny_model_dir) -> Path:
    if kind == "missing":
        return tmp_path / "nope.safetensors"
    p = tmp_path / f"{kind}.safetensors"
    if kind == "random_bytes":
        p.write_bytes(os.urandom(4096))
    elif kind == "truncated":
        data = tiny_model_dir("sd1", "single_file").read_bytes()
        p.write_bytes(data[: len(data) // 2])
    elif kind == "lora":
        save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
                   "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4)}, str(p))
    return p


BAD = ["missing", "random_bytes", "truncated", "lora"]


@pytest.mark.parametrize("kind", BAD)
@pytest.mark.parametrize("tool", ["convert_file", "convert_folder", "merge", "show_metadata"])
def test_bad_inputs_give_one_error_line(tool, kind, tmp_path, tiny_model_dir, capsys):
    bad = _bad_input(kind, tmp_path, tiny_model_dir)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    if tool == "convert_file":
        rc = convert_tool.main([str(bad), str(out_dir / "o.safetensors")])
    elif tool == "convert_folder":
        rc = convert_tool.main([str(bad), str(out_dir / "o"), "--tokenizer_cache_dir", str(tmp_path)])
    elif tool == "merge":
        good = str(tiny_model_dir("sd1", "single_file"))
        rc = merge_tool.main(["--models", good, str(bad), "--output", str(out_dir / "o.safetensors")])
    else:
        if kind == "lora":
            pytest.skip("a LoRA has readable metadata")
        rc = show_tool.main([str(bad)])
    assert rc == 1
    line = _one_error_line(capsys)
    assert str(bad.name) in line
    if kind == "lora" and tool != "show_metadata":
        assert "LoRA" in line
    assert list(out_dir.iterdir()) == []


def test_sdxl_file_with_v2_is_refused(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    assert convert_tool.main([str(tiny_model_dir("sdxl", "single_file")), str(out), "--v2"]) == 1
    assert "--v2" in _one_error_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize("tool", ["convert_file", "convert_folder", "merge"])
def test_unwritable_output_is_refused(tool, tmp_path, tiny_model_dir, capsys):
    src = tiny_model_dir("sd1", "single_file")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = blocker / "sub" / ("o" if tool == "convert_folder" else "o.safetensors")
    if tool == "merge":
        rc = merge_tool.main(["--models", str(src), str(src), "--output", str(out)])
    else:
        rc = convert_tool.main([str(src), str(out), "--tokenizer_cache_dir", str(_tok_dir(src))])
    assert rc == 1
    assert "error:" in _one_error_line(capsys)
    assert blocker.read_text() == "not a folder" and sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_read_only_output_folder_is_refused(tmp_path, tiny_model_dir, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert convert_tool.main([str(tiny_model_dir("sd1", "single_file")), str(ro / "o.safetensors")]) == 1
        assert "not writable" in _one_error_line(capsys)
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o700)


def test_show_metadata_rejects_non_safetensors(tiny_model_dir, capsys):
    folder = tiny_model_dir("sd1", "diffusers")
    assert show_tool.main([str(folder / "model_index.json")]) == 1
    assert "not a .safetensors file" in _one_error_line(capsys)


def test_streaming_safetensors_writer_round_trips_every_dtype(tmp_path):
    tensors = {
        "half": torch.randn(3, 5).half(), "bf16": torch.randn(7).bfloat16(), "f32": torch.randn(2, 2, 1, 1),
        "ids": torch.arange(77).reshape(1, 77), "flag": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }
    entries = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    out = tmp_path / "s.safetensors"
    merge_tool.write_safetensors_streaming(out, entries, tensors.__getitem__, {"a": "b"})
    _assert_same_tensors(tensors, load_file(out))
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"a": "b"}
    with pytest.raises(Exception, match="announced"):  # a producer that breaks its promise leaves no file
        merge_tool.write_safetensors_streaming(tmp_path / "bad.safetensors", entries, lambda k: tensors["f32"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.safetensors"]

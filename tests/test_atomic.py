"""The one atomic-write helper every file write goes through."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from library.errors import ModelSaveError
from library.utils.atomic import atomic_dir, atomic_write, save_safetensors, write_text


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_files_get_normal_permissions(tmp_path):
    save_safetensors({"a": torch.ones(3)}, tmp_path / "a.safetensors")
    write_text(tmp_path / "b.txt", "hi")
    for name in ("a.safetensors", "b.txt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert torch.equal(load_file(tmp_path / "a.safetensors")["a"], torch.ones(3))


def test_failed_write_keeps_previous_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "t.txt"
    write_text(target, "old")

    def half_then_crash(tmp):
        tmp.write_text("partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, half_then_crash)
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["t.txt"]


def test_atomic_dir_replaces_whole_folder(tmp_path):
    target = tmp_path / "state"
    with atomic_dir(target) as d:
        (d / "one").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as d:
            (d / "two").write_text("2")
            raise RuntimeError("crash while writing")
    assert sorted(os.listdir(target)) == ["one"]
    with atomic_dir(target) as d:
        (d / "two").write_text("2")
    assert sorted(os.listdir(target)) == ["two"]
    assert sorted(os.listdir(tmp_path)) == ["state"]


def test_parent_that_is_a_file_gives_a_clear_error(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ModelSaveError, match="cannot create folder"):
        write_text(tmp_path / "f" / "out.txt", "y")

"""Helpers for the trainer tests: tiny datasets, argument lists, running train_network in-process.

Not a pytest plugin: import from tests (``from tests.trainer_fixtures import ...``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file

from tests.data_fixtures import copy_photo

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def make_dataset(root: Path, names=PHOTOS, repeats: int = 1, token: str = "sks") -> Path:
    """A kohya DreamBooth folder ``root/<repeats>_<token>/`` with small real photos and captions."""
    folder = root / f"{repeats}_{token}"
    for n in names:
        p = copy_photo(n, folder, max_side=96)
        p.with_suffix(".caption").write_text(f"a photo of {token} {n}", encoding="utf-8")
    return root


def train_argv(model: Path, data: Path, out: Path, *extra: str, steps: int = 4, name: str = "lora") -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--resolution", "64",
        "--output_dir", str(out), "--output_name", name, "--network_module", "networks.lora",
        "--network_dim", "4", "--network_alpha", "1", "--max_train_steps", str(steps), "--learning_rate", "1e-3",
        "--seed", "7", "--max_data_loader_n_workers", "0", *extra,
    ]


def run_in_process(argv: list[str]) -> int:
    """``train_network.main(argv)`` in this process (accelerate's process-wide state reset first)."""
    from tests.helpers_resume import run_script_in_process

    return run_script_in_process("train_network", argv)


def run_subprocess(argv: list[str], timeout: float = 120, launcher: list[str] | None = None,
                   env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = (launcher or [sys.executable]) + [str(ROOT / "train_network.py"), *argv]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)


def lora_tensors(path: Path) -> dict:
    return load_file(str(path))


def lora_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def assert_same_tensors(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0.0:
            assert (a[k] == b[k]).all(), f"{k} differs"
        else:
            diff = (a[k].float() - b[k].float()).abs().max().item()
            assert diff <= atol, f"{k} differs by {diff}"


def unet_out(m, seed: int = 0):
    """The UNet output of a tiny model (SD1/SD2/SDXL) for fixed random inputs; no gradients."""
    import torch

    from library.models.families import Family

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 77, m.unet.config.cross_attention_dim, generator=g)
    kw = {}
    if m.family is Family.SDXL:
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 64, generator=g), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        return m.unet(x, torch.tensor([500]), ctx, **kw).sample

"""Helpers of the fullsize tests: running an entry script, training arguments, checks of LoRAs, images, caches."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def script_env() -> dict[str, str]:
    """Offline, two threads (both cores: the full-size runs are compute bound), sdtk's test cache."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "2",
            "PYTHONUNBUFFERED": "1"}


def run_script(script: str, *args: object, timeout: float = 400) -> str:
    """Run ``python <script> <args>`` from the repository root; it must exit 0 with no traceback.

    Returns the combined stdout and stderr.
    """
    return run_script_peak(script, *args, timeout=timeout)[0]


# The script runs under a small Python parent that reports its peak: a child of pytest would inherit
# pytest's own high-water mark in ru_maxrss (Linux carries it across fork and exec), this one only
# the small parent's.
_PEAK_PARENT = ("import os, subprocess, sys\n"
                "p = subprocess.Popen(sys.argv[2:])\n"
                "_, status, usage = os.wait4(p.pid, 0)\n"
                "p.returncode = code = os.waitstatus_to_exitcode(status)\n"
                "open(sys.argv[1], 'w').write(str(usage.ru_maxrss))\n"
                "sys.exit(code if code >= 0 else 128 - code)\n")


def run_script_peak(script: str, *args: object, timeout: float = 400) -> tuple[str, float]:
    """:func:`run_script`, also returning the script's peak resident memory in GiB."""
    cmd = [sys.executable, str(ROOT / script), *map(str, args)]
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        peak_file = Path(tmp) / "peak"
        with open(Path(tmp) / "out", "w+b") as fo, open(Path(tmp) / "err", "w+b") as fe:
            p = subprocess.Popen([sys.executable, "-c", _PEAK_PARENT, str(peak_file), *cmd], cwd=ROOT, stdout=fo,
                                 stderr=fe, env=script_env(), start_new_session=True)
            try:
                returncode = p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)  # the script too, not only its parent
                returncode = p.wait()
            fo.seek(0)
            fe.seek(0)
            out = fo.read().decode("utf-8", "replace") + fe.read().decode("utf-8", "replace")
        peak = int(peak_file.read_text()) / 2**20 if peak_file.exists() else float("nan")  # KiB on Linux
    print(f"{script}: {time.monotonic() - t0:.0f} s, peak RSS {peak:.1f} GiB")
    tail = "\n".join(out.splitlines()[-40:])
    assert returncode == 0, f"{script} exited {returncode}:\n{tail}"
    assert "Traceback" not in out, f"{script} printed a traceback:\n{out[-6000:]}"
    assert "loss=nan" not in out and "loss=inf" not in out, f"{script}: non-finite loss:\n{tail}"
    return out, peak


def train_args(model: Path, data: Path, out: Path, name: str, *extra: object) -> list[object]:
    """Two steps at 64 px, batch 1, rank 4 with alpha 4 (scale 1, so merged deltas are visible in fp16)."""
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", data, "--resolution", "64",
            "--output_dir", out, "--output_name", name, "--network_module", "networks.lora", "--network_dim", "4",
            "--network_alpha", "4", "--max_train_steps", "2", "--train_batch_size", "1", "--learning_rate", "1e-3",
            "--seed", "7", "--max_data_loader_n_workers", "0", *extra]


# two images from one gen_img run: the same seed with the LoRA on (--am 1) and off (--am 0)
PROMPTS = "a photo of sks astronaut --am 1 --d 5\na photo of sks astronaut --am 0 --d 5\n"


def lora_modules(sd: dict) -> dict[str, dict]:
    """``{module name: {suffix: tensor}}`` of a kohya LoRA state dict; every module must be complete."""
    mods: dict[str, dict] = {}
    for k, v in sd.items():
        name, suffix = k.split(".", 1)
        mods.setdefault(name, {})[suffix] = v
    for name, parts in mods.items():
        assert set(parts) == {"lora_down.weight", "lora_up.weight", "alpha"}, (name, sorted(parts))
    return mods


def gen_two_images(model: Path, lora: Path, tmp_path: Path, *extra: object) -> list[np.ndarray]:
    """gen_img.py with ``lora`` at 64 px, 3 steps: one image with the LoRA and one without, same seed."""
    from PIL import Image

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS, encoding="utf-8")
    out = tmp_path / "images"
    log = run_script("gen_img.py", "--ckpt", model, "--network_module", "networks.lora", "--network_weights", lora,
                     "--from_file", prompts, "--W", "64", "--H", "64", "--steps", "3", "--outdir", out, *extra)
    assert "2 image(s) written" in log
    files = sorted(out.glob("*.png"))
    assert len(files) == 2, files
    return [np.asarray(Image.open(f).convert("RGB")).astype(np.int16) for f in files]


def assert_images(images: list[np.ndarray], lora_changes_them: bool) -> None:
    for im in images:
        assert im.shape == (64, 64, 3)
        assert im.std() > 5, "a generated image is (nearly) constant"
    if lora_changes_them:
        changed = (images[0] != images[1]).any(axis=-1).mean()
        assert changed > 0.1, f"the LoRA changed only {changed:.1%} of the pixels"


def file_states(paths: list[Path]) -> dict[str, tuple[int, str]]:
    """``{name: (mtime_ns, sha256)}`` of files, to prove a later run left them untouched."""
    return {p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()) for p in paths}

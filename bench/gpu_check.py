"""GPU check (issue 12, item 4): SDXL LoRA at 1024 px on one NVIDIA GPU, low-memory recipe and default.

    python bench/gpu_check.py [--steps 8] [--json out.json]     # on a machine with a CUDA GPU
    python bench/gpu_check.py --dry                              # CPU, tiny SDXL model, 64 px: checks the plumbing

Each recipe runs in its own child process (a fresh CUDA context, so one recipe's peak does not
hide the other's) through ``sdxl_train_network``'s trainer. The model is the full-size SDXL base
UNet (sdtk's shipped config, random weights, built in memory, no file or network) with small text
encoders and a small VAE (the UNet sees its real 2048 + 1280 conditioning features; text-encoder
outputs and latents are cached before training, so the encoders' size does not matter). Settings:
UNet-only LoRA dim 4 / alpha 1, 1024 px, batch 1, ``--mixed_precision bf16``, ``--sdpa``,
``--cache_latents``, ``--cache_text_encoder_outputs``, AdamW, 4 photos of examples/quickstart.

Recipes: ``lowmem`` = ``--fp8_base --gradient_checkpointing`` (target: ``max_memory_allocated``
<= 8 GB), ``default`` = neither. Reported per recipe: it/s over steps 2..N (CUDA-synchronised wall
clock at the end of every optimizer step) and ``torch.cuda.max_memory_allocated`` /
``max_memory_reserved`` over the whole run and over the training phase (reset just before step 1).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RECIPES = {"lowmem": ["--fp8_base", "--gradient_checkpointing"], "default": []}
LOWMEM_TARGET_GB = 8.0


def _build(dry: bool, unet_dtype):
    """The benchmark model: full-size SDXL UNet (or the tiny test model with ``dry``)."""
    if dry:
        from library.models.families import Family
        from library.models.tiny import tiny_loaded_model

        return tiny_loaded_model(Family.SDXL)
    from bench_train_sdxl import build_model  # the same model as the CPU benchmark

    return build_model(unet_dtype)


def child(argv: list[str], result_path: Path, dry: bool) -> int:
    """Train in this process; write step times and CUDA memory figures to ``result_path``."""
    import torch

    import sdxl_train_network as script
    from library.config.args import parse_args
    from library.utils.logging import configure_logging

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    marks: list[float] = []
    mem: dict[str, float] = {}

    def gb(x: int) -> float:
        return round(x / 1e9, 3)

    def write() -> None:
        steps = [b - a for a, b in zip(marks, marks[1:])]
        if cuda:
            mem["max_allocated_gb"] = max(mem.get("max_allocated_gb", 0), gb(torch.cuda.max_memory_allocated()))
            mem["max_reserved_gb"] = max(mem.get("max_reserved_gb", 0), gb(torch.cuda.max_memory_reserved()))
        result_path.write_text(json.dumps({"step_seconds": steps, "memory": mem, "cuda": cuda,
                                           "device": torch.cuda.get_device_name() if cuda else "cpu"}))

    class Trainer(script.SdxlNetworkTrainer):
        def load_model(self):
            # --fp8_base builds the UNet in bf16 (as loading a half-precision checkpoint does), then quantizes
            return _build(dry, torch.bfloat16)

        def sample_images(self, s, steps, epoch):  # before step 1 and after every optimizer step
            if epoch is not None:
                return
            sync()
            marks.append(time.perf_counter())
            if cuda and len(marks) == 1:
                mem["before_training_max_allocated_gb"] = gb(torch.cuda.max_memory_allocated())
                write()  # keeps the whole-run peak so far
                torch.cuda.reset_peak_memory_stats()
            elif cuda:
                mem["training_max_allocated_gb"] = gb(torch.cuda.max_memory_allocated())
                mem["training_max_reserved_gb"] = gb(torch.cuda.max_memory_reserved())
            write()

    args = parse_args(script.SCRIPT, argv)
    configure_logging(args)
    Trainer(args).train()
    write()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--dry", action="store_true", help="tiny SDXL model at 64 px, 2 steps (runs on a CPU)")
    p.add_argument("--timeout", type=float, default=210, help="seconds per recipe before it is stopped")
    p.add_argument("--json", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    o, rest = p.parse_known_args(argv)
    if o.child:
        return child(rest, Path(o.child), o.dry)
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_train_sdxl import make_dataset

    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    results: dict[str, dict] = {}
    try:
        data = make_dataset(work)
        steps = 2 if o.dry else o.steps
        for name in o.recipes:
            res = work / f"{name}.json"
            train = ["--train_data_dir", str(data), "--resolution", "64" if o.dry else "1024",
                     "--output_dir", str(work / name), "--output_name", "gpu_check", "--network_module",
                     "networks.lora", "--network_dim", "4", "--network_alpha", "1", "--network_train_unet_only",
                     "--max_train_steps", str(steps), "--learning_rate", "1e-4", "--optimizer_type", "AdamW",
                     "--mixed_precision", "bf16", "--train_batch_size", "1", "--cache_latents",
                     "--cache_text_encoder_outputs", "--seed", "1", "--max_data_loader_n_workers", "0", "--sdpa",
                     "--console_log_level", "WARNING", *RECIPES[name]]
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(res), *(["--dry"] if o.dry else []),
                   *train]
            t0 = time.time()
            try:
                rc = subprocess.run(cmd, cwd=ROOT, timeout=o.timeout,
                                    env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
            r = json.loads(res.read_text()) if res.is_file() else {"step_seconds": [], "memory": {}}
            later = r["step_seconds"][1:]
            r.update(recipe=name, flags=RECIPES[name], returncode=rc, wall_s=round(time.time() - t0, 1),
                     it_per_s=round(len(later) / sum(later), 3) if later else None)
            if name == "lowmem" and "training_max_allocated_gb" in r["memory"]:
                r["lowmem_target_met"] = r["memory"]["max_allocated_gb"] <= LOWMEM_TARGET_GB
            results[name] = r
            print(json.dumps(r), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if o.json:
        Path(o.json).write_text(json.dumps(results, indent=2))
    ok = all(r["returncode"] == 0 and r["step_seconds"] for r in results.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

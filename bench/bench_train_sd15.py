"""Benchmark: SD1.5 LoRA training step time and peak memory (issue #4, item 13).

    python bench/bench_train_sd15.py                       # reference settings, model built in a temp folder
    python bench/bench_train_sd15.py --model_dir /tmp/sd15_bench   # keep / reuse the model folder

Settings (the kohya reference was measured with the same ones): the full-size SD1.5 UNet
architecture with random weights, a small text encoder (width 768 so the UNet sees its real
cross-attention width, 2 layers) and a small VAE, saved as a diffusers model folder and loaded by
``train_network.py`` through ``--pretrained_model_name_or_path`` like a real model; LoRA dim 4
(UNet and text encoder, kohya's default); 256 px; batch 1; fp32 (``--mixed_precision no``);
AdamW; ``--cache_latents``; 10 steps. Reported: mean seconds per step over steps 2..10 and the
peak RSS of the training process (``ru_maxrss``, loading included).

The training runs in a child process (``--child``) through ``train_network``'s trainer; the
only change is a timing mark in the per-step sampling hook. Never part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KOHYA = {"s_per_step": 6.35, "peak_rss_mb": 7035}


def build_model_folder(folder: Path) -> Path:
    """Write the random-weight benchmark model as a diffusers folder (once; reused if present)."""
    if (folder / "model_index.json").exists():
        return folder
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from library.models.families import Family
    from library.models.loading import LoadedModel, _te_config_dict, shipped_model_config
    from library.models.saving import save_diffusers
    from library.models.tiny import build_tiny_model, scheduler_config, vae_config

    torch.manual_seed(0)
    tiny = build_tiny_model(Family.SD1)
    cfg = shipped_model_config(Family.SD1)
    unet = UNet2DConditionModel(**cfg["unet"]).eval().requires_grad_(False)
    tok = tiny.tokenizers[0]
    te = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=768 * 4,
                                      num_hidden_layers=2, num_attention_heads=12, max_position_embeddings=77,
                                      hidden_act="quick_gelu", bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).eval()
    model_cfg = {"family": "sd1", "unet": dict(unet.config), "vae": vae_config(Family.SD1),
                 "text_encoders": [{"cls": "CLIPTextModel", "config": _te_config_dict(te)}],
                 "scheduler": scheduler_config()}
    model = LoadedModel(Family.SD1, unet, tiny.vae, [te], [tok], scheduler_config(), False, model_cfg)
    save_diffusers(model, folder)
    return folder


def make_dataset(root: Path) -> Path:
    src = ROOT / "examples" / "quickstart" / "images"
    folder = root / "data" / "5_sks"
    folder.mkdir(parents=True, exist_ok=True)
    for img in sorted(src.glob("*.jpg"))[:4]:
        shutil.copyfile(img, folder / img.name)
        shutil.copyfile(img.with_suffix(".txt"), folder / (img.stem + ".caption"))
    return root / "data"


def child(argv: list[str], result_path: Path) -> int:
    """Run the training in this process; write step times and peak RSS to ``result_path``."""
    import train_network as script
    from library.config.args import parse_args
    from library.training.trainer import NetworkTrainer

    marks: list[float] = []

    class BenchTrainer(NetworkTrainer):
        def sample_images(self, s, steps, epoch):  # the loop calls this after every optimizer step
            if epoch is None:
                marks.append(time.perf_counter())

    args = parse_args(script.SCRIPT, argv)
    from library.utils.logging import configure_logging

    configure_logging(args)
    start = time.perf_counter()
    BenchTrainer(args).train()
    steps = [b - a for a, b in zip(marks, marks[1:])]  # marks[0]: before step 1; marks[i]: end of step i
    result_path.write_text(json.dumps({"step_seconds": steps, "total_seconds": time.perf_counter() - start,
                                       "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--model_dir", default=None, help="where to build (or find) the benchmark model folder")
    p.add_argument("--extra", action="append", default=[], help="extra train_network flag (repeatable)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help="also write the result to this JSON file")
    opts, rest = p.parse_known_args(argv)
    if opts.child:
        return child(rest, Path(opts.child))
    work = Path(tempfile.mkdtemp(prefix="bench_sd15_"))
    try:
        model_dir = build_model_folder(Path(opts.model_dir) if opts.model_dir else work / "model")
        data = make_dataset(work)
        train = ["--pretrained_model_name_or_path", str(model_dir), "--train_data_dir", str(data),
                 "--resolution", "256", "--output_dir", str(work / "out"), "--output_name", "bench",
                 "--network_module", "networks.lora", "--network_dim", "4", "--network_alpha", "1",
                 "--max_train_steps", str(opts.steps), "--learning_rate", "1e-4", "--optimizer_type", "AdamW",
                 "--mixed_precision", "no", "--train_batch_size", "1", "--cache_latents", "--seed", "1",
                 "--max_data_loader_n_workers", "0", "--sdpa", "--console_log_level", "WARNING", *opts.extra]
        result_file = work / "result.json"
        load_before = os.getloadavg()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(result_file), *train]
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if proc.returncode != 0:
            print(f"error: the training process failed with code {proc.returncode}", file=sys.stderr)
            return 1
        r = json.loads(result_file.read_text())
        steps = r["step_seconds"][1:]  # steps 2..N
        s_per_step = sum(steps) / len(steps)
        summary = {
            "s_per_step_2_to_n": round(s_per_step, 2), "peak_rss_mb": round(r["peak_rss_mb"]),
            "time_vs_kohya": round(s_per_step / KOHYA["s_per_step"], 2),
            "rss_vs_kohya": round(r["peak_rss_mb"] / KOHYA["peak_rss_mb"], 2),
            "step_seconds": [round(x, 2) for x in r["step_seconds"]], "extra_flags": opts.extra,
            "load_avg_before": [round(x, 2) for x in load_before],
            "load_avg_after": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count(),
        }
        print(json.dumps(summary, indent=2))
        if opts.json:
            Path(opts.json).write_text(json.dumps(summary, indent=2))
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

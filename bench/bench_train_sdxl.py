"""Benchmark: SDXL LoRA training step time and peak memory on the full-size SDXL UNet (issue #5, item 9).

    python bench/bench_train_sdxl.py                 # the reference settings
    python bench/bench_train_sdxl.py --extra=--fp8_base --extra=--gradient_checkpointing

Settings (the kohya reference was measured with the same ones): full-size SDXL UNet architecture
with random weights; small text encoders (TE1: 12 layers of width 768, TE2: 2 layers of width
1280, projection 1280, so the UNet sees its real 2048 + 1280 features) and a small VAE; UNet-only
LoRA, dim 4; 256 px; batch 1; fp32 (``--mixed_precision no``); AdamW; ``--cache_latents`` and
``--cache_text_encoder_outputs``; 10 steps. Reported: mean seconds per step over steps 2..10 and
the peak RSS of the training process (``ru_maxrss``), which includes building the model, and the
training phase's own peak (the kernel's VmHWM, reset just before step 1). ``--fp8_base`` runs build
the UNet in bf16 (as loading a half-precision checkpoint in its own dtype does) before quantizing.

The training runs in a child process (``--child``) through ``sdxl_train_network``'s trainer;
only its model loading is replaced, by building the random-weight model in memory (no 10 GB
file is written). The step times come from the loop's per-step hook.
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

KOHYA = {"s_per_step": 15.0, "peak_rss_mb": 12952}


def build_model(unet_dtype=None):
    """The random-weight benchmark model as a ``LoadedModel`` (full-size UNet, small TEs and VAE).

    ``unet_dtype`` (e.g. bfloat16 for the ``--fp8_base`` runs) builds the UNet's weights directly in
    that dtype, as loading a bf16/fp16 checkpoint in its own dtype would; default float32.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from library.models.families import Family
    from library.models.loading import LoadedModel, shipped_model_config
    from library.models.tiny import scheduler_config, tiny_tokenizer, vae_config

    torch.manual_seed(0)
    cfg = shipped_model_config(Family.SDXL)
    default = torch.get_default_dtype()
    torch.set_default_dtype(unet_dtype or torch.float32)
    try:
        unet = UNet2DConditionModel(**cfg["unet"])
    finally:
        torch.set_default_dtype(default)
    tok1, tok2 = tiny_tokenizer(), tiny_tokenizer(pad_token="!")

    def te(cls, tok, width, layers, heads):
        c = CLIPTextConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=width, num_hidden_layers=layers,
                           num_attention_heads=heads, max_position_embeddings=77, projection_dim=1280,
                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        return cls(c)

    te1 = te(CLIPTextModel, tok1, 768, 12, 12)
    te2 = te(CLIPTextModelWithProjection, tok2, 1280, 2, 20)
    vae = AutoencoderKL(**vae_config(Family.SDXL))
    for m in (unet, te1, te2, vae):
        m.eval().requires_grad_(False)
    sched = {**scheduler_config(), "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    return LoadedModel(Family.SDXL, unet, vae, [te1, te2], [tok1, tok2], sched)


def make_dataset(root: Path) -> Path:
    src = ROOT / "examples" / "quickstart" / "images"
    folder = root / "data" / "5_sks"
    folder.mkdir(parents=True)
    for img in sorted(src.glob("*.jpg"))[:4]:
        shutil.copyfile(img, folder / img.name)
        shutil.copyfile(img.with_suffix(".txt"), folder / (img.stem + ".caption"))
    return root / "data"


def child(argv: list[str], result_path: Path) -> int:
    """Run the training in this process and write step times and peak RSS to ``result_path``."""
    import sdxl_train_network as script
    from library.config.args import parse_args
    from library.utils.logging import configure_logging

    marks: list[tuple[float, float]] = []  # (wall, process CPU) at the end of each step
    rss: dict[str, float] = {}

    def peak_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def vm_hwm_mb() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def write() -> None:  # after every step, so a run cut short still reports its steps
        steps = [b[0] - a[0] for a, b in zip(marks, marks[1:])]
        cpu = [b[1] - a[1] for a, b in zip(marks, marks[1:])]
        result_path.write_text(json.dumps({"step_seconds": steps, "step_cpu_seconds": cpu, "peak_rss_mb": peak_mb(),
                                           "peak_rss_mb_at": rss}))

    class BenchTrainer(script.SdxlNetworkTrainer):
        def load_model(self):
            model = build_model(torch.bfloat16 if self.args.fp8_base else None)
            rss["after_model_build"] = peak_mb()
            return model

        def sample_images(self, s, steps, epoch):  # the loop calls this after every optimizer step
            if epoch is None:
                marks.append((time.perf_counter(), time.process_time()))
                if "before_step_1" not in rss:
                    rss["before_step_1"] = peak_mb()
                    # reset the kernel's peak-RSS mark (VmHWM): training's own peak is read at the end
                    Path("/proc/self/clear_refs").write_text("5")
                rss["training_peak"] = vm_hwm_mb()
                write()

    import torch

    args = parse_args(script.SCRIPT, argv)
    configure_logging(args)
    BenchTrainer(args).train()  # marks[0] is the call before training (step 0); marks[i] ends step i
    rss["training_peak"] = vm_hwm_mb()
    write()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--extra", action="append", default=[], help="extra sdxl_train_network flag (repeatable)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help="also write the result to this JSON file")
    opts, rest = p.parse_known_args(argv)
    if opts.child:
        return child(rest, Path(opts.child))
    work = Path(tempfile.mkdtemp(prefix="bench_sdxl_"))
    try:
        data = make_dataset(work)
        train = ["--train_data_dir", str(data), "--resolution", "256", "--output_dir", str(work / "out"),
                 "--output_name", "bench", "--network_module", "networks.lora", "--network_dim", "4",
                 "--network_alpha", "1", "--network_train_unet_only", "--max_train_steps", str(opts.steps),
                 "--learning_rate", "1e-4", "--optimizer_type", "AdamW", "--mixed_precision", "no",
                 "--train_batch_size", "1", "--cache_latents", "--cache_text_encoder_outputs", "--seed", "1",
                 "--max_data_loader_n_workers", "0", "--sdpa", "--console_log_level", "WARNING", *opts.extra]
        result_file = work / "result.json"
        load_before = os.getloadavg()
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(result_file), *train]
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if proc.returncode != 0:
            print(f"error: the training process failed with code {proc.returncode}", file=sys.stderr)
            if not result_file.is_file() or len(json.loads(result_file.read_text())["step_seconds"]) < 2:
                return 1
        r = json.loads(result_file.read_text())
        # resetting VmHWM before step 1 also resets ru_maxrss: the overall peak is the larger of the two phases
        r["peak_rss_mb"] = max(r["peak_rss_mb"], *r["peak_rss_mb_at"].values())
        steps = r["step_seconds"][1:]  # steps 2..N
        s_per_step = sum(steps) / len(steps)
        cpu_steps = r["step_cpu_seconds"][1:]
        summary = {
            "s_per_step_2_to_n": round(s_per_step, 2), "peak_rss_mb": round(r["peak_rss_mb"]),
            "time_vs_kohya": round(s_per_step / KOHYA["s_per_step"], 2),
            "rss_vs_kohya": round(r["peak_rss_mb"] / KOHYA["peak_rss_mb"], 2),
            "steps_done": len(r["step_seconds"]), "complete": proc.returncode == 0,
            "cpu_s_per_step_2_to_n": round(sum(cpu_steps) / len(cpu_steps), 2),
            "step_seconds": [round(x, 2) for x in r["step_seconds"]], "extra_flags": opts.extra,
            "peak_rss_mb_at": {k: round(v) for k, v in r["peak_rss_mb_at"].items()},
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

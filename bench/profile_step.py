"""Profile sdtk's training step on the peer's models (issue 12): per-step times, page faults, operators.

    python bench/profile_step.py --family sd1|sdxl [--steps 6] [--profile out.txt] [--extra "--gradient_checkpointing"]

Runs ``train_network.py`` / ``sdxl_train_network.py``'s trainer in this process with the flags of
``../shared/peer/compare_perf.py`` (LoRA dim 4 / alpha 1, 256 px, batch 1, fp32, AdamW, cached latents,
``--sdpa``, seed 42; SDXL: cached TE outputs, UNet only) on the random-weight models that
``setup_kohya.sh`` builds in ``$PEER`` (default ``~/peer``). Prints one line per optimizer step: wall
seconds, process CPU seconds and minor page faults of that step. ``--profile FILE`` runs
``torch.profiler`` over steps 3..N and writes the operator table (self CPU time) to FILE.
A/B the allocator with the environment, e.g. ``MALLOC_MMAP_THRESHOLD_=1048576``.
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def peer_flags(peer: Path, sdxl: bool, steps: int, out: str) -> list[str]:
    """compare_perf.py's command line (kept in step with it by hand)."""
    model = peer / "models" / ("sdxl_random" if sdxl else "sd1_random")
    flags = ["--pretrained_model_name_or_path", str(model), "--tokenizer_cache_dir", str(peer / "tokenizers"),
             "--dataset_config", str(peer / "data" / ("dataset_sdxl.toml" if sdxl else "dataset_sd1.toml")),
             "--network_module", "networks.lora", "--network_dim", "4", "--network_alpha", "1", "--resolution", "256",
             "--train_batch_size", "1", "--mixed_precision", "no", "--save_model_as", "safetensors", "--cache_latents",
             "--optimizer_type", "AdamW", "--learning_rate", "1e-4", "--lr_scheduler", "constant", "--seed", "42",
             "--sdpa", "--max_data_loader_n_workers", "0", "--output_dir", out, "--output_name", "p",
             "--max_train_steps", str(steps)]
    if sdxl:
        flags += ["--cache_text_encoder_outputs", "--network_train_unet_only"]
    return flags


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=["sd1", "sdxl"], default="sd1")
    p.add_argument("--peer", default=os.environ.get("PEER", os.path.expanduser("~/peer")))
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--extra", default="", help="flags added to the command line")
    p.add_argument("--profile", default=None, help="write torch.profiler's operator table of steps 3..N here")
    p.add_argument("--out", default="/tmp/sdtk_profile_out")
    p.add_argument("--no-tune", action="store_true", help="leave glibc's malloc at its defaults (A/B)")
    o = p.parse_args(argv)
    sdxl = o.family == "sdxl"
    if sdxl:
        import sdxl_train_network as script
        from sdxl_train_network import SdxlNetworkTrainer as base
    else:
        import train_network as script
        from library.training.trainer import NetworkTrainer as base
    import torch

    from library.config.args import parse_args
    from library.utils.logging import configure_logging

    if o.no_tune:
        import library.training.memory as memory

        memory._done = True  # tune_allocator() then does nothing
    t0 = time.perf_counter()
    marks: list[tuple[float, float, int, float]] = []
    prof: list = []

    def rss() -> str:
        st = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return ", ".join(f"{k} {int(st[k].split()[0]) / 1024:.0f} MB" for k in ("VmHWM", "RssAnon", "RssFile"))

    def mark() -> None:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        marks.append((time.perf_counter(), time.process_time(), ru.ru_minflt, ru.ru_stime))
        if len(marks) >= 2:
            a, b = marks[-2], marks[-1]
            print(f"\nstep {len(marks) - 1}: {b[0] - a[0]:.2f} s wall, {b[1] - a[1]:.2f} s CPU, "
                  f"({b[3] - a[3]:.2f} s in the kernel), {b[2] - a[2]} minor faults", flush=True)
        else:
            print(f"start -> first step: {marks[0][0] - t0:.1f} s; torch threads {torch.get_num_threads()}; "
                  f"{rss()}", flush=True)
        if o.profile and len(marks) == 3:
            prof.append(torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=False))
            prof[0].__enter__()

    class Trainer(base):
        def sample_images(self, s, steps, epoch):  # the loop calls this before step 1 and after every step
            if epoch is None:
                mark()

    args = parse_args(script.SCRIPT, peer_flags(Path(o.peer), sdxl, o.steps, o.out) + shlex.split(o.extra))
    configure_logging(args)
    Trainer(args).train()
    if prof:
        prof[0].__exit__(None, None, None)
        table = prof[0].key_averages().table(sort_by="self_cpu_time_total", row_limit=60)
        Path(o.profile).write_text(table)
        print(table[:6000])
    steps = [b[0] - a[0] for a, b in zip(marks, marks[1:])][1:]
    if steps:
        print(rss())
        print(f"mean s/step over steps 2..{len(steps) + 1}: {sum(steps) / len(steps):.2f}; peak RSS "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

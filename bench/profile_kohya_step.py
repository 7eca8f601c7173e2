"""The peer's side of bench/profile_step.py: kohya's trainer, same flags, same per-step report (issue 12).

    ~/peer/venv/bin/python bench/profile_kohya_step.py --family sd1|sdxl [--steps 6] [--profile out.txt]

Run it with kohya's interpreter (``$PEER/venv/bin/python``); it imports ``train_network`` /
``sdxl_train_network`` from ``$PEER/sd-scripts`` and hooks its ``sample_images`` (called after every
optimizer step) to print wall/CPU seconds and minor page faults per step, and to run
``torch.profiler`` over steps 3..N. The command line is :func:`bench.profile_step.peer_flags`'s.
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from profile_step import ROOT, peer_flags  # noqa: E402

sys.path.remove(str(ROOT))  # profile_step puts sdtk first; kohya's ``library`` must win here


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=["sd1", "sdxl"], default="sd1")
    p.add_argument("--peer", default=os.environ.get("PEER", os.path.expanduser("~/peer")))
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--extra", default="")
    p.add_argument("--profile", default=None)
    p.add_argument("--out", default="/tmp/kohya_profile_out")
    o = p.parse_args()
    peer = Path(o.peer)
    os.chdir(peer / "sd-scripts")
    sys.path.insert(0, str(peer / "sd-scripts"))
    import torch

    sdxl = o.family == "sdxl"
    if sdxl:
        import sdxl_train_network as script
        trainer_cls = script.SdxlNetworkTrainer
    else:
        import train_network as script
        trainer_cls = script.NetworkTrainer
    from library import train_util

    t0 = time.perf_counter()
    marks: list[tuple[float, float, int, float]] = []
    prof: list = []

    class Trainer(trainer_cls):
        def sample_images(self, accelerator, args, epoch, global_step, *rest):
            if epoch is not None and global_step != 0:
                return
            ru = resource.getrusage(resource.RUSAGE_SELF)
            marks.append((time.perf_counter(), time.process_time(), ru.ru_minflt, ru.ru_stime))
            if len(marks) >= 2:
                a, b = marks[-2], marks[-1]
                print(f"\nstep {len(marks) - 1}: {b[0] - a[0]:.2f} s wall, {b[1] - a[1]:.2f} s CPU, "
                      f"({b[3] - a[3]:.2f} s in the kernel), {b[2] - a[2]} minor faults", flush=True)
            else:
                print(f"start -> first step: {marks[0][0] - t0:.1f} s; torch threads {torch.get_num_threads()}",
                      flush=True)
            if o.profile and len(marks) == 3:
                prof.append(torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]))
                prof[0].__enter__()

    parser = script.setup_parser()
    args = parser.parse_args(peer_flags(peer, sdxl, o.steps, o.out) + shlex.split(o.extra))
    train_util.verify_command_line_training_args(args)
    args = train_util.read_config_from_file(args, parser)
    Trainer().train(args)
    if prof:
        prof[0].__exit__(None, None, None)
        table = prof[0].key_averages().table(sort_by="self_cpu_time_total", row_limit=60)
        Path(o.profile).write_text(table)
    steps = [b[0] - a[0] for a, b in zip(marks, marks[1:])][1:]
    if steps:
        print(f"mean s/step over steps 2..{len(steps) + 1}: {sum(steps) / len(steps):.2f}; peak RSS "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

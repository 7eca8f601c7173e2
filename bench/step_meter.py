"""Per-step wall/CPU/page-fault meter and profiler window shared by bench/profile_step.py (sdtk) and
bench/profile_kohya_step.py (the peer), so both tools are measured by the same code."""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path


def common_parser(description: str, out: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=["sd1", "sdxl"], default="sd1")
    p.add_argument("--peer", default=os.environ.get("PEER", os.path.expanduser("~/peer")))
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--extra", default="", help="flags added to the command line")
    p.add_argument("--profile", default=None, help="write torch.profiler's operator table of steps 3..N here")
    p.add_argument("--out", default=out)
    return p


def rss() -> str:
    """Peak and current resident memory of this process, from /proc (Linux)."""
    st = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return ", ".join(f"{k} {int(st[k].split()[0]) / 1024:.0f} MB" for k in ("VmHWM", "RssAnon", "RssFile"))


class StepMeter:
    """Call :meth:`mark` before step 1 and after every optimizer step; :meth:`finish` at the end."""

    def __init__(self, profile: str | None):
        self.t0 = time.perf_counter()
        self.profile_path = profile
        self.marks: list[tuple[float, float, int, float]] = []
        self.prof = None

    def mark(self) -> None:
        import torch

        ru = resource.getrusage(resource.RUSAGE_SELF)
        self.marks.append((time.perf_counter(), time.process_time(), ru.ru_minflt, ru.ru_stime))
        if len(self.marks) >= 2:
            a, b = self.marks[-2], self.marks[-1]
            print(f"\nstep {len(self.marks) - 1}: {b[0] - a[0]:.2f} s wall, {b[1] - a[1]:.2f} s CPU, "
                  f"({b[3] - a[3]:.2f} s in the kernel), {b[2] - a[2]} minor faults", flush=True)
        else:
            print(f"start -> first step: {self.marks[0][0] - self.t0:.1f} s; torch threads "
                  f"{torch.get_num_threads()}; {rss()}", flush=True)
        if self.profile_path and len(self.marks) == 3:  # steps 3..N: past the heap's growth in steps 1-2
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=False)
            self.prof.__enter__()

    def finish(self) -> None:
        if self.prof is not None:
            self.prof.__exit__(None, None, None)
            table = self.prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=60)
            Path(self.profile_path).write_text(table)
            print(table[:6000])
        steps = [b[0] - a[0] for a, b in zip(self.marks, self.marks[1:])][1:]
        if steps:
            print(rss())
            print(f"mean s/step over steps 2..{len(steps) + 1}: {sum(steps) / len(steps):.2f}; best step "
                  f"{min(steps):.2f}; peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")

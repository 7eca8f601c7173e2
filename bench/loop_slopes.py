#!/usr/bin/env python3
"""Per-round "loop" s/step of a ``bench/compare_kohya.py`` run, read from the progress bars in its logs.

    python bench/loop_slopes.py /tmp/cmpk-lora-sd1-XXXX      # the "logs in ..." folder it printed

compare_kohya.py's s/step is the slope of whole-process wall times between the N1- and the N2-step run
of each tool, so loading cancels only as far as it repeats; when a step takes 2-5 s a second of loading
noise moves that slope by 0.1-0.3 s/step. The progress bar's elapsed time (tqdm, ``N/N [mm:ss<...``,
whole seconds, so +-1 s per run) covers the training loop only; its slope between the two runs of a
round leaves loading, caching and saving out. Both tools print the same tqdm bar. Prints one line per
round and tool, and the ratio sdtk/kohya; a benchmark tool, imported by nothing.
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict
from pathlib import Path

_BAR = re.compile(r"(\d+)/(\d+) \[(\d+):(\d+)(?::(\d+))?<")
_LOG = re.compile(r"r(\d+)-(kohya|sdtk)-(\d+)\.log$")


def loop_seconds(text: str, steps: int) -> int | None:
    """Elapsed seconds of the last progress-bar update that shows ``steps/steps``."""
    found = None
    for m in _BAR.finditer(text):
        if int(m.group(1)) == steps and int(m.group(2)) == steps:
            a, b, c = m.group(3), m.group(4), m.group(5)
            found = int(a) * 3600 + int(b) * 60 + int(c) if c is not None else int(a) * 60 + int(b)
    return found


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    loops: dict[tuple[int, str], dict[int, int]] = defaultdict(dict)
    for log in sorted(Path(argv[0]).glob("r*-*.log")):
        m = _LOG.search(log.name)
        if not m:
            continue
        rnd, tool, steps = int(m.group(1)), m.group(2), int(m.group(3))
        secs = loop_seconds(log.read_text(errors="replace"), steps)
        if secs is None:
            print(f"{log}: no finished progress bar for {steps} steps", file=sys.stderr)
            continue
        loops[(rnd, tool)][steps] = secs
    for rnd in sorted({r for r, _ in loops}):
        slope = {}
        for tool in ("kohya", "sdtk"):
            runs = loops.get((rnd, tool), {})
            if len(runs) == 2:
                (n1, s1), (n2, s2) = sorted(runs.items())
                slope[tool] = (s2 - s1) / (n2 - n1)
                print(f"round {rnd}: {tool} loop {n1} steps {s1} s, {n2} steps {s2} s: {slope[tool]:.2f} s/step")
        if len(slope) == 2 and slope["kohya"] > 0:
            print(f"round {rnd}: loop s/step ratio sdtk/kohya {slope['sdtk'] / slope['kohya']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

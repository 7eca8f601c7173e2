"""Benchmark: time and peak memory of sdtk's single-file model loading at full size.

    .venv/bin/python bench/bench_load.py                      # SD1.5 and SDXL, fp16 and fp32 loads
    .venv/bin/python bench/bench_load.py --families sd1 --dtypes fp16

For each family, builds the real architecture (shipped configs) with random weights, tensor by
tensor, and writes it in the original single-file layout as fp16 ``.safetensors`` (like files from
model sites) into a temporary folder; the builder never holds more than one tensor. Each load then
runs in a fresh subprocess, which reports the seconds spent in
``load_models(path, dtype=..., with_tokenizers=False)`` and its peak RSS (``ru_maxrss``), compared
with the file's size. Target: peak RSS <= 1.3x the file size when loading in the file's dtype
(``--dtypes fp16``, ``dtype=None``); loading as fp32 doubles the weights by design.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET_RATIO = 1.3
NAMES = {"sd1": "SD1.5", "sd2": "SD2.x", "sdxl": "SDXL"}


def _rss_kb(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class _PeakSampler:
    """Samples this process's anonymous and file-backed RSS every few ms (``ru_maxrss`` has only the sum).

    File-backed pages (the memory-mapped checkpoint) can be dropped by the kernel under memory
    pressure, anonymous ones cannot; so the anonymous peak is the figure that predicts out-of-memory.
    """

    def __init__(self, interval: float = 0.02):
        import threading

        self.anon_kb = self.file_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)

    def _run(self, interval: float) -> None:
        while not self._stop.is_set():
            self.anon_kb = max(self.anon_kb, _rss_kb("RssAnon"))
            self.file_kb = max(self.file_kb, _rss_kb("RssFile"))
            self._stop.wait(interval)

    def __enter__(self) -> "_PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._run_once()

    def _run_once(self) -> None:
        self.anon_kb = max(self.anon_kb, _rss_kb("RssAnon"))
        self.file_kb = max(self.file_kb, _rss_kb("RssFile"))


def build_checkpoint(family_name: str, path: Path, seed: int = 0) -> int:
    """Write a random-weight fp16 checkpoint of the full-size ``family`` in the original layout.

    Returns the number of tensors. Models are created on the meta device only to learn the key
    names and shapes; each tensor's random values are generated while it is being written.
    """
    import torch

    from library.models.families import Family
    from library.models.loading import LoadedModel, _empty_models, shipped_model_config
    from library.models.saving import to_original_state_dict
    from tools.merge_models import write_safetensors_streaming

    family = Family(family_name)
    cfg = shipped_model_config(family)
    unet, vae, tes = _empty_models(cfg)
    model = LoadedModel(family, unet, vae, tes, [], cfg["scheduler"], False, cfg)
    layout = to_original_state_dict(model, dry_run=True)  # meta tensors: names and shapes only
    entries = [(k, torch.float16 if v.is_floating_point() else v.dtype, tuple(v.shape)) for k, v in layout.items()]
    gen = torch.Generator().manual_seed(seed)

    def produce(key: str) -> torch.Tensor:
        meta = layout[key]
        if not meta.is_floating_point():  # position ids
            return torch.arange(meta.numel(), dtype=meta.dtype).reshape(meta.shape)
        return torch.empty(meta.shape, dtype=torch.float16).uniform_(-0.05, 0.05, generator=gen)

    write_safetensors_streaming(path, entries, produce)
    return len(entries)


def child(path: str, dtype_name: str) -> None:
    """Runs in the measured subprocess: import, load once, print one JSON line."""
    import torch

    import diffusers.loaders.single_file_utils  # noqa: F401  (imported here so the baseline includes them)
    import transformers  # noqa: F401
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel  # noqa: F401

    from library.models.loading import load_models

    baseline = _rss_kb()
    dtype = {"fp16": None, "float": torch.float32}[dtype_name]
    sampler = _PeakSampler().__enter__()
    t0 = time.perf_counter()
    model = load_models(path, dtype=dtype, with_tokenizers=False)
    seconds = time.perf_counter() - t0
    peak_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    params = [p for m in [model.unet, model.vae, *model.text_encoders] for p in m.parameters()]
    assert not any(p.device.type == "meta" for p in params), "a tensor was left on the meta device"
    # Tensors may still be backed by the file's memory map, whose pages count only once read: touch
    # every weight (as training or moving to a GPU does) so the peak is what using the model costs.
    t1 = time.perf_counter()
    with torch.no_grad():
        for p in params:  # one element per 4 KiB page: reads every page, allocates almost nothing
            flat = p.detach().reshape(-1)
            assert bool(torch.isfinite(flat[:: max(1, 4096 // p.element_size())].float()).all()), "non-finite weights"
    read_s = time.perf_counter() - t1
    sampler.__exit__()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    print(json.dumps({"load_s": seconds, "first_read_s": read_s, "peak_rss_kb": peak, "baseline_rss_kb": baseline, "peak_after_load_kb": peak_load,
                      "peak_anon_kb": sampler.anon_kb, "peak_file_kb": sampler.file_kb,
                      "weights_bytes": weight_bytes, "dtype": str(params[0].dtype)}))


def measure(path: Path, dtype_name: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(path), "--dtype", dtype_name]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"load subprocess failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(families: list[str], dtypes: list[str], workdir: Path | None, keep: bool) -> list[dict]:
    rows = []
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.TemporaryDirectory(dir=workdir) if not keep else None
    folder = Path(tmp.name) if tmp else Path(workdir or tempfile.mkdtemp())
    try:
        for fam in families:
            path = folder / f"{fam}_random_fp16.safetensors"
            t0 = time.perf_counter()
            n = build_checkpoint(fam, path)
            build_s = time.perf_counter() - t0
            size = path.stat().st_size
            print(f"{NAMES[fam]}: wrote {n} tensors, {size / 2**30:.2f} GiB in {build_s:.0f} s "
                  f"(builder peak RSS so far {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB)",
                  flush=True)
            for dt in dtypes:
                r = measure(path, dt)
                r.update(family=NAMES[fam], load_dtype=dt, file_bytes=size, ratio=r["peak_rss_kb"] * 1024 / size,
                         net_ratio=(r["peak_rss_kb"] - r["baseline_rss_kb"]) * 1024 / size)
                rows.append(r)
                print(format_row(r), flush=True)
    finally:
        if tmp:
            tmp.cleanup()
    return rows


def format_row(r: dict) -> str:
    gib = 2**30
    return (f"| {r['family']} | {r['file_bytes'] / gib:.2f} GiB | {r['load_dtype']} | {r['load_s']:.1f} s + {r['first_read_s']:.1f} s "
            f"| {r['peak_rss_kb'] * 1024 / gib:.2f} GiB | {r['baseline_rss_kb'] * 1024 / gib:.2f} GiB "
            f"| {r['ratio']:.2f}x | {r['net_ratio']:.2f}x | {r['peak_after_load_kb'] * 1024 / gib:.2f} GiB "
            f"| {r['peak_anon_kb'] * 1024 / gib:.2f} / {r['peak_file_kb'] * 1024 / gib:.2f} GiB |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", default=["sd1", "sdxl"], choices=list(NAMES))
    p.add_argument("--dtypes", nargs="+", default=["fp16", "float"], choices=["fp16", "float"],
                   help="fp16: load in the file's dtype (dtype=None); float: convert to fp32 while loading")
    p.add_argument("--workdir", type=Path, default=None, help="folder for the temporary checkpoints (needs ~8 GB)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints (in --workdir)")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="fp16", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.dtype)
        return 0
    print("| model | file | load dtype | load + first read of all weights | peak RSS | RSS after imports | peak/file | (peak-imports)/file "
          "| peak RSS before touching weights | peak anon / file-backed RSS |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rows = run(args.families, args.dtypes, args.workdir, args.keep)
    if args.json:
        from library.utils.atomic import write_json

        write_json(args.json, rows)
    worst = max((r["ratio"] for r in rows if r["load_dtype"] == "fp16"), default=0.0)
    print(f"worst peak RSS / file size when loading in the file's dtype: {worst:.2f}x (target <= {TARGET_RATIO}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

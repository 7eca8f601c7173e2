"""Benchmark resize_lora and extract_lora_from_models on the full-size SDXL architecture (random weights), CPU.

    python bench/bench_lora_tools.py --workdir /tmp/sdtk_bench_lora [--threads 2] [--keep]

Builds, without ever holding a model in memory (tensors are generated and written one at a time):

* ``base.safetensors`` / ``tuned.safetensors``: SDXL base 1.0 single files (original layout, fp16,
  ~6.9 GB each) with random weights; tuned = base + N(0, 0.01) on every UNet and text-encoder
  weight, so the text encoders differ by more than ``--min_diff`` and are extracted too;
* ``lora_r32.safetensors``: a random rank-32 kohya LoRA over kohya's SDXL targets (fp16).

Then runs each tool in its own process and reports wall time and that process's peak RSS:
``resize_lora --new_rank 16``, ``resize_lora --dynamic_method sv_fro --dynamic_param 0.9``, and
``extract_lora_from_models --dim 32`` (``--save_precision fp16``).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from library.models.families import Family  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _meta_model():
    """Full-size SDXL components on the meta device (no memory), as a LoadedModel."""
    import transformers
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from library.models.loading import LoadedModel, shipped_model_config

    cfg = shipped_model_config(Family.SDXL)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(cfg["unet"])
        vae = AutoencoderKL.from_config(cfg["vae"])
        tes = [getattr(transformers, t["cls"])(transformers.CLIPTextConfig(**t["config"])) for t in cfg["text_encoders"]]
    return LoadedModel(Family.SDXL, unet, vae, tes, [], cfg["scheduler"], False, cfg)


def _randn(key: str, shape, salt: int, std: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()) * 7 + salt)
    return torch.randn(shape, generator=g) * std


def make_checkpoints(work: Path) -> None:
    from library.models.saving import to_original_state_dict
    from tools.merge_models import write_safetensors_streaming

    model = _meta_model()
    meta_sd = to_original_state_dict(model, dry_run=True)
    entries = [(k, torch.float16, tuple(v.shape)) for k, v in meta_sd.items()]
    meta = {"sdtk.model_config": json.dumps(model.model_config)}
    perturbed = ("model.diffusion_model.", "conditioner.")

    def base(key: str) -> torch.Tensor:
        return _randn(key, meta_sd[key].shape, 0, 0.02)

    def tuned(key: str) -> torch.Tensor:
        w = base(key)
        if key.startswith(perturbed):
            w = w + _randn(key, w.shape, 1, 0.01)
        return w

    for name, fn in (("base", base), ("tuned", tuned)):
        t0 = time.time()
        write_safetensors_streaming(work / f"{name}.safetensors", entries, lambda k, fn=fn: fn(k).half(), meta)
        print(f"wrote {name}.safetensors ({len(entries)} tensors) in {time.time() - t0:.0f} s", flush=True)


def make_lora(work: Path, rank: int = 32) -> None:
    from safetensors.torch import save_file

    from library.models.loading import shipped_model_config
    from networks.extract_lora_from_models import target_modules

    sd = {}
    for name, _, _, shape in target_modules(shipped_model_config(Family.SDXL), rank, None):
        out_dim, in_dim = shape[0], int(torch.tensor(shape[1:]).prod())
        sd[f"{name}.lora_down.weight"] = _randn(name, (rank, in_dim), 2, in_dim ** -0.5).reshape(rank, *shape[1:]).half()
        up = _randn(name, (out_dim, rank), 3, 0.01)
        sd[f"{name}.lora_up.weight"] = (up.reshape(out_dim, rank, 1, 1) if len(shape) == 4 else up).half()
        sd[f"{name}.alpha"] = torch.tensor(float(rank / 2)).half()
    save_file(sd, str(work / f"lora_r{rank}.safetensors"), {"ss_network_dim": str(rank), "ss_base_model_version": "sdxl_base_v1-0"})
    print(f"wrote lora_r{rank}.safetensors ({len(sd) // 3} modules)", flush=True)


def measure(tool: str, argv: list[str]) -> None:
    """Run one tool in this process and print its time and peak RSS as JSON (child side)."""
    import importlib

    torch.set_num_threads(int(__import__("os").environ.get("SDTK_BENCH_THREADS", "1")))
    mod = importlib.import_module(f"networks.{tool}")
    t0 = time.time()
    rc = mod.main(argv)
    dt = time.time() - t0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("BENCH " + json.dumps({"tool": tool, "rc": rc, "seconds": round(dt, 1), "peak_rss_mb": round(rss_mb)}), flush=True)


def run_measured(tool: str, argv: list[str], threads: int) -> dict:
    env = dict(__import__("os").environ, SDTK_BENCH_THREADS=str(threads))
    r = subprocess.run([sys.executable, __file__, "--measure", tool, "--", *argv], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if line is None:
        raise RuntimeError(f"{tool} failed:\n{r.stderr[-3000:]}")
    res = json.loads(line[6:])
    print(json.dumps(res), flush=True)
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="/tmp/sdtk_bench_lora")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared; MKL threads oversubscribe badly)")
    p.add_argument("--keep", action="store_true", help="keep the generated files (else they are deleted)")
    p.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        measure(args.measure, args.rest)
        return 0
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    if not (work / "lora_r32.safetensors").exists():
        make_lora(work)
    if not (work / "tuned.safetensors").exists():
        make_checkpoints(work)
    results = [
        run_measured("resize_lora", ["--model", str(work / "lora_r32.safetensors"), "--save_to", str(work / "r16.safetensors"),
                                     "--new_rank", "16", "--save_precision", "fp16"], args.threads),
        run_measured("resize_lora", ["--model", str(work / "lora_r32.safetensors"), "--save_to", str(work / "dyn.safetensors"),
                                     "--new_rank", "32", "--dynamic_method", "sv_fro", "--dynamic_param", "0.9",
                                     "--save_precision", "fp16"], args.threads),
        run_measured("extract_lora_from_models", ["--model_org", str(work / "base.safetensors"), "--model_tuned",
                                                  str(work / "tuned.safetensors"), "--save_to", str(work / "x32.safetensors"),
                                                  "--dim", "32", "--save_precision", "fp16"], args.threads),
    ]
    print("RESULTS " + json.dumps(results))
    if not args.keep:
        for f in work.glob("*.safetensors"):
            f.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())

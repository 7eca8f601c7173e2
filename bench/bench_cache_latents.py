"""Latent-caching throughput: images/s at 512 px, tiny VAE and full-size SD VAE architecture (random weights).

    .venv/bin/python bench/bench_cache_latents.py [--images 16] [--threads 2]

Runs sdtk's real caching code (``library.data.latent_cache.cache_latents``, in-memory cache) over a
folder of generated 512x512 JPEGs, with ``vae_batch_size`` 1 and 4, and prints one row per setting.
Speed depends on the machine: compare rows from the same run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


def make_images(folder: Path, n: int) -> None:
    sub = folder / "1_bench"
    sub.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        # smooth random images (noise JPEGs would be unrealistically slow to decode)
        small = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((512, 512), Image.BICUBIC).save(sub / f"{i:03d}.jpg", quality=90)
        (sub / f"{i:03d}.txt").write_text("a photo")


def build_vae(kind: str):
    from diffusers import AutoencoderKL

    from library.models.families import Family
    from library.models.loading import shipped_model_config
    from library.models.tiny import vae_config

    cfg = vae_config(Family.SD1) if kind == "tiny" else shipped_model_config(Family.SD1)["vae"]
    torch.manual_seed(0)
    return AutoencoderKL.from_config(cfg).eval().requires_grad_(False)


def run(folder: Path, vae, vae_batch_size: int) -> float:
    from library.config.dataset_config import build_blueprint_for_args
    from library.data.dataset import build_dataset_group
    from library.data.latent_cache import cache_latents

    bp = build_blueprint_for_args({"train_data_dir": str(folder), "resolution": "512", "caption_extension": ".txt"})
    group = build_dataset_group(bp, seed=0)
    n = sum(len(d.samples) for d in group.datasets)
    t0 = time.perf_counter()
    with torch.no_grad():
        cache_latents(group, vae, vae_batch_size=vae_batch_size, to_disk=False)
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_images(folder, args.images)
        print(f"| VAE | vae_batch_size | images/s ({args.images} images, 512x512, {args.threads} threads) |")
        print("|---|---|---|")
        for kind in ("tiny", "full-size SD"):
            vae = build_vae("tiny" if kind == "tiny" else "full")
            run(folder, vae, 1)  # warm-up (allocator, kernels); not reported
            for bs in (1, 4):
                print(f"| {kind} | {bs} | {run(folder, vae, bs):.2f} |", flush=True)


if __name__ == "__main__":
    main()

"""Cache VAE latents to disk ahead of training (kohya's tools/cache_latents.py role).

    python tools/cache_latents.py --pretrained_model_name_or_path model.safetensors \\
        --train_data_dir data --resolution 1024 --enable_bucket --vae_batch_size 4 --skip_existing

Runs the same code as ``--cache_latents_to_disk`` during training, with a progress bar: each
image's latents go to ``<image stem>_<W>x<H>_sdtk.safetensors`` beside it (see
docs/dataset_guide.md). As in kohya, every image is re-encoded unless ``--skip_existing`` is
given; with it, files that are valid for the current settings and VAE are kept (stale ones are
always rebuilt) and ``--skip_cache_check`` keeps any existing file without checking it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.data.cli_args import add_dataset_arguments, dataset_args_mapping  # noqa: E402
from library.errors import SdtkError  # noqa: E402

logger = logging.getLogger("cache_latents")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", default=None, help="base model (file or diffusers folder)")
    p.add_argument("--v2", action="store_true", help="the model is SD2.x")
    p.add_argument("--v_parameterization", action="store_true", help="v-prediction model (accepted for kohya parity)")
    p.add_argument("--vae", default=None, help="use this VAE instead of the model's")
    p.add_argument("--tokenizer_cache_dir", default=None, help="kohya tokenizer cache folder")
    p.add_argument("--vae_batch_size", type=int, default=1, help="images per VAE call (one bucket per call)")
    p.add_argument("--no_half_vae", action="store_true", help="keep the VAE in fp32 under --mixed_precision")
    p.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"], help="VAE dtype")
    p.add_argument("--skip_existing", action="store_true", help="keep cache files that are valid for these settings")
    p.add_argument("--skip_cache_check", action="store_true", help="with --skip_existing: trust existing files unchecked")
    p.add_argument("--sdxl", action="store_true", help="accepted for kohya parity (the family is detected)")
    p.add_argument("--console_log_level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"])
    add_dataset_arguments(p)
    return p


def _vae_dtype(args: argparse.Namespace):
    import torch

    if args.no_half_vae or args.mixed_precision == "no":
        return torch.float32
    return torch.float16 if args.mixed_precision == "fp16" else torch.bfloat16


def cache_for_args(args: argparse.Namespace, vae=None):
    """Build the datasets from ``args`` and cache their latents with ``vae`` (loaded from the model if None)."""
    import torch

    from library.config.dataset_config import build_blueprint_for_args
    from library.data.dataset import build_dataset_group
    from library.data.latent_cache import cache_latents

    group = build_dataset_group(build_blueprint_for_args(dataset_args_mapping(args)), seed=args.seed or 0)
    if vae is None:
        from library.models.loading import load_models

        model = load_models(args.pretrained_model_name_or_path, v2=args.v2, v_parameterization=args.v_parameterization,
                            vae=args.vae, tokenizer_cache_dir=args.tokenizer_cache_dir)
        vae = model.vae
        del model
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vae = vae.to(device=device, dtype=_vae_dtype(args))
    return cache_latents(group, vae, vae_batch_size=args.vae_batch_size, to_disk=True,
                         skip_cache_check=args.skip_cache_check, rebuild=not args.skip_existing,
                         seed=args.seed or 0, progress=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.console_log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.pretrained_model_name_or_path is None:
            raise SdtkError("pass --pretrained_model_name_or_path (the model whose VAE encodes the images)")
        stats = cache_for_args(args)
    except SdtkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"cached latents: {stats.encoded} images encoded, {stats.reused} valid cache files kept")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Assign each image a bucket and cache its VAE latents before fine-tuning (kohya's script and flags).

    python finetune/prepare_buckets_latents.py images meta_cap.json meta_lat.json model.safetensors \\
        --max_resolution 512,512 --batch_size 4 --flip_aug

Reads ``in_json`` (captions from ``tools/merge_captions_to_metadata.py``), finds the images in
``train_data_dir``, and writes ``out_json``: the same metadata with each image's
``train_resolution`` (its bucket, kohya's bucketing for ``--max_resolution``) and ``image_size``
(its own size, which SDXL training uses as the original size). Then the latents of every image
are encoded with the model's VAE by sdtk's latent cache (the code ``--cache_latents_to_disk``
runs): ``<image stem>_<W>x<H>_sdtk.safetensors`` beside each image, which ``fine_tune.py
--in_json out_json --cache_latents_to_disk`` then reuses. (kohya writes ``.npz`` files here;
sdtk's cache files record what produced them, so stale ones are rebuilt.) All writes are atomic.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.errors import ConfigError, DatasetError, SdtkError  # noqa: E402

logger = logging.getLogger("prepare_buckets_latents")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("train_data_dir", help="folder of the training images")
    p.add_argument("in_json", help="metadata file to read (captions/tags)")
    p.add_argument("out_json", help="metadata file to write (with train_resolution and image_size)")
    p.add_argument("model_name_or_path", help="model whose VAE encodes the latents (file or diffusers folder)")
    p.add_argument("--v2", action="store_true", help="not used (kohya keeps it for compatibility)")
    p.add_argument("--batch_size", type=int, default=1, help="images per VAE call")
    p.add_argument("--max_data_loader_n_workers", type=int, default=None, help="accepted; images are read in turn")
    p.add_argument("--max_resolution", default="512,512", help="the largest bucket area, 'width,height'")
    p.add_argument("--min_bucket_reso", type=int, default=256, help="smallest bucket side")
    p.add_argument("--max_bucket_reso", type=int, default=1024, help="largest bucket side")
    p.add_argument("--bucket_reso_steps", type=int, default=64, help="bucket sides are multiples of this")
    p.add_argument("--bucket_no_upscale", action="store_true", help="make a bucket per image without upscaling")
    p.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"], help="VAE dtype")
    p.add_argument("--full_path", action="store_true", help="image keys are full paths (several image folders)")
    p.add_argument("--flip_aug", action="store_true", help="also cache the latents of the mirrored images")
    p.add_argument("--alpha_mask", type=str, default="", help="also cache the alpha channel as the loss mask")
    p.add_argument("--skip_existing", action="store_true", help="keep cache files that are valid for these settings")
    p.add_argument("--recursive", action="store_true", help="look for images in sub-folders too")
    return p


def _max_reso(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--max_resolution {text!r} must be 'width,height' (e.g. 512,512)") from None
    return w, h


def find_images(folder: Path, recursive: bool) -> list[Path]:
    from library.data.images import is_image_file

    if not folder.is_dir():
        raise DatasetError(f"train_data_dir {folder} is not a folder")
    files = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in files if p.is_file() and is_image_file(p))


def bucket_metadata(args: argparse.Namespace, images: list[Path], metadata: dict[str, dict]) -> dict[str, dict]:
    """``metadata`` with ``train_resolution`` and ``image_size`` for every image (keys as kohya forms them)."""
    from library.data.buckets import BucketManager
    from library.data.images import image_size

    manager = BucketManager(args.bucket_no_upscale, _max_reso(args.max_resolution), args.min_bucket_reso,
                            args.max_bucket_reso, args.bucket_reso_steps)
    if not args.bucket_no_upscale:
        manager.make_buckets()
    out = {k: dict(v) for k, v in metadata.items()}
    for path in images:
        key = str(path) if args.full_path else path.stem
        w, h = image_size(path)
        reso, _, _ = manager.select_bucket(w, h)
        entry = out.setdefault(key, {})
        entry["train_resolution"] = [reso[0] - reso[0] % 8, reso[1] - reso[1] % 8]  # latent units (kohya)
        entry["image_size"] = [w, h]
    return out


def run(args: argparse.Namespace, vae: Any = None) -> Any:
    """Write ``out_json`` and cache the latents; returns the cache statistics."""
    import torch

    from library.data.dataset import build_dataset_group
    from library.data.latent_cache import cache_latents
    from library.data.subsets import read_finetune_metadata
    from library.config.dataset_config import build_blueprint_for_args
    from library.utils.atomic import write_json

    in_json, out_json = Path(args.in_json), Path(args.out_json)
    if not in_json.is_file():
        raise DatasetError(f"in_json {in_json} does not exist; create it with tools/merge_captions_to_metadata.py")
    metadata, errors = read_finetune_metadata(in_json)
    if errors:
        raise DatasetError(errors[0] if len(errors) == 1 else "; ".join(errors[:3]))
    images = find_images(Path(args.train_data_dir), args.recursive)
    logger.info("found %d images", len(images))
    if not images:
        raise DatasetError(f"train_data_dir {args.train_data_dir} holds no images")
    write_json(out_json, bucket_metadata(args, images, metadata))
    logger.info("wrote %s", out_json)
    blueprint = build_blueprint_for_args({"train_data_dir": args.train_data_dir, "in_json": str(out_json),
                                          "flip_aug": args.flip_aug, "alpha_mask": bool(args.alpha_mask),
                                          "enable_bucket": True, "resolution": args.max_resolution,
                                          "min_bucket_reso": args.min_bucket_reso,
                                          "max_bucket_reso": args.max_bucket_reso,
                                          "bucket_reso_steps": args.bucket_reso_steps,
                                          "bucket_no_upscale": args.bucket_no_upscale})
    group = build_dataset_group(blueprint, seed=0)
    if vae is None:
        from library.models.loading import load_models

        vae = load_models(args.model_name_or_path, with_tokenizers=False).vae
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    vae = vae.to("cuda" if torch.cuda.is_available() else "cpu", dtype=dtype)
    return cache_latents(group, vae, vae_batch_size=args.batch_size, to_disk=True, rebuild=not args.skip_existing,
                         progress=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        stats = run(args)
    except SdtkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out_json}; latents: {stats.encoded} images encoded, {stats.reused} valid cache files kept")
    return 0


if __name__ == "__main__":
    sys.exit(main())

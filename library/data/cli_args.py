"""kohya's dataset command-line flags, for the data tools (cache_latents, check_dataset).

Defaults are ``None`` where kohya's dataset config falls back to its own defaults, so the
dataset config (``library.config.dataset_config``) decides them in one place.
"""

from __future__ import annotations

import argparse


def add_dataset_arguments(p: argparse.ArgumentParser) -> None:
    """Add the flags that describe the datasets (kohya names and meanings)."""
    g = p.add_argument_group("dataset (kohya flags)")
    g.add_argument("--dataset_config", default=None, help="dataset config TOML/JSON; overrides the folder flags")
    g.add_argument("--train_data_dir", default=None, help="folder of `N_class tokens` subfolders (or images with --in_json)")
    g.add_argument("--reg_data_dir", default=None, help="folder of regularization `N_class tokens` subfolders")
    g.add_argument("--in_json", default=None, help="fine-tuning metadata JSON (images in --train_data_dir)")
    g.add_argument("--conditioning_data_dir", default=None, help="ControlNet conditioning images (paired by stem)")
    g.add_argument("--resolution", default=None, help='training resolution "W,H" or "S"')
    g.add_argument("--train_batch_size", type=int, default=None, help="batch size")
    g.add_argument("--enable_bucket", action="store_true", help="aspect-ratio bucketing")
    g.add_argument("--min_bucket_reso", type=int, default=None, help="smallest bucket side (default 256)")
    g.add_argument("--max_bucket_reso", type=int, default=None, help="largest bucket side (default 1024)")
    g.add_argument("--bucket_reso_steps", type=int, default=None, help="bucket sides are multiples of this (default 64)")
    g.add_argument("--bucket_no_upscale", action="store_true", help="buckets follow image sizes, never upscaling")
    g.add_argument("--caption_extension", default=None, help='caption file extension (default ".caption")')
    g.add_argument("--caption_extention", default=None, help=argparse.SUPPRESS)  # kohya's old misspelling
    g.add_argument("--caption_separator", default=None, help='tag separator (default ",")')
    g.add_argument("--keep_tokens", type=int, default=None, help="leading tags kept in place (trigger tags)")
    g.add_argument("--max_token_length", type=int, default=None, choices=[75, 150, 225], help="caption token limit")
    g.add_argument("--flip_aug", action="store_true", help="random horizontal flips (flipped latents are cached too)")
    g.add_argument("--alpha_mask", action="store_true", help="use the alpha channel as a loss mask")
    g.add_argument("--random_crop", action="store_true", help="random instead of centre crops (not cacheable)")
    g.add_argument("--color_aug", action="store_true", help="colour augmentation (not cacheable)")
    g.add_argument("--resize_interpolation", default=None,
                   choices=["lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area"],
                   help="resize filter (default: area when shrinking, lanczos otherwise)")
    g.add_argument("--dataset_repeats", type=int, default=None, help="repeats of a fine-tuning dataset")
    g.add_argument("--seed", type=int, default=None, help="seed")


def dataset_args_mapping(args: argparse.Namespace) -> dict:
    """The namespace as the mapping ``build_blueprint_for_args`` reads (unset values dropped)."""
    return {k: v for k, v in vars(args).items() if v is not None}

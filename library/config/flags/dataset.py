"""Dataset, caption, augmentation, bucketing and caching flags.

Most of these can also be set per dataset or subset in a ``--dataset_config`` TOML; the
command-line value is the fallback for a dataset config's ``[general]`` section.
"""

from __future__ import annotations

from pathlib import Path

from library.config.flags.base import (
    DONE, TODO, F, at_least, between, float_pair, in_group, int_list, non_negative,
)

INTERPOLATIONS = ["lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area"]

FLAGS = in_group("dataset", [
    F("--dataset_config", Path, None, DONE,
      "Dataset config TOML (kohya's [general] / [[datasets]] / [[datasets.subsets]] schema)."),
    F("--train_data_dir", str, None, DONE,
      "Training images: a folder of 'N_name' subfolders (DreamBooth style, N = repeats) or, "
      "with --in_json, a folder of images with captions in metadata."),
    F("--reg_data_dir", str, None, DONE,
      "Regularization (class) images, same folder layout as --train_data_dir."),
    F("--in_json", str, None, DONE,
      "Metadata JSON with captions/tags per image (fine-tuning style dataset)."),
    F("--dataset_repeats", int, 1, DONE,
      "How many times each image of an --in_json dataset is repeated per epoch.", check=at_least(1)),
    F("--resolution", str, None, DONE,
      "Training resolution: 'SIZE' or 'WIDTH,HEIGHT' in pixels (e.g. 512 or 768,512).",
      check=int_list(",", (1, 2), 1)),
    F("--caption_extension", str, ".caption", DONE, "File extension of caption files next to images."),
    F("--caption_extention", str, None, DONE,
      "Misspelled alias of --caption_extension kept for old configs; it wins when given."),
    F("--shuffle_caption", bool, False, DONE, "Shuffle the comma-separated tags of each caption."),
    F("--caption_separator", str, ",", DONE, "Separator between caption tags."),
    F("--keep_tokens", int, 0, DONE,
      "Keep the first N tags in place when shuffling or dropping tags.", check=non_negative),
    F("--keep_tokens_separator", str, "", DONE,
      "Tags before this separator are kept in place (alternative to --keep_tokens)."),
    F("--secondary_separator", str, None, DONE,
      "Tags joined by this separator are shuffled and dropped as one tag."),
    F("--enable_wildcard", bool, False, DONE,
      "Expand {a|b|c} in captions by picking one option at random each time."),
    F("--caption_prefix", str, None, DONE, "Text added before every caption."),
    F("--caption_suffix", str, None, DONE, "Text added after every caption."),
    F("--caption_dropout_rate", float, 0.0, DONE,
      "Probability of training an image with an empty caption.", check=between(0, 1)),
    F("--caption_dropout_every_n_epochs", int, 0, DONE,
      "Use empty captions for every image in each N-th epoch (0 = never).", check=non_negative),
    F("--caption_tag_dropout_rate", float, 0.0, DONE,
      "Probability of dropping each tag of a caption.", check=between(0, 1)),
    F("--token_warmup_min", int, 1, DONE,
      "Tag warmup: start with this many tags per caption.", check=at_least(1)),
    F("--token_warmup_step", float, 0, DONE,
      "Tag warmup: reach the full caption after this many steps (a value < 1 is a ratio of "
      "the total steps; 0 = no warmup).", check=non_negative),
    F("--max_token_length", int, None, DONE,
      "Caption length in tokens: 75 (default), 150 or 225 (longer captions are split into "
      "chunks of 75). sdtk also accepts 75.", choices=[None, 75, 150, 225]),
    F("--color_aug", bool, False, DONE, "Randomly shift the hue of training images."),
    F("--flip_aug", bool, False, DONE, "Randomly mirror training images horizontally."),
    F("--random_crop", bool, False, DONE, "Crop at a random position instead of the center."),
    F("--face_crop_aug_range", str, None, DONE,
      "Face-centred crop augmentation: 'low,high' face-size scale range (needs face "
      "coordinates in the file names).", check=float_pair),
    F("--alpha_mask", bool, False, DONE,
      "Use the image's alpha channel as the loss mask (with --masked_loss)."),
    F("--enable_bucket", bool, False, DONE,
      "Group images into aspect-ratio buckets instead of cropping everything to one size."),
    F("--min_bucket_reso", int, 256, DONE, "Smallest bucket side in pixels.", check=at_least(1)),
    F("--max_bucket_reso", int, 1024, DONE, "Largest bucket side in pixels.", check=at_least(1)),
    F("--bucket_reso_steps", int, 64, DONE,
      "Bucket sides are multiples of this (64 recommended, 8 minimum).", check=at_least(1)),
    F("--bucket_no_upscale", bool, False, DONE,
      "Never upscale small images to fit a bucket; make a smaller bucket instead."),
    F("--resize_interpolation", str, None, DONE,
      "Interpolation used to resize images (default: area for downscaling, lanczos otherwise).",
      choices=INTERPOLATIONS),
    F("--cache_latents", bool, False, DONE,
      "Encode all images with the VAE once before training and keep the latents in memory "
      "(faster; disables color_aug and random_crop)."),
    F("--cache_latents_to_disk", bool, False, DONE,
      "Like --cache_latents, and store the latents in .npz files next to the images for later runs."),
    F("--skip_cache_check", bool, False, DONE,
      "Trust existing latent cache files without checking them."),
    F("--vae_batch_size", int, 1, DONE, "Batch size for encoding latents when caching.",
      check=at_least(1)),
    F("--cache_info", bool, False, DONE,
      "Cache the image sizes and captions of a dataset in a metadata file for faster startup."),
    F("--max_data_loader_n_workers", int, 8, DONE,
      "Data-loader worker processes (the actual number is at most the number of CPU cores; "
      "0 loads in the main process).", check=non_negative),
    F("--persistent_data_loader_workers", bool, False, DONE,
      "Keep data-loader workers alive between epochs (faster epoch starts, more memory)."),
    F("--prior_loss_weight", float, 1.0, DONE,
      "Loss weight of regularization images.", check=non_negative),
    F("--debug_dataset", bool, False, DONE, "Show the training images and captions instead of training."),
    F("--dataset_class", str, None, TODO, "Use a custom dataset class given as module.Class."),
    F("--conditioning_data_dir", str, None, DONE,
      "Conditioning images for ControlNet-style training."),
    F("--weighted_captions", bool, False, DONE,
      "Enable (word:1.2) attention weights in captions, as in AUTOMATIC1111 prompts."),
])

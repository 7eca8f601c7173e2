"""Typed parameters of datasets and subsets, after the dataset config has been validated.

Field names are kohya's option names (they are what users write in the dataset TOML).
``library.config.dataset_config`` validates a TOML/JSON config (or the command-line fallback)
and produces a :class:`Blueprint`; ``library.data`` builds the datasets from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

DatasetKind = Literal["dreambooth", "finetune", "controlnet"]


@dataclass
class SubsetParams:
    """One ``[[datasets.subsets]]`` entry with inheritance applied. ``kind`` says which options apply."""

    kind: DatasetKind
    image_dir: str | None = None
    num_repeats: int = 1
    shuffle_caption: bool = False
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str | None = None
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    color_aug: bool = False
    flip_aug: bool = False
    face_crop_aug_range: tuple[float, float] | None = None
    random_crop: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0
    custom_attributes: dict[str, Any] | None = None
    resize_interpolation: str | None = None
    alpha_mask: bool = False
    cache_info: bool = False
    # DreamBooth / ControlNet
    caption_extension: str = ".caption"
    # DreamBooth
    is_reg: bool = False
    class_tokens: str | None = None
    # fine-tuning
    metadata_file: str | None = None
    # ControlNet
    conditioning_data_dir: str | None = None


@dataclass
class DatasetParams:
    """One ``[[datasets]]`` entry with inheritance applied, and its subsets."""

    kind: DatasetKind
    subsets: list[SubsetParams] = field(default_factory=list)
    resolution: tuple[int, int] | None = None  # (width, height)
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    network_multiplier: float = 1.0
    resize_interpolation: str | None = None
    validation_seed: int | None = None
    validation_split: float = 0.0
    prior_loss_weight: float = 1.0
    debug_dataset: bool = False
    max_token_length: int | None = None


@dataclass
class Blueprint:
    """Everything needed to build the training datasets."""

    datasets: list[DatasetParams] = field(default_factory=list)

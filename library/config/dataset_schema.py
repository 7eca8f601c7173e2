"""The dataset-config options: one declaration each (type, range, levels, dataset kinds).

Names, levels and kinds follow kohya sd-scripts' ``config_util.ConfigSanitizer`` (kohya's
``docs/config_README-en.md``). Value checks are voluptuous validators whose messages read
``expected int, got '2a'``; :mod:`library.config.dataset_config` prefixes the location.

Levels: ``general`` = ``[general]``, ``dataset`` = ``[[datasets]]``, ``subset`` =
``[[datasets.subsets]]``. Kinds: ``dreambooth``, ``finetune``, ``controlnet``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from voluptuous import All, Invalid, Schema

GENERAL, DATASET, SUBSET = "general", "dataset", "subset"
ALL_LEVELS = frozenset({GENERAL, DATASET, SUBSET})
DATASET_LEVELS = frozenset({GENERAL, DATASET})
SUBSET_ONLY = frozenset({SUBSET})
GENERAL_ONLY = frozenset({GENERAL})
ALL_KINDS = frozenset({"dreambooth", "finetune", "controlnet"})
KIND_NAMES = {"dreambooth": "DreamBooth", "finetune": "fine-tuning", "controlnet": "ControlNet"}

# resize_interpolation names kohya accepts (its validate_interpolation_fn)
INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")


def show(value: Any) -> str:
    """A value as the user wrote it, for messages (``'2a'``, ``3.5``, ``true``, ``null``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    return repr(value)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _typed(expected: str, pred: Callable[[Any], bool], convert: Callable[[Any], Any] = lambda v: v):
    def check(value: Any) -> Any:
        if not pred(value):
            raise Invalid(f"expected {expected}, got {show(value)}")
        return convert(value)

    return check


BOOL = _typed("true or false", lambda v: isinstance(v, bool))
INT = _typed("int", _is_int)
NUMBER = _typed("number", _is_number)
STR = _typed("string", lambda v: isinstance(v, str))
TABLE = _typed("a table", lambda v: isinstance(v, dict))


def _at_least(n: float) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if value < n:
            raise Invalid(f"must be >= {n}, got {show(value)}")
        return value

    return check


def _rate(value: Any) -> float:
    if not 0.0 <= value <= 1.0:
        raise Invalid(f"must be between 0 and 1, got {show(value)}")
    return float(value)


def _pair(value: Any, item: Callable[[Any], bool], expected: str) -> tuple:
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(item(v) for v in value)):
        raise Invalid(f"expected {expected}, got {show(value)}")
    return tuple(value)


def _resolution(value: Any) -> tuple[int, int]:
    """``512`` -> ``(512, 512)``; ``[768, 512]`` -> ``(768, 512)`` (width, height)."""
    if _is_int(value):
        value = (value, value)
    else:
        value = _pair(value, _is_int, "an int or [width, height]")
    if min(value) <= 0:
        raise Invalid(f"must be positive, got {show(list(value))}")
    return value


def _face_crop(value: Any) -> tuple[float, float]:
    lo, hi = _pair(value, _is_number, "[low, high] numbers")
    if not 0 < lo <= hi:
        raise Invalid(f"expected 0 < low <= high, got {show(list(value))}")
    return float(lo), float(hi)


def _nonempty_str(value: Any) -> str:
    STR(value)
    if not value:
        raise Invalid("must not be empty")
    return value


def _interpolation(value: Any) -> str:
    STR(value)
    if value not in INTERPOLATIONS:
        raise Invalid(f"expected one of {', '.join(INTERPOLATIONS)}, got {show(value)}")
    return value


def _max_token_length(value: Any) -> int:
    if not _is_int(value) or value not in (75, 150, 225):
        raise Invalid(f"expected 75, 150 or 225, got {show(value)}")
    return value


def _validation_split(value: Any) -> float:
    NUMBER(value)
    if not 0.0 <= value < 1.0:
        raise Invalid(f"must be >= 0 and < 1, got {show(value)}")
    return float(value)


@dataclass(frozen=True)
class Option:
    """One dataset-config option.

    Attributes:
        name: kohya's option name.
        schema: validates and converts a value (raises ``voluptuous.Invalid``).
        levels: where it may be written.
        kinds: the dataset kinds it applies to.
        nullable: whether an explicit ``null`` (JSON) is a valid value (it overrides inheritance).
        target: ``"subset"`` (SubsetParams) or ``"dataset"`` (DatasetParams) or both.
        help: one line for the docs.
    """

    name: str
    schema: Schema
    levels: frozenset
    kinds: frozenset = ALL_KINDS
    nullable: bool = False
    targets: tuple = ("subset",)
    help: str = ""


def _opt(name: str, check: Any, levels: frozenset, help: str, kinds: frozenset = ALL_KINDS, nullable: bool = False,
         targets: tuple = ("subset",)) -> Option:
    return Option(name, Schema(check), levels, kinds, nullable, targets, help)


_DB_CN = frozenset({"dreambooth", "controlnet"})
_DB_FT = frozenset({"dreambooth", "finetune"})
_D = ("dataset",)

OPTIONS: dict[str, Option] = {o.name: o for o in [
    # --- subset options, inheritable from [general] and [[datasets]]
    _opt("num_repeats", All(INT, _at_least(1)), ALL_LEVELS, "times each image is repeated per epoch"),
    _opt("shuffle_caption", BOOL, ALL_LEVELS, "shuffle the caption's tags every step"),
    _opt("caption_separator", _nonempty_str, ALL_LEVELS, "separator between tags (default ',')"),
    _opt("keep_tokens", All(INT, _at_least(0)), ALL_LEVELS, "leading tags kept in place when shuffling"),
    _opt("keep_tokens_separator", STR, ALL_LEVELS, "marks the end of the fixed tags, e.g. '|||'", nullable=True),
    _opt("secondary_separator", STR, ALL_LEVELS, "separator kept together when shuffling, replaced by caption_separator",
         nullable=True),
    _opt("enable_wildcard", BOOL, ALL_LEVELS, "{a|b} choices; multi-line captions pick one line"),
    _opt("color_aug", BOOL, ALL_LEVELS, "random hue/gamma augmentation (disables latent caching)"),
    _opt("flip_aug", BOOL, ALL_LEVELS, "random horizontal flip"),
    _opt("face_crop_aug_range", _face_crop, ALL_LEVELS, "[low, high] face-centred crop scale range",
         nullable=True),
    _opt("random_crop", BOOL, ALL_LEVELS, "random instead of centre crop to the bucket"),
    _opt("caption_prefix", STR, ALL_LEVELS, "text put before every caption", nullable=True),
    _opt("caption_suffix", STR, ALL_LEVELS, "text put after every caption", nullable=True),
    _opt("caption_dropout_rate", All(NUMBER, _rate), ALL_LEVELS, "probability of an empty caption"),
    _opt("caption_dropout_every_n_epochs", All(INT, _at_least(0)), ALL_LEVELS,
         "drop all captions every n-th epoch"),
    _opt("caption_tag_dropout_rate", All(NUMBER, _rate), ALL_LEVELS, "probability of dropping each flexible tag"),
    _opt("token_warmup_min", All(INT, _at_least(0)), ALL_LEVELS, "tags used at step 0 of token warm-up"),
    _opt("token_warmup_step", All(NUMBER, _at_least(0)), ALL_LEVELS,
         "step at which all tags are used (< 1: fraction of max_train_steps)"),
    _opt("custom_attributes", TABLE, ALL_LEVELS, "free-form table passed to the sample", nullable=True),
    _opt("resize_interpolation", _interpolation, ALL_LEVELS, "interpolation for resizing images", nullable=True,
         targets=("subset", "dataset")),
    _opt("caption_extension", STR, ALL_LEVELS, "caption file extension (default '.caption')", kinds=_DB_CN),
    _opt("class_tokens", STR, ALL_LEVELS, "caption for images without a caption file",
         kinds=frozenset({"dreambooth"}), nullable=True),
    _opt("cache_info", BOOL, ALL_LEVELS, "cache image sizes and captions in a metadata file", kinds=_DB_CN),
    # --- subset only
    _opt("image_dir", STR, SUBSET_ONLY, "folder of training images"),
    _opt("is_reg", BOOL, SUBSET_ONLY, "regularization images", kinds=frozenset({"dreambooth"})),
    _opt("alpha_mask", BOOL, SUBSET_ONLY, "use the alpha channel as the loss mask", kinds=_DB_FT),
    _opt("metadata_file", STR, SUBSET_ONLY, "fine-tuning metadata JSON (makes the subset fine-tuning)",
         kinds=frozenset({"finetune"})),
    _opt("conditioning_data_dir", STR, SUBSET_ONLY, "ControlNet conditioning images (makes the subset ControlNet)",
         kinds=frozenset({"controlnet"})),
    # --- dataset options, inheritable from [general]
    _opt("resolution", _resolution, DATASET_LEVELS, "training resolution: 512 or [width, height]", targets=_D),
    _opt("batch_size", All(INT, _at_least(1)), DATASET_LEVELS, "images per batch", targets=_D),
    _opt("enable_bucket", BOOL, DATASET_LEVELS, "aspect-ratio bucketing", targets=_D),
    _opt("min_bucket_reso", All(INT, _at_least(1)), DATASET_LEVELS, "smallest bucket side", targets=_D),
    _opt("max_bucket_reso", All(INT, _at_least(1)), DATASET_LEVELS, "largest bucket side", targets=_D),
    _opt("bucket_reso_steps", All(INT, _at_least(1)), DATASET_LEVELS, "bucket sides are multiples of this",
         targets=_D),
    _opt("bucket_no_upscale", BOOL, DATASET_LEVELS, "buckets follow image sizes, never upscaling", targets=_D),
    _opt("network_multiplier", NUMBER, DATASET_LEVELS, "network multiplier for this dataset", targets=_D),
    _opt("validation_seed", INT, DATASET_LEVELS, "seed of the validation split", nullable=True, targets=_D),
    _opt("validation_split", _validation_split, DATASET_LEVELS, "share of images held out for validation",
         targets=_D),
    # --- [general] only (kohya reads these from the command line)
    _opt("debug_dataset", BOOL, GENERAL_ONLY, "show the dataset instead of training", targets=_D),
    _opt("max_token_length", _max_token_length, GENERAL_ONLY, "caption tokens: 75, 150 or 225", nullable=True,
         targets=_D),
    _opt("prior_loss_weight", All(NUMBER, _at_least(0)), GENERAL_ONLY, "loss weight of regularization images",
         targets=_D),
]}

# kohya's old misspelling, still accepted by its command line
ALIASES = {"caption_extention": "caption_extension"}

# command-line dests whose config name differs (kohya's ARGPARSE_OPTNAME_TO_CONFIG_OPTNAME)
ARG_TO_OPTION = {"train_batch_size": "batch_size", "dataset_repeats": "num_repeats", "caption_extention": "caption_extension"}

LEVEL_NAMES = {GENERAL: "[general]", DATASET: "[[datasets]]", SUBSET: "[[datasets.subsets]]"}


def where_allowed(option: Option) -> str:
    """``"[[datasets.subsets]]"``, ``"[general] or [[datasets]]"``, ... for messages."""
    names = [LEVEL_NAMES[lv] for lv in (GENERAL, DATASET, SUBSET) if lv in option.levels]
    return " or ".join(names) if len(names) < 3 else "any level"

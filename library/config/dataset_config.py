"""Dataset config (``--dataset_config`` TOML/JSON, or the command line) -> validated :class:`Blueprint`.

kohya's schema: ``[general]`` -> ``[[datasets]]`` -> ``[[datasets.subsets]]``. A value is looked
up in the subset, then its dataset, then ``[general]``, then the command line (``fallback``, by
kohya's dest names), then the built-in default. "Unset" and an explicit ``null`` (JSON only)
differ: ``null`` sets a nullable option to None and stops the lookup; a None on the command
line means "not given".

Every problem in the file is collected first and reported in one :class:`ConfigError`, each
with its location (``datasets[0].subsets[1].keep_tokens: expected int, got '2a'``).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import re
import tomllib
from pathlib import Path
from typing import Any, Mapping

import toml
from voluptuous import Invalid

from library.config.dataset_params import Blueprint, DatasetParams, SubsetParams
from library.config.dataset_schema import (
    ALIASES, ARG_TO_OPTION, DATASET, GENERAL, KIND_NAMES, OPTIONS, SUBSET, Option, show, where_allowed,
)
from library.data.buckets import adjust_min_max_bucket_reso
from library.errors import ConfigError

logger = logging.getLogger(__name__)

_KIND_KEYS = ("image_dir", "metadata_file", "conditioning_data_dir")  # never taken from the command line
# dataset options the cross-field checks read
_CROSS_CHECKED = {"resolution", "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps"}


def load_config_file(path: str | Path) -> dict:
    """Read a dataset config, TOML or JSON by extension.

    Raises:
        ConfigError: missing file, unknown extension, not UTF-8, or a syntax error (with its line).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"dataset config file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".json"):
        raise ConfigError(f"dataset config must be a .toml or .json file, got {path.name}")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"not valid UTF-8 (byte {e.start}); re-save the file as UTF-8", source=str(path)) from e
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"JSON syntax error at line {e.lineno}, column {e.colno}: {e.msg}", source=str(path)) from e
    else:
        data = _parse_toml(text, str(path))
    if not isinstance(data, dict):
        raise ConfigError("the top level must be a table/object with [general] and [[datasets]]", source=str(path))
    return data


def _parse_toml(text: str, source: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as strict_error:
        msg = str(strict_error)
        m = re.search(r"\(at line (\d+), column (\d+)\)", msg)
        where = f"line {m.group(1)}, column {m.group(2)}" if m else "unknown line"
        msg = re.sub(r"\s*\(at line \d+, column \d+\)", "", msg)
        # kohya parses with the `toml` package, which accepts a few things TOML 1.0 does not;
        # a config kohya accepts must keep working, but the user should know
        try:
            data = toml.loads(text)
        except Exception:
            pass
        else:
            logger.warning("%s is not valid TOML 1.0 (%s: %s); read it leniently like kohya does. Please fix it: "
                           "the lenient parser may drop what it does not understand", source, where, msg)
            return data
        hint = ""
        if "\\" in msg or "escape" in msg.lower():
            hint = " (for Windows paths use single quotes: image_dir = 'C:\\data\\10_sks dog')"
        raise ConfigError(f"TOML syntax error at {where}: {msg}{hint}", source=source) from strict_error


# ---------------------------------------------------------------------------- validation


def _suggest(key: str, candidates: list[str]) -> str:
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    return f"; did you mean `{match[0]}`?" if match else "; see docs/dataset_config.md for the options"


def _check_table(table: Mapping[str, Any], loc: str, level: str, kind: str | None, problems: list[str],
                 extra_keys: tuple[str, ...] = (), invalid: set[str] | None = None) -> dict[str, Any]:
    """Validate one table's options; returns ``{option: converted value}`` (None for explicit null).

    Names of options with invalid values are added to ``invalid`` (cross-field checks skip them).
    """
    out: dict[str, Any] = {}
    for raw_key, value in table.items():
        if raw_key in extra_keys:
            continue
        key = ALIASES.get(raw_key, raw_key)
        where = f"{loc}.{raw_key}"
        if key != raw_key and key in table:
            problems.append(f"{where}: both `{key}` and its old spelling `{raw_key}` are set; keep only `{key}`")
            continue
        option = OPTIONS.get(key)
        if key in ("subsets", "datasets", "general"):
            problems.append(f"{where}: [{key}] cannot be nested here; the structure is [general], [[datasets]], "
                            "[[datasets.subsets]]")
            continue
        if option is None:
            problems.append(f"{where}: unknown option{_suggest(raw_key, list(OPTIONS) + list(extra_keys))}")
            continue
        if level not in option.levels:
            problems.append(f"{where}: `{key}` is only allowed in {where_allowed(option)}")
            continue
        if kind is not None and kind not in option.kinds:
            kinds = " and ".join(KIND_NAMES[k] for k in sorted(option.kinds))
            problems.append(f"{where}: `{key}` applies only to {kinds} subsets, but this is a {KIND_NAMES[kind]} "
                            f"{'subset' if level == SUBSET else 'dataset'}")
            continue
        if value is None and option.nullable:
            out[key] = None
            continue
        try:
            out[key] = option.schema(value)
        except Invalid as e:  # also MultipleInvalid
            problems.append(f"{where}: {e.msg}")
            if invalid is not None:
                invalid.add(key)
    return out


def _subset_kind(sub: Mapping[str, Any]) -> str:
    if sub.get("metadata_file") is not None:
        return "finetune"
    if sub.get("conditioning_data_dir") is not None:
        return "controlnet"
    return "dreambooth"


def _dataset_kind(subsets: list[Mapping[str, Any]], loc: str, supported: dict[str, bool], problems: list[str]) -> str | None:
    kinds = [_subset_kind(s) for s in subsets]
    for j, s in enumerate(subsets):
        if s.get("metadata_file") is not None and s.get("conditioning_data_dir") is not None:
            problems.append(f"{loc}.subsets[{j}]: a subset cannot have both metadata_file (fine-tuning) and "
                            "conditioning_data_dir (ControlNet)")
            return None
    if not kinds:
        return None
    if len(set(kinds)) > 1:
        desc = ", ".join(f"subsets[{j}] is {KIND_NAMES[k]}" for j, k in enumerate(kinds))
        problems.append(f"{loc}: subsets of different kinds cannot be mixed in one dataset ({desc}); a subset with "
                        "metadata_file is fine-tuning, with conditioning_data_dir ControlNet, otherwise DreamBooth; "
                        "put them in separate [[datasets]]")
        return None
    kind = kinds[0]
    if not supported[kind]:
        ok = ", ".join(KIND_NAMES[k] for k, v in supported.items() if v)
        hint = "; for mask images in conditioning_data_dir, add --masked_loss" if kind == "controlnet" else ""
        problems.append(f"{loc}: {KIND_NAMES[kind]} datasets are not supported by this training script "
                        f"(supported: {ok}){hint}")
        return None
    return kind


def _fallback_values(fallback: Mapping[str, Any], problems: list[str], invalid: set[str]) -> dict[str, Any]:
    """Command-line values by option name; None (not given) is left out."""
    out: dict[str, Any] = {}
    # kohya: the misspelled --caption_extention wins over --caption_extension when given
    ordered = sorted(fallback.items(), key=lambda kv: kv[0] in ALIASES)
    for arg, value in ordered:
        name = ARG_TO_OPTION.get(arg, arg)
        if value is None or name not in OPTIONS or name in _KIND_KEYS:
            continue
        if name == "resolution" and isinstance(value, str):
            value = _parse_number_list(value, int)
            value = value[0] if isinstance(value, list) and len(value) == 1 else value
        elif name == "face_crop_aug_range" and isinstance(value, str):
            value = _parse_number_list(value, float)
        try:
            out[name] = OPTIONS[name].schema(value)
        except Invalid as e:
            problems.append(f"--{arg}: {e.msg}")
            invalid.add(name)
    return out


def _parse_number_list(text: str, cast: type) -> Any:
    try:
        return [cast(p) for p in text.split(",")]
    except ValueError:
        return text  # the schema reports it


# ---------------------------------------------------------------------------- inheritance


def _resolve(name: str, layers: list[tuple[str, Mapping[str, Any]]], default: Any) -> tuple[Any, str]:
    for label, values in layers:
        if name in values:
            return values[name], label
    return default, "default"


def _make_params(cls: type, kind: str, layers: list[tuple[str, Mapping[str, Any]]], target: str) -> tuple[Any, dict]:
    values: dict[str, Any] = {"kind": kind}
    sources: dict[str, str] = {}
    defaults = cls(kind=kind)
    for f in dataclasses.fields(cls):
        option: Option | None = OPTIONS.get(f.name)
        if option is None or target not in option.targets or kind not in option.kinds:
            continue
        values[f.name], sources[f.name] = _resolve(f.name, layers, getattr(defaults, f.name))
    return cls(**values), sources


def _check_dataset(ds: DatasetParams, sources: dict[str, str], loc: str, problems: list[str]) -> None:
    """Cross-field checks after inheritance; adjusts bucket min/max like kohya."""

    def src(name: str) -> str:
        return f"{name} from {sources.get(name, 'default')}"

    if ds.resolution is None:
        problems.append(f"{loc}: resolution is not set; add `resolution = 512` (or [width, height]) to [general] or "
                        "[[datasets]], or pass --resolution")
        return
    if not ds.enable_bucket:
        return
    w, h = ds.resolution
    steps = ds.bucket_reso_steps
    if ds.min_bucket_reso > ds.max_bucket_reso:
        problems.append(f"{loc}: min_bucket_reso {ds.min_bucket_reso} is larger than max_bucket_reso "
                        f"{ds.max_bucket_reso} ({src('min_bucket_reso')}, {src('max_bucket_reso')})")
        return
    if w % steps or h % steps:
        near = [max(steps, round(v / steps) * steps) for v in (w, h)]
        problems.append(f"{loc}: resolution {w}x{h} is not divisible by bucket_reso_steps {steps} "
                        f"({src('resolution')}, {src('bucket_reso_steps')}); use e.g. {near[0]}x{near[1]}")
        return
    ds.min_bucket_reso, ds.max_bucket_reso = adjust_min_max_bucket_reso(ds.min_bucket_reso, ds.max_bucket_reso, steps)
    if min(w, h) < ds.min_bucket_reso:
        problems.append(f"{loc}: min_bucket_reso {ds.min_bucket_reso} is larger than the smaller side of resolution "
                        f"{w}x{h}; lower min_bucket_reso or raise resolution")
    if max(w, h) > ds.max_bucket_reso:
        problems.append(f"{loc}: max_bucket_reso {ds.max_bucket_reso} is smaller than the larger side of resolution "
                        f"{w}x{h}; raise max_bucket_reso or lower resolution")


def _as_table_list(value: Any, loc: str, header: str, problems: list[str]) -> list[dict]:
    if isinstance(value, dict):
        problems.append(f"{loc}: must be an array of tables; write {header} (double brackets)")
        return []
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        problems.append(f"{loc}: expected an array of tables ({header}), got {show(value)}")
        return []
    return value


def build_blueprint(raw: dict, *, source: str, fallback: Mapping[str, Any], support_dreambooth: bool = True,
                    support_finetuning: bool = True, support_controlnet: bool = False) -> Blueprint:
    """Validate a parsed dataset config and apply inheritance.

    Args:
        raw: the parsed TOML/JSON.
        source: where it came from (file path), named in errors.
        fallback: command-line values by kohya dest name (None = not given).
        support_*: which dataset kinds the calling script can train.

    Raises:
        ConfigError: listing every problem found.
    """
    problems: list[str] = []
    supported = {"dreambooth": support_dreambooth, "finetune": support_finetuning, "controlnet": support_controlnet}
    for key in raw:
        if key in ("general", "datasets"):
            continue
        if ALIASES.get(key, key) in OPTIONS:
            problems.append(f"{key}: options must be inside a table: put `{key}` under [general] or [[datasets]]")
        else:
            problems.append(f"{key}: unknown top-level table{_suggest(key, ['general', 'datasets'])}")
    general_raw = raw.get("general", {})
    if not isinstance(general_raw, dict):
        problems.append(f"general: expected a table ([general]), got {show(general_raw)}")
        general_raw = {}
    invalid_shared: set[str] = set()
    general = _check_table(general_raw, "general", GENERAL, None, problems, invalid=invalid_shared)
    args = _fallback_values(fallback, problems, invalid_shared)
    datasets_raw = _as_table_list(raw.get("datasets", []), "datasets", "[[datasets]]", problems)
    if not datasets_raw and "datasets" not in raw:
        problems.append("no [[datasets]] defined; add at least one [[datasets]] with a [[datasets.subsets]] "
                        "entry (image_dir = '...')")

    datasets: list[DatasetParams] = []
    for i, ds_raw in enumerate(datasets_raw):
        loc = f"datasets[{i}]"
        subsets_raw = _as_table_list(ds_raw.get("subsets", []), f"{loc}.subsets", "[[datasets.subsets]]", problems)
        if not subsets_raw and "subsets" not in ds_raw:
            problems.append(f"{loc}: has no [[datasets.subsets]]; add one with image_dir = '...'")
        kind = _dataset_kind(subsets_raw, loc, supported, problems)
        invalid = set(invalid_shared)
        ds_values = _check_table(ds_raw, loc, DATASET, kind, problems, extra_keys=("subsets",), invalid=invalid)
        sub_values = [_check_table(s, f"{loc}.subsets[{j}]", SUBSET, kind, problems) for j, s in enumerate(subsets_raw)]
        if kind is None:
            continue
        layers = [(loc, ds_values), ("[general]", general), ("the command line", args)]
        ds, sources = _make_params(DatasetParams, kind, layers, "dataset")
        for j, sv in enumerate(sub_values):
            sub, _ = _make_params(SubsetParams, kind, [(f"{loc}.subsets[{j}]", sv)] + layers, "subset")
            _check_subset(sub, f"{loc}.subsets[{j}]", problems)
            ds.subsets.append(sub)
        if not invalid & _CROSS_CHECKED:  # a bad value is already reported; don't pile on
            _check_dataset(ds, sources, loc, problems)
        datasets.append(ds)
    if problems:
        raise ConfigError(problems, source=source)
    return Blueprint(datasets=datasets)


def _check_subset(sub: SubsetParams, loc: str, problems: list[str]) -> None:
    if sub.kind in ("dreambooth", "controlnet") and not sub.image_dir:
        problems.append(f"{loc}: image_dir is required (the folder of training images)")
    if sub.kind == "controlnet" and not sub.conditioning_data_dir:
        problems.append(f"{loc}: conditioning_data_dir is required for ControlNet subsets")
    if sub.caption_extension and not sub.caption_extension.startswith("."):
        sub.caption_extension = "." + sub.caption_extension  # kohya accepts "txt" for ".txt"


# ---------------------------------------------------------------------------- command line


def parse_dreambooth_folder_name(name: str) -> tuple[int, str] | None:
    """``"10_sks dog"`` -> ``(10, "sks dog")``; None when the name has no ``N_`` prefix."""
    m = re.fullmatch(r"([+-]?\d+)_(.*)", name, flags=re.S)
    return (int(m.group(1)), m.group(2)) if m else None


def dreambooth_subsets_from_dirs(train_data_dir: str | None, reg_data_dir: str | None) -> list[dict]:
    """Subset tables for kohya's folder convention: each ``N_class tokens`` subfolder is a subset.

    Raises:
        ConfigError: missing folders, no subfolders, names without ``N_``, repeats < 1 (all listed).
    """
    problems: list[str] = []
    subsets: list[dict] = []
    for flag, base, is_reg in (("--train_data_dir", train_data_dir, False), ("--reg_data_dir", reg_data_dir, True)):
        if base is None:
            continue
        base_path = Path(base)
        if not base_path.is_dir():
            problems.append(f"{flag} {base}: folder not found")
            continue
        subdirs = sorted(d for d in base_path.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not subdirs:
            problems.append(f"{flag} {base}: no subfolders; put the images in subfolders named "
                            "`<repeats>_<class tokens>`, e.g. `10_sks dog`")
        for d in subdirs:
            parsed = parse_dreambooth_folder_name(d.name)
            if parsed is None:
                problems.append(f"{flag}: folder `{d.name}` ({d}) does not start with a repeat count; name it "
                                f"`<repeats>_<class tokens>`, e.g. `10_sks dog` or `10_{d.name}`")
            elif parsed[0] < 1:
                problems.append(f"{flag}: folder `{d.name}` ({d}) has {parsed[0]} repeats; the repeat count must be "
                                f"at least 1, e.g. `10_{parsed[1]}`")
            else:
                subsets.append({"image_dir": str(d), "num_repeats": parsed[0], "is_reg": is_reg,
                                "class_tokens": parsed[1]})
    if problems:
        raise ConfigError(problems, source="command line")
    return subsets


def _as_mapping(args: Mapping[str, Any] | argparse.Namespace) -> Mapping[str, Any]:
    return vars(args) if isinstance(args, argparse.Namespace) else args


def blueprint_from_args(fallback: Mapping[str, Any]) -> Blueprint:
    """Build the datasets from kohya's command-line options (no ``--dataset_config``).

    ``--in_json`` makes a fine-tuning dataset (``image_dir`` = ``--train_data_dir``);
    ``--conditioning_data_dir`` a ControlNet dataset; otherwise ``--train_data_dir`` and
    ``--reg_data_dir`` are scanned for ``N_class tokens`` folders.
    """
    fallback = _as_mapping(fallback)
    train_dir = fallback.get("train_data_dir")
    if train_dir is None:
        raise ConfigError("no training data: pass --train_data_dir (with subfolders like `10_sks dog`) or "
                          "--dataset_config")
    in_json, cond_dir = fallback.get("in_json"), fallback.get("conditioning_data_dir")
    if in_json is not None:
        subsets = [{"image_dir": str(train_dir), "metadata_file": str(in_json)}]
    elif cond_dir is not None:
        subsets = [{"image_dir": str(train_dir), "conditioning_data_dir": str(cond_dir)}]
    else:
        subsets = dreambooth_subsets_from_dirs(str(train_dir), fallback.get("reg_data_dir"))
    return build_blueprint({"datasets": [{"subsets": subsets}]}, source="command line", fallback=fallback,
                           support_controlnet=cond_dir is not None)


def build_blueprint_for_args(args_mapping: Mapping[str, Any] | argparse.Namespace, *, support_dreambooth: bool = True,
                             support_finetuning: bool = True, support_controlnet: bool = False) -> Blueprint:
    """The trainer's entry point: ``--dataset_config`` if given, else the command-line options."""
    args = _as_mapping(args_mapping)
    config = args.get("dataset_config")
    if config is None:
        return blueprint_from_args(args)
    raw = load_config_file(config)
    logger.info("loading dataset config %s", config)
    return build_blueprint(raw, source=str(config), fallback=args, support_dreambooth=support_dreambooth,
                           support_finetuning=support_finetuning, support_controlnet=support_controlnet)

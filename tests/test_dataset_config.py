"""Dataset config: kohya's schema, inheritance, all-at-once validation, command-line fallback."""

from __future__ import annotations

import argparse
import json
import textwrap

import pytest

from library.config.dataset_config import (
    blueprint_from_args, build_blueprint, build_blueprint_for_args, load_config_file, parse_dreambooth_folder_name,
)
from library.errors import ConfigError

# kohya's config_README example (DreamBooth + fine-tuning datasets), paths made POSIX
KOHYA_EXAMPLE = """
[general]
shuffle_caption = true
caption_extension = '.txt'
keep_tokens = 1

# This is a DreamBooth-style dataset
[[datasets]]
resolution = 512
batch_size = 4
keep_tokens = 2

  [[datasets.subsets]]
  image_dir = '/data/hoge'
  class_tokens = 'hoge girl'
  # This subset uses keep_tokens = 2 (the value of the parent datasets)

  [[datasets.subsets]]
  image_dir = '/data/fuga'
  class_tokens = 'fuga boy'
  keep_tokens = 3

  [[datasets.subsets]]
  is_reg = true
  image_dir = '/data/reg'
  class_tokens = 'human'
  keep_tokens = 1

# This is a fine-tuning dataset
[[datasets]]
resolution = [768, 768]
batch_size = 2

  [[datasets.subsets]]
  image_dir = '/data/piyo'
  metadata_file = '/data/piyo_metadata.json'
  # This subset uses keep_tokens = 1 (the value of [general])
"""


def write(tmp_path, text: str, name: str = "cfg.toml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text), encoding="utf-8")
    return p


def build(raw: dict, fallback: dict | None = None, **kw):
    return build_blueprint(raw, source="cfg.toml", fallback=fallback or {}, **kw)


def problems_of(raw: dict, fallback: dict | None = None, **kw) -> list[str]:
    with pytest.raises(ConfigError) as info:
        build(raw, fallback, **kw)
    assert info.value.source == "cfg.toml"
    return info.value.problems


def one_subset(subset: dict | None = None, dataset: dict | None = None, general: dict | None = None) -> dict:
    raw = {"datasets": [{"resolution": 512, **(dataset or {}), "subsets": [{"image_dir": "/img", **(subset or {})}]}]}
    if general is not None:
        raw["general"] = general
    return raw


def test_kohya_example_and_inheritance(tmp_path):
    raw = load_config_file(write(tmp_path, KOHYA_EXAMPLE))
    bp = build(raw)
    db, ft = bp.datasets
    assert (db.kind, ft.kind) == ("dreambooth", "finetune")
    assert db.resolution == (512, 512) and db.batch_size == 4
    assert ft.resolution == (768, 768) and ft.batch_size == 2
    assert [s.keep_tokens for s in db.subsets] == [2, 3, 1]
    assert ft.subsets[0].keep_tokens == 1
    assert all(s.shuffle_caption for s in db.subsets + ft.subsets)
    assert [s.caption_extension for s in db.subsets] == [".txt"] * 3
    assert [s.is_reg for s in db.subsets] == [False, False, True]
    assert db.subsets[0].class_tokens == "hoge girl"
    assert ft.subsets[0].metadata_file == "/data/piyo_metadata.json" and ft.subsets[0].image_dir == "/data/piyo"


def test_precedence_subset_dataset_general_commandline_default():
    raw = {
        "general": {"keep_tokens": 1, "flip_aug": True, "batch_size": 3},
        "datasets": [{"resolution": 512, "keep_tokens": 2, "subsets": [
            {"image_dir": "/a", "keep_tokens": 4},
            {"image_dir": "/b"},
        ]}],
    }
    fallback = {"keep_tokens": 9, "color_aug": True, "caption_dropout_rate": None, "train_batch_size": 8,
                "learning_rate": 1e-4, "max_token_length": 150}
    ds = build(raw, fallback).datasets[0]
    a, b = ds.subsets
    assert (a.keep_tokens, b.keep_tokens) == (4, 2)  # subset > dataset
    assert a.flip_aug and b.flip_aug  # [general]
    assert a.color_aug  # command line
    assert a.caption_dropout_rate == 0.0  # None on the command line = not given -> default
    assert ds.batch_size == 3  # [general] beats --train_batch_size
    assert ds.max_token_length == 150
    assert build(one_subset(), {"train_batch_size": 8}).datasets[0].batch_size == 8


def test_explicit_null_overrides_inheritance_but_only_where_nullable():
    raw = one_subset({"caption_prefix": None}, {"caption_prefix": "sks"})
    assert build(raw).datasets[0].subsets[0].caption_prefix is None
    assert build(one_subset({}, {"caption_prefix": "sks"})).datasets[0].subsets[0].caption_prefix == "sks"
    assert problems_of(one_subset({"keep_tokens": None})) == ["datasets[0].subsets[0].keep_tokens: expected int, got null"]


def test_json_config(tmp_path):
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps(one_subset({"num_repeats": 3, "face_crop_aug_range": [2, 4]})), encoding="utf-8")
    sub = build(load_config_file(p)).datasets[0].subsets[0]
    assert sub.num_repeats == 3 and sub.face_crop_aug_range == (2.0, 4.0)


def test_all_problems_reported_at_once_with_locations():
    raw = {
        "general": {"shufle_caption": True},
        "datasets": [{"resolution": 512, "image_dir": "/x", "max_token_length": 150, "subsets": [
            {"image_dir": "/a"},
            {"image_dir": "/b", "keep_tokens": "2a", "batch_size": 2, "num_repeats": 0, "flip_aug": "yes"},
        ]}],
    }
    problems = problems_of(raw)
    assert problems == [
        "general.shufle_caption: unknown option; did you mean `shuffle_caption`?",
        "datasets[0].image_dir: `image_dir` is only allowed in [[datasets.subsets]]",
        "datasets[0].max_token_length: `max_token_length` is only allowed in [general]",
        "datasets[0].subsets[1].keep_tokens: expected int, got '2a'",
        "datasets[0].subsets[1].batch_size: `batch_size` is only allowed in [general] or [[datasets]]",
        "datasets[0].subsets[1].num_repeats: must be >= 1, got 0",
        "datasets[0].subsets[1].flip_aug: expected true or false, got 'yes'",
    ]
    with pytest.raises(ConfigError, match=r"cfg.toml: 7 problems:\n  - general.shufle_caption"):
        build(raw)


def test_unknown_key_without_close_match():
    (p,) = problems_of(one_subset({"zzzz": 1}))
    assert p == "datasets[0].subsets[0].zzzz: unknown option; see docs/dataset_config.md for the options"


@pytest.mark.parametrize("repeats", [0, -3])
def test_zero_or_negative_repeats(repeats):
    assert problems_of(one_subset({"num_repeats": repeats})) == [
        f"datasets[0].subsets[0].num_repeats: must be >= 1, got {repeats}"]


def test_wrong_types():
    cases = {
        "keep_tokens": (True, "expected int, got true"),
        "caption_dropout_rate": (1.5, "must be between 0 and 1, got 1.5"),
        "caption_tag_dropout_rate": ("0.1", "expected number, got '0.1'"),
        "face_crop_aug_range": ([4.0, 2.0], "expected 0 < low <= high, got [4.0, 2.0]"),
        "resize_interpolation": ("fancy", "expected one of lanczos, nearest"),
        "custom_attributes": ([1], "expected a table, got [1]"),
    }
    for key, (value, msg) in cases.items():
        (p,) = problems_of(one_subset({key: value}))
        assert p.startswith(f"datasets[0].subsets[0].{key}: {msg}"), p
    (p,) = problems_of(one_subset(dataset={"resolution": [512, 512, 3]}))
    assert p == "datasets[0].resolution: expected an int or [width, height], got [512, 512, 3]"
    (p,) = problems_of(one_subset(general={"max_token_length": 100}))
    assert p == "general.max_token_length: expected 75, 150 or 225, got 100"


def test_resolution_forms_and_rates():
    ds = build(one_subset({"caption_dropout_rate": 0, "token_warmup_step": 0.5}, {"resolution": [768, 512]})).datasets[0]
    assert ds.resolution == (768, 512)
    assert ds.subsets[0].caption_dropout_rate == 0.0 and ds.subsets[0].token_warmup_step == 0.5


def test_min_bucket_reso_larger_than_max():
    (p,) = problems_of(one_subset(dataset={"enable_bucket": True, "min_bucket_reso": 1024, "max_bucket_reso": 512}))
    assert p.startswith("datasets[0]: min_bucket_reso 1024 is larger than max_bucket_reso 512")


def test_resolution_not_divisible_by_bucket_reso_steps():
    raw = one_subset(dataset={"enable_bucket": True, "resolution": 500}, general={"bucket_reso_steps": 64})
    (p,) = problems_of(raw)
    assert p == ("datasets[0]: resolution 500x500 is not divisible by bucket_reso_steps 64 (resolution from "
                 "datasets[0], bucket_reso_steps from [general]); use e.g. 512x512")
    # without bucketing any resolution is fine
    assert build(one_subset(dataset={"resolution": 500})).datasets[0].resolution == (500, 500)


def test_bucket_min_max_adjusted_like_kohya():
    ds = build(one_subset(dataset={"enable_bucket": True, "min_bucket_reso": 300, "max_bucket_reso": 1000})).datasets[0]
    assert (ds.min_bucket_reso, ds.max_bucket_reso) == (256, 1024)


def test_resolution_outside_bucket_range():
    (p,) = problems_of(one_subset(dataset={"enable_bucket": True, "resolution": 1024, "max_bucket_reso": 768}))
    assert p.startswith("datasets[0]: max_bucket_reso 768 is smaller than the larger side of resolution 1024x1024")


def test_missing_resolution():
    raw = {"datasets": [{"subsets": [{"image_dir": "/a"}]}]}
    (p,) = problems_of(raw)
    assert p.startswith("datasets[0]: resolution is not set")
    assert build(raw, {"resolution": "512,768"}).datasets[0].resolution == (512, 768)
    assert build(raw, {"resolution": "640"}).datasets[0].resolution == (640, 640)


def test_legacy_caption_extention_and_dot():
    assert build(one_subset({"caption_extention": "txt"})).datasets[0].subsets[0].caption_extension == ".txt"
    (p,) = problems_of(one_subset({"caption_extention": ".txt", "caption_extension": ".cap"}))
    assert "both `caption_extension` and its old spelling `caption_extention` are set" in p
    assert build(one_subset(), {"caption_extention": ".tags"}).datasets[0].subsets[0].caption_extension == ".tags"
    # on the command line the old spelling wins when given (kohya's prepare_dataset_args)
    both = {"caption_extention": ".tags", "caption_extension": ".caption"}
    assert build(one_subset(), both).datasets[0].subsets[0].caption_extension == ".tags"
    both = {"caption_extention": None, "caption_extension": ".txt"}
    assert build(one_subset(), both).datasets[0].subsets[0].caption_extension == ".txt"


def test_dataset_kinds():
    raw = {"datasets": [{"resolution": 512, "subsets": [
        {"image_dir": "/a", "conditioning_data_dir": "/c", "caption_extension": ".txt"}]}]}
    ds = build(raw, support_controlnet=True).datasets[0]
    assert ds.kind == "controlnet" and ds.subsets[0].conditioning_data_dir == "/c"
    (p,) = problems_of(raw)
    assert p.startswith("datasets[0]: ControlNet datasets are not supported by this training script")

    mixed = {"datasets": [{"resolution": 512, "subsets": [{"image_dir": "/a"}, {"metadata_file": "/m.json"}]}]}
    (p,) = problems_of(mixed)
    assert p.startswith("datasets[0]: subsets of different kinds cannot be mixed in one dataset "
                        "(subsets[0] is DreamBooth, subsets[1] is fine-tuning)")

    ft = {"datasets": [{"resolution": 512, "class_tokens": "x", "subsets": [{"metadata_file": "/m.json", "is_reg": True}]}]}
    assert problems_of(ft) == [
        "datasets[0].class_tokens: `class_tokens` applies only to DreamBooth subsets, but this is a fine-tuning dataset",
        "datasets[0].subsets[0].is_reg: `is_reg` applies only to DreamBooth subsets, but this is a fine-tuning subset",
    ]
    (p,) = problems_of(one_subset(), support_dreambooth=False)
    assert p.startswith("datasets[0]: DreamBooth datasets are not supported")


def test_required_image_dir():
    (p,) = problems_of({"datasets": [{"resolution": 512, "subsets": [{"num_repeats": 2}]}]})
    assert p == "datasets[0].subsets[0]: image_dir is required (the folder of training images)"


def test_structure_errors(tmp_path):
    raw = load_config_file(write(tmp_path, """
        resolution = 512
        [datasets]
        batch_size = 2
    """))
    problems = problems_of(raw)
    assert problems[0] == "resolution: options must be inside a table: put `resolution` under [general] or [[datasets]]"
    assert problems[1] == "datasets: must be an array of tables; write [[datasets]] (double brackets)"
    assert problems_of({"general": {}}) == [
        "no [[datasets]] defined; add at least one [[datasets]] with a [[datasets.subsets]] entry (image_dir = '...')"]
    assert problems_of({"datsets": []})[0].startswith("datsets: unknown top-level table; did you mean `datasets`?")
    (p,) = problems_of(one_subset({"subsets": []}))
    assert p.startswith("datasets[0].subsets[0].subsets: [subsets] cannot be nested here")
    assert problems_of({"datasets": [{"resolution": 512}]}) == [
        "datasets[0]: has no [[datasets.subsets]]; add one with image_dir = '...'"]


def test_syntax_errors_name_file_and_line(tmp_path):
    bad = write(tmp_path, "[general]\nshuffle_caption = true\nkeep_tokens = \n")
    with pytest.raises(ConfigError, match=r"cfg.toml: TOML syntax error at line 3, column \d+"):
        load_config_file(bad)
    bad_json = tmp_path / "cfg.json"
    bad_json.write_text('{"general": {"keep_tokens": 1,}\n}', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"cfg.json: JSON syntax error at line 1, column 31"):
        load_config_file(bad_json)
    win = write(tmp_path, '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "C:\\data\\x"\n')
    with pytest.raises(ConfigError, match="line 3.*single quotes"):
        load_config_file(win)
    with pytest.raises(ConfigError, match="must be a .toml or .json file"):
        load_config_file(write(tmp_path, "", name="cfg.yaml"))
    with pytest.raises(ConfigError, match="dataset config file not found"):
        load_config_file(tmp_path / "missing.toml")


def test_toml_that_only_kohyas_parser_accepts_still_loads(tmp_path, caplog):
    # the `toml` package kohya uses accepts text after a closing triple quote; TOML 1.0 does not
    p = write(tmp_path, '[general]\nkeep_tokens = 1\ncaption_prefix = """sks"""x\n')
    with caplog.at_level("WARNING"):
        assert load_config_file(p)["general"]["keep_tokens"] == 1
    assert "is not valid TOML 1.0 (line 3, column" in caplog.text and "Please fix it" in caplog.text


def test_invalid_command_line_fallback():
    (p,) = problems_of(one_subset(), {"resolution": "512x768"})
    assert p == "--resolution: expected an int or [width, height], got '512x768'"


# ---------------------------------------------------------------------------- command line / folders


def make_dirs(root, *names):
    for n in names:
        (root / n).mkdir(parents=True)


def test_parse_folder_name():
    assert parse_dreambooth_folder_name("10_sks dog") == (10, "sks dog")
    assert parse_dreambooth_folder_name("3_sks_dog") == (3, "sks_dog")
    assert parse_dreambooth_folder_name("0_x") == (0, "x")
    assert parse_dreambooth_folder_name("sks dog") is None
    assert parse_dreambooth_folder_name("10sks") is None


def test_blueprint_from_args_dreambooth(tmp_path):
    make_dirs(tmp_path, "train/10_sks dog", "train/2_ohwx cat", "train/.cache", "reg/1_dog")
    args = {"train_data_dir": str(tmp_path / "train"), "reg_data_dir": str(tmp_path / "reg"), "resolution": "512,768",
            "train_batch_size": 2, "enable_bucket": True, "caption_extension": ".txt", "shuffle_caption": True,
            "keep_tokens": 1, "in_json": None, "prior_loss_weight": 0.5}
    ds = blueprint_from_args(args).datasets[0]
    assert ds.kind == "dreambooth" and ds.resolution == (512, 768) and ds.batch_size == 2 and ds.enable_bucket
    assert ds.prior_loss_weight == 0.5
    got = [(s.num_repeats, s.class_tokens, s.is_reg, s.caption_extension, s.keep_tokens) for s in ds.subsets]
    assert got == [(10, "sks dog", False, ".txt", 1), (2, "ohwx cat", False, ".txt", 1), (1, "dog", True, ".txt", 1)]
    assert ds.subsets[0].image_dir == str(tmp_path / "train" / "10_sks dog")


def test_folder_without_repeat_prefix(tmp_path):
    make_dirs(tmp_path, "train/10_sks dog", "train/images")
    with pytest.raises(ConfigError) as info:
        blueprint_from_args({"train_data_dir": str(tmp_path / "train"), "resolution": "512"})
    (p,) = info.value.problems
    assert "folder `images`" in p and "does not start with a repeat count" in p
    assert "`<repeats>_<class tokens>`, e.g. `10_sks dog`" in p and "`10_images`" in p


def test_zero_and_negative_repeat_folders(tmp_path):
    make_dirs(tmp_path, "train/0_sks dog", "train/-2_cat")
    with pytest.raises(ConfigError) as info:
        blueprint_from_args({"train_data_dir": str(tmp_path / "train"), "resolution": "512"})
    problems = info.value.problems
    assert len(problems) == 2
    assert "folder `-2_cat`" in problems[0] and "has -2 repeats; the repeat count must be at least 1" in problems[0]
    assert "folder `0_sks dog`" in problems[1] and "e.g. `10_sks dog`" in problems[1]


def test_missing_or_flat_train_data_dir(tmp_path):
    with pytest.raises(ConfigError, match="no training data: pass --train_data_dir"):
        blueprint_from_args({"resolution": "512"})
    with pytest.raises(ConfigError, match="folder not found"):
        blueprint_from_args({"train_data_dir": str(tmp_path / "nope"), "resolution": "512"})
    (tmp_path / "flat").mkdir()
    with pytest.raises(ConfigError, match="no subfolders; put the images in subfolders named"):
        blueprint_from_args({"train_data_dir": str(tmp_path / "flat"), "resolution": "512"})


def test_blueprint_from_args_finetune_and_controlnet(tmp_path):
    ds = blueprint_from_args({"train_data_dir": "/imgs", "in_json": "/meta.json", "resolution": "1024",
                              "dataset_repeats": 3}).datasets[0]
    assert ds.kind == "finetune" and ds.subsets[0].image_dir == "/imgs"
    assert ds.subsets[0].metadata_file == "/meta.json" and ds.subsets[0].num_repeats == 3
    ds = blueprint_from_args({"train_data_dir": "/imgs", "conditioning_data_dir": "/cond", "resolution": "512"}).datasets[0]
    assert ds.kind == "controlnet" and ds.subsets[0].conditioning_data_dir == "/cond"


def test_build_blueprint_for_args(tmp_path):
    cfg = write(tmp_path, KOHYA_EXAMPLE)
    ns = argparse.Namespace(dataset_config=str(cfg), train_data_dir=None, train_batch_size=1, flip_aug=True)
    bp = build_blueprint_for_args(ns)
    assert len(bp.datasets) == 2 and bp.datasets[0].subsets[0].flip_aug
    make_dirs(tmp_path, "train/5_x")
    bp = build_blueprint_for_args({"dataset_config": None, "train_data_dir": str(tmp_path / "train"), "resolution": "512"})
    assert bp.datasets[0].subsets[0].num_repeats == 5
    bad = write(tmp_path, "[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = '/a'\nkeep_tokens = '2a'\n",
                name="bad.toml")
    with pytest.raises(ConfigError, match=r"bad.toml: datasets\[0\].subsets\[0\].keep_tokens: expected int, got '2a'"):
        build_blueprint_for_args({"dataset_config": str(bad)})


def test_docs_list_every_option():
    from pathlib import Path

    from library.config.dataset_schema import OPTIONS

    doc = (Path(__file__).resolve().parents[1] / "docs" / "dataset_config.md").read_text(encoding="utf-8")
    missing = [name for name in OPTIONS if f"| `{name}` |" not in doc]
    assert not missing, f"docs/dataset_config.md lacks {missing}"

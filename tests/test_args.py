"""The argument system: every kohya flag known, kohya defaults, config files, --output_config."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from library.config import args as A
from library.config.flags import COVERED_SCRIPTS, FULL_TRAINERS
from library.config.flags.base import INT_OR_FLOAT
from library.errors import ConfigError

# Valid non-default sample values for flags whose format is checked.
_SAMPLES = {
    "resolution": "512,768", "face_crop_aug_range": "2.0,4.0", "optimizer_type": "AdamW8bit",
    "lr_scheduler": "cosine", "network_args": "conv_dim=4", "optimizer_args": "weight_decay=0.1",
    "lr_scheduler_args": "power=2", "lr_scheduler_type": "torch.optim.lr_scheduler.StepLR",
    "max_token_length": "150", "network_dropout": "0.1", "caption_dropout_rate": "0.1",
    "max_bucket_reso": "2048",
}
# Implemented flags that a script rejects for a reason of its own (kohya asserts the same).
_SCRIPT_REJECTS = {("sdxl_train_network", "v2"): "--v2 cannot be used with SDXL",
                   ("sdxl_train", "v2"): "--v2 cannot be used with SDXL",
                   ("sdxl_train_textual_inversion", "v2"): "--v2 cannot be used with SDXL"}
# Defaults sdtk changes on purpose (documented): embeddings are written as safetensors, not pickles.
_SDTK_DEFAULTS = {("train_textual_inversion", "save_model_as"): "safetensors",
                  ("sdxl_train_textual_inversion", "save_model_as"): "safetensors",
                  ("train_textual_inversion_XTI", "save_model_as"): "safetensors"}
# Companions that implemented flags need to be valid together (kohya's own constraints).
_COMPANIONS = {
    "full_fp16": ["--mixed_precision", "fp16"], "full_bf16": ["--mixed_precision", "bf16"],
    "cache_text_encoder_outputs": ["--network_train_unet_only"],
    "cache_text_encoder_outputs_to_disk": ["--network_train_unet_only"],
    "dim_from_weights": ["--network_weights", "w.safetensors"],
    "lr_warmup_steps": ["--lr_scheduler", "cosine"],
}


def _kohya_entries(script: str) -> list[dict]:
    return A.kohya_flags()[script]


def _flag(script: str, dest: str):
    return next(f for f in A.flags_for(script) if f.dest == dest)


def _sample_argv(entry: dict) -> list[str]:
    """A command line giving ``entry`` a valid value different from its default."""
    name = entry["flags"][-1]
    if entry["action"] == "StoreTrue":
        return [name]
    if entry["dest"] in _SAMPLES:
        return [name, _SAMPLES[entry["dest"]]]
    if entry["choices"]:
        value = next(c for c in entry["choices"] if c is not None and c != entry["default"])
        return [name, str(value)]
    sample = {"int": "3", "float": "0.5", "int_or_float": "0.1", "Path": "x.toml"}.get(entry["type"], "x")
    return [name, sample]


# Old spellings that kohya folds into another flag: (dest that changes, expected value).
_FOLDED = {"caption_extention": ("caption_extension", "x"), "use_8bit_adam": ("optimizer_type", "AdamW8bit")}


@pytest.mark.parametrize("script", COVERED_SCRIPTS)
def test_every_kohya_flag_is_accepted_or_rejected_as_not_supported(script, tmp_path):
    companions = {**_COMPANIONS, "output_config": ["--output_dir", str(tmp_path)]}
    if script == "sdxl_train":  # the text encoders are frozen unless --train_text_encoder
        companions.update(cache_text_encoder_outputs=[], cache_text_encoder_outputs_to_disk=[])
    for entry in _kohya_entries(script):
        flag = _flag(script, entry["dest"])
        argv = _sample_argv(entry) + companions.get(entry["dest"], [])
        if flag.dest == "config_file":
            (tmp_path / "empty.toml").write_text("")
            argv = ["--config_file", str(tmp_path / "empty.toml")]
        if (script, flag.dest) in _SCRIPT_REJECTS:
            with pytest.raises(ConfigError, match=_SCRIPT_REJECTS[script, flag.dest]):
                A.parse_args(script, argv)
        elif flag.support.implemented:
            ns = A.parse_args(script, argv)
            dest, expected = _FOLDED.get(flag.dest, (flag.dest, None))
            value = getattr(ns, dest)
            assert value != _flag(script, dest).default and (expected is None or value == expected), flag.dest
        else:
            with pytest.raises(ConfigError) as info:
                A.parse_args(script, argv)
            assert info.value.problems == [f"{flag.name} is not supported by sdtk: {flag.support.reason}"]


@pytest.mark.parametrize("script", COVERED_SCRIPTS)
def test_defaults_types_and_choices_equal_kohyas(script):
    ns = A.parse_args(script, [])
    entries = _kohya_entries(script)
    for entry in entries:
        flag = _flag(script, entry["dest"])
        default = _SDTK_DEFAULTS.get((script, entry["dest"]), entry["default"])
        assert getattr(ns, entry["dest"]) == default, entry["dest"]
        assert flag.spellings == tuple(entry["flags"])
        assert flag.kind is A._kohya_kind(entry), entry["dest"]
        if entry["choices"]:  # sdtk may accept more (max_token_length 75), never fewer
            assert set(entry["choices"]) <= set(flag.choices), entry["dest"]
    sdtk_only = {f.dest for f in A.flags_for(script)} - {e["dest"] for e in entries}
    full_model = {"ema", "ema_decay"} if script in ("train_db", "fine_tune", "sdxl_train") else set()
    assert sdtk_only == {"allow_pickle"} | full_model


def test_each_dest_declared_once_and_no_fallbacks_for_covered_scripts():
    for script in A.known_scripts():  # a dest may be declared once per script
        dests = [f.dest for f in A.flags_for(script)]
        assert len(dests) == len(set(dests)), script
    for script in COVERED_SCRIPTS:
        assert not [f.dest for f in A.flags_for(script) if f.group == "other kohya options"]


def test_sdxl_only_flags_belong_to_sdxl_script():
    sd = {f.dest for f in A.flags_for("train_network")}
    assert "cache_text_encoder_outputs" not in sd
    with pytest.raises(ConfigError, match="unknown flag --cache_text_encoder_outputs.*sdxl_train_network"):
        A.parse_args("train_network", ["--cache_text_encoder_outputs"])


def test_value_conversion_and_validation():
    ns = A.parse_args("sdxl_train_network", [
        "--lr_scheduler", "cosine", "--lr_warmup_steps", "5%", "--lr_decay_steps", "0", "--text_encoder_lr", "1e-5", "2e-5",
        "--max_token_length", "75", "--resolution", "1024", "--dataset_config", "d.toml"])
    assert ns.lr_warmup_steps == pytest.approx(0.05) and ns.text_encoder_lr == [1e-5, 2e-5]
    assert ns.max_token_length == 75 and ns.dataset_config == Path("d.toml")
    warm = A.parse_args("train_network", ["--lr_scheduler", "linear", "--lr_warmup_steps", "100"]).lr_warmup_steps
    assert warm == 100 and isinstance(warm, int)
    bad = [
        (["--learning_rate", "0"], "--learning_rate: must be > 0"),
        (["--learning_rate", "abc"], "--learning_rate: expected a number"),
        (["--max_token_length", "100"], "--max_token_length: invalid choice 100"),
        (["--mixed_precision", "fp61"], "did you mean 'fp16'"),
        (["--save_precision", "half"], "--save_precision: invalid choice"),
        (["--save_model_as", "diffusers"], "--save_model_as: invalid choice"),
        (["--lr_warmup_steps", "1.5"], "ratio in [0, 1)"),
        (["--lr_warmup_steps", "10"], "--lr_warmup_steps needs a scheduler with warmup"),
        (["--text_encoder_lr", "1", "2", "3"], "takes 1 or 2 values"),
        (["--resolution", "512x512"], "--resolution: must be 1 or 2 integers"),
        (["--optimizer_type", "adamw9bit"], "did you mean 'AdamW8bit'"),
        (["--lr_scheduler", "cosine_restarts"], "did you mean 'cosine_with_restarts'"),
        (["--network_args", "conv_dim"], "key=value"),
        (["--train_batch_size", "0"], "must be >= 1"),
    ]
    for argv, needle in bad:
        with pytest.raises(ConfigError) as info:
            A.parse_args("sdxl_train_network", argv)
        assert needle in str(info.value), (argv, str(info.value))
    # optimizer names are case-insensitive as in kohya; dotted classes pass through
    assert A.parse_args("train_network", ["--optimizer_type", "adamw8bit"]).optimizer_type == "adamw8bit"
    assert A.parse_args("train_network", ["--optimizer_type", "a.b.C"]).optimizer_type == "a.b.C"


def test_cross_flag_rules_and_kohya_normalisation():
    with pytest.raises(ConfigError) as info:
        A.parse_args("sdxl_train_network", ["--v2", "--full_bf16", "--cache_latents", "--color_aug",
                                            "--cache_text_encoder_outputs", "--shuffle_caption",
                                            "--min_bucket_reso", "1024", "--max_bucket_reso", "512"])
    text = str(info.value)
    for needle in ("--v2 cannot be used with SDXL", "--full_bf16 needs --mixed_precision bf16",
                   "--cache_latents cannot be used with --color_aug",
                   "--cache_text_encoder_outputs needs --network_train_unet_only",
                   "cannot be used with --shuffle_caption", "--min_bucket_reso (1024) must not exceed"):
        assert needle in text
    ns = A.parse_args("train_network", ["--caption_extention", ".txt", "--use_8bit_adam", "--cache_latents_to_disk"])
    assert ns.caption_extension == ".txt" and ns.caption_extention is None
    assert ns.optimizer_type == "AdamW8bit" and ns.use_8bit_adam is False and ns.cache_latents is True


def test_unknown_flags_get_suggestions_and_all_problems_come_together(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('learning_rate = -1\nnetwork_dimm = 8\nhuggingface_repo_id = "me/x"\n')
    with pytest.raises(ConfigError) as info:
        A.parse_args("train_network", ["--config_file", str(cfg), "--learnin_rate", "1", "--xformerz",
                                       "--mixed_precision", "fp8", "--deepspeed"])
    problems = info.value.problems
    assert len(problems) == 7, problems
    assert "--mixed_precision: invalid choice 'fp8'; choose one of no, fp16, bf16" in problems
    text = "\n".join(problems)
    assert "unknown flag --learnin_rate for train_network; did you mean --learning_rate?" in text
    assert "did you mean --xformers?" in text
    assert f"{cfg}: unknown key 'network_dimm' for train_network; did you mean 'network_dim'?" in text
    assert f"{cfg}: learning_rate: must be > 0" in text
    assert ("--deepspeed is not supported by sdtk: only the full-model scripts (train_db.py, fine_tune.py, "
            "sdxl_train.py) use DeepSpeed") in text
    assert ("--huggingface_repo_id is not supported by sdtk: Hugging Face upload is not supported "
            f"(offline toolkit) (set in {cfg})") in text


def test_config_file_precedence_and_kohya_semantics(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        "[model_arguments]\npretrained_model_name_or_path = \"m.safetensors\"\n"
        "[training_arguments]\nlearning_rate = 1e-4\nmax_train_steps = 10.0\nseed = 1\n"
        "network_args = \"conv_dim=4\"\ntext_encoder_lr = 5e-5\nresolution = 512\n"
        "lr_warmup_steps = 0.1\nlr_scheduler = \"linear\"\n")
    # ".toml" is appended as kohya does; the command line overrides the file, the file the defaults
    ns = A.parse_args("train_network", ["--config_file", str(tmp_path / "run"), "--seed", "7"])
    assert ns.pretrained_model_name_or_path == "m.safetensors"
    assert ns.learning_rate == 1e-4 and ns.max_train_steps == 10 and isinstance(ns.max_train_steps, int)
    assert ns.seed == 7
    assert ns.network_args == ["conv_dim=4"] and ns.text_encoder_lr == [5e-5] and ns.resolution == "512"
    assert ns.lr_warmup_steps == 0.1 and ns.train_batch_size == 1  # untouched default
    with pytest.raises(ConfigError, match="config file not found"):
        A.parse_args("train_network", ["--config_file", str(tmp_path / "missing.toml")])
    bad = tmp_path / "bad.toml"
    bad.write_text("shuffle_caption = 'yes'\nlearning_rate = [1, 2]\nthis is not toml = \n")
    with pytest.raises(ConfigError, match="cannot read TOML"):
        A.parse_args("train_network", ["--config_file", str(bad)])
    bad.write_text("shuffle_caption = 'yes'\nlearning_rate = [1, 2]\n")
    with pytest.raises(ConfigError) as info:
        A.parse_args("train_network", ["--config_file", str(bad)])
    assert len(info.value.problems) == 2 and "shuffle_caption: expected true or false" in str(info.value)


def test_output_config_round_trip(tmp_path):
    out = tmp_path / "out"
    argv = ["--output_dir", str(out), "--output_name", "mylora", "--learning_rate", "3e-4",
            "--network_args", "conv_dim=4", "conv_alpha=1", "--text_encoder_lr", "1e-5", "2e-5",
            "--lr_scheduler", "cosine", "--lr_warmup_steps", "0.05", "--dataset_config", str(tmp_path / "d.toml"),
            "--caption_extension", '.t"x\\t', "--seed", "3", "--full_bf16", "--mixed_precision", "bf16",
            "--output_config"]
    ns = A.parse_args("sdxl_train_network", argv)
    assert ns.output_config is True
    written = out / "mylora.toml"
    text = written.read_text()
    assert "[optimizer]" in text and "learning_rate = 0.0003" in text and "deepspeed" not in text
    again = A.parse_args("sdxl_train_network", ["--config_file", str(written)])
    expected = {k: v for k, v in vars(ns).items() if k not in ("config_file", "output_config")}
    got = {k: v for k, v in vars(again).items() if k not in ("config_file", "output_config")}
    assert got == expected
    assert again.output_config is False and again.config_file == str(written)


def test_output_config_to_config_file_path_like_kohya(tmp_path):
    target = tmp_path / "saved"
    ns = A.parse_args("train_network", ["--config_file", str(target), "--output_config", "--seed", "5"])
    assert (tmp_path / "saved.toml").is_file() and A.output_config_path(ns) == tmp_path / "saved.toml"
    assert A.parse_args("train_network", ["--config_file", str(target)]).seed == 5
    with pytest.raises(ConfigError, match="already exists"):  # kohya never overwrites it either
        A.parse_args("train_network", ["--config_file", str(target), "--output_config"])
    with pytest.raises(ConfigError, match="--output_config needs"):
        A.parse_args("train_network", ["--output_config"])


def test_helpers_and_secrets(tmp_path):
    ns = A.parse_args("train_network", ["--dataset_config", "d.toml", "--seed", "1"])
    d = A.namespace_to_dict(ns)
    assert d["dataset_config"] == "d.toml" and d["seed"] == 1 and d["v2"] is False
    ns.wandb_api_key = "SECRET"  # secrets never reach a written config
    ns.not_a_flag = "x"  # attributes added by callers are skipped
    text = A.effective_config_toml(ns)
    assert "SECRET" not in text and "not_a_flag" not in text and "seed = 1" in text


@pytest.mark.parametrize("script", COVERED_SCRIPTS)
def test_help_lists_every_flag(script):
    parser = A.build_parser(script)
    text = " ".join(parser.format_help().split())
    for entry in _kohya_entries(script):
        assert entry["flags"][-1] in text
    # DeepSpeed: the full-model scripts implement it (but --zero3_init_flag); the others refuse it
    assert ("[not supported: sdtk reads the model from its checkpoint" if script in FULL_TRAINERS
            else "[not supported: only the full-model scripts") in text
    assert "defaults < --config_file TOML < command line" in text
    # the plain parser converts types itself
    assert parser.parse_args(["--learning_rate", "1e-3"]).learning_rate == 1e-3


def test_other_kohya_scripts_know_all_their_flags():
    for script in ("gen_img", "networks.merge_lora"):
        dests = {f.dest for f in A.flags_for(script)}
        # sdtk-only safety switch; --XTI_embeddings is kohya's, from gen_img_diffusers.py (not in gen_img.py)
        own = {"allow_pickle", "XTI_embeddings"} if script == "gen_img" else set()
        assert dests == {e["dest"] for e in A.kohya_flags()[script]} | own
    with pytest.raises(ConfigError, match="--pyramid_noise_prob is not supported by sdtk: not implemented yet"):
        A.parse_args("gen_img", ["--pyramid_noise_prob", "0.5"])
    ns = A.parse_args("gen_img", [])
    assert isinstance(ns, argparse.Namespace) and ns.pyramid_noise_prob is None
    with pytest.raises(ConfigError, match="unknown script"):
        A.flags_for("train_lora")


def test_flag_kinds_cover_int_or_float():
    assert _flag("train_network", "lr_warmup_steps").kind is INT_OR_FLOAT


def test_docs_are_generated_from_declarations():
    from tools.gen_flag_docs import DEFAULT_OUT, render

    assert DEFAULT_OUT.read_text(encoding="utf-8") == render(), "run python tools/gen_flag_docs.py"


def test_gui_style_off_values_are_accepted_for_unimplemented_flags(tmp_path):
    # configs written by GUIs spell "off" as 0 / "" for flags kohya tests by truthiness
    cfg = tmp_path / "gui.toml"
    cfg.write_text('multires_noise_iterations = 0\nip_noise_gamma = 0\nmax_timestep = 1000\n'
                   'dataset_class = ""\nlr_scheduler_args = []\nloss_type = "l2"\ndeepspeed = false\n'
                   'min_snr_gamma = 0\n')
    ns = A.parse_args("train_network", ["--config_file", str(cfg)])
    # a flag sdtk does not implement always holds its default in the namespace
    assert ns.dataset_class is None and ns.deepspeed is False
    # implemented: kept as given (0 = off, as in kohya)
    assert ns.min_snr_gamma == 0 and ns.multires_noise_iterations == 0 and ns.max_timestep == 1000
    cfg.write_text('dataset_class = "my.Dataset"\n')
    with pytest.raises(ConfigError, match="--dataset_class is not supported by sdtk"):
        A.parse_args("train_network", ["--config_file", str(cfg)])

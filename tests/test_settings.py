"""Typed settings (library/config/settings.py): built once from the parsed flags, defaults taken from the
flag declarations, frozen; the cross-flag rules run once, where the flags are parsed."""

from __future__ import annotations

import ast
import dataclasses
from argparse import Namespace
from pathlib import Path

import pytest

from library.config import settings as S
from library.config.args import flags_for, parse_args
from library.config.flags.scripts import COVERED_SCRIPTS
from library.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
FLAT_SETTINGS = [S.NoiseSettings, S.LossSettings, S.OptimizerSettings, S.SchedulerSettings, S.DeepSpeedSettings,
                 S.FusedStepSettings, S.ConsoleLogSettings]


def _declared(dest: str) -> list:
    """Every default a covered script declares for ``dest``."""
    return [f.default for script in COVERED_SCRIPTS for f in flags_for(script) if f.dest == dest]


@pytest.mark.parametrize("cls", FLAT_SETTINGS, ids=lambda c: c.__name__)
def test_every_field_default_is_the_declared_flag_default(cls):
    built = cls.from_args(Namespace())  # a script that declares none of these flags
    for field in dataclasses.fields(cls):
        declared = _declared(field.name)
        assert declared, f"{cls.__name__}.{field.name} is not a flag of any training script"
        assert getattr(built, field.name) == declared[0], field.name
        assert all(d == declared[0] for d in declared), f"{field.name}: scripts declare different defaults"


@pytest.mark.parametrize("script", COVERED_SCRIPTS)
def test_a_scripts_own_defaults_build_the_same_settings(script):
    """Whether a script declares a flag or not, its settings at defaults are the same."""
    own = Namespace(**{f.dest: f.default for f in flags_for(script)})
    assert S.TrainingSettings.from_args(own) == S.TrainingSettings.from_args(Namespace())


def test_settings_hold_the_parsed_values_and_are_frozen():
    noise = S.NoiseSettings.from_args(Namespace(noise_offset=0.05, max_timestep=700))
    assert noise.noise_offset == 0.05 and noise.max_timestep == 700 and noise.multires_noise_discount == 0.3
    with pytest.raises(dataclasses.FrozenInstanceError):
        noise.noise_offset = 0.1  # type: ignore[misc]
    assert S.NoiseSettings.of(noise) is noise
    args = parse_args("train_network", ["--loss_type", "huber", "--huber_c", "0.2", "--optimizer_type", "Lion",
                                        "--lr_scheduler", "cosine"])
    t = S.TrainingSettings.from_args(args)
    assert (t.loss.loss_type, t.loss.huber_c, t.optimizer.optimizer_type, t.scheduler.lr_scheduler) == \
        ("huber", 0.2, "Lion", "cosine")
    assert not t.deepspeed.enabled  # train_network has no --deepspeed: the declared default
    assert not S.FusedStepSettings.from_args(Namespace(fused_backward_pass=True, optimizer_type="AdamW",
                                                       full_bf16=True)).stochastic_rounding
    assert S.FusedStepSettings.from_args(Namespace(fused_backward_pass=True, optimizer_type="Adafactor",
                                                   full_bf16=True)).stochastic_rounding


def test_an_unknown_flag_name_is_an_error_not_a_default():
    values = S.flag_values(Namespace(noise_offset=0.1))
    assert values["noise_offset"] == 0.1 and values["multires_noise_discount"] == 0.3
    assert values.declares("noise_offset") and not values.declares("multires_noise_discount")
    with pytest.raises(KeyError, match="noise_ofset"):
        values["noise_ofset"]


@pytest.mark.parametrize("lo, hi, bad", [(500, 100, True), (300, 300, True), (100, 500, False)])
def test_the_timestep_range_rule_is_one_rule(lo, hi, bad):
    """parse_args and the step module's check apply the same (strict) rule: min must be below max."""
    from library.training.step import check_loss_and_noise_args

    argv = ["--min_timestep", str(lo), "--max_timestep", str(hi)]
    problems = check_loss_and_noise_args(Namespace(min_timestep=lo, max_timestep=hi))
    assert bool(problems) is bad
    if bad:
        with pytest.raises(ConfigError, match="--min_timestep .* must be smaller than --max_timestep"):
            parse_args("train_network", argv)
    else:
        assert parse_args("train_network", argv).min_timestep == lo


def test_cross_flag_problems_are_found_once_all_at_once():
    """Rules once checked in two places: parse-time ones by parse_args, the run's ones by the setup's check
    (each flag alone is a valid command line), every problem in one error."""
    from library.training.setup import check_args

    with pytest.raises(ConfigError) as e:
        parse_args("train_network", ["--network_train_unet_only", "--network_train_text_encoder_only",
                                     "--mixed_precision", "bf16", "--full_fp16"])
    text = str(e.value)
    for needle in ("--network_train_unet_only and --network_train_text_encoder_only", "--full_fp16 needs"):
        assert needle in text, text
    args = parse_args("train_network", ["--initial_step", "5", "--max_train_steps", "5", "--adaptive_noise_scale",
                                        "0.1"])
    with pytest.raises(ConfigError) as e:
        check_args(args)
    text = str(e.value)
    for needle in ("--initial_step 5 must be less than --max_train_steps 5", "--adaptive_noise_scale needs"):
        assert needle in text, text
    with pytest.raises(ConfigError, match="--fused_backward_pass cannot be used with --gradient_accumulation_steps"):
        check_args(parse_args("sdxl_train", ["--fused_backward_pass", "--optimizer_type", "Adafactor",
                                             "--gradient_accumulation_steps", "2"]))


class _Processes:
    """Two processes' views of one barrier, recording who did what when."""

    def __init__(self, log: list, main: bool):
        self.log, self.is_main_process, self.num_processes = log, main, 2

    def wait_for_everyone(self):
        self.log.append(("wait", self.is_main_process))


def test_main_process_writes_first_and_the_others_wait():
    from library.training.distributed import main_process_first

    log: list = []
    for main in (True, False):
        acc = _Processes(log, main)
        assert main_process_first(acc, lambda: log.append(("work", acc.is_main_process)) or "done") == "done"
    assert log == [("work", True), ("wait", True), ("wait", False), ("work", False)]
    log.clear()
    main_process_first(_Processes(log, False), lambda: log.append("work"), shared_files=False)
    assert log == ["work"]  # nothing shared through files: no waiting


def test_root_scripts_import_no_other_root_script():
    scripts = {p.stem for p in ROOT.glob("*.py")}
    for path in ROOT.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            bad = [n for n in names if n.split(".")[0] in scripts - {path.stem}]
            assert not bad, f"{path.name} imports the root script {bad[0]}"

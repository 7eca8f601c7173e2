"""Command-line flags for sdtk's kohya-compatible scripts: parsing, ``--config_file``, validation.

Every flag is declared once in ``library.config.flags`` (a :class:`~library.config.flags.base.Flag`);
``--help``, ``docs/flags.md``, validation and ``--output_config`` are all derived from those
declarations. Every kohya flag of a script is known to its parser (``kohya_flags.json`` is a
copy of kohya's interface): a kohya flag sdtk declares as not supported, or has not declared
yet, is rejected with "--foo is not supported by sdtk: <reason>" when it is given a non-default
value, never with argparse's "unrecognized arguments".

Precedence of values (the one place this is defined):

    defaults  <  --config_file TOML  <  command line

``--config_file FILE`` follows kohya: a TOML file whose keys are flag dest names (e.g.
``learning_rate``), optionally grouped in sections (``[training]``) which are flattened; ".toml"
is appended when the name lacks it. Unknown keys are errors naming the file and key.

``--output_config`` writes the effective configuration (all values that are set, as TOML) and
the caller must then exit without training: with ``--config_file FILE`` it is written to FILE
(kohya's behaviour; an existing FILE is never overwritten), otherwise to
``<output_dir>/<output_name>.toml``. Reading that file back with ``--config_file`` yields the
same namespace.

All problems (unknown flags, bad values, unsupported flags, conflicting flags) are collected
and raised together as one :class:`~library.errors.ConfigError`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Sequence

from library.config.flags import ALL_FLAGS, COVERED_SCRIPTS
from library.config.flags.base import INT_OR_FLOAT, TODO, Flag, suggest
from library.config.flags.convert import convert, kind_name
from library.config.flags.rules import apply_rules
from library.errors import ConfigError
from library.utils.atomic import write_text

logger = logging.getLogger(__name__)

_KOHYA_FILE = Path(__file__).with_name("kohya_flags.json")
# Never written by --output_config: they only say how the config itself was read or written.
_NOT_WRITTEN = ("config_file", "output_config")


# ---- the declarations bound to a script --------------------------------------------------


@functools.lru_cache(maxsize=1)
def kohya_flags() -> dict[str, list[dict]]:
    """kohya's argparse facts per script (from the project's own copy, kohya_flags.json)."""
    with open(_KOHYA_FILE, encoding="utf-8") as f:
        return json.load(f)["scripts"]


def known_scripts() -> list[str]:
    """Scripts that :func:`build_parser` accepts: kohya's scripts plus any only sdtk declares."""
    own = {s for f in ALL_FLAGS if f.scripts for s in f.scripts}
    return list(kohya_flags()) + sorted(own - set(kohya_flags()))


def _kohya_kind(entry: dict) -> type:
    if entry["action"] == "StoreTrue":
        return bool
    return {"int": int, "float": float, "Path": Path, "int_or_float": INT_OR_FLOAT}.get(entry["type"], str)


def _matches_kohya(flag: Flag, entry: dict) -> bool:
    nargs = entry["nargs"] if entry["action"] != "StoreTrue" else None
    return entry["default"] == flag.default and nargs == flag.nargs


def scripts_of(flag: Flag) -> tuple[str, ...]:
    """The scripts a declaration applies to (see ``Flag.scripts``)."""
    if flag.scripts is not None:
        return flag.scripts
    table = kohya_flags()
    return tuple(
        s for s in COVERED_SCRIPTS
        if any(e["dest"] == flag.dest and _matches_kohya(flag, e) for e in table.get(s, []))
    )


def _fallback(entry: dict) -> Flag:
    """A kohya flag sdtk has not declared for this script: known, typed, 'not implemented yet'."""
    return Flag(
        spellings=tuple(entry["flags"]), kind=_kohya_kind(entry), default=entry["default"],
        support=TODO, help="kohya option that sdtk does not implement for this script yet.",
        choices=tuple(entry["choices"]) if entry["choices"] else None,
        nargs=entry["nargs"] if entry["action"] != "StoreTrue" else None,
        dest=entry["dest"], group="other kohya options", required=entry["required"],
    )


@functools.lru_cache(maxsize=None)
def flags_for(script: str) -> tuple[Flag, ...]:
    """Every flag of ``script``: sdtk's declarations first, then undeclared kohya flags."""
    if script not in known_scripts():
        raise ConfigError(f"unknown script {script!r}; known: {', '.join(known_scripts())}")
    declared = [f for f in ALL_FLAGS if script in scripts_of(f)]
    dests = {f.dest for f in declared}
    extra = [_fallback(e) for e in kohya_flags().get(script, []) if e["dest"] not in dests]
    return tuple(declared + extra)


@functools.lru_cache(maxsize=1)
def _flag_by_dest() -> dict[str, Flag]:
    """Any declaration for a dest, for writing TOML without knowing the script."""
    out: dict[str, Flag] = {}
    for script in known_scripts():
        for f in flags_for(script):
            out.setdefault(f.dest, f)
    return out


# ---- parsers -----------------------------------------------------------------------------


class _ArgparseFailure(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so errors reach one ConfigError."""

    def error(self, message: str):  # type: ignore[override]
        raise _ArgparseFailure(message)


def _help_text(flag: Flag) -> str:
    parts = [flag.help]
    if flag.kind is not bool and flag.default not in (None, "", []):
        parts.append(f"(default: {flag.default})")
    if not flag.support.implemented:
        parts.insert(0, f"[not supported: {flag.support.reason}]")
    return " ".join(parts).replace("%", "%%")


def _metavar(flag: Flag) -> str:
    if flag.choices:
        return "{" + ",".join(str(c) for c in flag.choices if c is not None) + "}"
    return {int: "N", float: "X", Path: "PATH", INT_OR_FLOAT: "N|RATIO"}.get(flag.kind, "TEXT")


def _argparse_type(flag: Flag):
    def conv(text: str) -> Any:
        value, problems = convert(_single(flag), text)
        if problems:
            raise argparse.ArgumentTypeError("; ".join(problems))
        return value

    conv.__name__ = kind_name(flag)
    return conv


def _single(flag: Flag) -> Flag:
    """The same flag seen as a single value (argparse converts list items one by one)."""
    return flag if flag.nargs is None else dataclasses.replace(flag, nargs=None)


def _make_parser(script: str, raw: bool) -> argparse.ArgumentParser:
    """``raw``: no defaults (SUPPRESS) and no type conversion, to see what the user typed."""
    cls = _Parser if raw else argparse.ArgumentParser
    parser = cls(prog=script, allow_abbrev=False,
                 description=f"{script} (sdtk, kohya-compatible flags). Precedence: "
                 "defaults < --config_file TOML < command line. See docs/flags.md.")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for flag in flags_for(script):
        group = groups.get(flag.group) or groups.setdefault(flag.group, parser.add_argument_group(flag.group))
        kw: dict[str, Any] = {"help": _help_text(flag)}
        if not flag.positional:
            kw["dest"] = flag.dest
        if raw:
            kw["default"] = argparse.SUPPRESS
        if flag.kind is bool:
            kw["action"] = "store_true"
            kw.setdefault("default", False)
        else:
            kw.setdefault("default", flag.default)
            kw["metavar"] = flag.dest if flag.positional else _metavar(flag)
            if not raw:
                kw["type"] = _argparse_type(flag)
            if flag.nargs is not None:
                kw["nargs"] = flag.nargs
            if flag.positional and not flag.required:
                kw["nargs"] = "?"
            if flag.required and not flag.positional:
                kw["required"] = True
        group.add_argument(*flag.spellings, **kw)
    return parser


@functools.lru_cache(maxsize=None)
def _raw_parser(script: str) -> argparse.ArgumentParser:
    # parsing does not change a parser, so one per script is enough
    return _make_parser(script, raw=True)


def build_parser(script: str) -> argparse.ArgumentParser:
    """An argparse parser with every flag of ``script`` (types, defaults, grouped help).

    Useful for ``--help`` and for tools that want a plain parser; :func:`parse_args` adds
    config files, collected errors, support checks and cross-flag rules on top.
    """
    return _make_parser(script, raw=False)


# ---- parse_args --------------------------------------------------------------------------


def parse_args(script: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` for ``script`` with kohya's semantics (see module docstring).

    Args:
        script: kohya script name, e.g. ``"train_network"`` or ``"sdxl_train_network"``.
        argv: arguments without the program name; ``None`` reads ``sys.argv[1:]``.

    Returns:
        A namespace with one attribute per flag dest. When ``args.output_config`` is true the
        effective config has been written and the caller must exit without training.

    Raises:
        ConfigError: every problem found, at once.
    """
    flags = flags_for(script)
    given, problems = _parse_command_line(script, argv)
    from_file: dict[str, Any] = {}
    config_path: Path | None = None
    config_file = given.get("config_file")
    if config_file and not given.get("output_config"):
        config_path = config_file_path(config_file)
        from_file, file_problems = _read_config_file(script, config_path)
        problems += file_problems

    values: dict[str, Any] = {}
    for flag in flags:
        source = None
        raw = flag.default
        if flag.dest in given:
            raw, source = given[flag.dest], flag.name
        elif flag.dest in from_file:
            raw, source = from_file[flag.dest], f"{config_path}: {flag.dest}"
        if source is None:
            values[flag.dest] = flag.default
            continue
        value, bad = convert(flag, raw)
        problems += [f"{source}: {p}" for p in bad]
        values[flag.dest] = flag.default if bad else value
        if not bad and not flag.support.implemented:
            # a flag sdtk does not implement always holds its default in the namespace
            values[flag.dest] = flag.default
            if not flag.is_off(value):
                where = f" (set in {config_path})" if source != flag.name else ""
                problems.append(f"{flag.name} is not supported by sdtk: {flag.support.reason}{where}")

    problems += apply_rules(values, script)
    if problems:
        raise ConfigError(problems)
    args = argparse.Namespace(**values)
    if values.get("output_config"):  # scripts without --output_config (gen_img) never write one
        path = write_effective_config(args)
        logger.info("wrote the effective config to %s; exiting without training", path)
    return args


def _parse_command_line(script: str, argv: Sequence[str] | None) -> tuple[dict[str, Any], list[str]]:
    """The flags the user typed (raw text), and problems with unknown flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _raw_parser(script)
    try:
        ns, extras = parser.parse_known_args(argv)
    except _ArgparseFailure as e:
        raise ConfigError(f"command line: {e}") from None
    problems = []
    spellings = [s for f in flags_for(script) for s in f.spellings if s.startswith("-")]
    after_unknown = False  # values that follow an unknown flag belong to it
    for item in extras:
        if item.startswith("-") and len(item) > 1 and not _is_number(item):
            problems.append(_unknown_flag_problem(script, item.split("=", 1)[0], spellings))
            after_unknown = "=" not in item
        elif not after_unknown:
            problems.append(f"unexpected argument {item!r} (values go after a flag: --flag value)")
    return vars(ns), problems


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _unknown_flag_problem(script: str, name: str, spellings: list[str]) -> str:
    msg = f"unknown flag {name} for {script}"
    others = [s for s, entries in kohya_flags().items()
              if s != script and any(name in e["flags"] for e in entries)]
    if others:
        msg += f" (it is a kohya option of {', '.join(others[:3])})"
    hint = suggest(name, spellings)
    return msg + (f"; did you mean {hint}?" if hint else "")


# ---- config files ------------------------------------------------------------------------


def config_file_path(name: str | Path) -> Path:
    """kohya appends ".toml" to a --config_file name that lacks it."""
    name = str(name)
    return Path(name if name.endswith(".toml") else name + ".toml")


def load_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file; raise ConfigError naming the file on any problem."""
    try:
        import tomllib  # Python 3.11+
    except ImportError:  # pragma: no cover - Python 3.10
        import toml as tomllib  # type: ignore[no-redef]
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}; check the --config_file path")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"cannot read TOML: {e}", source=str(path)) from None
    except Exception as e:  # toml's own decode error on Python 3.10
        raise ConfigError(f"cannot read TOML: {e}", source=str(path)) from None


def _read_config_file(script: str, path: Path) -> tuple[dict[str, Any], list[str]]:
    """Flattened {dest: raw value} from a kohya config TOML, and problems with unknown keys."""
    data = load_toml(path)
    flat: dict[str, Any] = {}
    for key, value in data.items():
        section = value if isinstance(value, dict) else {key: value}
        for k, v in section.items():
            if k in flat:
                logger.warning("%s: key %r appears in more than one section; the last one wins", path, k)
            flat[k] = v
    dests = {f.dest for f in flags_for(script)}
    problems = []
    for key in flat:
        if key in dests:
            continue
        msg = f"{path}: unknown key {key!r} for {script}"
        others = [s for s, entries in kohya_flags().items() if any(e["dest"] == key for e in entries)]
        if others:
            msg += f" (it is a kohya option of {', '.join(others[:3])})"
        hint = suggest(key, sorted(dests))
        problems.append(msg + (f"; did you mean {hint!r}?" if hint else ""))
    for key in _NOT_WRITTEN:
        if key in flat:
            problems.append(f"{path}: key {key!r} cannot be set inside a config file")
    return {k: v for k, v in flat.items() if k in dests and k not in _NOT_WRITTEN}, problems


# ---- effective config --------------------------------------------------------------------


def namespace_to_dict(args: argparse.Namespace) -> dict[str, Any]:
    """All values of ``args`` as plain Python data (paths as text), e.g. for metadata or logs."""
    out = {}
    for key, value in vars(args).items():
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, (list, tuple)):
            value = [str(v) if isinstance(v, Path) else v for v in value]
        out[key] = value
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)


def effective_config_toml(args: argparse.Namespace) -> str:
    """The effective config as TOML: every set value, grouped in sections by topic.

    Values that are ``None`` (unset) are left out because TOML has no null; secrets
    (API keys, tokens), ``config_file`` / ``output_config`` and flags sdtk does not implement
    (which can only hold their defaults) are not written. Attributes that are not flags
    (added by callers) are skipped.
    """
    by_dest = _flag_by_dest()
    sections: dict[str, list[str]] = {}
    for key, value in namespace_to_dict(args).items():
        flag = by_dest.get(key)
        # flags sdtk does not implement can only hold their defaults here: leave them out
        if (flag is None or flag.secret or key in _NOT_WRITTEN or value is None
                or not flag.support.implemented):
            continue
        sections.setdefault(flag.group, []).append(f"{key} = {_toml_value(value)}")
    lines = ["# Effective sdtk config. Use it with --config_file; command-line flags override it."]
    for group, entries in sections.items():
        lines += ["", f"[{group.replace(' ', '_')}]", *entries]
    return "\n".join(lines) + "\n"


def output_config_path(args: argparse.Namespace) -> Path:
    """Where --output_config writes: the --config_file path, else <output_dir>/<output_name>.toml.

    ``args`` is a namespace of :func:`parse_args` for any script: one without ``--config_file`` /
    ``--output_dir`` / ``--output_name`` reads them as unset.
    """
    values = vars(args)
    if values.get("config_file"):
        return config_file_path(values["config_file"])
    if not values.get("output_dir"):
        raise ConfigError("--output_config needs --config_file FILE (where to write) or --output_dir")
    return Path(values["output_dir"]) / f"{values.get('output_name') or 'last'}.toml"


def write_effective_config(args: argparse.Namespace) -> Path:
    """Write :func:`effective_config_toml` for --output_config (atomically); return the path."""
    path = output_config_path(args)
    if vars(args).get("config_file") and path.exists():
        raise ConfigError(f"--output_config: {path} already exists; remove it or name another "
                          "--config_file (kohya also refuses to overwrite it)")
    write_text(path, effective_config_toml(args))
    return path

"""The command-line convention every tool in tools/ follows, in one place.

What: absl flags (snake_case), settings as `--config.a.b=v` overrides of the tool's
`default_config()` (ml_collections), `--help`/`-h` printing the tool's docstring (with its example
commands) and its flags, and every user mistake shown as one paragraph `error: ...` on stderr with
exit status 2, never a traceback.

Why here: one leaf (it imports only afm_jax.errors / configuration and absl / ml_collections), so the
tools stay thin and alike. Each call parses into its own `absl.flags.FlagValues`, so tests can call
several tools in one process, and a tool's `main(argv)` can be called repeatedly.

A tool looks like:

    TOOL = cli.Tool(__doc__, define_flags, default_config=my_config, config_keys_in="tools/x.py")

    def work(fv: flags.FlagValues, args: list[str]) -> int: ...

    def main(argv=None) -> int:
        return cli.run(TOOL, work, argv)

    if __name__ == "__main__":
        cli.app_main(TOOL, work)
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Callable, Sequence

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from afm_jax import configuration
from afm_jax.errors import ConfigError, UserError, user_error_message

HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "--helpfull", "-?")
CONFIG = "config"


class UsageError(ConfigError):
    """A flag that does not exist, lacks its value or has a value of the wrong type."""


@dataclasses.dataclass(frozen=True)
class Tool:
    """A tool's interface: its docstring (first line: what it does; then example commands), a function
    defining its flags on a FlagValues, and optionally its settings (`default_config(argv)` returning a
    ConfigDict, exposed as `--config.<key>=<value>`; it receives the command line so that a setting's
    defaults may depend on a flag such as `--variant`)."""

    doc: str
    define_flags: Callable[[flags.FlagValues], None]
    default_config: Callable[[Sequence[str]], ml_collections.ConfigDict] | None = None
    config_keys_in: str = ""  # where the valid --config keys are documented (named in errors)
    positional: str = ""  # usage of positional arguments, e.g. "STUDY_FILE"; "" = none allowed
    required: tuple[str, ...] = ()  # flags that must be given


def peek_flag(argv: Sequence[str], name: str, default: str | None = None) -> str | None:
    """The value of `--name=v` / `--name v` in argv before parsing (the last one wins), else default."""
    value = default
    for i, arg in enumerate(argv):
        if arg in (f"--{name}", f"-{name}") and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith((f"--{name}=", f"-{name}=")):
            value = arg.split("=", 1)[1]
    return value


def config_overrides(argv: Sequence[str], name: str = CONFIG) -> list[str]:
    """The dotted keys given as `--config.a.b=v` (or `--config.a.b v`, `--noconfig.flag`), in order."""
    keys = []
    for arg in argv:
        m = re.match(rf"^--?(?:no)?{name}\.([^=]+)", arg)
        if m and m.group(1) not in keys:
            keys.append(m.group(1))
    return keys


def _is_flag_token(arg: str) -> bool:
    return arg.startswith("-") and arg != "-" and not re.match(r"^-\d", arg)


def help_text(tool: Tool, fv: flags.FlagValues | None = None) -> str:
    """The docstring (usage and examples) followed by every flag with its default."""
    fv = fv if fv is not None else _define(tool, [])
    lines = [tool.doc.strip(), "", "Flags:"]
    for flag in (fv[name] for name in sorted(fv)):
        if flag.name == CONFIG or flag.name.startswith(CONFIG + "."):
            continue
        default = "" if flag.default is None else f" (default: {flag.default_as_str or repr(flag.default)})"
        lines.append(f"  --{flag.name}: {flag.help}{default}")
    if tool.default_config is not None:
        lines += ["", f"Settings (override with --{CONFIG}.<key>=<value>; documented in {tool.config_keys_in}):"]
        config = tool.default_config([])
        for key, value in sorted(flatten(config).items()):
            lines.append(f"  --{CONFIG}.{key}={value!r}")
    return "\n".join(lines)


def flatten(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, object]:
    """{dotted key: value} of every leaf of `config`."""
    out: dict[str, object] = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _unknown_key(config: ml_collections.ConfigDict, key: str) -> str | None:
    """The first part of dotted `key` that `config` lacks (as a dotted prefix), or None."""
    node = config
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
            return ".".join(parts[: i + 1])
        node = node[part]
    return None


def _define(tool: Tool, argv: Sequence[str]) -> flags.FlagValues:
    """A fresh FlagValues with the tool's flags and (when it has settings) its --config overrides applied."""
    fv = flags.FlagValues()
    tool.define_flags(fv)
    overrides = config_overrides(argv)
    if tool.default_config is None:
        if overrides:
            raise UsageError(
                f"--{CONFIG}.{overrides[0]}: this tool has no --{CONFIG} settings; its flags are listed by --help."
            )
        return fv
    config = tool.default_config(argv)
    for key in overrides:
        bad = _unknown_key(config, key)
        if bad is not None:
            raise ConfigError(
                f"--{CONFIG}.{key}: `{bad}` is not a setting of this tool. The valid keys and their "
                f"defaults are listed by --help (and in {tool.config_keys_in})."
            )
    try:
        config_flags.DEFINE_config_dict(
            CONFIG, config, "The tool's settings.", flag_values=fv, sys_argv=["tool", *argv]
        )
    except (AttributeError, KeyError, ValueError, TypeError) as e:  # ml_collections rejects an override
        raise ConfigError(configuration.bad_override_message(argv, e, tool.config_keys_in)) from None
    return fv


def parse(tool: Tool, argv: Sequence[str]) -> tuple[flags.FlagValues, list[str]]:
    """(flag values, positional arguments) of `argv` (without the program name). Raises a UserError."""
    argv = [os.fspath(a) for a in argv]
    fv = _define(tool, argv)
    try:
        rest = fv(["tool", *argv], known_only=False)[1:]
    except flags.IllegalFlagValueError as e:
        raise UsageError(f"{e}. Run with --help for the flags and their types.") from None
    except flags.Error as e:
        raise UsageError(f"{e}. Run with --help for the flags.") from None
    if rest and not tool.positional:
        raise UsageError(f"Unexpected arguments {rest}: this tool takes flags only (see --help).")
    missing = [name for name in tool.required if fv[name].value in (None, "", [])]
    if missing:
        raise UsageError(f"Give {', '.join('--' + m for m in missing)} (see --help for an example).")
    return fv, rest


def run(
    tool: Tool, work: Callable[[flags.FlagValues, list[str]], int | None], argv: Sequence[str] | None = None
) -> int:
    """Parses `argv` (default: sys.argv[1:]) and runs `work(flag_values, positional_args)`; returns the
    exit status: 0 (or what `work` returns), 2 with `error: ...` on stderr for a user mistake."""
    argv = list(sys.argv[1:] if argv is None else [os.fspath(a) for a in argv])
    options = argv[: argv.index("--")] if "--" in argv else argv
    if any(a in HELP_FLAGS for a in options):
        try:
            print(help_text(tool))
        except UserError as e:
            print(user_error_message(e), file=sys.stderr)
            return 2
        return 0
    try:
        fv, args = parse(tool, argv)
        if not flags.FLAGS.is_parsed():  # libraries (grain workers) read absl's global flags
            flags.FLAGS.mark_as_parsed()
        rc = work(fv, args)
    except (UserError, FileExistsError) as e:
        print(user_error_message(e), file=sys.stderr)
        return 2
    return 0 if rc is None else int(rc)


def app_main(tool: Tool, work: Callable[[flags.FlagValues, list[str]], int | None]) -> None:
    """The `if __name__ == "__main__":` entry: runs the tool under `absl.app.run` and exits with its status."""

    def parse_global(argv: list[str]) -> list[str]:
        flags.FLAGS([argv[0]])  # absl's own flags keep their defaults; the tool's are parsed by `run`
        return argv

    app.run(lambda argv: sys.exit(run(tool, work, argv[1:])), flags_parser=parse_global)


def require_positive(value: int | float | None, flag: str, *, allow_zero: bool = True) -> None:
    """A count flag (workers, steps) must not be negative (or zero when `allow_zero` is False)."""
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise UsageError(f"--{flag} must be {'>= 0' if allow_zero else '>= 1'}, got {value}.")


def check_output_dir(path: str | os.PathLike, flag: str = "out") -> None:
    """An output folder flag must not name an existing file."""
    if not str(path).strip():
        raise UsageError(f"--{flag} is empty: give the folder to write into.")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--{flag} {os.fspath(path)} is a file, not a folder: give a folder to write into.")


def refuse_overwrite(path: str | os.PathLike, marker: str, overwrite: bool, flag: str = "out") -> None:
    """Refuses to write into a folder that already holds `marker` (an earlier output) unless `--overwrite`."""
    check_output_dir(path, flag)
    if not overwrite and os.path.exists(os.path.join(path, marker)):
        raise UsageError(
            f"--{flag} {os.fspath(path)} already holds {marker}: pass --overwrite to replace it, "
            "or give another folder."
        )


def define_parity_flags(fv: flags.FlagValues, tolerance: float) -> None:
    """The timm parity-check flags both interop tools take (--check, --tolerance, --no_parity)."""
    flags.DEFINE_bool(
        "check", False, "Fail if the timm parity check fails (or torch/timm are missing).", flag_values=fv
    )
    flags.DEFINE_float(
        "tolerance", tolerance, "Max abs difference of forward_features accepted by --check.", flag_values=fv
    )
    flags.DEFINE_bool("no_parity", False, "Skip the timm parity check.", flag_values=fv)


def define_output_flags(fv: flags.FlagValues, what: str) -> None:
    """--out (a folder) and --overwrite (replace an earlier output there)."""
    flags.DEFINE_string("out", None, f"Folder to write {what} into.", flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "Replace an earlier output in --out.", flag_values=fv)

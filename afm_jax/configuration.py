"""Config checks that run before any work: a bad value fails early with a message naming the key.

Configs are `get_config()` files returning an `ml_collections.ConfigDict` (locked, so an override of
an unknown key fails at flag parsing). This module checks the *values* a task needs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
from typing import Any, Callable, Iterable

import ml_collections

from afm_jax.errors import ConfigError


def require(config: ml_collections.ConfigDict, key: str, check: Callable[[Any], bool], expected: str) -> Any:
    """Returns `config.<key>` (dotted path) after checking it; raises ConfigError naming the key."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
            raise ConfigError(f"Config key `{key}` is missing: set it in the config file or with --config.{key}=...")
        node = node[part]
    try:
        ok = check(node)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(
            f"Config key `{key}` = {node!r} is invalid: expected {expected}. "
            f"Fix it in the config file or override with --config.{key}=..."
        )
    return node


def require_choice(config: ml_collections.ConfigDict, key: str, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    return require(config, key, lambda v: v in choices, f"one of {', '.join(map(repr, choices))}")


def to_json(config: ml_collections.ConfigDict) -> dict:
    """A JSON-safe dict of the config (tuples become lists), for checkpoints and logs."""
    return json.loads(config.to_json_best_effort())


def load_python_file(path: str | os.PathLike, function: str, *args: Any, what: str = "Config file") -> Any:
    """Calls `function(*args)` of a Python file the user named (a config or study file; nothing
    else is executed). Missing file or function: ConfigError saying which."""
    file = pathlib.Path(path)
    if not file.is_file():
        raise ConfigError(f"{what} {file} does not exist.")
    spec = importlib.util.spec_from_file_location(f"afm_{function}_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, function):
        raise ConfigError(f"{what} {file} has no {function}() function.")
    return getattr(module, function)(*args)


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any], where: str) -> None:
    """Sets dotted keys (`{"optim.base_lr": 1e-3}`) in place; a key the config lacks is a ConfigError
    naming `where` the override came from. Lists become tuples (ConfigDict's sequence type)."""
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            if part not in node:
                raise ConfigError(f"{where}: override {key!r} is not a config key (see afm_jax/train/defaults.py).")
            node = node[part]
        if leaf not in node:
            raise ConfigError(f"{where}: override {key!r} is not a config key (see afm_jax/train/defaults.py).")
        node[leaf] = tuple(value) if isinstance(value, list) else value


def bad_override_message(argv: Iterable[str], error: Exception, keys_are_in: str) -> str:
    """The message for a `--config.a.b=v` override that ml_collections rejected (unknown key or bad
    value), naming the one override that failed and where the valid keys are listed."""
    overrides = list(dict.fromkeys(a.split("=")[0] for a in argv if a.startswith("--config.")))
    detail = str(error).strip("\"'").replace("\\n", " ").replace("\\'", "'")
    # ml_collections names the missing part (AttributeError(KeyError("'zz'"))) or the flag (`--config.a=abc`)
    inner: Any = error
    while isinstance(inner, BaseException) and inner.args:
        inner = inner.args[0]
    missing = str(inner).strip("\"'")
    failed = [o for o in overrides if o in detail] or [o for o in overrides if missing in o.split(".")[1:]]
    named = failed[-1] if failed else (overrides[0] if len(overrides) == 1 else "a --config override")
    return f"unknown key or bad value in {named} ({detail}). The valid keys and their defaults are in {keys_are_in}."

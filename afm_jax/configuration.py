"""Config checks that run before any work: a bad value fails early with a message naming the key.

Configs are `get_config()` files returning an `ml_collections.ConfigDict` (locked, so an override of
an unknown key fails at flag parsing). This module checks the *values* a task needs.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterable

import ml_collections


class ConfigError(ValueError):
    """A config value is missing or invalid; the message names the key and what to do."""


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
        raise ConfigError(f"Config key `{key}` = {node!r} is invalid: expected {expected}. "
                          f"Fix it in the config file or override with --config.{key}=...")
    return node


def require_choice(config: ml_collections.ConfigDict, key: str, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    return require(config, key, lambda v: v in choices, f"one of {', '.join(map(repr, choices))}")


def to_json(config: ml_collections.ConfigDict) -> dict:
    """A JSON-safe dict of the config (tuples become lists), for checkpoints and logs."""
    return json.loads(config.to_json_best_effort())

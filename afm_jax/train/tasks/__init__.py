"""Training tasks by name (`config.task`): each supplies model, loss and pictures to the trainer."""

from __future__ import annotations

from afm_jax.train.tasks import mae

TASKS = {"mae": mae.MAETask()}


def get_task(name: str):
    from afm_jax.configuration import ConfigError
    if name not in TASKS:
        raise ConfigError(f"Config key `task` = {name!r} is unknown: expected one of {', '.join(map(repr, TASKS))}.")
    return TASKS[name]

"""Training tasks by name (`config.task`); each module is imported only when its task is used."""

from __future__ import annotations

import importlib

from afm_jax.errors import ConfigError

# name -> "module:Class"; a task module registers here and nowhere else.
TASKS = {
    "mae": "afm_jax.train.tasks.mae:MAETask",
    "dino": "afm_jax.train.tasks.dino:DINOTask",
    "finetune": "afm_jax.train.tasks.finetune:FinetuneTask",
    "linprobe": "afm_jax.train.tasks.finetune:LinearProbeTask",
}


def get_task_class(name: str) -> type:
    if name not in TASKS:
        raise ConfigError(f"Config key `task` = {name!r} is unknown: expected one of {', '.join(map(repr, TASKS))}.")
    module_name, class_name = TASKS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def get_task(name: str):
    """A fresh instance of the task called `name`."""
    return get_task_class(name)()

"""Checkpoints in `<workdir>/checkpoints`: train state, data-iterator state and run metadata.

One orbax `CheckpointManager` with three items per step:
- `state`: the TrainState pytree (saved asynchronously; every process writes its shards);
- `data`: the grain iterator state, one JSON file per process (grain's own orbax handler);
- `meta`: config, code version and step, so every checkpoint says what made it.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

ITEMS = ("state", "data", "meta")


class Checkpointer:
    """Saves and restores (train state, iterator state, metadata) by step; keeps the newest N."""

    def __init__(self, workdir: str | os.PathLike, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(os.fspath(workdir)), "checkpoints")
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any | None, meta: dict) -> None:
        """Starts an (async) save of `step`; the previous async save is waited for first."""
        args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self._manager.save(step, args=ocp.args.Composite(**args), force=True)

    def restore(self, step: int, abstract_state: Any, data_iterator: Any | None) -> tuple[Any, dict]:
        """Restores `state` into the shardings of `abstract_state` (any device/process layout: orbax
        reshards) and the iterator in place."""
        args = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
        restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        if data_iterator is not None:
            data_iterator.set_state(json.loads(self._data_state_file(step).read_text()))
        return restored["state"], restored["meta"]

    def _data_state_file(self, step: int) -> pathlib.Path:
        """This process's iterator state; on another process count, process 0's (the iterator
        accepts a state from another layout when the global batch is unchanged)."""
        directory = pathlib.Path(self.directory) / str(step) / "data"
        index, count = jax.process_index(), jax.process_count()
        own = directory / f"process_{index}-of-{count}.json"
        if own.is_file():
            return own
        others = sorted(directory.glob("process_0-of-*.json"))
        if not others:
            raise FileNotFoundError(f"Checkpoint {directory.parent} has no data-iterator state.")
        return others[0]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

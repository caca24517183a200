"""Checkpoints in `<workdir>/checkpoints`: train state, data-iterator state and run metadata.

One orbax `CheckpointManager` with three items per step:
- `state`: the TrainState pytree (saved asynchronously; every process writes its shards);
- `data`: the grain iterator state, one JSON file per process (grain's own orbax handler);
- `meta`: config, code version and step, so every checkpoint says what made it.

Reading back without the trainer (export, `config.init_from`, evaluation backbones): `read_encoder_checkpoint`
restores only the encoder weights (params/frozen, or a DINO teacher from `extra`) as numpy, no optimiser
state, no devices, and rebuilds the encoder from `meta['config']['model']`; `resolve_step_dir` and
`read_meta` find a step and its metadata. Writer and readers share one layout: `<workdir>/checkpoints/<step>/{state,data,meta}`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from afm_jax.errors import InteropError
from afm_jax.interop.timm import encoder_flat_state
from afm_jax.models import factory
from afm_jax.models.vit import VisionTransformer

ITEMS = ("state", "data", "meta")
CHECKPOINTS_DIR = "checkpoints"


class Checkpointer:
    """Saves and restores (train state, iterator state, metadata) by step; keeps the newest N."""

    def __init__(self, workdir: str | os.PathLike, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(os.fspath(workdir)), CHECKPOINTS_DIR)
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


# ─── Readers (no trainer needed) ───

WEIGHTS = ("auto", "teacher", "student")


@dataclasses.dataclass
class EncoderCheckpoint:
    """An encoder rebuilt from a checkpoint, and where it came from."""

    encoder: VisionTransformer
    config: ml_collections.ConfigDict
    step: int
    weights: str                  # "student" (params) or "teacher" (extra['teacher'])
    code_version: str
    step_dir: pathlib.Path


def _numbered_steps(directory: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in directory.iterdir()
                  if p.is_dir() and p.name.isdigit() and (p / "state").is_dir())


def is_checkpoint_path(path: str | os.PathLike) -> bool:
    """True for a workdir (with ``checkpoints/``), a checkpoints dir, or one step dir of ours."""
    p = pathlib.Path(path)
    if not p.is_dir():
        return False
    if (p / "state").is_dir() and (p / "meta").is_dir():
        return True
    if (p / CHECKPOINTS_DIR).is_dir():
        p = p / CHECKPOINTS_DIR
    return bool(_numbered_steps(p))


def resolve_step_dir(path: str | os.PathLike, step: int | None = None) -> tuple[pathlib.Path, int]:
    """(step directory, step) for a workdir, a ``checkpoints`` dir or a step dir; latest by default."""
    p = pathlib.Path(path).expanduser()
    if not p.exists():
        raise InteropError(f"Checkpoint path {p} does not exist: pass a run's --workdir, its "
                           "checkpoints/ folder or one checkpoints/<step> folder.")
    if (p / "state").is_dir() and (p / "meta").is_dir():
        if step is not None and p.name.isdigit() and int(p.name) != step:
            raise InteropError(f"{p} is the checkpoint of step {p.name}, not of --step {step}.")
        return p, int(p.name) if p.name.isdigit() else -1
    if (p / CHECKPOINTS_DIR).is_dir():
        p = p / CHECKPOINTS_DIR
    steps = _numbered_steps(p) if p.is_dir() else []
    if not steps:
        raise InteropError(f"No checkpoint found in {p}: expected <workdir>/checkpoints/<step>/state "
                           "as the trainer writes it. Did the run save a checkpoint yet?")
    if step is None:
        step = steps[-1]
    if step not in steps:
        raise InteropError(f"No checkpoint of step {step} in {p}; available steps: {steps}.")
    return p / str(step), step


def read_meta(step_dir: pathlib.Path) -> dict:
    """The ``meta`` item (config, code version) of a step directory."""
    if not (step_dir / "meta").is_dir():
        raise InteropError(f"{step_dir} has no meta/ item: not a checkpoint of this trainer.")
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ck:
        return dict(ck.restore(step_dir / "meta"))


def _restore_subtrees(state_dir: pathlib.Path, keys: tuple[str, ...]) -> dict:
    """Restores only ``keys`` of the saved TrainState, as numpy arrays on the host."""
    with ocp.PyTreeCheckpointer() as ck:
        md = ck.metadata(state_dir)
        tree = getattr(md, "item_metadata", md)
        tree = getattr(tree, "tree", tree)
        item = {k: tree[k] for k in keys if k in tree and tree[k]}
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        return ck.restore(state_dir, args=ocp.args.PyTreeRestore(
            item=item, restore_args=restore_args, partial_restore=True))


def _flatten(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
    """Nested dicts -> ``{dotted path: array}``; nnx's ``value`` leaf level is dropped."""
    out: dict[str, np.ndarray] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k == "value" and not isinstance(v, dict):
                out[prefix.rstrip(".")] = np.asarray(v)
            else:
                out.update(_flatten(v, f"{prefix}{k}."))
    elif tree is not None:
        out[prefix.rstrip(".")] = np.asarray(tree)
    return out


def assign_flat_state(module: nnx.Module, flat: dict[str, np.ndarray], *, source: str) -> None:
    """Sets every variable of ``module`` from ``flat`` (same paths, same shapes), in place."""
    targets = encoder_flat_state(module)
    for path, var in targets.items():
        if path not in flat:
            raise InteropError(f"Key {path!r} is missing from {source}; the checkpoint's encoder does "
                               "not match its own config (was it written by another code version?).")
        if tuple(flat[path].shape) != tuple(var.shape):
            raise InteropError(f"Key {path!r} has shape {flat[path].shape} in {source}, the model built "
                               f"from its config {tuple(var.shape)}.")
    for path, var in targets.items():
        var.set_value(jnp.asarray(flat[path], var.dtype))


def read_encoder_checkpoint(path: str | os.PathLike, *, step: int | None = None,
                            weights: str = "auto") -> EncoderCheckpoint:
    """The encoder of a checkpoint, rebuilt from the run's config and loaded with its weights.

    Args:
      path: a run's workdir, its ``checkpoints`` folder or one ``checkpoints/<step>`` folder.
      step: which step (default: the latest).
      weights: ``"teacher"`` (DINO's EMA teacher), ``"student"`` (the optimised params) or
        ``"auto"`` (the teacher when the run has one, else the params).
    """
    if weights not in WEIGHTS:
        raise InteropError(f"weights must be one of {WEIGHTS}, got {weights!r}.")
    step_dir, step = resolve_step_dir(path, step)
    meta = read_meta(step_dir)
    if "config" not in meta or "model" not in meta["config"]:
        raise InteropError(f"{step_dir}/meta has no config.model: cannot tell which encoder it holds.")
    config = ml_collections.ConfigDict(meta["config"])
    restored = _restore_subtrees(step_dir / "state", ("params", "frozen", "extra"))
    teacher = (restored.get("extra") or {}).get("teacher")
    chosen = "teacher" if weights == "teacher" or (weights == "auto" and teacher) else "student"
    if chosen == "teacher" and not teacher:
        raise InteropError(f"The checkpoint in {step_dir} has no teacher (extra['teacher']; MAE runs "
                           "have none): use --weights student.")
    params = teacher if chosen == "teacher" else restored["params"]
    if "encoder" not in params:
        raise InteropError(f"The checkpoint's params have no 'encoder' (keys: {sorted(params)}); "
                           "only models that expose their ViT as .encoder can be exported.")
    flat = _flatten((restored.get("frozen") or {}).get("encoder", {}))
    flat.update(_flatten(params["encoder"]))
    # abstract build (no random init: every variable is set from the checkpoint just below)
    encoder = nnx.eval_shape(lambda: factory.build_encoder(config.model, config.image_size, nnx.Rngs(0)))
    assign_flat_state(encoder, flat, source=str(step_dir))
    return EncoderCheckpoint(encoder=encoder, config=config, step=step, weights=chosen,
                             code_version=str(meta.get("code_version", "unknown")), step_dir=step_dir)

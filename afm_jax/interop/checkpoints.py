"""Read the ViT encoder (and the run config) out of our orbax training checkpoints.

What: export (``tools/export_timm.py``) and ``config.init_from`` need the encoder weights of a run
without rebuilding its task, optimiser or data pipeline. A checkpoint step holds ``state`` (the
TrainState pytree ``{step, params, frozen, opt_state, rng, extra}``), ``data`` and ``meta`` (JSON:
``config``, ``code_version``, ``step``). We restore only ``params``/``frozen`` (and ``extra`` for a
DINO teacher) as numpy — no optimiser state, no devices, no shardings — and rebuild the encoder from
``meta['config']['model']``.

Why: every pretraining model exposes its ViT as ``.encoder``, so its weights sit under
``params['encoder']`` (trainable) and ``frozen['encoder']`` (the fixed sin-cos ``pos_embed``); a
DINO teacher has the same tree under ``extra['teacher']``.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from afm_jax.errors import InteropError
from afm_jax.interop.timm import encoder_flat_state
from afm_jax.models import factory
from afm_jax.models.vit import VisionTransformer

__all__ = ["EncoderCheckpoint", "is_checkpoint_path", "resolve_step_dir", "read_meta",
           "read_encoder_checkpoint", "assign_flat_state"]

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
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
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
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
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
    import orbax.checkpoint as ocp

    if not (step_dir / "meta").is_dir():
        raise InteropError(f"{step_dir} has no meta/ item: not a checkpoint of this trainer.")
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ck:
        return dict(ck.restore(step_dir / "meta"))


def _restore_subtrees(state_dir: pathlib.Path, keys: tuple[str, ...]) -> dict:
    """Restores only ``keys`` of the saved TrainState, as numpy arrays on the host."""
    import jax
    import orbax.checkpoint as ocp

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

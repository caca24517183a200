"""The train state: one pytree holding everything a resumed run needs.

Flax NNX modules are split once into a static `graphdef` and state; the train step receives the
pure pytree below and merges the module inside `jit`. Fixed (non-trainable) variables such as
sin-cos position embeddings live in `frozen`, so the optimiser never sees them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimiser steps taken
    params: Any  # nnx.State of nnx.Param variables
    frozen: Any  # nnx.State of every other variable (fixed pos-embeds, ...)
    opt_state: Any
    rng: jax.Array  # base key; the key of step t is fold_in(rng, t), so resume is exact
    extra: Any = struct.field(default_factory=dict)  # method state: DINO teacher and centre, ...


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, Any, Any]:
    """(graphdef, params, frozen) of a module."""
    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
    return graphdef, params, frozen


def merge_model(graphdef: nnx.GraphDef, state: TrainState, params: Any | None = None) -> nnx.Module:
    """The module for `state` (optionally with other params, e.g. inside a grad closure)."""
    return nnx.merge(graphdef, state.params if params is None else params, state.frozen)


def create_train_state(
    model: nnx.Module, tx: optax.GradientTransformation, seed: int, extra: Any = None
) -> tuple[nnx.GraphDef, TrainState]:
    graphdef, params, frozen = split_model(model)
    state = TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        frozen=frozen,
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
        extra={} if extra is None else extra,
    )
    return graphdef, state


def step_key(state: TrainState) -> jax.Array:
    """The PRNG key of the current step (independent of how the run was interrupted)."""
    return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

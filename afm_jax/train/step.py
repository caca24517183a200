"""The update step: a pure function (state, batch) -> (state, metrics), shared by trainer and benchmarks."""

from __future__ import annotations

from typing import Callable

import jax
import optax
from flax import nnx

from afm_jax.train import state as state_lib

LossFn = Callable[[nnx.Module, dict, jax.Array], tuple[jax.Array, dict]]


def make_train_step(graphdef: nnx.GraphDef, loss_fn: LossFn, tx: optax.GradientTransformation,
                    schedule: optax.Schedule) -> Callable:
    """Returns train_step(state, batch) for `jax.jit` (with shardings and donated state)."""

    def train_step(state: state_lib.TrainState, batch: dict) -> tuple[state_lib.TrainState, dict]:
        key = state_lib.step_key(state)

        def loss_of(params):
            return loss_fn(state_lib.merge_model(graphdef, state, params), batch, key)

        (loss, aux), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step), **aux}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step

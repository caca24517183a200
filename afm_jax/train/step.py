"""The update step: a pure function (state, batch) -> (state, metrics), shared by trainer and benchmarks.

Gradient accumulation (`accum_steps` = k > 1) splits the global batch into k equal micro-batches,
runs them one after another in a `lax.scan` and averages loss, gradients, metrics and outputs, then
makes one optimiser update: for a loss that is a mean over examples this is the update of the whole
batch (up to float rounding), with the activation memory of one micro-batch. Micro-batch i takes
every k-th example starting at i, so each device keeps an equal share of every micro-batch.

Non-trainable state (`state.frozen`: every variable that is not an `nnx.Param`) is carried through
the loss: whatever the model changes during its forward pass is written back. That is how
train-mode BatchNorm's running averages (DINO's ResNet-50) advance; constants such as sin-cos
position embeddings come back bit-identical. Under accumulation the micro-batches run in order and
each starts from the state the previous one left (running averages updated once per micro-batch,
as PyTorch does with accumulation); the step keeps the last micro-batch's state.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding

from afm_jax.train import state as state_lib

# loss(model, batch, key, extra, step) -> (loss, (metrics, outputs)); see tasks/base.py.
LossFn = Callable[[nnx.Module, dict, jax.Array, Any, jax.Array], tuple[jax.Array, tuple[dict, dict]]]
UpdateExtraFn = Callable[[Any, Any, dict, jax.Array], Any]


def split_micro_batches(batch: dict, accum_steps: int, sharding: NamedSharding | None = None) -> dict:
    """(B, ...) leaves -> (k, B/k, ...): micro-batch i holds examples i, i+k, i+2k, ..."""

    def split(x):
        if x.shape[0] % accum_steps:
            raise ValueError(f"Batch of {x.shape[0]} is not divisible by accum_steps={accum_steps}.")
        y = x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1)
        if sharding is not None:
            spec = jax.sharding.PartitionSpec(None, *sharding.spec)
            y = jax.lax.with_sharding_constraint(y, NamedSharding(sharding.mesh, spec))
        return y

    return jax.tree.map(split, batch)


def make_train_step(
    graphdef: nnx.GraphDef,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    *,
    update_extra: UpdateExtraFn | None = None,
    accum_steps: int = 1,
    batch_sharding: NamedSharding | None = None,
) -> Callable:
    """Returns train_step(state, batch) for `jax.jit` (with shardings and donated state)."""
    if accum_steps < 1:
        raise ValueError(f"accum_steps must be >= 1, got {accum_steps}.")

    def train_step(state: state_lib.TrainState, batch: dict) -> tuple[state_lib.TrainState, dict]:
        key = state_lib.step_key(state)

        def grads_of(frozen: Any, micro_batch: dict, micro_key: jax.Array):
            """((loss, (metrics, outputs)), grads) of one (micro-)batch, and the model's non-Param
            state after the loss (BatchNorm running averages; everything else passes through)."""

            def loss_of(params):
                model = nnx.merge(graphdef, params, frozen, copy=True)  # fresh variables: the loss may update them
                loss, aux = loss_fn(model, micro_batch, micro_key, state.extra, state.step)
                _, _, after = nnx.split(model, nnx.Param, ...)
                return loss, (aux, after)

            (loss, (aux, after)), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
            after = jax.tree.map(
                lambda new, old: new if new.dtype == old.dtype else new.astype(old.dtype),
                jax.lax.stop_gradient(after),
                frozen,
            )
            return ((loss, aux), grads), after

        if accum_steps == 1:
            ((loss, (metrics, outputs)), grads), frozen = grads_of(state.frozen, batch, key)
        else:
            micro = split_micro_batches(batch, accum_steps, batch_sharding)

            def one(carry, xs):
                total, frozen_i = carry
                i, micro_batch = xs
                result, frozen_next = grads_of(frozen_i, micro_batch, jax.random.fold_in(key, i))
                return (jax.tree.map(lambda a, b: a + b.astype(a.dtype), total, result), frozen_next), None

            shapes = jax.eval_shape(lambda m: grads_of(state.frozen, m, key)[0], jax.tree.map(lambda x: x[0], micro))
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.promote_types(s.dtype, jnp.float32)), shapes)
            (total, frozen), _ = jax.lax.scan(one, (zeros, state.frozen), (jnp.arange(accum_steps), micro))
            (loss, (metrics, outputs)), grads = jax.tree.map(lambda t: t / accum_steps, total)
            grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)

        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        extra = state.extra if update_extra is None else update_extra(state.extra, params, outputs, state.step)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step), **metrics}
        return state.replace(
            step=state.step + 1, params=params, frozen=frozen, opt_state=opt_state, extra=extra
        ), metrics

    return train_step

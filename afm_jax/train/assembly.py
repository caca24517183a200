"""Builds the pieces of a training run from config and task: optimiser, sharded state, jitted step.

Shared by the trainer and the benchmarks, so a benchmark times exactly the step a run executes.
The train state is never materialised unsharded: `initial_state` runs the initialisation under
`jit(out_shardings=...)`, so each device creates only its own shards (FSDP of a model that does not
fit one device). Starting from other weights (`config.init_from`) is the exception: those are loaded
on the host, then placed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from afm_jax.train import optim, sharding
from afm_jax.train import state as state_lib
from afm_jax.train import step as step_lib
from afm_jax.train.init_from import initialize_encoder


@dataclasses.dataclass
class Assembly:
    """Everything the loop needs to run steps; `initial_state()` creates a fresh state."""

    graphdef: nnx.GraphDef
    abstract_state: state_lib.TrainState
    state_shardings: Any
    batch_sharding: NamedSharding
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    train_step: Callable  # the pure step function
    jit_step: Callable  # jitted with shardings and donated state
    initial_state: Callable[[], state_lib.TrainState]
    init_report: dict  # what `init_from` loaded, once `initial_state()` has run


def assemble(
    config: ml_collections.ConfigDict, task: Any, mesh: Mesh, *, total_steps: int, warmup_steps: int
) -> Assembly:
    """Optimiser, abstract and sharded train state, and the compiled-on-first-call step."""
    schedule = optim.learning_rate_schedule(config.optim, config.batch_size, total_steps, warmup_steps)
    boxes: dict[str, Any] = {}
    init_report: dict = {}

    def build(tx: optax.GradientTransformation | None, init_from: str | None = None) -> state_lib.TrainState:
        model = task.build_model(config, nnx.Rngs(config.seed))
        if init_from:
            init_report.update(load_initial_weights(task, model, init_from))
        if tx is None:  # first (abstract) pass: the optimiser may depend on the param tree
            _, params, _ = state_lib.split_model(model)
            tx = task.make_optimizer(config, schedule, params)
            boxes["tx"] = tx
        graphdef, state = state_lib.create_train_state(model, tx, config.seed + 1, task.init_extra(model))
        boxes["graphdef"] = graphdef
        return state

    abstract_state = jax.eval_shape(lambda: build(None))
    tx, graphdef = boxes["tx"], boxes["graphdef"]
    state_shardings = sharding.param_shardings(mesh, abstract_state, config.get("sharding"))
    batch_sharding = sharding.batch_sharding(mesh)
    train_step = step_lib.make_train_step(
        graphdef,
        task.loss,
        tx,
        schedule,
        update_extra=task.update_extra,
        accum_steps=int(config.get("accum_steps", 1)),
        batch_sharding=batch_sharding,
    )
    jit_step = jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )

    def initial_state() -> state_lib.TrainState:
        init_from = config.get("init_from")
        if not init_from:
            return jax.jit(lambda: build(tx), out_shardings=state_shardings)()
        state = build(tx, init_from)  # on the host: the weights come from a file
        return jax.device_put(state, state_shardings)

    return Assembly(
        graphdef=graphdef,
        abstract_state=abstract_state,
        state_shardings=state_shardings,
        batch_sharding=batch_sharding,
        tx=tx,
        schedule=schedule,
        train_step=train_step,
        jit_step=jit_step,
        initial_state=initial_state,
        init_report=init_report,
    )


def load_initial_weights(task: Any, model: nnx.Module, path: str) -> dict:
    """Overwrites the task's backbone in `model` with weights from `path` (timm/DINO/DINOv2 file,
    an export of ours, or one of our run directories); returns what was loaded."""
    return initialize_encoder(task.encoder_of(model), path)

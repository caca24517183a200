"""The interface between the trainer and a training method (MAE, DINO, fine-tuning, ...).

The trainer (`afm_jax.train.loop`) owns everything a long job needs once — mesh, sharded state,
compiled step, checkpoints, resume, signals, logging. A `Task` supplies what differs between methods:
the model, its config section, the optimiser, the input iterator, the loss, method state that is not
trained by the optimiser (`extra`: a DINO teacher and centre, ...), pictures and periodic evaluations.
Subclasses override only what differs from these defaults.

Contract of the pure, jitted parts (`loss`, `update_extra`):

    loss(model, batch, key, extra, step) -> (scalar loss, (metrics, outputs))
        metrics: dict of scalars to log (averaged over accumulation micro-batches);
        outputs: dict of arrays the method state needs after the update (e.g. the teacher's batch
        mean for the DINO centre); they must be *means over the batch*, so averaging them over
        equal micro-batches gives the full-batch value.
    update_extra(extra, params, outputs, step) -> extra
        runs after the optimiser update, with the new params (e.g. the EMA teacher update).
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx

from afm_jax.data import pipeline, records
from afm_jax.models import factory
from afm_jax.train import optim


class Task:
    """Default behaviour of a training method; subclasses set `name` and override what differs."""

    name: str = ""
    batch_keys: tuple[str, ...] = ("image",)  # which keys of a host batch go to the devices

    # ─── Config ──────────────────────────────────────────────────────────────────────────────
    @classmethod
    def extend_config(cls, config: ml_collections.ConfigDict) -> None:
        """Adds this method's config sections (and changes of common defaults) to `config`."""

    def validate(self, config: ml_collections.ConfigDict) -> None:
        """Raises ConfigError naming the key for a bad value; called before any work."""
        factory.validate_model_config(config)

    def num_train_examples(self, config: ml_collections.ConfigDict) -> int:
        """How many examples one epoch has (for `num_epochs` and warmup epochs); called before setup."""
        return len(
            records.open_split(config.data.path, config.data.train_split, selection=config.data.get("selection"))
        )

    def setup(self, config: ml_collections.ConfigDict, *, workdir: str, total_steps: int, steps_per_epoch: int) -> None:
        """Called once by the trainer before anything is built: remembers the run's shape."""
        self.config = config
        self.workdir = workdir
        self.total_steps = int(total_steps)
        self.steps_per_epoch = int(steps_per_epoch)

    # ─── Model, state, optimiser, input ──────────────────────────────────────────────────────
    def build_model(self, config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
        raise NotImplementedError

    def encoder_of(self, model: nnx.Module) -> nnx.Module:
        """The backbone inside `model` (what `init_from` loads and what probes evaluate)."""
        return model.encoder

    def init_extra(self, model: nnx.Module) -> Any:
        """Method state beside the trained params (not touched by the optimiser); {} for none."""
        return {}

    def make_optimizer(
        self, config: ml_collections.ConfigDict, schedule: optax.Schedule, params: Any
    ) -> optax.GradientTransformation:
        """The optimiser; `params` is the (abstract) param tree, for masks and per-layer rates."""
        return optim.make_optimizer(config.optim, schedule)

    def build_train_iterator(self, config: ml_collections.ConfigDict):
        """This host's infinite, checkpointable iterator of training batches (numpy dicts)."""
        return pipeline.build_train_iterator(
            config.data, global_batch_size=config.batch_size, seed=config.seed, image_size=config.image_size
        )

    def example_batch(self, config: ml_collections.ConfigDict, batch_size: int, seed: int) -> dict[str, np.ndarray]:
        """A random batch shaped like the iterator's (benchmarks, compile checks)."""
        rng = np.random.default_rng(seed)
        s = config.image_size
        return {"image": rng.random((batch_size, s, s, 1), dtype=np.float32)}

    # ─── Pure functions inside the compiled step ─────────────────────────────────────────────
    def loss(
        self, model: nnx.Module, batch: dict, key: jax.Array, extra: Any, step: jax.Array
    ) -> tuple[jax.Array, tuple[dict, dict]]:
        raise NotImplementedError

    def update_extra(self, extra: Any, params: Any, outputs: dict, step: jax.Array) -> Any:
        return extra

    # ─── Host-side extras ────────────────────────────────────────────────────────────────────
    def images(self, model: nnx.Module, extra: Any, batch: dict, key: jax.Array) -> dict[str, jax.Array]:
        """Named (H, W) images in [0, 1] to log (jitted by the trainer); {} for none."""
        return {}

    def monitored_encoder(self, model: nnx.Module, extra: Any) -> nnx.Module:
        """The encoder a monitor (e.g. evaluation/monitors.KnnMonitor) evaluates: by default the
        trained one; DINO: the EMA teacher's."""
        return self.encoder_of(model)

    def predictions(self) -> dict[str, Any] | None:
        """What the task predicted for downstream use after training (fine-tuning: the best-on-
        validation model's per-image predictions per split); None for pretraining tasks."""
        return None

    def evaluate(self, model: nnx.Module, extra: Any, step: int) -> dict[str, float]:
        """Periodic evaluation every `config.eval_every` steps, on every process; returns scalars
        logged as `eval/<name>`. A truthy `should_stop` entry ends training (early stopping)."""
        return {}

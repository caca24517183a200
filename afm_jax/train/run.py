"""`run(config, workdir)`: train the task a config names in a workdir — the one way to do it.

What: looks up the task (`config.task`), builds the embedded synthetic dataset first when the config
asks for it, and runs the trainer (resuming from the workdir's newest checkpoint). Returns the
`TrainResult`: final state, whether it finished, and the task's predictions (fine-tuning: the
best-on-validation model's per-image predictions of the validation and test splits).

Why one function: `python -m afm_jax.main`, comparison studies and the fine-tuning protocol all
train through here, so what they run is what a user runs by hand.
"""

from __future__ import annotations

import ml_collections

from afm_jax.data import synthetic
from afm_jax.train import loop
from afm_jax.train.loop import Monitor, TrainResult
from afm_jax.train.tasks import get_task


def run(
    config: ml_collections.ConfigDict, workdir: str, *, monitor: Monitor | None = None, stop_at_step: int | None = None
) -> TrainResult:
    """Trains `config.task` per `config` in `workdir` (see the module docstring)."""
    task = get_task(config.task)
    with loop.workdir_lock(workdir):  # also covers building the synthetic dataset into the workdir
        synthetic.prepare_dataset(config, workdir)
        return loop.train(config, workdir, task, monitor=monitor, stop_at_step=stop_at_step)

"""Entry point: `python -m afm_jax.main --config configs/X.py --workdir DIR [--config.key=value ...]`.

Dispatches on `config.task`, resumes from `--workdir` automatically, and turns user mistakes
(bad config value, missing dataset, missing salt) into a short message instead of a traceback.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/demo.py.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, images. Reruns resume.")
flags.mark_flags_as_required(["config", "workdir"])
# Multi-process jobs: under SLURM (srun, one task per node or per GPU) these are detected from the
# environment; elsewhere give all three (the same coordinator on every process).
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 for jax.distributed.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job (jax.distributed).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")


def prepare_dataset(config, workdir: str) -> None:
    """Builds the embedded synthetic dataset into the workdir when the config asks for it."""
    from afm_jax.data import synthetic
    if config.data.path or not config.data.synthetic.enabled:
        return
    import jax
    from jax.experimental import multihost_utils

    syn = config.data.synthetic
    data_root = os.path.join(workdir, "data")

    def ensure() -> str:
        return os.fspath(synthetic.ensure_synthetic_dataset(
            data_root, num_patients=syn.num_patients, seed=syn.seed, image_size=syn.image_size))

    # In a multi-process job process 0 writes the dataset while the others wait, then they find it.
    if jax.process_index() != 0:
        multihost_utils.sync_global_devices("afm_jax:synthetic_dataset")
    path = ensure()
    if jax.process_index() == 0 and jax.process_count() > 1:
        multihost_utils.sync_global_devices("afm_jax:synthetic_dataset")
    with config.unlocked():
        config.data.path = path


def run(config, workdir: str) -> None:
    """Runs the task of `config` in `workdir` (pretraining, then the optional linear-probe check)."""
    import jax
    from flax import nnx

    from afm_jax.evaluation.aff_probe import aff_vs_nff_probe
    from afm_jax.models import factory
    from afm_jax.train import loop, state as state_lib
    from afm_jax.train.tasks import get_task

    task = get_task(config.task)
    prepare_dataset(config, workdir)
    result = loop.train(config, workdir, task)
    if not (config.get("probe") and config.probe.enabled and result.finished and jax.process_index() == 0):
        return
    trained = state_lib.merge_model(result.graphdef, jax.device_get(result.state))
    random_init = factory.build_backbone(config.model, config.image_size, nnx.Rngs(config.seed))
    probe_size = config.probe.image_size or config.image_size
    scores = {name: aff_vs_nff_probe(encoder, config.data, image_size=probe_size,
                                     pool=config.probe.pool, batch_size=config.probe.batch_size, seed=config.seed)
              for name, encoder in ((config.task, task.encoder_of(trained)), ("random_init", random_init))}
    with open(os.path.join(workdir, "linear_probe.json"), "w") as f:
        json.dump(scores, f, indent=2)
    print(f"AUROC (AFF vs NFF, linear probe): {config.task}={scores[config.task]['auroc']:.4f} "
          f"random_init={scores['random_init']['auroc']:.4f}", flush=True)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, plus a clear message for an override of a config key that does not exist."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e}\nRun with --helpfull for the flags.", file=sys.stderr)
        sys.exit(2)
    except (AttributeError, KeyError) as e:  # ml_collections: unknown key in a --config.a.b=v override
        from afm_jax.configuration import bad_override_message
        print("error: " + bad_override_message(argv, e, "afm_jax/train/defaults.py (or the config file)"),
              file=sys.stderr)
        sys.exit(2)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}. Config changes go as --config.key=value.")
    logging.set_verbosity(logging.WARNING)  # keep library INFO chatter (e.g. backend probing) off the console
    from afm_jax.train import distributed
    from afm_jax.errors import exit_on_user_error
    exit_on_user_error(distributed.initialize, coordinator=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                       process_id=_PROCESS_ID.value)
    exit_on_user_error(run, _CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)

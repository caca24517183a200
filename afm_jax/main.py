"""Entry point: `python -m afm_jax.main --config configs/X.py --workdir DIR [--config.key=value ...]`.

Dispatches on `config.task`, resumes from `--workdir` automatically, and turns user mistakes
(bad config value, missing dataset, missing salt) into a short message instead of a traceback.
"""

from __future__ import annotations

import os
import pathlib
import sys

import jax
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from afm_jax import io
from afm_jax.cli import peek_flag
from afm_jax.configuration import bad_override_message
from afm_jax.data.synthetic import LABEL_NAMES
from afm_jax.errors import ConfigError, exit_on_user_error, user_error_message
from afm_jax.evaluation import low_label, monitors, protocols
from afm_jax.models import factory
from afm_jax.train import distributed
from afm_jax.train import run as train_run
from afm_jax.train.tasks import get_task

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/demo.py.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, images. Reruns resume.")
flags.mark_flags_as_required(["config", "workdir"])
# Multi-process jobs: under SLURM (srun, one task per node or per GPU) these are detected from the
# environment; elsewhere give all three (the same coordinator on every process).
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 for jax.distributed.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job (jax.distributed).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")

NFF_LABEL, AFF_LABEL = LABEL_NAMES.index("nff"), LABEL_NAMES.index("aff")  # the demo probe: AFF positive


def run(config, workdir: str) -> None:
    """Trains the task of `config` in `workdir`, then (if `config.probe.enabled`) probes AFF vs NFF on
    the trained encoder's frozen features against the same architecture at random initialisation,
    with `probe.fractions` of the training patients labelled (evaluation/low_label.py)."""
    result = train_run.run(config, workdir, monitor=monitors.monitor_for(config))
    if not (config.get("probe") and config.probe.enabled and result.finished and jax.process_index() == 0):
        return
    task = get_task(config.task)
    random_init = factory.build_backbone(config.model, config.image_size, nnx.Rngs(config.seed))
    p = config.probe
    aff_vs_nff = protocols.TaskSpec(
        name="aff_vs_nff",
        data=config.data.path,
        positive_labels=(AFF_LABEL,),
        negative_labels=(NFF_LABEL,),
        unit=p.unit,
    )
    encoders = {config.task: task.encoder_of(result.model()), "random_init": random_init}
    results = low_label.low_label_comparison(
        encoders,
        config.data,
        aff_vs_nff,
        image_size=p.image_size or config.image_size,
        fractions=tuple(p.fractions),
        seeds=tuple(p.seeds),
        pool=p.pool,
        batch_size=p.batch_size,
        n_boot=p.n_boot,
        bootstrap_seed=config.seed,
    )
    io.write_json(os.path.join(workdir, "linear_probe.json"), results)
    names = list(encoders)
    for fraction in sorted(p.fractions, reverse=True):
        row = results[f"{fraction:g}"]
        diff = row["difference"][f"{names[0]}-{names[1]}"]
        print(
            f"  {fraction:.0%} labels: {names[0]} - {names[1]} = {diff['point']:+.3f} "
            f"[{diff['low']:+.3f} to {diff['high']:+.3f}] over {row['num_test_units']} test {p.unit}s, "
            f"{len(p.seeds)} probe seeds",
            flush=True,
        )
    for fraction in sorted(p.fractions, reverse=True):  # the smallest fraction (the headline) prints last
        print(
            f"AUROC (AFF vs NFF, linear probe, {fraction:.0%} labels): {low_label.headline(results, fraction, names)}",
            flush=True,
        )


def _check_config_file(argv: list[str]) -> None:
    """A missing config file or one that does not compile is a message, not absl's traceback."""
    path = peek_flag(argv[1:], "config")
    if not path:
        return
    file = pathlib.Path(path.split(":", 1)[0])  # config_flags allows `file.py:arg`
    if not file.is_file():
        raise ConfigError(f"Config file {file} does not exist: give --config a file such as configs/demo.py.")
    try:
        compile(file.read_bytes(), os.fspath(file), "exec")
    except SyntaxError as e:
        raise ConfigError(f"Config file {file} has a syntax error at line {e.lineno}: {e.msg}. Fix the file.") from None
    except ValueError as e:  # null bytes: not a Python file
        raise ConfigError(f"Config file {file} is not a Python file ({e}).") from None


def load_config():
    """The --config value; a get_config() that fails is reported with its error, as a ConfigError."""
    try:
        return _CONFIG.value
    except Exception as e:  # noqa: BLE001 - whatever the user's get_config() raised
        causes, inner = [], e
        while inner is not None:
            causes.append(f"{type(inner).__name__}: {inner}")
            inner = inner.__cause__ or inner.__context__
        raise ConfigError(
            f"Config file {peek_flag(sys.argv[1:], 'config')} could not be loaded: "
            + "; ".join(dict.fromkeys(causes[::-1]))
            + "."
        ) from None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, plus a clear message for an override of a config key that does not exist."""
    try:
        _check_config_file(argv)
    except ConfigError as e:
        print(user_error_message(e), file=sys.stderr)
        sys.exit(2)
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e}\nRun with --helpfull for the flags.", file=sys.stderr)
        sys.exit(2)
    except (AttributeError, KeyError) as e:  # ml_collections: unknown key in a --config.a.b=v override
        print(
            "error: " + bad_override_message(argv, e, "afm_jax/train/defaults.py (or the config file)"), file=sys.stderr
        )
        sys.exit(2)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}. Config changes go as --config.key=value.")
    logging.set_verbosity(logging.WARNING)  # keep library INFO chatter (e.g. backend probing) off the console
    exit_on_user_error(
        distributed.initialize,
        coordinator=_COORDINATOR.value,
        num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value,
    )
    exit_on_user_error(lambda: run(load_config(), _WORKDIR.value))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)

"""The canonical trainer: mesh → input → model and optimiser → sharded state → step → checkpoints → loop.

Task-specific parts (which model, which loss, which pictures) come from a `Task`; everything a
long job needs — automatic resume from `--workdir`, SIGTERM/SIGINT save-and-exit, logging, MFU —
lives here once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import signal
import sys
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from afm_jax import configuration, errors, io
from afm_jax.errors import TrainingDivergedError
from afm_jax.train import assembly as assembly_lib
from afm_jax.train import checkpoint, optim, resume, sharding, throughput
from afm_jax.train import state as state_lib
from afm_jax.train.metrics_writer import MetricsWriter
from afm_jax.train.tasks.base import Task
from afm_jax.version import code_version


@dataclasses.dataclass
class TrainResult:
    state: state_lib.TrainState
    graphdef: nnx.GraphDef
    step: int
    finished: bool  # False when stopped early (signal or stop_at_step)
    predictions: dict | None = None  # the task's predictions (fine-tuning: per split), see Task.predictions

    def model(self) -> nnx.Module:
        """The trained model (host copy), e.g. for `task.encoder_of(result.model())`."""
        return state_lib.merge_model(self.graphdef, jax.device_get(self.state))


# A monitor: called every `eval_every` steps with (task, model, extra, step); returns scalars logged as
# eval/<name> (e.g. evaluation.monitors.KnnMonitor). The trainer never imports evaluation itself.
Monitor = Callable[[Task, nnx.Module, Any, int], dict]


class _StopRequest:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step (save, then exit cleanly).

    In a multi-process job SIGTERM is left to JAX's preemption notifier (installed by
    `jax.distributed.initialize`): it also catches a SIGTERM that comes during start-up, and
    `reached_preemption_sync_point` makes every process stop at the same step, which a per-process
    flag cannot (one process would save while another runs the next step's collectives: a hang).
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.requested: str | None = None
        self._signals = signals
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        for sig in self._signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some test runners): no handler
                pass
        return self

    def _handle(self, signum, _frame):
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def run_schedule(config: ml_collections.ConfigDict, num_train_examples: int) -> tuple[int, int]:
    """(total_steps, warmup_steps) from `total_steps` or `num_epochs` and the dataset size."""
    steps_per_epoch = max(num_train_examples // config.batch_size, 1)
    total = config.total_steps if config.total_steps > 0 else int(round(config.num_epochs * steps_per_epoch))
    if total <= 0:
        raise errors.ConfigError("Config gives no steps: set --config.total_steps=N or --config.num_epochs=E.")
    warmup = int(round(config.optim.warmup_epochs * steps_per_epoch))
    return total, min(warmup, total)


def validate_common(config: ml_collections.ConfigDict) -> None:
    """Checks the keys every training task uses."""
    configuration.require(config, "batch_size", lambda v: int(v) > 0, "a positive global batch size")
    configuration.require(config, "image_size", lambda v: int(v) > 0, "a positive image size in pixels")
    configuration.require(config, "optim.base_lr", lambda v: float(v) > 0, "a positive learning rate")
    configuration.require(config, "optim.weight_decay", lambda v: float(v) >= 0, "a non-negative weight decay")
    if "weight_decay_rule" in config.optim:
        configuration.require_choice(config, "optim.weight_decay_rule", optim.WEIGHT_DECAY_RULES)
    configuration.require(config, "log_every", lambda v: int(v) > 0, "a positive step interval")
    configuration.require(config, "checkpoint_every", lambda v: int(v) > 0, "a positive step interval")
    configuration.require(config, "accum_steps", lambda v: int(v) >= 1, "a micro-batch count >= 1")
    configuration.require(config, "eval_every", lambda v: int(v) >= 0, "a step interval (0 = never)")
    configuration.require(
        config, "keep_checkpoints", lambda v: int(v) >= 1, "at least 1 (with fewer, nothing is kept to resume from)"
    )
    configuration.require(config, "data.num_workers", lambda v: int(v) >= 0, "a process count >= 0 (0 = in-process)")
    configuration.require(config, "data.read_threads", lambda v: int(v) >= 1, "a thread count >= 1")
    configuration.require(config, "data.prefetch_buffer_size", lambda v: int(v) >= 1, "a batch count >= 1")
    configuration.require(
        config,
        "batch_size",
        lambda v: int(v) % int(config.accum_steps) == 0,
        f"a multiple of accum_steps = {config.accum_steps}",
    )
    if config.batch_size % jax.process_count():
        raise errors.ConfigError(
            f"Config key `batch_size` = {config.batch_size} is not divisible by the {jax.process_count()} processes."
        )


def check_workdir(workdir: Any) -> str:
    """The absolute workdir; refuses an empty one and one that is a file."""
    if not isinstance(workdir, (str, os.PathLike)) or not os.fspath(workdir).strip():
        raise errors.ConfigError(
            "--workdir is empty: give the run directory (checkpoints, logs and images go there; "
            "rerunning with the same one resumes)."
        )
    workdir = os.path.abspath(os.fspath(workdir))
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise errors.ConfigError(f"--workdir {workdir} is a file, not a folder: give a run directory.")
    return workdir


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[None]:
    """Holds the workdir's lock (process 0 of a job; re-entrant): a second trainer there is refused with a
    message naming the holder. An unwritable workdir is a ConfigError."""
    workdir = check_workdir(workdir)
    if jax.process_index() != 0:
        yield
        return
    try:
        with io.exclusive_lock(workdir, "afm_jax trainer", errors.LockedError):
            yield
    except (PermissionError, OSError) as e:
        if isinstance(e, errors.UserError) or not _is_write_error(e, workdir):
            raise
        raise errors.ConfigError(
            f"--workdir {workdir} cannot be written ({e.strerror or e}): give a folder on a writable filesystem."
        ) from None


def _is_write_error(error: OSError, workdir: str) -> bool:
    return error.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST) and (
        error.filename is None or os.fspath(error.filename).startswith(workdir)
    )


def train(
    config: ml_collections.ConfigDict,
    workdir: str,
    task: Task,
    *,
    stop_at_step: int | None = None,
    monitor: Monitor | None = None,
) -> TrainResult:
    """Trains `task` per `config` in `workdir`, resuming from its latest checkpoint if there is one.

    `stop_at_step` saves and returns at that step as a preemption would (used by resume tests);
    `monitor` runs with the task's own evaluation every `eval_every` steps.
    """
    workdir = check_workdir(workdir)
    validate_common(config)
    task.validate(config)
    with workdir_lock(workdir):
        return _train(config, workdir, task, stop_at_step=stop_at_step, monitor=monitor)


def _train(
    config: ml_collections.ConfigDict, workdir: str, task: Task, *, stop_at_step: int | None, monitor: Monitor | None
) -> TrainResult:
    is_main = jax.process_index() == 0

    # ─── Input ───────────────────────────────────────────────────────────────────────────────
    num_train = task.num_train_examples(config)
    if config.batch_size > num_train:
        raise errors.ConfigError(
            f"Config key `batch_size` = {config.batch_size} is larger than the {num_train} images of split "
            f"`{config.data.train_split}` in {config.data.path}: lower --config.batch_size or use a larger dataset."
        )
    total_steps, warmup_steps = run_schedule(config, num_train)
    task.setup(config, workdir=workdir, total_steps=total_steps, steps_per_epoch=max(num_train // config.batch_size, 1))

    # ─── Mesh ────────────────────────────────────────────────────────────────────────────────
    mesh = sharding.make_mesh(config.mesh)
    micro_batch = config.batch_size // config.accum_steps
    if micro_batch % mesh.size:
        raise errors.ConfigError(
            f"Config key `batch_size` = {config.batch_size} (÷ accum_steps = {config.accum_steps}) is not "
            f"divisible by the {mesh.size} devices."
        )
    # Everything opened from here on is closed on every exit path (an error, a divergence, a failed save),
    # newest first: the logs, the checkpoint manager (it waits for the save in flight, so the last good
    # checkpoint is complete and no orbax temporary folder is left), grain's worker processes.
    data_iter = task.build_train_iterator(config)
    closers: list[Callable[[], None]] = [data_iter.close]
    try:
        # ─── Model, optimiser, sharded state and update step (see assembly.py) ───────────────────
        parts = assembly_lib.assemble(config, task, mesh, total_steps=total_steps, warmup_steps=warmup_steps)
        graphdef, state_shardings = parts.graphdef, parts.state_shardings

        def image_fn(state: state_lib.TrainState, batch: dict) -> dict:
            model = state_lib.merge_model(graphdef, state)
            return task.images(model, state.extra, batch, jax.random.key(config.seed))

        jit_images = jax.jit(image_fn)

        # ─── Checkpoint: resume automatically (newest good step; damaged ones are moved aside) ───
        ckpt = checkpoint.Checkpointer(workdir, max_to_keep=config.keep_checkpoints)
        closers.append(lambda: ckpt.close(raise_errors=False))
        target = jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), parts.abstract_state, state_shardings
        )
        notes: list[str] = []

        def check(saved_meta: dict) -> None:
            notes[:] = resume.check_resume(saved_meta, config)

        restored = ckpt.restore_latest(target, data_iter, check=check)
        if restored is None:
            state = parts.initial_state()
            start_step = 0
            if parts.init_report and is_main:
                print(
                    f"Initialised from {config.init_from}: {parts.init_report.get('summary', parts.init_report)}",
                    flush=True,
                )
        else:
            start_step, state, _ = restored
            if is_main:
                print(f"Resumed from {ckpt.directory} at step {start_step}.", flush=True)
                for note in notes:
                    print(f"note: {note}", flush=True)
        meta = {
            "config": configuration.to_json(config),
            "code_version": code_version(),
            "resume": resume.resume_record(config),
        }

        writer = MetricsWriter(workdir, enabled=is_main, total_steps=total_steps)
        closers.append(writer.close)
        writer.write_record(
            {
                "event": "start",
                "step": start_step,
                "total_steps": total_steps,
                "num_train_examples": num_train,
                "processes": jax.process_count(),
                "devices": jax.device_count(),
                "init_from": parts.init_report or None,
                **meta,
            }
        )

        # ─── Loop ────────────────────────────────────────────────────────────────────────────────
        step = start_step
        peak_flops = None
        step_flops = None
        compiled_step = None
        fixed_images: dict | None = None
        interval_start, interval_steps, pending = time.perf_counter(), 0, []
        finished = step >= total_steps
        last_loss: float | None = None
        multi_process = jax.process_count() > 1
        with _StopRequest((signal.SIGINT,) if multi_process else (signal.SIGTERM, signal.SIGINT)) as stop:
            while step < total_steps:
                local = next(data_iter)
                batch = sharding.global_batch(mesh, {k: local[k] for k in task.batch_keys})
                if compiled_step is None:  # compile once; the executable also gives the step's FLOPs
                    compiled_step = parts.jit_step.lower(state, batch).compile()
                    step_flops = throughput.compiled_flops(compiled_step, num_devices=mesh.size)
                    if is_main:
                        peak, _ = throughput.device_peak_flops()
                        # CPU "devices" share the host's cores: the measured peak is the whole host's.
                        peak_flops = peak if jax.devices()[0].platform == "cpu" else peak * jax.device_count()
                if fixed_images is None:
                    n = min(config.num_panel_images, len(local[task.batch_keys[0]]))
                    fixed_images = {k: jnp.asarray(local[k][:n]) for k in task.batch_keys}
                state, metrics = compiled_step(state, batch)
                pending.append(metrics)
                step += 1
                interval_steps += 1

                if step % config.log_every == 0 or step == total_steps:
                    fetched = jax.device_get(pending)
                    elapsed = time.perf_counter() - interval_start
                    scalars = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
                    scalars["step_time_s"] = elapsed / interval_steps
                    scalars["img_per_s"] = config.batch_size * interval_steps / elapsed
                    scalars["img_per_s_per_device"] = scalars["img_per_s"] / jax.device_count()
                    if step_flops and peak_flops:
                        scalars["mfu"] = step_flops / scalars["step_time_s"] / peak_flops
                    if not np.isfinite(scalars["loss"]):
                        raise TrainingDivergedError(
                            f"Loss is {scalars['loss']} at step {step}: training diverged. Lower the learning rate "
                            "(--config.optim.base_lr) or enable clipping (--config.optim.grad_clip_norm=1), then rerun "
                            f"(it resumes from the last checkpoint in {workdir}; delete it to start over)."
                        )
                    writer.write_scalars(step, scalars)
                    writer.progress(step, scalars)
                    last_loss = scalars["loss"]
                    interval_start, interval_steps, pending = time.perf_counter(), 0, []

                if config.image_every > 0 and (step % config.image_every == 0 or step == total_steps):
                    for name, image in jax.device_get(jit_images(state, fixed_images)).items():
                        writer.write_image(step, name, image)

                early_stop = False
                if config.eval_every > 0 and (step % config.eval_every == 0 or step == total_steps):
                    model = state_lib.merge_model(graphdef, state)
                    results = task.evaluate(model, state.extra, step)
                    if monitor is not None:
                        results.update(monitor(task, model, state.extra, step))
                    early_stop = bool(results.pop("should_stop", False))
                    if results:
                        writer.write_scalars(step, {f"eval/{k}": float(v) for k, v in results.items()})
                        if is_main:
                            print(
                                f"eval @ {step}: " + "  ".join(f"{k}={float(v):.4f}" for k, v in results.items()),
                                flush=True,
                            )

                preempted = multi_process and multihost_utils.reached_preemption_sync_point(step)
                stopping = (
                    stop.requested is not None or preempted or (stop_at_step is not None and step >= stop_at_step)
                )
                if step % config.checkpoint_every == 0 or step == total_steps or stopping or early_stop:
                    ckpt.save(step, state, data_iter, {**meta, "step": step})
                if early_stop:
                    if is_main:
                        print(f"Early stop at step {step}: the task's evaluation stopped improving.", flush=True)
                    finished = True
                    break
                if stopping:
                    if is_main:
                        why = stop.requested or (
                            "SIGTERM, all processes" if preempted else f"stop_at_step={stop_at_step}"
                        )
                        print(
                            f"Stopping at step {step} ({why}); checkpoint saved, rerun the same command to resume.",
                            flush=True,
                        )
                    break
            else:
                finished = True
        ckpt.close()  # waits for the last save; a failed one raises CheckpointError here
        if jax.process_count() > 1 and last_loss is not None:  # one line per process: they must agree
            print(f"[process {jax.process_index()}/{jax.process_count()}] step {step} loss {last_loss:.6f}", flush=True)
        return TrainResult(state=state, graphdef=graphdef, step=step, finished=finished, predictions=task.predictions())
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT) or isinstance(e, errors.UserError):
            raise
        raise errors.OutOfSpaceError(
            f"The disk is full writing {e.filename or workdir} ({e.strerror}). The newest "
            f"complete checkpoint in {workdir}/checkpoints is intact: free space and rerun the "
            "same command to resume."
        ) from None
    finally:
        for close in reversed(closers):
            try:
                close()
            except Exception as e:  # noqa: BLE001 - keep closing the rest; the first error is on its way out
                print(f"warning: while shutting down: {type(e).__name__}: {e}", file=sys.stderr, flush=True)

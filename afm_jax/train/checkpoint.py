"""Checkpoints in `<workdir>/checkpoints`: train state, data-iterator state and run metadata.

One orbax `CheckpointManager` with three items per step:
- `state`: the TrainState pytree (saved asynchronously; every process writes its shards);
- `data`: the grain iterator state, one JSON file per process (grain's own orbax handler);
- `meta`: config, code version and step, so every checkpoint says what made it.

Reading back without the trainer (export, `config.init_from`, evaluation backbones): `read_encoder_checkpoint`
restores only the encoder weights (params/frozen, or a DINO teacher from `extra`) as numpy, no optimiser
state, no devices, and rebuilds the encoder from `meta['config']['model']`; `resolve_step_dir` and
`read_meta` find a step and its metadata. Writer and readers share one layout: `<workdir>/checkpoints/<step>/{state,data,meta}`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import shutil
import sys
import threading
import time
from typing import Any, Callable

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from afm_jax import io
from afm_jax.errors import CheckpointError, ConfigError, InteropError, UserError
from afm_jax.interop.timm import encoder_flat_state
from afm_jax.models import factory
from afm_jax.models.vit import VisionTransformer

ITEMS = ("state", "data", "meta")
CHECKPOINTS_DIR = "checkpoints"
DAMAGED_DIR = "checkpoints_damaged"  # <workdir>/checkpoints_damaged/<step>-<reason>: moved aside, never read
INTEGRITY_FILE = "integrity.json"  # in each step folder: sha256 and size of every file saved
_TMP_MARK = ".orbax-checkpoint-tmp"
# orbax rewrites these top-level files when it commits the step, after the digest is taken: not recorded
# (the items' files are; damage to these shows as a failed restore).
_COMMIT_FILES = ("_CHECKPOINT_METADATA", "commit_success.txt")

log = logging.getLogger(__name__)


# ─── Integrity: a digest of every file of a finished step, verified before it is restored ───


def _sha256(path: pathlib.Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_digests(step_dir: pathlib.Path) -> dict[str, dict]:
    """{relative path: {"sha256", "bytes"}} of every file under `step_dir` (except the record itself)."""
    out = {}
    for path in sorted(p for p in step_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(step_dir).as_posix()
        if rel != INTEGRITY_FILE and rel not in _COMMIT_FILES:
            out[rel] = {"sha256": _sha256(path), "bytes": path.stat().st_size}
    return out


def write_integrity(step_dir: pathlib.Path, step: int) -> None:
    """Records the digest of `step_dir` in `<step_dir>/integrity.json` (atomically)."""
    io.write_json(step_dir / INTEGRITY_FILE, {"version": 1, "step": int(step), "files": file_digests(step_dir)})


@dataclasses.dataclass
class Verdict:
    """The result of checking one step folder: `damage` is None for a good one, else the reason."""

    step: int
    damage: str | None
    kind: str = ""  # short slug for the folder name in checkpoints_damaged/
    verified: bool = False  # an integrity record was present and matched

    @property
    def ok(self) -> bool:
        return self.damage is None


def verify_step(step_dir: pathlib.Path, *, hash_files: bool = True) -> Verdict:
    """Checks a step folder against its integrity record, and that its JSON items parse.

    Without a record (a run killed between orbax's commit and the record, or older code) the files
    cannot be verified; the step counts as good here and the restore itself is the test.
    `hash_files=False` checks presence and sizes only (the other processes of a job: process 0 hashes)."""
    step = int(step_dir.name) if step_dir.name.isdigit() else -1
    record_file = step_dir / INTEGRITY_FILE
    verified = False
    if record_file.exists():
        try:
            record = io.read_json(record_file)
            files = dict(record["files"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            return Verdict(step, f"its integrity record {INTEGRITY_FILE} is unreadable ({e})", "bad-integrity-record")
        for rel, want in files.items():
            path = step_dir / rel
            if not path.is_file():
                return Verdict(step, f"{rel} is missing", "missing-file")
            size = path.stat().st_size
            if size != int(want["bytes"]):
                return Verdict(step, f"{rel} has {size} bytes, {want['bytes']} were written", "truncated")
            if hash_files and _sha256(path) != want["sha256"]:
                return Verdict(
                    step, f"{rel} does not match its recorded sha256 (bit rot or overwritten)", "checksum-mismatch"
                )
        verified = True
    for item in ITEMS[::2]:  # state, meta: orbax items that must be there (data only when an iterator was saved)
        if not (step_dir / item).is_dir():
            return Verdict(step, f"its {item}/ item is missing", "missing-item")
    try:
        read_meta(step_dir)
    except Exception as e:  # noqa: BLE001 - any failure to read means the step is unusable
        return Verdict(step, f"its meta/ item is unreadable ({_first_line(e)})", "unreadable-meta")
    for path in sorted((step_dir / "data").glob("*.json")) if (step_dir / "data").is_dir() else []:
        try:
            json.loads(path.read_text())
        except (OSError, ValueError) as e:
            return Verdict(step, f"data/{path.name} is not valid JSON ({e})", "unreadable-data")
    return Verdict(step, None, verified=verified)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def step_dirs(directory: str | os.PathLike) -> list[pathlib.Path]:
    """The finished-looking step folders of a checkpoints dir, oldest first."""
    d = pathlib.Path(directory)
    if not d.is_dir():
        return []
    return sorted((p for p in d.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def quarantine(step_dir: pathlib.Path, kind: str) -> pathlib.Path:
    """Moves a damaged step folder to `<workdir>/checkpoints_damaged/<step>-<kind>` (out of orbax's sight)."""
    damaged = step_dir.parent.parent / DAMAGED_DIR
    damaged.mkdir(parents=True, exist_ok=True)
    target = damaged / f"{step_dir.name}-{kind or 'damaged'}"
    if target.exists():
        target = damaged / f"{step_dir.name}-{kind or 'damaged'}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    os.replace(step_dir, target)
    return target


class _QuietOrbax(logging.Filter):
    """While a Checkpointer is open, drops the tracebacks orbax's background threads log when a save fails:
    the same error is raised to the trainer, which reports it once as a CheckpointError."""

    active = False

    def filter(self, record: logging.LogRecord) -> bool:
        return not (self.active and record.levelno >= logging.ERROR and "orbax" in record.pathname)


_quiet_orbax = _QuietOrbax()
logging.getLogger("absl").addFilter(_quiet_orbax)


def _join_orbax_threads(timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and type(thread).__module__.startswith("orbax"):
            thread.join(max(0.0, deadline - time.monotonic()))


class Checkpointer:
    """Saves and restores (train state, iterator state, metadata) by step; keeps the newest N.

    Every finished step gets an integrity record (sha256 per file, written into the step folder before
    orbax commits it, so record and checkpoint appear together); `restore_latest` verifies the newest
    step, moves a damaged one aside (warning with step and reason) and falls back to the previous one.
    """

    def __init__(self, workdir: str | os.PathLike, *, max_to_keep: int = 3, async_save: bool = True):
        if int(max_to_keep) < 1:
            raise ConfigError(
                f"Config key `keep_checkpoints` = {max_to_keep} is invalid: keep at least 1 "
                "checkpoint, or the run can never resume."
            )
        self.directory = os.path.join(os.path.abspath(os.fspath(workdir)), CHECKPOINTS_DIR)
        self._async = async_save
        self._pending: int | None = None  # the step whose save is in flight
        self._last_good: int | None = None  # the newest step known to be complete
        self._closed = False
        self._failed: CheckpointError | None = None
        async_options = ocp.AsyncOptions(post_finalization_callback=self._on_finalized) if async_save else None
        options = ocp.CheckpointManagerOptions(
            max_to_keep=int(max_to_keep),
            create=True,
            enable_async_checkpointing=async_save,
            async_options=async_options,
            cleanup_tmp_directories=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
        _quiet_orbax.active = True

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    # ─── Save ──────────────────────────────────────────────────────────────────────────────
    def _on_finalized(self) -> None:
        """orbax's post-finalisation hook (background thread, before the temporary folder is renamed):
        records the integrity digest inside the not-yet-committed step folder."""
        step = self._pending
        if step is None or jax.process_index() != 0:
            return
        candidates = [p for p in pathlib.Path(self.directory).glob(f"{step}{_TMP_MARK}*") if p.is_dir()]
        target = candidates[0] if len(candidates) == 1 else pathlib.Path(self.directory) / str(step)
        if target.is_dir():
            write_integrity(target, step)

    def _save_error(self, error: BaseException) -> CheckpointError:
        step = self._pending
        good = self._last_good if self._last_good is not None else "none yet"
        return CheckpointError(
            f"Saving the checkpoint of step {step} in {self.directory} failed: {_first_line(error)}. The newest "
            f"complete checkpoint (step {good}) is intact; fix the cause (e.g. free disk space) and rerun the same "
            "command to resume from it."
        )

    def save(self, step: int, state: Any, data_iterator: Any | None, meta: dict) -> None:
        """Starts an (async) save of `step`; the previous async save is waited for first. A failure of
        the previous save (raised here by orbax) or of this one is a CheckpointError naming the step."""
        if self._failed is not None:
            raise self._failed
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - orbax re-raises the background save's error
            self._failed = self._save_error(e)
            raise self._failed from None
        if self._pending is not None:
            self._last_good = self._pending
        self._pending = int(step)
        args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if data_iterator is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        try:
            self._manager.save(step, args=ocp.args.Composite(**args), force=True)
            if not self._async:
                write_integrity(pathlib.Path(self.directory) / str(step), step)
        except Exception as e:  # noqa: BLE001
            self._failed = self._save_error(e)
            raise self._failed from None

    # ─── Restore ───────────────────────────────────────────────────────────────────────────
    def restore(self, step: int, abstract_state: Any, data_iterator: Any | None) -> tuple[Any, dict]:
        """Restores `state` into the shardings of `abstract_state` (any device/process layout: orbax
        reshards) and the iterator in place."""
        args = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
        restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        if data_iterator is not None:
            data_iterator.set_state(json.loads(self._data_state_file(step).read_text()))
        return restored["state"], restored["meta"]

    def restore_latest(
        self, abstract_state: Any, data_iterator: Any | None, check: Callable[[dict], None] | None = None
    ) -> tuple[int, Any, dict] | None:
        """(step, state, meta) of the newest good checkpoint, or None when there is none.

        Each candidate, newest first, is verified (`verify_step`); `check(meta)` may then refuse it
        (a UserError, e.g. the config changed: propagated, nothing is moved). A damaged step is moved to
        `checkpoints_damaged/` with a warning naming the step and the reason, and the previous one is
        tried. When every checkpoint is damaged: CheckpointError."""
        moved: list[str] = []
        for step_dir in reversed(step_dirs(self.directory)):
            verdict = self._agree(verify_step(step_dir, hash_files=jax.process_index() == 0))
            if verdict.ok:
                meta = read_meta(step_dir)
                if check is not None:
                    check(meta)
                try:
                    state, meta = self.restore(verdict.step, abstract_state, data_iterator)
                    self._last_good = verdict.step
                    return verdict.step, state, meta
                except UserError:
                    raise
                except Exception as e:  # noqa: BLE001 - any read failure
                    if verdict.verified:  # the bytes are as written: the checkpoint does not fit this run
                        raise CheckpointError(
                            f"The checkpoint of step {verdict.step} in {self.directory} is intact but cannot be "
                            f"restored into this run's model: {_first_line(e)}. Resume with the config it was "
                            "saved with (kept in its meta/), or start a new --workdir."
                        ) from None
                    verdict = Verdict(verdict.step, f"it cannot be read ({_first_line(e)})", "unreadable-state")
            where = self._move_aside(step_dir, verdict)
            moved.append(f"step {verdict.step} ({verdict.damage}) -> {where}")
        if moved:
            raise CheckpointError(
                f"No checkpoint in {self.directory} can be restored: " + "; ".join(moved) + ". Rerunning the "
                "same command starts over from step 0; to keep what was trained, repair or copy back a step folder "
                f"from {pathlib.Path(self.directory).parent / DAMAGED_DIR} first."
            )
        return None

    @staticmethod
    def _agree(verdict: Verdict) -> Verdict:
        """Every process of a job follows process 0's verdict (it hashed the files), so all restore or
        skip the same step."""
        if jax.process_count() == 1:
            return verdict
        ok = bool(multihost_utils.broadcast_one_to_all(np.int32(verdict.ok)))
        if ok == verdict.ok:
            return verdict
        return Verdict(verdict.step, None) if ok else Verdict(verdict.step, "damaged (found by process 0)", "damaged")

    def _move_aside(self, step_dir: pathlib.Path, verdict: Verdict) -> str:
        target = pathlib.Path(step_dir.parent.parent / DAMAGED_DIR / f"{step_dir.name}-{verdict.kind}")
        if jax.process_index() == 0:
            target = quarantine(step_dir, verdict.kind)
            log.warning(
                "Checkpoint of step %d in %s is damaged: %s. Moved it to %s; trying the previous one.",
                verdict.step,
                self.directory,
                verdict.damage,
                target,
            )
            print(
                f"warning: checkpoint of step {verdict.step} is damaged ({verdict.damage}); moved it to {target} "
                "and trying the previous one.",
                file=sys.stderr,
                flush=True,
            )
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"afm_jax:quarantine:{verdict.step}")
        self._manager.reload()
        return str(target)

    def _data_state_file(self, step: int) -> pathlib.Path:
        """This process's iterator state; on another process count, process 0's (the iterator
        accepts a state from another layout when the global batch is unchanged)."""
        directory = pathlib.Path(self.directory) / str(step) / "data"
        index, count = jax.process_index(), jax.process_count()
        own = directory / f"process_{index}-of-{count}.json"
        if own.is_file():
            return own
        others = sorted(directory.glob("process_0-of-*.json"))
        if not others:
            raise FileNotFoundError(f"Checkpoint {directory.parent} has no data-iterator state.")
        return others[0]

    # ─── Shutdown ──────────────────────────────────────────────────────────────────────────
    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self, *, raise_errors: bool = True) -> None:
        """Waits for the save in flight, closes orbax's threads and removes what a failed save left.
        A failed save raises CheckpointError (once) unless `raise_errors` is False (an error is
        already on its way out); either way, everything is closed."""
        if self._closed:
            return
        self._closed = True
        error = None
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            error = self._failed or self._save_error(e)
        try:
            self._manager.close()
        except Exception as e:  # noqa: BLE001
            error = error or self._failed or self._save_error(e)
        if error is not None or self._failed is not None:
            _join_orbax_threads(timeout_s=60.0)  # a failed save can leave writers of the other items running
        if jax.process_index() == 0:
            for tmp in pathlib.Path(self.directory).glob(f"*{_TMP_MARK}*"):
                shutil.rmtree(tmp, ignore_errors=True)
        if error is None and self._failed is None:
            _quiet_orbax.active = False
        if error is None and self._pending is not None:
            self._last_good = self._pending
        if error is not None and error is not self._failed:
            self._failed = error
            if raise_errors:
                raise error
            print(f"error: {error}", file=sys.stderr, flush=True)


def verify_workdir(workdir: str | os.PathLike) -> list[Verdict]:
    """The verdict of every step folder in `<workdir>/checkpoints` (or a checkpoints dir), oldest first."""
    p = pathlib.Path(workdir)
    if (p / CHECKPOINTS_DIR).is_dir():
        p = p / CHECKPOINTS_DIR
    if not p.is_dir():
        raise InteropError(f"{workdir} has no checkpoints/ folder: pass a run's --workdir.")
    return [verify_step(d) for d in step_dirs(p)]


# ─── Readers (no trainer needed) ───

WEIGHTS = ("auto", "teacher", "student")


@dataclasses.dataclass
class EncoderCheckpoint:
    """An encoder rebuilt from a checkpoint, and where it came from."""

    encoder: VisionTransformer
    config: ml_collections.ConfigDict
    step: int
    weights: str  # "student" (params) or "teacher" (extra['teacher'])
    code_version: str
    step_dir: pathlib.Path


def _numbered_steps(directory: pathlib.Path) -> list[int]:
    return sorted(
        int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit() and (p / "state").is_dir()
    )


def is_checkpoint_path(path: str | os.PathLike) -> bool:
    """True for a workdir (with ``checkpoints/``), a checkpoints dir, or one step dir of ours."""
    p = pathlib.Path(path)
    if not p.is_dir():
        return False
    if (p / "state").is_dir() and (p / "meta").is_dir():
        return True
    if (p / CHECKPOINTS_DIR).is_dir():
        p = p / CHECKPOINTS_DIR
    return bool(_numbered_steps(p))


def resolve_step_dir(path: str | os.PathLike, step: int | None = None) -> tuple[pathlib.Path, int]:
    """(step directory, step) for a workdir, a ``checkpoints`` dir or a step dir; latest by default."""
    p = pathlib.Path(path).expanduser()
    if not p.exists():
        raise InteropError(
            f"Checkpoint path {p} does not exist: pass a run's --workdir, its "
            "checkpoints/ folder or one checkpoints/<step> folder."
        )
    if (p / "state").is_dir() and (p / "meta").is_dir():
        if step is not None and p.name.isdigit() and int(p.name) != step:
            raise InteropError(f"{p} is the checkpoint of step {p.name}, not of --step {step}.")
        return p, int(p.name) if p.name.isdigit() else -1
    if (p / CHECKPOINTS_DIR).is_dir():
        p = p / CHECKPOINTS_DIR
    steps = _numbered_steps(p) if p.is_dir() else []
    if not steps:
        raise InteropError(
            f"No checkpoint found in {p}: expected <workdir>/checkpoints/<step>/state "
            "as the trainer writes it. Did the run save a checkpoint yet?"
        )
    if step is None:
        step = steps[-1]
    if step not in steps:
        raise InteropError(f"No checkpoint of step {step} in {p}; available steps: {steps}.")
    return p / str(step), step


def read_meta(step_dir: pathlib.Path) -> dict:
    """The ``meta`` item (config, code version) of a step directory."""
    if not (step_dir / "meta").is_dir():
        raise InteropError(f"{step_dir} has no meta/ item: not a checkpoint of this trainer.")
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ck:
        return dict(ck.restore(step_dir / "meta"))


def _restore_subtrees(state_dir: pathlib.Path, keys: tuple[str, ...]) -> dict:
    """Restores only ``keys`` of the saved TrainState, as numpy arrays on the host."""
    with ocp.PyTreeCheckpointer() as ck:
        md = ck.metadata(state_dir)
        tree = getattr(md, "item_metadata", md)
        tree = getattr(tree, "tree", tree)
        item = {k: tree[k] for k in keys if k in tree and tree[k]}
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        return ck.restore(
            state_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
        )


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
            raise InteropError(
                f"Key {path!r} is missing from {source}; the checkpoint's encoder does "
                "not match its own config (was it written by another code version?)."
            )
        if tuple(flat[path].shape) != tuple(var.shape):
            raise InteropError(
                f"Key {path!r} has shape {flat[path].shape} in {source}, the model built "
                f"from its config {tuple(var.shape)}."
            )
    for path, var in targets.items():
        var.set_value(jnp.asarray(flat[path], var.dtype))


def read_encoder_checkpoint(
    path: str | os.PathLike, *, step: int | None = None, weights: str = "auto"
) -> EncoderCheckpoint:
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
        raise InteropError(
            f"The checkpoint in {step_dir} has no teacher (extra['teacher']; MAE runs "
            "have none): use --weights student."
        )
    params = teacher if chosen == "teacher" else restored["params"]
    if "encoder" not in params:
        raise InteropError(
            f"The checkpoint's params have no 'encoder' (keys: {sorted(params)}); "
            "only models that expose their ViT as .encoder can be exported."
        )
    flat = _flatten((restored.get("frozen") or {}).get("encoder", {}))
    flat.update(_flatten(params["encoder"]))
    # abstract build (no random init: every variable is set from the checkpoint just below)
    encoder = nnx.eval_shape(lambda: factory.build_encoder(config.model, config.image_size, nnx.Rngs(0)))
    assign_flat_state(encoder, flat, source=str(step_dir))
    return EncoderCheckpoint(
        encoder=encoder,
        config=config,
        step=step,
        weights=chosen,
        code_version=str(meta.get("code_version", "unknown")),
        step_dir=step_dir,
    )

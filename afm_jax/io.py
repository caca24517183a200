"""Atomic file writes and JSON reading: the one home for "write this file so a crash never leaves
half of it".

What: each writer writes to a hidden temporary name in the same folder (`.<name>.tmp-<pid>-<rand>`)
and renames it over the target, which POSIX makes atomic; a reader sees the old file or the new one,
never a torn one. `is_temporary` recognises the temporary names, so resumable tools can sweep what a
killed run left behind. Why here: a leaf module, usable from every layer.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import socket
import time
import uuid
from typing import Any, Callable, Iterator

TMP_MARK = ".tmp-"


def temporary_path(path: str | os.PathLike) -> pathlib.Path:
    """A hidden sibling of `path` unique to this process and call: `.<name>.tmp-<pid>-<hex>`."""
    path = pathlib.Path(path)
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def is_temporary(path: str | os.PathLike) -> bool:
    """True for a name made by `temporary_path` (a leftover of an interrupted write)."""
    name = pathlib.Path(path).name
    return name.startswith(".") and TMP_MARK in name


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Yields a temporary path to write; on success renames it to `path`, on error removes it."""
    path = pathlib.Path(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` (UTF-8) to `path` atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(
    path: str | os.PathLike,
    obj: Any,
    *,
    indent: int | None = 2,
    sort_keys: bool = False,
    default: Callable[[Any], Any] | None = None,
) -> None:
    """Writes `obj` as JSON to `path` atomically."""
    write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, default=default) + "\n")


def write_with(path: str | os.PathLike, writer: Callable[[pathlib.Path], None]) -> None:
    """Calls `writer(tmp)` to produce the file, then renames it to `path` (for np.savez, PNGs, ...).

    The temporary keeps `path`'s suffix, so writers that append one (np.savez adds `.npz`) do not."""
    path = pathlib.Path(path)
    with atomic_path(path) as tmp:
        tmp_with_suffix = tmp.with_name(tmp.name + path.suffix) if path.suffix else tmp
        try:
            writer(tmp_with_suffix)
            if tmp_with_suffix != tmp:
                os.replace(tmp_with_suffix, tmp)
        finally:
            if tmp_with_suffix != tmp and tmp_with_suffix.exists():
                tmp_with_suffix.unlink()


def read_json(path: str | os.PathLike) -> Any:
    """Parses the JSON file at `path`."""
    return json.loads(pathlib.Path(path).read_text(encoding="utf-8"))


# ─── Exclusive folder locks ──────────────────────────────────────────────────────────────────────

LOCK_FILE = ".afm_jax.lock"
_held: dict[str, int] = {}  # lock file -> nesting depth, for locks this process holds


def _process_start_ticks(pid: int) -> str | None:
    """The start time of `pid` in clock ticks since boot (Linux), to tell a reused pid from the holder."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _holder_alive(holder: dict) -> bool:
    pid = int(holder.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    ticks = holder.get("pid_start")
    return ticks is None or _process_start_ticks(pid) in (None, ticks)


def _describe(holder: dict) -> str:
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {holder.get('started', '?')}" + (
        f" ({holder['what']})" if holder.get("what") else ""
    )


@contextlib.contextmanager
def exclusive_lock(
    directory: str | os.PathLike,
    what: str,
    error: Callable[[str], Exception],
    *,
    name: str = LOCK_FILE,
    subject: str | os.PathLike | None = None,
) -> Iterator[pathlib.Path]:
    """Holds `<directory>/<name>` (default `.afm_jax.lock`; created with O_EXCL, it records host, pid and
    start time) while the block runs, so a second run on the same folder is refused with a message naming
    the holder (`error(message)` is raised; `subject` is the folder named in it, default `directory`).
    A lock left by a dead process on this host, or by an earlier run of the same SLURM job (a requeue on
    another node), is taken over. Re-entrant within one process. The folder is created if needed."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / name
    subject = subject if subject is not None else directory
    key = os.fspath(lock.resolve())
    if key in _held:
        _held[key] += 1
        try:
            yield lock
        finally:
            _held[key] -= 1
        return
    me = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_start": _process_start_ticks(os.getpid()),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "what": what,
        "slurm_job": os.environ.get("SLURM_JOB_ID") or None,
    }
    for _attempt in range(3):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text() or "{}")
            except (OSError, ValueError):
                holder = {}
            if not holder:  # being written right now, or garbage: look again shortly
                time.sleep(0.2)
                try:
                    holder = json.loads(lock.read_text() or "{}")
                except (OSError, ValueError):
                    holder = {}
            requeued = bool(me["slurm_job"]) and holder.get("slurm_job") == me["slurm_job"]  # SLURM requeues
            # a job only after its previous run ended: a lock of the same job id on another node is stale
            if (holder.get("host") == me["host"] and not _holder_alive(holder)) or requeued:
                stale = lock.with_name(f"{name}.stale-{os.getpid()}")
                try:
                    os.replace(lock, stale)  # one taker wins; the others see the new lock
                    stale.unlink()
                except FileNotFoundError:
                    pass
                continue
            raise error(
                f"{subject} is in use by another run ({_describe(holder)}); its lock is {lock}. Wait for "
                "it to finish or use another folder. If that process is gone (e.g. it ran on another "
                f"host that crashed), delete {lock} and rerun."
            ) from None
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me))
        break
    else:
        raise error(f"Could not take the lock {lock}: it keeps changing hands; is another run starting there?")
    _held[key] = 1
    try:
        yield lock
    finally:
        _held.pop(key, None)
        try:
            if json.loads(lock.read_text()).get("pid") == os.getpid():
                lock.unlink()
        except (OSError, ValueError):
            pass

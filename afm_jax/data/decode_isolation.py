"""Run one file's conversion in a child process, so that a decoder crash costs one file, not the run.

Why: a hostile or broken file can make a C/C++ decoder abort the process (GDCM's `std::bad_alloc`
under a cgroup memory limit -> `std::terminate` -> SIGABRT), crash it (SIGSEGV), hang, or eat the
node's memory. In a worker pool that kills the worker (`BrokenProcessPool`), the run, and every
rerun — the chunk holding the file never completes. Here each converting process (a pool worker, or
the main process with `--workers 0`) keeps one long-lived child and sends it one file at a time:

* the child dies (any signal, any exit) -> `DecoderCrashError` naming the signal; a new child is
  started for the next file;
* no answer within `timeout_s` -> the child is killed, `DecodeTimeoutError`;
* `max_memory_mb` > 0 caps the child's address space (`RLIMIT_AS`): an allocation past it fails
  inside the child (MemoryError, or an abort of the decoder) instead of the node's OOM killer
  choosing a victim.

The caller turns these errors into the file's `failed:<reason>` row. Only the function and its
arguments cross the pipe (pickled; the salt travels in memory, never on disk), so the child needs
nothing but the module of the function. The child is a fresh interpreter (`python -m
afm_jax.data.decode_isolation <fd> <max_memory_mb>`, talking over a socket pair), not a
multiprocessing child, so it never re-imports the caller's `__main__` (scripts need no `__main__`
guard for `workers=0`). Costs: one idle process per converting process, about a millisecond of
pickling per file; the child starts once (about a second) and is reused.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import resource
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from afm_jax.errors import DecoderCrashError, DecodeTimeoutError

_SIGNAL_HINTS = {
    signal.SIGABRT: "the decoder aborted (e.g. std::bad_alloc for a size it cannot allocate)",
    signal.SIGSEGV: "the decoder crashed (segmentation fault)",
    signal.SIGKILL: "killed from outside (the out-of-memory killer, most likely)",
    signal.SIGBUS: "the decoder crashed (bus error)",
}


@dataclasses.dataclass(frozen=True)
class IsolationOptions:
    """How files are isolated: `enabled` (False: convert in the calling process, no protection),
    per-file `timeout_s`, and the child's address-space cap `max_memory_mb` (0: no cap of its own)."""

    enabled: bool = True
    timeout_s: float = 600.0
    max_memory_mb: int = 0

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.max_memory_mb < 0:
            raise ValueError(
                f"timeout_s must be > 0 and max_memory_mb >= 0, got {self.timeout_s}, {self.max_memory_mb}."
            )


def _serve(conn: Any, max_memory_mb: int) -> None:
    """The child's loop: (function, args) in, ("ok", result) or ("error", exception) out; EOF ends it."""
    if max_memory_mb:
        limit = int(max_memory_mb) << 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    while True:
        try:
            fn, args = conn.recv()
        except (EOFError, OSError):
            return  # the parent went away
        try:
            reply = ("ok", fn(*args))
        except BaseException as e:  # pylint: disable=broad-except  (reported to the parent)
            reply = ("error", e)
        try:
            conn.send(reply)
        except Exception as e:  # pylint: disable=broad-except  (an unpicklable exception or result)
            conn.send(("error", RuntimeError(f"{type(e).__name__}: {e}")))


class IsolatedWorker:
    """One child process that runs functions for its parent, restarted after a crash or time-out."""

    def __init__(self, options: IsolationOptions = IsolationOptions()) -> None:
        self.options = options
        self._process: Any = None
        self._conn: Any = None

    def _start(self) -> None:
        parent, child = socket.socketpair()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))  # the caller's imports
        self._process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "afm_jax.data.decode_isolation",
                str(child.fileno()),
                str(self.options.max_memory_mb),
            ],
            pass_fds=(child.fileno(),),
            env=env,
            stdin=subprocess.DEVNULL,
        )
        child.close()
        self._conn = Connection(parent.detach())

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) in the child. Re-raises the child's exception; DecoderCrashError if the child died,
        DecodeTimeoutError after `timeout_s` (the child is then killed and restarted next time)."""
        if self._process is None or self._process.poll() is not None:
            self.close()
            self._start()
        try:
            self._conn.send((fn, args))
            if not self._conn.poll(self.options.timeout_s):
                self.close()
                raise DecodeTimeoutError(
                    f"no result within the per-file limit of {self.options.timeout_s:g} s; "
                    "the decoding process was stopped"
                )
            status, value = self._conn.recv()
        except (EOFError, BrokenPipeError, ConnectionResetError, OSError):
            try:
                code = self._process.wait(5)
            except subprocess.TimeoutExpired:
                code = None
            self.close()
            raise DecoderCrashError(_death(code)) from None
        if status == "error":
            raise value
        return value

    def close(self) -> None:
        if self._process is not None:
            if self._process.poll() is None:
                self._process.kill()
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                pass
        if self._conn is not None:
            self._conn.close()
        self._process = self._conn = None


def _death(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            sig = signal.Signals(-code)
        except ValueError:
            return f"the decoding process died from signal {-code}"
        return f"the decoding process died from {sig.name}: {_SIGNAL_HINTS.get(sig, 'killed by a signal')}"
    return f"the decoding process exited unexpectedly (exit status {code})"


_SHARED: dict[IsolationOptions, IsolatedWorker] = {}


def shared_worker(options: IsolationOptions) -> IsolatedWorker:
    """This process's worker for `options` (one child per converting process, reused across chunks)."""
    if options not in _SHARED:
        _SHARED[options] = IsolatedWorker(options)
    return _SHARED[options]


@atexit.register
def _close_all() -> None:
    for worker in _SHARED.values():
        worker.close()


if __name__ == "__main__":  # the child: python -m afm_jax.data.decode_isolation <fd> <max_memory_mb>
    _serve(Connection(int(sys.argv[1])), int(sys.argv[2]))

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


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2, sort_keys: bool = False,
               default: Callable[[Any], Any] | None = None) -> None:
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

"""DICOM archive -> per-chunk outputs, in parallel and resumable (the merge is in `merge`).

The unit of work is a **chunk**: `chunk_size` consecutive files of the ordered input list
(`inputs.list_inputs`). Each chunk becomes two files in the work directory:

    <work>/chunks/chunk-000042.array_record   16-bit PNGs of the chunk's images, in order
    <work>/chunks/chunk-000042.jsonl          one row per input file: status, hashed ids, metadata

both written under temporary names (`afm_jax.io`) and renamed into place (the `.jsonl` last: its presence means the
chunk is complete). Hence:

* **parallel on one machine**: chunks go to a pool of worker processes (spawned; `workers=0` runs
  them in this process);
* **one file cannot stop the run**: each file is converted in a child process of the converting
  process (`decode_isolation`), so a decoder abort, crash, hang or memory blow-up becomes that
  file's `failed:DecoderCrashError: ...` / `failed:DecodeTimeoutError: ...` row (also with
  `workers=0`);
* **parallel over SLURM array tasks**: `--shard i/n` converts chunks c with c mod n == i; any set of
  shard runs that together cover every chunk can be merged, since chunk contents do not depend on n;
* **resumable**: a rerun skips complete chunks and rewrites the rest; a killed run leaves at most
  temporary files, which the next run of the same shard removes. A chunk's bytes depend only on its
  files, the variant and the salt, so a resumed run equals an uninterrupted one;
* `<work>/plan.json` pins what the chunks were made from (input fingerprint, variant, chunk size, a
  salt check value — not the salt); a run with other inputs, variant or salt refuses to mix in.

Nothing here writes a path, name or raw identifier: rows carry `file_id` (salted hash of the path
relative to its input) and hashed DICOM identifiers; error messages have the path replaced.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import multiprocessing
import os
import pathlib
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from tqdm import tqdm

from afm_jax import io
from afm_jax.data import anonymize, decode_isolation, dicom, preprocessing
from afm_jax.data.conversion import inputs as conversion_inputs
from afm_jax.data.conversion.inputs import InputFile
from afm_jax.data.preprocessing import Variant
from afm_jax.errors import ConfigError, DecoderCrashError, DecodeTimeoutError

PLAN_FILE = "plan.json"
CHUNK_DIR = "chunks"
DEFAULT_CHUNK_SIZE = 32
_MAX_ERROR_CHARS = 240
# The DICOM header facts of a converted file, copied from its first frame into its row (and the manifest).
HEADER_FIELDS = ("manufacturer", "sop_class", "transfer_syntax", "photometric", "bits_stored", "voi_used")

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything that fixes the chunks' contents (all PHI-free; stored as plan.json)."""

    work_dir: str
    files: tuple[InputFile, ...]
    variant: Variant
    chunk_size: int
    label_ids: dict[str, int]
    inputs_fingerprint: str
    salt_check: str

    @property
    def num_chunks(self) -> int:
        return len(conversion_inputs.chunk_ranges(len(self.files), self.chunk_size))

    def chunk_files(self, chunk: int) -> list[InputFile]:
        start = chunk * self.chunk_size
        return list(self.files[start : start + self.chunk_size])

    def chunk_path(self, chunk: int, suffix: str) -> pathlib.Path:
        return pathlib.Path(self.work_dir) / CHUNK_DIR / f"chunk-{chunk:06d}.{suffix}"

    def is_done(self, chunk: int) -> bool:
        return self.chunk_path(chunk, "jsonl").is_file()

    def summary(self) -> dict[str, Any]:
        return {
            "inputs_fingerprint": self.inputs_fingerprint,
            "num_files": len(self.files),
            "num_chunks": self.num_chunks,
            "chunk_size": self.chunk_size,
            "variant": self.variant.to_dict(),
            "label_ids": self.label_ids,
            "salt_check": self.salt_check,
        }


def make_plan(
    files: Sequence[InputFile],
    variant: Variant,
    work_dir: str | os.PathLike,
    salt: bytes,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    label_names: Sequence[str] | None = None,
) -> Plan:
    """The plan for converting `files`; writes `<work_dir>/plan.json` or checks an existing one.

    Raises ConfigError if the work directory holds chunks of a different plan (other inputs, variant,
    chunk size or salt): mixing them would give a dataset that is neither."""
    if chunk_size < 1:
        raise ConfigError(f"--chunk_size must be >= 1, got {chunk_size}.")
    work = pathlib.Path(work_dir).expanduser().resolve()
    plan = Plan(
        str(work),
        tuple(files),
        variant,
        int(chunk_size),
        conversion_inputs.label_ids(files, label_names),
        conversion_inputs.inputs_fingerprint(files),
        anonymize.hash_id("afm-jax salt check", salt),
    )
    (work / CHUNK_DIR).mkdir(parents=True, exist_ok=True)
    plan_file = work / PLAN_FILE
    wanted = plan.summary()
    if plan_file.is_file():
        existing = json.loads(plan_file.read_text())
        if existing != json.loads(json.dumps(wanted)):
            changed = sorted(
                k
                for k in set(existing) | set(wanted)
                if json.dumps(existing.get(k), sort_keys=True) != json.dumps(wanted.get(k), sort_keys=True)
            )
            raise ConfigError(
                f"The work directory {work} holds a conversion with different {', '.join(changed)} "
                "(salt_check: another salt). Use the same inputs, variant, chunk size and salt to "
                "resume it, or delete the directory (or pass --restart) to start over."
            )
    else:
        io.write_text(plan_file, json.dumps(wanted, indent=1, sort_keys=True))
    return plan


# ─── One chunk (runs in a worker process) ────────────────────────────────────────────────────────


@dataclasses.dataclass(frozen=True)
class ChunkTask:
    """What a worker needs for one chunk (picklable; the salt travels in memory only)."""

    chunk: int
    files: tuple[InputFile, ...]
    variant: dict[str, Any]
    label_ids: dict[str, int]
    salt: bytes
    record_path: str
    rows_path: str
    isolation: decode_isolation.IsolationOptions = decode_isolation.IsolationOptions()


def convert_chunk(task: ChunkTask) -> Counter:
    """Converts one chunk's files and writes its two output files atomically; returns status counts."""
    # array_record: a native extension, loaded only in the worker processes that write chunks
    from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top

    logging.getLogger("pydicom").setLevel(logging.ERROR)
    variant = Variant.from_dict(task.variant)
    counts: Counter = Counter()
    rows = []
    with io.atomic_path(task.record_path) as record_tmp:
        writer = ArrayRecordWriter(os.fspath(record_tmp), "group_size:1,uncompressed")
        try:
            for f in task.files:
                row, pngs = _convert_file_isolated(f, variant, task)
                for png in pngs:
                    writer.write(png)
                rows.append(row)
                counts[row["status"].split(":", 1)[0]] += 1
        finally:
            writer.close()
    io.write_text(task.rows_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return counts


def _convert_file_isolated(f: InputFile, variant: Variant, task: ChunkTask) -> tuple[dict, list[bytes]]:
    """`convert_file` in this process's decoding child; its death or time-out fails only this file."""
    if not task.isolation.enabled:
        return convert_file(f, variant, task.salt, task.label_ids)
    start = time.perf_counter()
    try:
        return decode_isolation.shared_worker(task.isolation).call(convert_file, f, variant, task.salt, task.label_ids)
    except (DecoderCrashError, DecodeTimeoutError) as e:
        row = {
            "file_index": f.index,
            "file_id": f.file_id(task.salt),
            "label_name": f.label_name,
            "label": task.label_ids.get(f.label_name, -1) if f.label_name else -1,
            "status": f"failed:{type(e).__name__}: {e}",
            "seconds": round(time.perf_counter() - start, 4),
        }
        return row, []


def convert_file(f: InputFile, variant: Variant, salt: bytes, label_ids: dict[str, int]) -> tuple[dict, list[bytes]]:
    """One input file -> (manifest row, PNG bytes of its images). Never raises for a bad file."""
    start = time.perf_counter()
    row: dict[str, Any] = {
        "file_index": f.index,
        "file_id": f.file_id(salt),
        "label_name": f.label_name,
        "label": label_ids.get(f.label_name, -1) if f.label_name else -1,
    }
    pngs: list[bytes] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            frames = dicom.read_dicom(f.path, salt, variant.dicom_options)
        images = []
        for frame in frames:
            meta = frame.meta
            processed = preprocessing.apply_variant(
                frame.image, variant, padding=frame.padding, laterality=meta["laterality"]
            )
            pngs.append(preprocessing.encode_png(processed.image, variant.png_compression))
            spacing = [float(s) / processed.scale for s in meta["pixel_spacing_mm"]]
            images.append(
                {
                    "image_id": meta["image_id"],
                    "patient_id": meta["patient_id"],
                    "study_id": meta["study_id"],
                    "series_id": meta["series_id"],
                    "body_part": meta["body_part"],
                    "view": meta["view"],
                    "laterality": meta["laterality"],
                    "modality": meta["modality"],
                    "frame": meta["frame"],
                    "pixel_spacing_mm": [None if s != s else s for s in spacing],  # NaN -> null in JSON
                    "shape": list(processed.image.shape),
                    "crop": list(processed.crop),
                    "flipped": processed.flipped,
                }
            )
        first = frames[0].meta
        row.update(
            status="converted",
            images=images,
            pixel_hash=first["pixel_hash"],
            **{
                k: first[k]
                for k in (
                    *HEADER_FIELDS,
                    "num_frames",
                    "orig_shape",
                    "patient_id_source",
                    "spacing_source",
                    "notes",
                )
            },
        )
    except dicom.SkippedFile as e:
        row["status"] = f"skipped:{e.reason}"
        pngs = []
    except Exception as e:  # pylint: disable=broad-except  (a broken file is reported, never fatal)
        row["status"] = f"failed:{type(e).__name__}: {_scrub(str(e), f)}"
        pngs = []
    row["seconds"] = round(time.perf_counter() - start, 4)
    return row, pngs


def _scrub(message: str, f: InputFile) -> str:
    """An error message without the file's path (paths can hold names or IDs), on one line, short."""
    for text in (f.path, f.relpath, os.path.basename(f.path)):
        if text:
            message = message.replace(text, "<file>")
    message = " ".join(message.split())
    return message[:_MAX_ERROR_CHARS] + ("..." if len(message) > _MAX_ERROR_CHARS else "")


# ─── Running a shard ─────────────────────────────────────────────────────────────────────────────


def pending_chunks(plan: Plan, shard: tuple[int, int] = (0, 1)) -> list[int]:
    """The chunks of `shard` that are not complete yet."""
    return [c for c in conversion_inputs.chunks_of_shard(plan.num_chunks, shard) if not plan.is_done(c)]


def _remove_stale_temporaries(plan: Plan, chunks: Sequence[int]) -> None:
    """Temporary files of this shard's unfinished chunks (left by a killed run): `afm_jax.io`'s hidden
    `.chunk-N.<suffix>.tmp-*`, and the unhidden `chunk-N.array_record.tmp-*` of earlier versions."""
    directory = pathlib.Path(plan.work_dir) / CHUNK_DIR
    names = {f"chunk-{c:06d}" for c in chunks}
    for path in directory.iterdir():
        if io.TMP_MARK in path.name and path.name.lstrip(".").split(".", 1)[0] in names:
            path.unlink(missing_ok=True)


def run_shard(
    plan: Plan,
    salt: bytes,
    *,
    shard: tuple[int, int] = (0, 1),
    workers: int = 0,
    progress: bool = True,
    on_chunk_done: Callable[[int], None] | None = None,
    isolation: decode_isolation.IsolationOptions = decode_isolation.IsolationOptions(),
) -> Counter:
    """Converts the pending chunks of `shard`; returns status counts of the files converted now.

    `workers` > 0 uses that many spawned processes; 0 converts in this process. `on_chunk_done(chunk)`
    is called after each chunk is complete (tests use it to interrupt a run); `isolation`: per-file
    child process, time and memory limits (see `decode_isolation`)."""
    todo = pending_chunks(plan, shard)
    _remove_stale_temporaries(plan, todo)
    shard_chunks = conversion_inputs.chunks_of_shard(plan.num_chunks, shard)
    total = sum(len(plan.chunk_files(c)) for c in shard_chunks)
    done_files = total - sum(len(plan.chunk_files(c)) for c in todo)
    variant = plan.variant.to_dict()
    tasks = [
        ChunkTask(
            c,
            tuple(plan.chunk_files(c)),
            variant,
            plan.label_ids,
            salt,
            str(plan.chunk_path(c, "array_record")),
            str(plan.chunk_path(c, "jsonl")),
            isolation,
        )
        for c in todo
    ]
    counts: Counter = Counter()
    bar = tqdm(
        total=total,
        initial=done_files,
        unit="file",
        desc=f"converting shard {shard[0]}/{shard[1]}",
        disable=not progress,
        smoothing=0.05,
        dynamic_ncols=True,
    )
    try:
        if workers <= 0:
            for task in tasks:
                counts.update(convert_chunk(task))
                _advance(bar, task, counts, on_chunk_done)
        else:
            context = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
                futures = {pool.submit(convert_chunk, task): task for task in tasks}
                try:
                    for future in concurrent.futures.as_completed(futures):
                        counts.update(future.result())
                        _advance(bar, futures[future], counts, on_chunk_done)
                except BaseException:
                    for future in futures:
                        future.cancel()
                    raise
    finally:
        bar.close()
    return counts


def _advance(bar: tqdm, task: ChunkTask, counts: Counter, on_chunk_done: Callable[[int], None] | None) -> None:
    bar.update(len(task.files))
    bar.set_postfix({k: counts[k] for k in ("converted", "skipped", "failed")}, refresh=False)
    if on_chunk_done is not None:
        on_chunk_done(task.chunk)


def read_rows(plan: Plan, chunk: int) -> list[dict]:
    """The manifest rows of a complete chunk."""
    with open(plan.chunk_path(chunk, "jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]

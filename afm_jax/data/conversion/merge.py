"""Merge complete conversion chunks into one dataset: dedup, patient splits, records, manifest.

Runs once, after every chunk is complete (on one machine, or as the final `--merge` step after a
SLURM array). It streams over the chunk outputs, one chunk at a time, never holding all rows
(`MergedRows`; at 500k files the row dicts alone would be ~1 GB):

1. the rows: exact duplicates are decided — same SOP Instance UID (hashed `image_id`) or the same
   stored pixels (`pixel_hash`) as an earlier file in input order; the earlier file is kept, so the
   choice does not depend on sharding — and every patient gets a split;
2. the images: streamed in input order into `records.write_dataset`, so the dataset, its index and
   `content_fingerprint` are the same however the chunks were produced;
3. the rows again, with the decisions and record positions applied, into the manifest.

**Splits** are by patient. With `split_mode="stratified"` (default) patients are grouped by label
(their most frequent image label; -1 when unlabelled), ordered within a group by the same salted
hash `splits.split_of_patient` uses, and cut at the cumulative fractions: every label's patients
are split in the requested proportions (within one patient per group). `split_mode="hash"` uses
`splits.split_of_patient` alone, which keeps a patient's split stable when data is added. Both live
in `afm_jax.data.splits`.

The manifest (`manifest.csv`, beside the shards) has one row per input file: `status` is
`converted`, `skipped:<reason>` or `failed:<error>`, `output` is `<split>:<record index>` (several,
`;`-separated, for multi-frame files with `frames="all"`), ids are salted hashes.
"""

from __future__ import annotations

import csv
import itertools
import logging
import pathlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from afm_jax import io
from afm_jax.data import records
from afm_jax.data.conversion.chunks import HEADER_FIELDS, Plan, read_rows
from afm_jax.data.splits import SPLIT_MODES, assign_patient_splits, parse_split_fractions  # noqa: F401  (CLIs' names)
from afm_jax.errors import IncompleteConversionError, NothingConvertedError

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.csv"
MANIFEST_COLUMNS = (
    "file_index",
    "file_id",
    "status",
    "output",
    "duplicate_of",
    *records.ID_KEYS,
    "label",
    "label_name",
    "modality",
    "body_part",
    "view",
    "laterality",
    *HEADER_FIELDS,
    "orig_rows",
    "orig_cols",
    "num_frames",
    "num_images",
    "pixel_hash",
    "notes",
)


def check_complete(plan: Plan) -> None:
    """Raises IncompleteConversionError unless every chunk of `plan` is converted."""
    missing = [c for c in range(plan.num_chunks) if not plan.is_done(c)]
    if missing:
        shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
        raise IncompleteConversionError(
            f"{len(missing)} of {plan.num_chunks} chunks are not converted yet (chunks {shown}). Run (or rerun) "
            "the conversion shards first — finished chunks are skipped — then --merge again. Chunk c belongs to "
            "shard c mod n of a --shard i/n run."
        )


class _DuplicateFinder:
    """Decides, row by row in input order, whether a converted row repeats an earlier row's SOP
    Instance UID or pixels; keeps only the ids and hashes seen, not the rows."""

    def __init__(self) -> None:
        self.by_image: dict[str, str] = {}
        self.by_pixels: dict[str, str] = {}

    def check(self, row: dict) -> tuple[str, str] | None:
        """(status, duplicate_of) for a duplicate, None for a row to keep (then remembered)."""
        if row["status"] != "converted":
            return None
        ids = [image["image_id"] for image in row["images"]]
        first = next((self.by_image[i] for i in ids if i in self.by_image), None)
        if first is not None:
            return "skipped:duplicate_sop_instance_uid", first
        if row["pixel_hash"] in self.by_pixels:
            return "skipped:duplicate_pixels", self.by_pixels[row["pixel_hash"]]
        for i in ids:
            self.by_image[i] = row["file_id"]
        self.by_pixels[row["pixel_hash"]] = row["file_id"]
        return None


class MergedRows:
    """The merge's decisions over every input row, made in one streaming pass; `rows()` streams the
    rows again with them applied (status of duplicates, `output` positions).

    `read` returns a fresh iterator over all rows in input order each time it is called (the merge
    reads the chunk files again; nothing but ids, hashes and per-patient label counts is held: ~1 GB
    of row dicts at 500k files otherwise)."""

    def __init__(
        self, read: Callable[[], Iterable[dict]], fractions: Mapping[str, float], split_mode: str = "stratified"
    ) -> None:
        self._read = read
        finder = _DuplicateFinder()
        self._duplicates: dict[int, tuple[str, str]] = {}
        patient_labels: dict[str, Counter] = defaultdict(Counter)
        counts: Counter = Counter()
        self.num_files = self.num_images = 0
        for row in read():
            self.num_files += 1
            decision = finder.check(row)
            if decision is not None:
                self._duplicates[row["file_index"]] = decision
            status = decision[0] if decision else row["status"]
            counts[status] += 1
            if status == "converted":
                self.num_images += len(row["images"])
                for image in row["images"]:
                    patient_labels[image["patient_id"]][int(row["label"])] += 1
        del finder
        self.split_of = assign_patient_splits(patient_labels, fractions, split_mode)
        self.summary = summarize(counts)

    def rows(self) -> Iterator[dict]:
        """Every row in input order, duplicates marked, kept images' `output` = `<split>:<index>` in
        the order `records.write_dataset` sees them."""
        position: Counter = Counter()
        for row in self._read():
            decision = self._duplicates.get(row["file_index"])
            if decision is not None:
                row.update(status=decision[0], duplicate_of=decision[1])
            elif row["status"] == "converted":
                outputs = []
                for image in row["images"]:
                    split = self.split_of[image["patient_id"]]
                    outputs.append(f"{split}:{position[split]}")
                    position[split] += 1
                row["output"] = ";".join(outputs)
            yield row


def plan_rows(plan: Plan) -> Iterator[dict]:
    """Every row of a complete conversion in input order, one chunk file at a time (chunk c holds
    files c·chunk_size to (c+1)·chunk_size - 1)."""
    for chunk in range(plan.num_chunks):
        yield from sorted(read_rows(plan, chunk), key=lambda r: r["file_index"])


def merge(
    plan: Plan,
    out_dir: str | pathlib.Path,
    name: str,
    *,
    split_fractions: Mapping[str, float] | None = None,
    split_mode: str = "stratified",
    overwrite: bool = False,
    max_shard_bytes: int = records.DEFAULT_MAX_SHARD_BYTES,
    extra_info: dict | None = None,
) -> tuple[pathlib.Path, dict[str, int]]:
    """Writes the dataset `<out_dir>/<name>/<version>` and its manifest; returns (dataset dir, summary).

    The summary counts files per status (`converted`, `skipped:<reason>`, `failed:<ExceptionType>`).
    Raises IncompleteConversionError if chunks are missing, NothingConvertedError (a ConfigError, so a
    ValueError) if nothing was converted (the manifest is then written to `<out_dir>/<name>/manifest.csv`
    for inspection). Streams: the rows are read three times (decisions, records, manifest), never
    all held."""
    check_complete(plan)
    fractions = dict(split_fractions or records.DEFAULT_SPLIT_FRACTIONS)
    merged = MergedRows(lambda: plan_rows(plan), fractions, split_mode)
    split_of, summary = merged.split_of, merged.summary
    empty = sorted(set(fractions) - set(split_of.values()))
    if empty and split_of:
        log.warning(
            "Splits %s received no patient (%d patients in all): too few patients per label for the "
            "fractions %s. Add patients or change --splits.",
            empty,
            len(split_of),
            fractions,
        )

    info = dict(extra_info or {})
    info.update(
        preprocessing=plan.variant.to_dict(),
        source_fingerprint=plan.inputs_fingerprint,
        conversion={
            "files": merged.num_files,
            "status_counts": summary,
            "split_mode": split_mode,
            "label_ids": plan.label_ids,
            "chunk_size": plan.chunk_size,
        },
    )
    base = pathlib.Path(out_dir).expanduser().resolve()
    if not merged.num_images:
        (base / name).mkdir(parents=True, exist_ok=True)
        write_manifest(merged.rows(), base / name / MANIFEST_FILE)
        raise NothingConvertedError(
            f"No file was converted ({summary}); the manifest {base / name / MANIFEST_FILE} "
            "gives each file's reason. Check that --input points at DICOM images."
        )
    directory = records.write_dataset(
        _examples(plan, merged.rows()),
        base,
        name=name,
        split_fractions=fractions,
        extra_info=info,
        num_examples_hint=merged.num_images,
        overwrite=overwrite,
        max_shard_bytes=max_shard_bytes,
        png_compression=plan.variant.png_compression,
        assign_split=lambda record: split_of[record["patient_id"]],
    )
    write_manifest(merged.rows(), directory / MANIFEST_FILE)
    return directory, summary


def _examples(plan: Plan, rows: Iterable[dict]) -> Iterator[dict[str, Any]]:
    """Record dicts of the kept images, in input order, with the PNGs read from the chunk files (one
    chunk's PNGs in memory at a time)."""
    # array_record: a native extension, loaded only by the process that merges
    from array_record.python.array_record_module import ArrayRecordReader  # pylint: disable=g-import-not-at-top

    for chunk, chunk_rows in itertools.groupby(rows, key=lambda r: r["file_index"] // plan.chunk_size):
        chunk_rows = list(chunk_rows)
        if not any("images" in r for r in chunk_rows):
            continue
        reader = ArrayRecordReader(str(plan.chunk_path(chunk, "array_record")))
        try:
            pngs = reader.read_all()
        finally:
            reader.close()
        k = 0
        for row in chunk_rows:
            images = row.get("images", [])
            keep = row["status"] == "converted"
            for image in images:
                png = pngs[k]
                k += 1
                if keep:
                    yield _record(row, image, png)


def _record(row: dict, image: dict, png: bytes) -> dict[str, Any]:
    spacing = [np.nan if s is None else s for s in image["pixel_spacing_mm"]]
    return {
        "image": png,
        "patient_id": image["patient_id"],
        "study_id": image["study_id"],
        "series_id": image["series_id"],
        "image_id": image["image_id"],
        "body_part": image["body_part"],
        "view": image["view"],
        "laterality": image["laterality"],
        "modality": image["modality"],
        "label_name": row["label_name"],
        "label": int(row["label"]),
        "pixel_spacing_mm": np.asarray(spacing, np.float32),
        "orig_shape": np.asarray(row["orig_shape"], np.int32),
    }


def summarize(status_counts: Mapping[str, int]) -> dict[str, int]:
    """Files per status from counts of the full status strings, failures grouped by exception type
    (their messages stay in the manifest)."""
    counts: Counter = Counter()
    for status, n in status_counts.items():
        if status.startswith("failed:"):
            status = status.split(":", 2)[0] + ":" + status.split(":", 2)[1].strip()
        counts[status] += n
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def format_summary(summary: Mapping[str, int]) -> str:
    """Human-readable summary: totals per status, then per reason."""
    totals: Counter = Counter()
    for status, n in summary.items():
        totals[status.split(":", 1)[0]] += n
    lines = ["  " + ", ".join(f"{k}: {totals[k]}" for k in ("converted", "skipped", "failed"))]
    lines += [f"  {n:7d}  {status}" for status, n in summary.items() if status != "converted"]
    return "\n".join(lines)


def write_manifest(rows: Iterable[dict], path: pathlib.Path) -> None:
    """One CSV row per input file (no paths, no raw identifiers), streamed into an atomic temporary
    (not built in memory first: ~150 MB of text at 500k files)."""
    io.write_with(path, lambda tmp: _write_manifest_rows(rows, tmp))


def _write_manifest_rows(rows: Iterable[dict], path: pathlib.Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            images = row.get("images") or [{}]
            first = images[0]
            orig = row.get("orig_shape") or ["", ""]
            writer.writerow(
                {
                    **{k: row.get(k, "") for k in MANIFEST_COLUMNS},
                    **{
                        k: ";".join(dict.fromkeys(str(im.get(k, "")) for im in images))
                        for k in ("patient_id", "study_id", "series_id", "body_part", "view", "laterality", "modality")
                    },
                    "image_id": ";".join(str(im.get("image_id", "")) for im in images),
                    "orig_rows": orig[0],
                    "orig_cols": orig[1],
                    "num_images": len(row.get("images") or []),
                    "label": row.get("label", -1),
                    "output": row.get("output", ""),
                    "duplicate_of": row.get("duplicate_of", ""),
                }
                | ({} if first else {"patient_id": "", "image_id": ""})
            )


def read_manifest(path: str | pathlib.Path) -> list[dict[str, str]]:
    """The manifest rows as dicts of strings."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))

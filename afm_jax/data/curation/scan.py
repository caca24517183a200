"""The one pass over the records that everything else in curation works from.

Per image: decode the 16-bit PNG once, then the quality signals, the exact pixel hash, the
perceptual hash, a 16x16 thumbnail embedding and the string metadata — all kept in memory as
columns (~400 bytes per image, ~200 MB at 500k). Decoding dominates; PNG decoding and OpenCV
release the GIL, so a few threads (each with its own record reader) scale over the cores.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm import tqdm

from afm_jax.data import records, transforms
from afm_jax.data.curation import duplicates, embeddings, quality


@dataclasses.dataclass
class Scan:
    """Columns over the scanned images (one row each, dataset order per split)."""

    split: list[str]
    index: np.ndarray  # record index inside its split
    image_id: list[str]
    patient_id: list[str]  # already salted and hashed in the records
    label: np.ndarray
    signals: dict[str, np.ndarray]  # quality.SIGNAL_NAMES -> (N,)
    pixel_hash: list[str]
    phash: np.ndarray  # (N, 32) uint8
    thumbnail: np.ndarray  # (N, 256) float32
    metadata: list[dict[str, str]]

    def __len__(self) -> int:
        return len(self.image_id)


def _scan_record(record: dict, work_size: int) -> dict:
    pixels = transforms.decode_png(record["image"])[..., 0]
    small = quality.working_copy(pixels, work_size)
    signals = quality.image_signals(
        small,
        work_size=work_size,
        pixel_spacing_mm=record.get("pixel_spacing_mm"),
        orig_shape=record.get("orig_shape", pixels.shape),
        stored_shape=pixels.shape,
    )
    return {
        "image_id": record["image_id"],
        "patient_id": record["patient_id"],
        "label": int(record.get("label", -1)),
        "signals": signals,
        "pixel_hash": duplicates.pixel_hash(pixels),
        "phash": duplicates.perceptual_hash(small),
        "thumbnail": embeddings.thumbnail_embedding(small),
        "metadata": quality.metadata_fields(record),
    }


def scan_split(
    dataset_path: str | os.PathLike,
    split: str,
    *,
    work_size: int = 128,
    threads: int = 2,
    chunk: int = 64,
    progress: bool = True,
) -> Scan:
    """Scans every record of `split` (in dataset order) with `threads` reader threads."""
    source = records.open_split(dataset_path, split)
    n = len(source)
    local = threading.local()

    def reader() -> records.RecordSource:
        if not hasattr(local, "source"):  # one reader per thread: the array-record readers are not shared
            local.source = records.RecordSource(source.path, source.split, source.indices)
        return local.source

    def work(start: int) -> list[dict]:
        src = reader()
        return [_scan_record(src[i], work_size) for i in range(start, min(start + chunk, n))]

    rows: list[dict] = []
    with (
        ThreadPoolExecutor(max_workers=max(1, threads)) as pool,
        tqdm(total=n, desc=f"scanning {split}", unit="img", disable=not progress) as bar,
    ):
        for part in pool.map(work, range(0, n, chunk)):
            rows.extend(part)
            bar.update(len(part))
    return _columns(rows, split)


def _columns(rows: Sequence[dict], split: str) -> Scan:
    n = len(rows)
    return Scan(
        split=[split] * n,
        index=np.arange(n, dtype=np.int64),
        image_id=[r["image_id"] for r in rows],
        patient_id=[r["patient_id"] for r in rows],
        label=np.asarray([r["label"] for r in rows], np.int64),
        signals={k: np.asarray([r["signals"][k] for r in rows], np.float64) for k in quality.SIGNAL_NAMES},
        pixel_hash=[r["pixel_hash"] for r in rows],
        phash=np.asarray([r["phash"] for r in rows], np.uint8).reshape(n, duplicates.PHASH_BYTES),
        thumbnail=np.asarray([r["thumbnail"] for r in rows], np.float32).reshape(n, -1),
        metadata=[r["metadata"] for r in rows],
    )


def concat(scans: Sequence[Scan]) -> Scan:
    """One Scan over several splits (rows keep their split and record index)."""
    if len(scans) == 1:
        return scans[0]
    return Scan(
        split=sum((s.split for s in scans), []),
        index=np.concatenate([s.index for s in scans]),
        image_id=sum((s.image_id for s in scans), []),
        patient_id=sum((s.patient_id for s in scans), []),
        label=np.concatenate([s.label for s in scans]),
        signals={k: np.concatenate([s.signals[k] for s in scans]) for k in quality.SIGNAL_NAMES},
        pixel_hash=sum((s.pixel_hash for s in scans), []),
        phash=np.concatenate([s.phash for s in scans]),
        thumbnail=np.concatenate([s.thumbnail for s in scans]),
        metadata=sum((s.metadata for s in scans), []),
    )

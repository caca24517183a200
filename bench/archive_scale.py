#!/usr/bin/env python
"""Archive scale, simulated: time (and peak memory) of the row and column stages at N synthetic rows.

Command:  python bench/archive_scale.py [--sizes 10000,50000,500000] [--dim 256] [--budget_s 240]

The real archive is ~500,000 images from ~17,000 patients (~30 images per patient). For each N this
times, on synthetic data of that shape:

* ``merge_rows`` (timed under tracemalloc, which slows allocation: an upper bound): the row passes
  of `afm_jax.data.conversion.merge` over rows shaped as the conversion writes them, read from
  chunk JSONL files as the merge reads them — `MergedRows` (1 % planted SOP-UID and pixel
  duplicates, the stratified patient splits, the summary) and `write_manifest` of its `rows()`;
  the records pass is the ``records`` stage. Peak Python heap from `tracemalloc` (the merge streams
  the rows: ids, hashes and per-patient counts are what it holds) and the manifest's size.
* ``exact_pairs``: equal pixel hashes (`duplicates.exact_pairs`).
* ``hamming_pairs``: 256-bit pHashes within 12 bits (`duplicates.hamming_pairs`, faiss binary).
* ``cosine_flat``: embedding pairs at cosine >= 0.99, exact (`duplicates.cosine_pairs`, faiss flat,
  quadratic); ``cosine_ivf``: the same with `method="ivf"` (faiss IVF, sub-quadratic) and its
  ``recall`` of the exact pairs (planted near-duplicates plus the exact search's other finds).
* ``kmeans``: `hierarchical_kmeans` (256, 32) + `balanced_order` + `take` (half).
* ``records``: writing N tiny 16x16 records (`records.write_dataset`), opening the split
  (`records.open_split`: the ArrayRecord index) and 2,000 random reads (`parse_record`).

A stage whose time predicted from the smaller sizes (power-law fit) exceeds ``--budget_s`` is not
run at that size: its figure is extrapolated and marked so (``"extrapolated": true``). Each
stage's growth exponent k (time ∝ N^k) is fitted over the measured sizes, from wall time
(``exponent_k``) and from the process's CPU time (``exponent_k_cpu``, all threads: steadier when
other jobs share the machine). The last line of stdout is
one JSON object; progress goes to stderr. Absolute times move with the machine's load; the
exponents much less.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import tempfile
import time
import tracemalloc

import numpy as np

from afm_jax.data import records
from afm_jax.data.conversion import merge
from afm_jax.data.curation import clustering, duplicates

IMAGES_PER_PATIENT = 30  # 500,000 images / 17,000 patients ≈ 29


def log(msg: str) -> None:
    print(f"[archive_scale {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# Synthetic data.
# ------------------------------------------------------------------------------------------------


def synthetic_rows(n: int, rng: np.random.Generator) -> list[dict]:
    """Manifest rows shaped like `chunks.read_rows` output: 1 % duplicate UIDs, 1 % duplicate pixels."""
    patients = rng.integers(0, max(1, n // IMAGES_PER_PATIENT), n)
    labels = rng.integers(-1, 2, n)
    pixel = [f"{h:032x}" for h in rng.integers(0, 2**62, n)]
    uid = [f"{h:032x}" for h in rng.integers(0, 2**62, n)]
    k = max(1, n // 100)
    dup_px, dup_uid = rng.choice(n - 1, k, replace=False) + 1, rng.choice(n - 1, k, replace=False) + 1
    for i in dup_px:
        pixel[i] = pixel[i - 1]
    for i in dup_uid:
        uid[i] = uid[i - 1]
    rows = []
    for i in range(n):
        p = f"p{patients[i]:024x}"
        image = {
            "image_id": uid[i],
            "patient_id": p,
            "study_id": f"s{i // 3:024x}",
            "series_id": f"r{i // 3:024x}",
            "body_part": "FEMUR",
            "view": "AP",
            "laterality": "L",
            "modality": "DX",
            "frame": 0,
            "pixel_spacing_mm": [0.14, 0.14],
            "shape": [512, 512],
            "crop": [0, 0, 2000, 2000],
            "flipped": False,
        }
        rows.append(
            {
                "file_index": i,
                "file_id": f"f{i:024x}",
                "label_name": "aff" if labels[i] == 1 else "",
                "label": int(labels[i]),
                "status": "converted",
                "images": [image],
                "pixel_hash": pixel[i],
                "manufacturer": "X",
                "sop_class": "1.2.840.10008.5.1.4.1.1.1.1",
                "transfer_syntax": "1.2.840.10008.1.2.1",
                "photometric": "MONOCHROME2",
                "bits_stored": 12,
                "voi_used": "window",
                "num_frames": 1,
                "orig_shape": [2500, 2000],
                "patient_id_source": "PatientID",
                "spacing_source": "PixelSpacing",
                "seconds": 0.05,
            }
        )
    return rows


def synthetic_columns(n: int, dim: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """pHash codes, embeddings (1 % planted near-copies) and pixel hashes of n images."""
    codes = rng.integers(0, 256, (n, duplicates.PHASH_BYTES), dtype=np.uint8)
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    dup = rng.choice(n, max(1, n // 100), replace=False)
    codes[dup] = codes[(dup + 1) % n]
    vectors[dup] = vectors[(dup + 1) % n] + 0.02 * rng.normal(size=(len(dup), dim)).astype(np.float32)
    hashes = [f"{h:x}" for h in rng.integers(0, 2**62, n)]
    for i in dup:
        hashes[i] = hashes[(i + 1) % n]
    return codes, vectors, np.asarray(hashes)


# ------------------------------------------------------------------------------------------------
# Stages.
# ------------------------------------------------------------------------------------------------


CHUNK_ROWS = 1024  # rows per chunk file (the conversion's --chunk_size is 64 by default; the reads are the same)


def stage_merge_rows(n: int, rng: np.random.Generator, tmp: str) -> dict:
    t = time.perf_counter()
    rows = synthetic_rows(n, rng)
    chunk_files = []
    for start in range(0, n, CHUNK_ROWS):  # as the conversion leaves them: one JSON row per line
        path = os.path.join(tmp, f"chunk-{start // CHUNK_ROWS:06d}.jsonl")
        with open(path, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows[start : start + CHUNK_ROWS])
        chunk_files.append(path)
    del rows
    build_s = time.perf_counter() - t

    def read():  # what merge.plan_rows does with a Plan's chunk files
        for path in chunk_files:
            with open(path) as f:
                yield from sorted((json.loads(line) for line in f), key=lambda r: r["file_index"])

    tracemalloc.start()
    t, c = time.perf_counter(), time.process_time()
    merged = merge.MergedRows(read, {"train": 0.8, "validation": 0.1, "test": 0.1}, "stratified")
    path = os.path.join(tmp, f"manifest_{n}.csv")
    merge.write_manifest(merged.rows(), pathlib.Path(path))
    seconds, cpu_s = time.perf_counter() - t, time.process_time() - c
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    out = {
        "seconds": seconds,
        "cpu_s": cpu_s,
        "rows_build_s": round(build_s, 3),
        "peak_mb": round(peak / 2**20, 1),
        "manifest_mb": round(os.path.getsize(path) / 2**20, 1),
        "patients": len(merged.split_of),
        "skipped": sum(v for k, v in merged.summary.items() if k.startswith("skipped")),
    }
    os.remove(path)
    for chunk in chunk_files:
        os.remove(chunk)
    return out


def pair_set(pairs: np.ndarray) -> set[tuple[int, int]]:
    return set(map(tuple, np.asarray(pairs, np.int64).tolist()))


def stage_records(n: int, rng: np.random.Generator, tmp: str) -> dict:
    images = rng.integers(0, 65535, (64, 16, 16), dtype=np.uint16)

    def examples():
        for i in range(n):
            yield {
                "image": images[i % 64],
                "patient_id": f"p{i // IMAGES_PER_PATIENT}",
                "study_id": "s",
                "series_id": "r",
                "image_id": f"i{i}",
                "body_part": "FEMUR",
                "view": "AP",
                "laterality": "L",
                "modality": "DX",
                "pixel_spacing_mm": np.asarray([0.1, 0.1], np.float32),
                "orig_shape": np.asarray([16, 16], np.int32),
                "label": -1,
                "label_name": "",
            }

    t = time.perf_counter()
    directory = records.write_dataset(
        examples(), tmp, name=f"scale{n}", split_fractions={"train": 1.0}, num_examples_hint=n, overwrite=True
    )
    write_s = time.perf_counter() - t
    t = time.perf_counter()
    source = records.open_split(directory, "train")
    open_s = time.perf_counter() - t
    idx = rng.integers(0, len(source), 2000)
    t = time.perf_counter()
    for i in idx:
        source[int(i)]
    read_s = time.perf_counter() - t
    return {
        "seconds": open_s + read_s,
        "write_s": round(write_s, 3),
        "open_s": round(open_s, 4),
        "random_read_us": round(read_s / len(idx) * 1e6, 1),
        "records": len(source),
    }


# ------------------------------------------------------------------------------------------------
# Main.
# ------------------------------------------------------------------------------------------------


def fit_exponent(sizes: list[int], seconds: list[float]) -> float | None:
    """k of time ∝ N^k, least squares in log-log over the measured sizes."""
    pts = [(math.log(n), math.log(s)) for n, s in zip(sizes, seconds) if s and s > 0]
    if len(pts) < 2:
        return None
    x, y = np.array(pts).T
    return float(np.polyfit(x, y, 1)[0])


def predict(sizes: list[int], seconds: list[float], n: int) -> float | None:
    k = fit_exponent(sizes, seconds)
    if k is None:
        return None
    return seconds[-1] * (n / sizes[-1]) ** k


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,50000,500000")
    parser.add_argument("--dim", type=int, default=256, help="embedding width")
    parser.add_argument(
        "--budget_s",
        type=float,
        default=240.0,
        help="a stage predicted to take longer at a size is extrapolated instead of run",
    )
    parser.add_argument(
        "--stages", default="merge_rows,exact_pairs,hamming_pairs,cosine_flat,cosine_ivf,kmeans,records"
    )
    parser.add_argument("--records_max", type=int, default=50000, help="largest N for the records stage (write cost)")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    stages = args.stages.split(",")
    measured: dict[str, dict[int, dict]] = {s: {} for s in stages}
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            rng = np.random.default_rng(n)
            codes, vectors, hashes = synthetic_columns(n, args.dim, rng)
            flat_pairs = None
            for stage in stages:
                done = sorted(measured[stage])
                guess = predict(done, [measured[stage][m]["seconds"] for m in done], n)
                if (guess is not None and guess > args.budget_s) or (stage == "records" and n > args.records_max):
                    log(
                        f"{stage} at N={n}: predicted {guess if guess is None else round(guess)} s > budget: extrapolated"
                    )
                    continue
                t, c = time.perf_counter(), time.process_time()
                if stage == "merge_rows":
                    out = stage_merge_rows(n, rng, tmp)
                elif stage == "exact_pairs":
                    out = {"pairs": int(len(duplicates.exact_pairs(hashes.tolist())))}
                elif stage == "hamming_pairs":
                    out = {"pairs": int(len(duplicates.hamming_pairs(codes, 12)))}
                elif stage == "cosine_flat":
                    flat_pairs = duplicates.cosine_pairs(vectors, 0.99)
                    out = {"pairs": int(len(flat_pairs))}
                elif stage == "cosine_ivf":
                    pairs = duplicates.cosine_pairs(vectors, 0.99, method="ivf")
                    out = {"pairs": int(len(pairs))}
                    if flat_pairs is not None:
                        want = pair_set(flat_pairs)
                        out["recall_vs_flat"] = round(len(want & pair_set(pairs)) / max(1, len(want)), 5)
                elif stage == "kmeans":
                    levels, _ = clustering.hierarchical_kmeans(vectors, (256, 32), niter=10)
                    clustering.take(clustering.balanced_order(levels), n // 2)
                    out = {}
                elif stage == "records":
                    out = stage_records(n, rng, tmp)
                else:
                    raise SystemExit(f"unknown stage {stage!r}")
                out.setdefault("seconds", time.perf_counter() - t)
                out["seconds"] = round(out["seconds"], 3)
                out["cpu_s"] = round(out.get("cpu_s", time.process_time() - c), 3)  # all threads of this process
                measured[stage][n] = out
                log(f"{stage} at N={n}: {out}")
    result: dict = {
        "bench": "archive_scale",
        "sizes": sizes,
        "dim": args.dim,
        "cpu_count": os.cpu_count(),
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "stages": {},
    }
    for stage in stages:
        done = sorted(measured[stage])
        secs = [measured[stage][m]["seconds"] for m in done]
        k = fit_exponent(done, secs)
        k_cpu = fit_exponent(done, [measured[stage][m]["cpu_s"] for m in done])
        entry = {
            "measured": {str(m): measured[stage][m] for m in done},
            "exponent_k": None if k is None else round(k, 3),
            "exponent_k_cpu": None if k_cpu is None else round(k_cpu, 3),
        }
        for n in sizes:
            if n not in measured[stage] and k is not None:
                entry[f"seconds_at_{n}"] = round(predict(done, secs, n), 1)
                entry["extrapolated"] = True
        result["stages"][stage] = entry
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()

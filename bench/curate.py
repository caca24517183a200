"""Curation throughput (images/s, embedding time excluded) against the decode ceiling of the same run.

Curating a 500k archive is a pass over every record (decode, quality signals, hashes, thumbnail)
plus pair searches and clustering over the scan's columns. The scan should run near the rate at
which the same threads merely read and decode the PNGs — decoding is the irreducible cost — so that
is the ceiling quoted (`scan_vs_decode`; `vs_decode` also counts the fixed costs of clustering and
the report, which dominate a run of a few hundred images). A second part times the column stages alone on N random rows (`--scale`),
to show how dedup and clustering grow toward archive size. Prints one JSON object as its last line:

    {"bench": "curate", "images": ..., "img_per_s": ..., "scan_img_per_s": ..., "decode_img_per_s": ...,
     "scan_vs_decode": ..., "vs_decode": ...,
     "stage_s": {...}, "removed_by_reason": {...}, "scale_rows": N, "scale_dedup_s": ..., "scale_cluster_s": ...,
     "threads": ..., "image_size": ..., "load_avg_1min": ...}

Usage:  python bench/curate.py [--num_patients 60] [--image_size 256] [--threads 2] [--scale 20000]
The dataset is the synthetic femur set with injected defects (afm_jax.data.curation.synthetic_defects),
written to a temporary directory and deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def decode_rate(path: str, threads: int) -> float:
    """Images/s of reading + decoding every train record with `threads` threads (one reader each)."""
    from afm_jax.data import records, transforms

    n = len(records.open_split(path, "train"))
    chunks = [range(s, min(s + 64, n)) for s in range(0, n, 64)]
    sources = [records.open_split(path, "train") for _ in range(threads)]

    def work(k: int) -> int:
        src = sources[k % threads]
        for i in chunks[k]:
            transforms.decode_png(src[i]["image"])
        return len(chunks[k])

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(work, range(len(chunks))))
    return total / (time.perf_counter() - start)


def scale_stages(rows: int, seed: int = 0) -> dict[str, float]:
    """Seconds of the column stages (phash pairs, embedding pairs, hierarchical k-means + balanced order)
    on `rows` random rows with 1% planted duplicates."""
    from afm_jax.data.curation import clustering, duplicates

    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, (rows, duplicates.PHASH_BYTES), dtype=np.uint8)
    vectors = rng.normal(size=(rows, 256)).astype(np.float32)
    dup = rng.choice(rows, rows // 100, replace=False)
    codes[dup] = codes[(dup + 1) % rows]
    vectors[dup] = vectors[(dup + 1) % rows]
    t = time.perf_counter()
    hp = duplicates.hamming_pairs(codes, 12)
    cp = duplicates.cosine_pairs(vectors, 0.99)
    dedup_s = time.perf_counter() - t
    t = time.perf_counter()
    levels, _ = clustering.hierarchical_kmeans(vectors, (256, 32), niter=10)
    clustering.take(clustering.balanced_order(levels), rows // 2)
    return {
        "scale_rows": rows,
        "scale_dedup_s": round(dedup_s, 3),
        "scale_cluster_s": round(time.perf_counter() - t, 3),
        "scale_pairs_found": int(len(hp) + len(cp)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_patients", type=int, default=60)
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scale", type=int, default=20000, help="rows for the column-stage timing (0 = skip)")
    args = parser.parse_args()

    from afm_jax.data.curation import config as config_lib
    from afm_jax.data.curation import curate as run
    from afm_jax.data.curation import synthetic_defects

    with tempfile.TemporaryDirectory() as tmp:
        print("building the synthetic set with injected defects ...", file=sys.stderr)
        ds = synthetic_defects.build_defective_dataset(
            tmp, num_patients=args.num_patients, image_size=args.image_size, per_kind=2
        )
        cfg = config_lib.default_config()
        cfg.metadata.allow = synthetic_defects.FEMUR_ONLY
        cfg.threads = args.threads
        cfg.selection.target_fraction = 0.5
        decode_before = decode_rate(str(ds.path), args.threads)
        result = run.curate(ds.path, os.path.join(tmp, "out"), cfg, progress=True)
        decode_after = decode_rate(str(ds.path), args.threads)
    s = result.summary
    decode = (decode_before + decode_after) / 2  # around the curation run, so drifting load hits both
    scan_rate = s["images"] / s["timings_s"]["scan_s"]
    out = {
        "bench": "curate",
        "images": s["images"],
        "img_per_s": s["images_per_s"],
        "scan_img_per_s": round(scan_rate, 2),
        "decode_img_per_s": round(decode, 2),
        "scan_vs_decode": round(scan_rate / decode, 3),
        "vs_decode": round(s["images_per_s"] / decode, 3),
        "stage_s": s["timings_s"],
        "removed_by_reason": s["removed_by_reason"],
        "selected": s["selected"],
        "threads": args.threads,
        "image_size": args.image_size,
        "load_avg_1min": os.getloadavg()[0],
    }
    if args.scale:
        print(f"timing dedup + clustering on {args.scale} random rows ...", file=sys.stderr)
        out.update(scale_stages(args.scale))
    print(json.dumps(out))


if __name__ == "__main__":
    main()

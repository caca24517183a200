"""Input-pipeline throughput against its ceiling: decoding the same PNGs with the same cores.

The training pipeline (read record, decode 16-bit PNG, random resized crop, flip, intensity jitter,
batch, hand over from worker processes) should run close to the rate at which the same number of
threads can merely decode the images — decoding is the irreducible cost. Prints one JSON object as
its last line:

    {"bench": "input_pipeline", "pipeline_img_per_s": ..., "decode_img_per_s": ..., "ratio": ...,
     "num_workers": ..., "image_size": ..., "records": ..., "cpu_ms_per_img_pipeline": ...,
     "cpu_ms_per_img_decode": ..., "cpu_ratio": ..., "load_avg_1min": ...}

`ratio` is wall-clock img/s against the decode ceiling, measured between two half-length decode
runs so that drifting background load hits both. On a shared machine it still swings with other
people's jobs, so the bench also reports CPU seconds per image (this process and its workers, from
/proc): `cpu_ratio` = decode CPU / pipeline CPU is the pipeline's efficiency, nearly independent of
load. `load_avg_1min` says how busy the machine was.

Usage:  python bench/input_pipeline.py [--path DATASET_DIR] [--num_workers 2] [--image_size 224]
                                       [--batch 64] [--seconds 20] [--png_compression 0-9]
`png_bytes_per_img` gives the size cost of a compression level (the preprocessing variant option
`png_compression` of afm_jax/data/preprocessing.py sets it for real datasets); `profile_cpu_ms`
splits the pipeline's CPU per image into record read+parse, decode and the rest.
Without --path it writes a temporary dataset of 512x512 16-bit PNGs (smooth random images with
noise, roughly radiograph-like compressibility) and deletes it afterwards. Goal: ratio >= 0.9.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from multiprocessing.pool import ThreadPool

import cv2
import numpy as np

from afm_jax.data import pipeline, records


def synthetic_examples(n: int, size: int = 512, seed: int = 0):
    """n smooth random 16-bit images with mild noise, 4 per fake patient."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        coarse = rng.uniform(0, 1, (8, 8)).astype(np.float32)
        smooth = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
        image = np.clip(smooth * 40000 + 10000 + rng.normal(0, 300, (size, size)), 0, 65535).astype(np.uint16)
        yield {"image": image, "patient_id": f"bench{i // 4:06d}", "image_id": f"img{i:06d}", "label": i % 2}


def process_tree_cpu_seconds() -> float:
    """User + system CPU seconds of this process and its live children (the grain workers), from /proc.

    Wall-clock rates on a shared machine move with other people's load; CPU seconds per image do
    not, so the bench also reports the CPU-time ratio."""
    tick = os.sysconf("SC_CLK_TCK")
    me, total = os.getpid(), 0.0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(pid) == me or int(fields[1]) == me:  # fields[1] is the parent pid
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def decode_ceiling(pngs: list[bytes], threads: int, seconds: float) -> tuple[float, float]:
    """(images per second, CPU seconds per image) decoding `pngs` (in memory) with `threads` threads."""

    def decode(data: bytes) -> None:
        cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)

    with ThreadPool(threads) as pool:
        pool.map(decode, pngs[: threads * 4])  # warm-up
        done, start, cpu = 0, time.perf_counter(), process_tree_cpu_seconds()
        while time.perf_counter() - start < seconds:
            pool.map(decode, pngs, chunksize=8)
            done += len(pngs)
        return done / (time.perf_counter() - start), (process_tree_cpu_seconds() - cpu) / done


def read_cpu_ms(source, n: int) -> float:
    """CPU ms per image of reading + parsing one record (ArrayRecord random access, no decode), one thread."""
    idx = np.random.default_rng(0).integers(0, len(source), n)
    c0 = time.process_time()
    for i in idx:
        source[int(i)]
    return 1e3 * (time.process_time() - c0) / n


def pipeline_rate(path: str, num_workers: int, image_size: int, batch: int, seconds: float) -> tuple[float, float]:
    """(images per second, CPU seconds per image) out of the training iterator, after start-up."""
    cfg = pipeline.default_data_config()
    cfg.path, cfg.num_workers = path, num_workers
    it = pipeline.build_train_iterator(cfg, global_batch_size=batch, seed=0, image_size=image_size)
    try:
        for _ in range(max(2, 2 * num_workers)):  # spawn workers, fill the buffers
            next(it)
        done, start, cpu = 0, time.perf_counter(), process_tree_cpu_seconds()
        while time.perf_counter() - start < seconds:
            done += len(next(it)["image"])
        return done / (time.perf_counter() - start), (process_tree_cpu_seconds() - cpu) / done
    finally:
        it.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--path", default=None, help="dataset version dir (default: a temporary synthetic one)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--num_workers", type=int, default=2)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=20.0, help="measuring time of each of the two runs")
    parser.add_argument("--records", type=int, default=512, help="size of the temporary dataset")
    parser.add_argument(
        "--png_compression",
        type=int,
        default=None,
        help="zlib level of the temporary dataset's PNGs (default: OpenCV's; 0 = stored)",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = args.path
        if path is None:
            path = str(
                records.write_dataset(
                    synthetic_examples(args.records),
                    tmp,
                    name="bench",
                    split_fractions={args.split: 1.0},
                    num_examples_hint=args.records,
                    png_compression=args.png_compression,
                )
            )
        source = records.open_split(path, args.split)
        png_compression = records.read_info(path).get("png_compression")
        pngs = [source[i]["image"] for i in range(min(len(source), 2048))]
        read_ms = read_cpu_ms(source, min(2000, 4 * len(source)))
        # The machine may be shared: bracket the pipeline run by two half-length decode runs so that a
        # drift in background load affects the ceiling and the pipeline alike.
        threads = max(1, args.num_workers)
        before, cpu_before = decode_ceiling(pngs, threads, args.seconds / 2)
        rate, cpu_pipeline = pipeline_rate(path, args.num_workers, args.image_size, args.batch, args.seconds)
        after, cpu_after = decode_ceiling(pngs, threads, args.seconds / 2)
        decode, cpu_decode = (before + after) / 2, (cpu_before + cpu_after) / 2
    print(
        json.dumps(
            {
                "bench": "input_pipeline",
                "pipeline_img_per_s": round(rate, 1),
                "decode_img_per_s": round(decode, 1),
                "ratio": round(rate / decode, 3),
                "num_workers": args.num_workers,
                "image_size": args.image_size,
                "records": len(source),
                "png_compression": png_compression,
                "png_bytes_per_img": round(float(np.mean([len(p) for p in pngs]))),
                # where the pipeline's CPU goes (ms per image): record read+parse, PNG decode, and the
                # rest (crop/resize, flip, jitter, batching, worker hand-over)
                "profile_cpu_ms": {
                    "read_parse": round(read_ms, 3),
                    "decode": round(1e3 * cpu_decode, 2),
                    "augment_batch_ipc": round(1e3 * cpu_pipeline - 1e3 * cpu_decode - read_ms, 2),
                },
                "cpu_ms_per_img_pipeline": round(1e3 * cpu_pipeline, 2),
                "cpu_ms_per_img_decode": round(1e3 * cpu_decode, 2),
                "cpu_ratio": round(cpu_decode / cpu_pipeline, 3),
                "load_avg_1min": os.getloadavg()[0],
            }
        )
    )


if __name__ == "__main__":
    main()

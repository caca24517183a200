"""DICOM conversion throughput against its ceiling: pydicom decoding the same files with the same processes.

The conversion (read, decode, Modality/VOI LUT, field crop, resize, normalise, PNG encode, chunk
files, merge into the dataset) should run close to the rate at which the same number of processes
can merely decode the files (`pydicom.dcmread(...).pixel_array`) — decoding is the irreducible cost.
Prints one JSON object as its last line:

    {"bench": "preprocess", "files_per_s": ..., "decode_files_per_s": ..., "ratio": ...,
     "files_per_s_1proc": ..., "scaling": ..., "processes": 2, "files": ..., "image_size": ...,
     "syntax": ..., "variant": ..., "load_avg_1min": ...}

`ratio` = conversion files/s ÷ decode files/s (both with `--processes`, both in warmed-up worker
pools, decode timed before and after the conversion and averaged); `scaling` = conversion files/s
with `--processes` ÷ with 1 process. The merge (single process) is part of the conversion time; it
has a fixed cost of about a second (TFDS metadata), so use enough files (`merge_s` and
`ratio_without_merge` show it separately).

How much the conversion adds depends on how expensive decoding is: uncompressed files decode at
memory speed, so the per-image work (LUT over every pixel, duplicate hash, resize, PNG encode) shows;
JPEG 2000 / JPEG lossless files — what PACS exports mostly hold — decode ~10-50x slower, and the
conversion's own work is then a small fraction. Hence `--syntax`.

Usage:  python bench/preprocess.py [--path DIR] [--files 32] [--image_size 2048]
                                   [--syntax explicit|j2k] [--processes 2] [--variant std512]
Without --path it writes synthetic femur DICOMs (rendered at 512 px, upsampled to --image_size, 12-bit)
to a temporary folder and deletes it afterwards.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import pathlib
import sys
import tempfile
import time

from afm_jax.data import preprocessing
from afm_jax.data.conversion import chunks as conversion
from afm_jax.data.conversion import inputs as conversion_inputs
from afm_jax.data.conversion import merge as conversion_merge

SALT = b"bench salt (not a secret)"


def write_synthetic(out: pathlib.Path, files: int, image_size: int, syntax: str) -> None:
    """`files` synthetic radiographs as DICOM, `image_size` px, in the requested transfer syntax."""
    import cv2
    import numpy as np
    import pydicom
    from pydicom.uid import JPEG2000Lossless

    from afm_jax.data import synthetic

    patients = 1
    while synthetic.count_synthetic_images(patients) < files:
        patients += 1
    paths = synthetic.write_dicom_files(out, num_patients=patients, image_size=512)
    for extra in paths[files:]:
        extra.unlink()
    for path in paths[:files]:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array.astype(np.float32)
        bits = int(ds.BitsStored)
        big = cv2.resize(pixels, (image_size, int(image_size * 1.2)), interpolation=cv2.INTER_CUBIC)
        rng = np.random.default_rng(len(str(path)))
        big = np.clip(big + rng.normal(0, 4, big.shape), 0, (1 << bits) - 1).astype(np.uint16)
        ds.set_pixel_data(big, ds.PhotometricInterpretation, bits, generate_instance_uid=False)
        if syntax == "j2k":
            ds.compress(JPEG2000Lossless)
        ds.save_as(path, enforce_file_format=True)


def decode_chunk(paths: list[str]) -> int:
    """The ceiling's unit of work: read and decode each file (pixel data only, no LUT, no output)."""
    import warnings

    import pydicom

    n = 0
    for path in paths:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                arr = pydicom.dcmread(path).pixel_array
            n += int(arr.size > 0)
        except Exception:  # pylint: disable=broad-except  (non-images count as read files)
            pass
    return n


def _warm(pool: concurrent.futures.ProcessPoolExecutor, processes: int, path: str) -> None:
    """Start every worker and import the conversion code in it, so that start-up is not timed."""
    futures = [pool.submit(_warm_one, path) for _ in range(processes * 2)]
    for f in futures:
        f.result()


def _warm_one(path: str) -> None:
    time.sleep(0.3)
    decode_chunk([path])
    from afm_jax.data import dicom  # noqa: F401  pylint: disable=unused-import


def time_decode(pool, plan: conversion.Plan) -> float:
    start = time.perf_counter()
    tasks = [pool.submit(decode_chunk, [f.path for f in plan.chunk_files(c)]) for c in range(plan.num_chunks)]
    for t in tasks:
        t.result()
    return time.perf_counter() - start


def time_conversion(pool, plan: conversion.Plan, out: pathlib.Path, name: str) -> tuple[float, float]:
    """Chunks through the pool (as `conversion.run_shard` does), then the merge; returns (total, merge) seconds."""
    for path in (pathlib.Path(plan.work_dir) / conversion.CHUNK_DIR).glob("chunk-*"):
        path.unlink()
    start = time.perf_counter()
    variant = plan.variant.to_dict()
    tasks = [
        pool.submit(
            conversion.convert_chunk,
            conversion.ChunkTask(
                c,
                tuple(plan.chunk_files(c)),
                variant,
                plan.label_ids,
                SALT,
                str(plan.chunk_path(c, "array_record")),
                str(plan.chunk_path(c, "jsonl")),
            ),
        )
        for c in range(plan.num_chunks)
    ]
    for t in tasks:
        t.result()
    merge_start = time.perf_counter()
    conversion_merge.merge(plan, out, name, overwrite=True)
    end = time.perf_counter()
    return end - start, end - merge_start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--path", help="folder of DICOM files (default: synthetic)")
    parser.add_argument("--files", type=int, default=32)
    parser.add_argument("--image_size", type=int, default=2048)
    parser.add_argument("--syntax", choices=("explicit", "j2k"), default="explicit")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--variant", default="std512")
    parser.add_argument("--chunk_size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="timed passes per measurement (best counts)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="afm_bench_preprocess_") as tmp:
        tmp_path = pathlib.Path(tmp)
        source = pathlib.Path(args.path) if args.path else tmp_path / "dicom"
        if not args.path:
            print(f"writing {args.files} synthetic DICOMs ({args.image_size} px, {args.syntax}) ...", file=sys.stderr)
            write_synthetic(source, args.files, args.image_size, args.syntax)
        files = [f for f in conversion_inputs.list_inputs([source]) if not f.path.endswith(".csv")]
        files = [conversion_inputs.InputFile(i, f.root, f.relpath, f.path, f.label_name) for i, f in enumerate(files)]
        variant = preprocessing.get_variant(args.variant)
        plan = conversion.make_plan(files, variant, tmp_path / "work", SALT, chunk_size=args.chunk_size)
        context = multiprocessing.get_context("spawn")
        results = {}
        for processes in sorted({args.processes, 1}, reverse=True):
            with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context) as pool:
                _warm(pool, processes, files[0].path)
                decode, convert = [], []
                for _ in range(args.repeats):
                    decode.append(time_decode(pool, plan))
                    convert.append(time_conversion(pool, plan, tmp_path / "out", "bench"))
                    decode.append(time_decode(pool, plan))
                pairs = [(decode[2 * i] + decode[2 * i + 1]) / 2 for i in range(args.repeats)]
                best = min(convert)
                results[processes] = {"decode_s": min(pairs), "convert_s": best[0], "merge_s": best[1]}
            print(
                f"{processes} process(es): decode {len(files) / results[processes]['decode_s']:.2f} files/s, "
                f"conversion {len(files) / results[processes]['convert_s']:.2f} files/s",
                file=sys.stderr,
            )
    p = args.processes
    files_per_s = len(files) / results[p]["convert_s"]
    decode_per_s = len(files) / results[p]["decode_s"]
    one = len(files) / results[1]["convert_s"]
    print(
        json.dumps(
            {
                "bench": "preprocess",
                "files_per_s": round(files_per_s, 3),
                "decode_files_per_s": round(decode_per_s, 3),
                "ratio": round(files_per_s / decode_per_s, 3),
                "files_per_s_1proc": round(one, 3),
                "decode_files_per_s_1proc": round(len(files) / results[1]["decode_s"], 3),
                "scaling": round(files_per_s / one, 3),
                "merge_s": round(results[p]["merge_s"], 3),
                "ratio_without_merge": round(
                    results[p]["decode_s"] / (results[p]["convert_s"] - results[p]["merge_s"]), 3
                ),
                "processes": p,
                "files": len(files),
                "image_size": None if args.path else args.image_size,
                "syntax": None if args.path else args.syntax,
                "variant": variant.name,
                "cpu_count": os.cpu_count(),
                "load_avg_1min": round(os.getloadavg()[0], 2),
            }
        )
    )


if __name__ == "__main__":
    main()

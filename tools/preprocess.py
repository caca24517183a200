"""DICOM archive -> versioned training dataset (ArrayRecord, TFDS layout) + manifest.

Workstation (convert with all cores, then merge):
    AFM_SALT_FILE=~/salt.txt python tools/preprocess.py --input /archive --labels labels.csv \\
        --out /data --name femur --variant std512

SLURM array (each task converts its shard; one final merge):
    python tools/preprocess.py --input /archive --out /data --name femur --variant std512 --shard slurm
    python tools/preprocess.py --input /archive --out /data --name femur --variant std512 --merge

The dataset lands in `<out>/<name>_<variant>_v<version>/1.0.0` (train with
`--config.data.path=<that dir>`); its `manifest.csv` has one row per input file. See docs/preprocess.md.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import sys
from collections.abc import Sequence

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from afm_jax.errors import ConfigError  # noqa: E402
from afm_jax.data import anonymize, conversion, conversion_inputs, conversion_merge, preprocessing  # noqa: E402
from afm_jax.data import decode_isolation  # noqa: E402


def _usable_cores() -> int:
    """Cores this process may run on (a SLURM task's allocation, not the whole node's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--input", nargs="+", default=[], help="folders of DICOM files and/or CSV files (path[,label])")
    p.add_argument("--labels", help="CSV (path,label) giving labels of files found in the input folders")
    p.add_argument("--label_names", help="comma-separated label names in label-id order (default: sorted)")
    p.add_argument("--out", help="data directory the dataset is written into")
    p.add_argument("--name", default="femur", help="dataset base name (lower_snake_case)")
    p.add_argument("--variant", default="std512", help=f"preprocessing variant: {', '.join(preprocessing.VARIANTS)} "
                                                       "or a JSON file of parameters")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a variant parameter (e.g. --set image_size=256); give a new name= too")
    p.add_argument("--workers", type=int, default=_usable_cores(),
                   help="worker processes (0: in-process; default: the cores this job may use)")
    p.add_argument("--shard", help="convert only shard i/n (0-based), or 'slurm' for the array task's shard")
    p.add_argument("--merge", action="store_true", help="only merge the converted shards into the dataset")
    p.add_argument("--chunk_size", type=int, default=conversion.DEFAULT_CHUNK_SIZE, help="files per work unit")
    p.add_argument("--splits", default="train=0.8,validation=0.1,test=0.1", help="patient fractions per split")
    p.add_argument("--split_mode", default="stratified", choices=conversion_merge.SPLIT_MODES)
    p.add_argument("--salt_file", help="file holding the hashing salt (default: $AFM_SALT_FILE or $AFM_SALT)")
    p.add_argument("--work_dir", help="where chunk outputs go (default: <out>/.work/<dataset name>)")
    p.add_argument("--restart", action="store_true", help="delete the work directory first")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset of the same name")
    p.add_argument("--keep_work", action="store_true", help="keep the chunk outputs after merging")
    p.add_argument("--locate", help="comma-separated file_ids from a manifest: print their paths and exit")
    p.add_argument("--list_variants", action="store_true", help="print the built-in variants and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--max_pixels", type=int, default=None,
                   help="skip files decoding to more pixels than this (too_many_pixels; 0: no limit; "
                        f"default {preprocessing.DEFAULT_MAX_PIXELS})")
    p.add_argument("--file_timeout", type=float, default=600.0, help="seconds one file may take (then failed)")
    p.add_argument("--file_memory_mb", type=int, default=0,
                   help="address-space cap of the per-file decoding process (0: none of its own)")
    return p.parse_args(argv)


def _parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if "," in text:
        return [_parse_value(t) for t in text.split(",")]
    return text


# Variant parameters that do not change the stored pixels: overriding them keeps the variant's name.
_NAME_NEUTRAL_PARAMS = frozenset({"name", "description", "png_compression", "max_pixels"})


def _variant(args: argparse.Namespace) -> preprocessing.Variant:
    """The variant named by --variant with the --set overrides. Overrides that change the pixels need a
    new name: the dataset directory carries the name, and two variants must not share one."""
    overrides = {}
    for item in args.set:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} must look like KEY=VALUE.")
        key, value = item.split("=", 1)
        overrides[key.strip()] = _parse_value(value.strip())
    if getattr(args, "max_pixels", None) is not None:
        overrides["max_pixels"] = args.max_pixels
    try:
        variant = preprocessing.get_variant(args.variant, overrides)
        base = preprocessing.get_variant(args.variant)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{e}") from None
    changed = sorted(k for k in set(overrides) - _NAME_NEUTRAL_PARAMS
                     if getattr(variant, k) != getattr(base, k))
    if changed and variant.name == base.name:
        raise ConfigError(f"--set {', '.join(changed)} changes the pixels of variant {base.name!r}: give it a new "
                          f"name too (e.g. --set name={base.name}_custom), so that it gets its own dataset directory.")
    return variant


def _shard(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    if text == "slurm":
        try:
            i, n = int(os.environ["SLURM_ARRAY_TASK_ID"]), int(os.environ["SLURM_ARRAY_TASK_COUNT"])
            i -= int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
        except (KeyError, ValueError):
            raise ConfigError("--shard slurm needs SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT (run it in an "
                              "sbatch --array job, see launch/preprocess_array.sbatch) or give --shard i/n.") from None
        return conversion_inputs.parse_shard(f"{i}/{n}")
    return conversion_inputs.parse_shard(text)


def run(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.list_variants:
        for name, v in preprocessing.VARIANTS.items():
            print(f"{name:16s} v{v.version}  {v.description}")
        return 0
    salt = anonymize.load_salt(args.salt_file)
    if not args.input:
        raise ConfigError("Give --input (folders and/or CSV files).")
    files = conversion_inputs.list_inputs(args.input, args.labels,  # outputs inside an input tree are no inputs
                                          exclude=[d for d in (args.out, args.work_dir) if d])
    if args.locate:
        found = conversion_inputs.locate(files, [s.strip() for s in args.locate.split(",")], salt)
        for fid in args.locate.split(","):
            print(f"{fid.strip()}\t{found.get(fid.strip(), '(not among the inputs)')}")
        return 0
    if not args.out:
        raise ConfigError("Give --out (the data directory to write the dataset into).")
    variant = _variant(args)
    name = preprocessing.variant_dir_name(args.name, variant)
    if not conversion_merge.records._NAME_RE.match(name):  # pylint: disable=protected-access
        raise ConfigError(f"--name {args.name!r} must be lower_snake_case.")
    fractions = conversion_merge.parse_split_fractions(args.splits)
    out = pathlib.Path(args.out).expanduser().resolve()
    work = pathlib.Path(args.work_dir).expanduser().resolve() if args.work_dir else out / ".work" / name
    shard = _shard(args.shard)
    final = out / name / conversion_merge.records.SCHEMA_VERSION
    if final.exists() and not args.overwrite and not args.merge:
        raise ConfigError(f"A dataset already exists at {final}; pass --overwrite to replace it, or another --name.")
    if args.restart and work.exists():
        shutil.rmtree(work)
    label_names = [s.strip() for s in args.label_names.split(",")] if args.label_names else None
    plan = conversion.make_plan(files, variant, work, salt, chunk_size=args.chunk_size, label_names=label_names)
    print(f"{len(files)} input files, {plan.num_chunks} chunks of {plan.chunk_size}; variant {variant.name} "
          f"v{variant.version}; work dir {work}", file=sys.stderr)
    if not args.merge:
        try:
            isolation = decode_isolation.IsolationOptions(timeout_s=args.file_timeout, max_memory_mb=args.file_memory_mb)
        except ValueError as e:
            raise ConfigError(f"--file_timeout / --file_memory_mb: {e}") from None
        conversion.run_shard(plan, salt, shard=shard or (0, 1), workers=args.workers, progress=not args.quiet,
                             isolation=isolation)
        if shard is not None:
            left = len(conversion.pending_chunks(plan, (0, 1)))
            print(f"shard {shard[0]}/{shard[1]} done; {left} chunks of other shards still to convert. When all "
                  "shards are done, run the same command with --merge instead of --shard.", file=sys.stderr)
            return 0
    directory, summary = conversion_merge.merge(plan, out, name, split_fractions=fractions,
                                                split_mode=args.split_mode, overwrite=args.overwrite or args.merge)
    if not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
        if not args.work_dir:
            try:
                work.parent.rmdir()  # <out>/.work, once empty
            except OSError:
                pass
    print("summary (files per status):\n" + conversion_merge.format_summary(summary))
    print(f"manifest: {directory / conversion_merge.MANIFEST_FILE}")
    print(f"dataset: {directory}\ntrain with: --config.data.path={directory}")
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    from afm_jax.errors import exit_on_user_error

    sys.exit(exit_on_user_error(run, argv))


if __name__ == "__main__":
    main()

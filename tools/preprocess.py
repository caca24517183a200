"""DICOM archive -> versioned training dataset (ArrayRecord, TFDS layout) + manifest.

Usage: python tools/preprocess.py --input DICOM_TREE[,LIST.csv...] --out DATA_DIR [--name femur] [--variant std512]
    [--config.KEY=VALUE ...] [--shard i/n|slurm | --merge]

Example (workstation: convert with all cores, then merge):
    AFM_SALT_FILE=~/salt.txt python tools/preprocess.py --input /archive --labels labels.csv \\
        --out /data --name femur --variant std512

Example (SLURM array: each task converts its shard; one final merge):
    python tools/preprocess.py --input /archive --out /data --name femur --variant std512 --shard slurm
    python tools/preprocess.py --input /archive --out /data --name femur --variant std512 --merge

Example (a variant parameter changed; a change of the pixels needs a new name):
    python tools/preprocess.py --input /archive --out /data --config.image_size=256 --config.name=std256

The settings (`--config.<key>=<value>`) are the parameters of the variant named by --variant
(afm_jax/data/preprocessing.py `Variant`, or a JSON file of them); `--list_variants` prints the
built-in ones. The dataset lands in `<out>/<name>_<variant>_v<version>/1.0.0` (train with
`--config.data.path=<that dir>`); its `manifest.csv` has one row per input file. See docs/preprocess.md.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import sys
from collections.abc import Sequence

import ml_collections
from absl import flags

from afm_jax import cli, io
from afm_jax.data import anonymize, decode_isolation, preprocessing, records
from afm_jax.data.conversion import chunks as conversion
from afm_jax.data.conversion import inputs as conversion_inputs
from afm_jax.data.conversion import merge as conversion_merge
from afm_jax.errors import ConfigError, LockedError


def _usable_cores() -> int:
    """Cores this process may run on (a SLURM task's allocation, not the whole node's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def define_flags(fv: flags.FlagValues) -> None:
    d = dict(flag_values=fv)
    flags.DEFINE_list("input", [], "Comma-separated folders of DICOM files and/or CSV files (path[,label]).", **d)
    flags.DEFINE_string("labels", None, "CSV (path,label) giving labels of files found in the input folders.", **d)
    flags.DEFINE_string("label_names", None, "Comma-separated label names in label-id order (default: sorted).", **d)
    flags.DEFINE_string("out", None, "Data directory the dataset is written into.", **d)
    flags.DEFINE_string("name", "femur", "Dataset base name (lower_snake_case).", **d)
    flags.DEFINE_string(
        "variant",
        "std512",
        f"Preprocessing variant: {', '.join(preprocessing.VARIANTS)} or a JSON "
        "file of parameters; its parameters are the --config.<key> settings.",
        **d,
    )
    flags.DEFINE_integer(
        "workers", _usable_cores(), "Worker processes (0: in-process; default: the cores this job may use).", **d
    )
    flags.DEFINE_string("shard", None, "Convert only shard i/n (0-based), or 'slurm' for the array task's shard.", **d)
    flags.DEFINE_bool("merge", False, "Only merge the converted shards into the dataset.", **d)
    flags.DEFINE_integer("chunk_size", conversion.DEFAULT_CHUNK_SIZE, "Files per work unit.", **d)
    flags.DEFINE_string("splits", "train=0.8,validation=0.1,test=0.1", "Patient fractions per split.", **d)
    flags.DEFINE_enum("split_mode", "stratified", conversion_merge.SPLIT_MODES, "How patients are split.", **d)
    flags.DEFINE_string("salt_file", None, "File holding the hashing salt (default: $AFM_SALT_FILE or $AFM_SALT).", **d)
    flags.DEFINE_string("work_dir", None, "Where chunk outputs go (default: <out>/.work/<dataset name>).", **d)
    flags.DEFINE_bool("restart", False, "Delete the work directory first.", **d)
    flags.DEFINE_bool("overwrite", False, "Replace an existing dataset of the same name.", **d)
    flags.DEFINE_bool("keep_work", False, "Keep the chunk outputs after merging.", **d)
    flags.DEFINE_string("locate", None, "Comma-separated file_ids from a manifest: print their paths and exit.", **d)
    flags.DEFINE_bool("list_variants", False, "Print the built-in variants and exit.", **d)
    flags.DEFINE_bool("quiet", False, "No progress bars.", **d)
    flags.DEFINE_float(
        "file_timeout", 600.0, "Seconds one file may take to convert (then it is failed:DecodeTimeoutError).", **d
    )
    flags.DEFINE_integer(
        "file_memory_mb", 0, "Address-space cap of the per-file decoding process (0: none of its own).", **d
    )


def _base_variant(name_or_path: str) -> preprocessing.Variant:
    try:
        return preprocessing.get_variant(name_or_path)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"--variant: {e}") from None


def default_config(argv: Sequence[str]) -> ml_collections.ConfigDict:
    """The parameters of the variant that --variant names (so that overrides are typed like them)."""
    params = _base_variant(cli.peek_flag(argv, "variant", "std512")).to_dict()
    params.pop("fingerprint", None)  # derived from the others
    return ml_collections.ConfigDict({k: tuple(v) if isinstance(v, list) else v for k, v in params.items()})


TOOL = cli.Tool(
    __doc__, define_flags, default_config=default_config, config_keys_in="afm_jax/data/preprocessing.py (class Variant)"
)

# Variant parameters that do not change the stored pixels: overriding them keeps the variant's name.
_NAME_NEUTRAL_PARAMS = frozenset({"name", "description", "png_compression", "max_pixels"})


def _variant(fv: flags.FlagValues) -> preprocessing.Variant:
    """The variant named by --variant with the --config overrides. Overrides that change the pixels need a
    new name: the dataset directory carries the name, and two variants must not share one."""
    base = _base_variant(fv.variant)
    given = fv.config.to_dict()
    base_params = base.to_dict()
    overrides = {k: list(v) if isinstance(v, tuple) else v for k, v in given.items()}
    overrides = {k: v for k, v in overrides.items() if v != base_params.get(k)}
    try:
        variant = preprocessing.get_variant(fv.variant, overrides)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{e}") from None
    changed = sorted(k for k in set(overrides) - _NAME_NEUTRAL_PARAMS if getattr(variant, k) != getattr(base, k))
    if changed and variant.name == base.name:
        raise ConfigError(
            f"--config.{', --config.'.join(changed)} changes the pixels of variant {base.name!r}: give "
            f"it a new name too (e.g. --config.name={base.name}_custom), so that it gets its own "
            "dataset directory."
        )
    return variant


def _check_labels_file(path: str | None) -> None:
    """--labels must be a text CSV (a binary file would fail deep in the csv reader)."""
    if not path or not os.path.isfile(path):
        return  # a missing file is reported by the input listing, naming the option
    with open(path, "rb") as f:
        head = f.read(65536)
    try:
        head.decode("utf-8")
        is_text = b"\0" not in head
    except UnicodeDecodeError as e:
        is_text = e.start > len(head) - 4  # a multi-byte character cut at the end of the sample
    if not is_text:
        raise ConfigError(
            f"--labels {path} is not a text CSV file (it holds binary data): give a CSV with rows path,label."
        )


def _shard(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    if text == "slurm":
        try:
            i, n = int(os.environ["SLURM_ARRAY_TASK_ID"]), int(os.environ["SLURM_ARRAY_TASK_COUNT"])
            i -= int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
        except (KeyError, ValueError):
            raise ConfigError(
                "--shard slurm needs SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT (run it in an "
                "sbatch --array job, see launch/preprocess_array.sbatch) or give --shard i/n."
            ) from None
        return conversion_inputs.parse_shard(f"{i}/{n}")
    return conversion_inputs.parse_shard(text)


def _convert_and_merge(fv, files, variant, work_dir, salt, shard, out, name, fractions):
    """Converts (this shard's chunks, or all) and merges; None when only a shard was converted."""
    if fv.restart and work_dir.exists():
        shutil.rmtree(work_dir)
    label_names = [s.strip() for s in fv.label_names.split(",")] if fv.label_names else None
    plan = conversion.make_plan(files, variant, work_dir, salt, chunk_size=fv.chunk_size, label_names=label_names)
    print(
        f"{len(files)} input files, {plan.num_chunks} chunks of {plan.chunk_size}; variant {variant.name} "
        f"v{variant.version}; work dir {work_dir}",
        file=sys.stderr,
    )
    if not fv.merge:
        try:
            isolation = decode_isolation.IsolationOptions(timeout_s=fv.file_timeout, max_memory_mb=fv.file_memory_mb)
        except ValueError as e:
            raise ConfigError(f"--file_timeout / --file_memory_mb: {e}") from None
        conversion.run_shard(
            plan, salt, shard=shard or (0, 1), workers=fv.workers, progress=not fv.quiet, isolation=isolation
        )
        if shard is not None:
            left = len(conversion.pending_chunks(plan, (0, 1)))
            print(
                f"shard {shard[0]}/{shard[1]} done; {left} chunks of other shards still to convert. When all "
                "shards are done, run the same command with --merge instead of --shard.",
                file=sys.stderr,
            )
            return None
    directory, summary = conversion_merge.merge(
        plan, out, name, split_fractions=fractions, split_mode=fv.split_mode, overwrite=fv.overwrite or fv.merge
    )
    if not fv.keep_work:
        shutil.rmtree(work_dir, ignore_errors=True)
    return directory, summary


def work(fv: flags.FlagValues, args: list[str]) -> int:
    if fv.list_variants:
        for name, v in preprocessing.VARIANTS.items():
            print(f"{name:16s} v{v.version}  {v.description}")
        return 0
    cli.require_positive(fv.workers, "workers")
    cli.require_positive(fv.chunk_size, "chunk_size", allow_zero=False)
    for flag in ("out", "work_dir"):
        if fv[flag].value is not None:
            cli.check_output_dir(fv[flag].value, flag)
    _check_labels_file(fv.labels)
    salt = anonymize.load_salt(fv.salt_file)
    if not fv.input:
        raise ConfigError("Give --input (folders and/or CSV files).")
    files = conversion_inputs.list_inputs(
        fv.input,
        fv.labels,  # outputs inside an input tree are no inputs
        exclude=[d for d in (fv.out, fv.work_dir) if d],
    )
    if fv.locate:
        found = conversion_inputs.locate(files, [s.strip() for s in fv.locate.split(",")], salt)
        for fid in fv.locate.split(","):
            print(f"{fid.strip()}\t{found.get(fid.strip(), '(not among the inputs)')}")
        return 0
    if not fv.out:
        raise ConfigError("Give --out (the data directory to write the dataset into).")
    variant = _variant(fv)
    name = preprocessing.variant_dir_name(fv.name, variant)
    records.check_dataset_name(fv.name, "--name")
    records.check_dataset_name(name, "The dataset folder name made from --name and --variant")
    fractions = conversion_merge.parse_split_fractions(fv.splits)
    out = pathlib.Path(fv.out).expanduser().resolve()
    work_dir = pathlib.Path(fv.work_dir).expanduser().resolve() if fv.work_dir else out / ".work" / name
    shard = _shard(fv.shard)
    final = out / name / records.SCHEMA_VERSION
    if final.exists() and not fv.overwrite and not fv.merge:
        raise ConfigError(f"A dataset already exists at {final}; pass --overwrite to replace it, or another --name.")
    # One run per output dataset (<out>/.<name>.lock; a SLURM array's shards each hold their own shard's
    # lock instead); the lock sits in --out, so --restart and the final clean-up do not remove it.
    lock_name = f".{name}" + (f".shard-{shard[0]}-of-{shard[1]}" if shard else "") + ".lock"
    with io.exclusive_lock(
        out,
        "tools/preprocess.py" + (f" --shard {fv.shard}" if shard else ""),
        LockedError,
        name=lock_name,
        subject=out / name,
    ):
        result = _convert_and_merge(fv, files, variant, work_dir, salt, shard, out, name, fractions)
    if result is None:
        return 0
    directory, summary = result
    if not fv.keep_work and not fv.work_dir:
        try:
            work_dir.parent.rmdir()  # <out>/.work, once empty
        except OSError:
            pass
    print("summary (files per status):\n" + conversion_merge.format_summary(summary))
    print(f"manifest: {directory / conversion_merge.MANIFEST_FILE}")
    print(f"dataset: {directory}\ntrain with: --config.data.path={directory}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(TOOL, work, argv)


if __name__ == "__main__":
    cli.app_main(TOOL, work)

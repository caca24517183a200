"""Evaluation datasets in the record format: MURA-v1.1, or any labelled image folder / CSV.

Usage: python tools/make_eval_dataset.py mura|folder --input ROOT --out DATA_DIR [--name NAME] [--image_size N] ...

Example (MURA, the unpacked MURA-v1.1.zip; test = MURA's valid, validation = 10% of train patients):
    python tools/make_eval_dataset.py mura --input /data/raw --out /data/eval
    python tools/make_eval_dataset.py mura --input /data/raw/MURA-v1.1 --out /data/eval --body_parts wrist \\
        --name mura_wrist

Example (any folder ROOT/<label>/.../<image> or CSV path,label[,patient]; PNG/JPEG/TIFF/DICOM, any size):
    AFM_SALT_FILE=~/salt.txt python tools/make_eval_dataset.py folder --input /data/knee --out /data/eval \\
        --name knee_oa --label_names normal,abnormal --image_size 512

The first argument says which kind of source --input is. The dataset lands in `<out>/<name>/1.0.0`;
point an evaluation config at it (`--config.data.path=<that dir>`). See docs/evaluate.md.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from absl import flags

from afm_jax import cli
from afm_jax.data import anonymize, folder_dataset, mura, records
from afm_jax.data.conversion import merge as conversion_merge
from afm_jax.errors import ConfigError

SOURCES = ("mura", "folder")
_MURA_ONLY = ("body_parts", "validation_fraction")
_FOLDER_ONLY = ("label_names", "splits", "patient_from", "body_part", "strict")


def define_flags(fv: flags.FlagValues) -> None:
    d = dict(flag_values=fv)
    flags.DEFINE_string(
        "input",
        None,
        "mura: the MURA-v1.1 folder or the folder holding it; folder: ROOT/<label>/.../"
        "<image>, or a CSV path,label[,patient].",
        **d,
    )
    flags.DEFINE_string("out", None, "Data directory the dataset is written into.", **d)
    flags.DEFINE_string(
        "name", None, "Dataset name (lower_snake_case; default 'mura' for mura, required for folder).", **d
    )
    flags.DEFINE_integer("image_size", 0, "Shrink the longest side to this (0: keep).", lower_bound=0, **d)
    flags.DEFINE_string("salt_file", None, "File holding the hashing salt (default: $AFM_SALT_FILE or $AFM_SALT).", **d)
    flags.DEFINE_integer("workers", min(4, os.cpu_count() or 1), "Decoding threads.", lower_bound=1, **d)
    flags.DEFINE_bool("overwrite", False, "Replace an existing dataset of the same name.", **d)
    flags.DEFINE_integer(
        "png_compression",
        None,
        "zlib level 0-9 of the stored PNGs (0: ~3x faster decoding, larger files; default OpenCV's).",
        lower_bound=0,
        upper_bound=9,
        **d,
    )
    flags.DEFINE_string("body_parts", None, "mura: comma-separated subset, e.g. wrist,elbow (default: all seven).", **d)
    flags.DEFINE_float("validation_fraction", 0.1, "mura: train patients moved to validation.", **d)
    flags.DEFINE_string(
        "label_names",
        None,
        "folder: comma-separated label names in id order, positive class last for binary tasks (default: sorted).",
        **d,
    )
    flags.DEFINE_string(
        "splits",
        "train=0.8,validation=0.1,test=0.1",
        "folder: patient fractions per split (ignored when the CSV has a split column).",
        **d,
    )
    flags.DEFINE_enum(
        "patient_from",
        "auto",
        ["auto", "csv", "dicom", "subfolder", "file"],
        "folder: where patient ids come from (auto: CSV column, DICOM, ROOT/<label>/<patient>/, file).",
        **d,
    )
    flags.DEFINE_string("body_part", "", "folder: body part for images that do not state one, e.g. KNEE.", **d)
    flags.DEFINE_bool("strict", False, "folder: stop at the first unreadable file.", **d)
    flags.DEFINE_string(
        "target_column",
        "",
        "folder (CSV): a numeric column written as each record's float "
        "`target` for regression tasks, e.g. bone_age_months (a column named `target` is read "
        "without this flag).",
        **d,
    )


TOOL = cli.Tool(__doc__, define_flags, positional="mura|folder", required=("input", "out"))


def _salt(salt_file: str | None, allow_demo: bool) -> bytes:
    return anonymize.load_salt(salt_file, allow_demo_salt=allow_demo)


def work(fv: flags.FlagValues, args: list[str]) -> int:
    if len(args) != 1 or args[0] not in SOURCES:
        raise ConfigError(
            f"Give the kind of source first: `mura` or `folder` (got {' '.join(args) or 'nothing'}), "
            "e.g. python tools/make_eval_dataset.py mura --input /data/raw --out /data/eval."
        )
    source = args[0]
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s", force=True)
    other = _FOLDER_ONLY if source == "mura" else _MURA_ONLY
    wrong = [f"--{n}" for n in other if fv[n].present]
    if wrong:
        raise ConfigError(f"{', '.join(wrong)} do(es) not apply to `{source}` sources (see --help).")
    cli.check_output_dir(fv.out)
    name = fv.name or ("mura" if source == "mura" else None)
    if not name:
        raise ConfigError("Give --name for a folder dataset (lower_snake_case, e.g. knee_oa).")
    records.check_dataset_name(name, "--name")

    if source == "mura":
        parts = [s for s in (fv.body_parts or "").split(",") if s.strip()]
        directory = mura.build_mura_dataset(
            fv.input,
            fv.out,
            name=name,
            body_parts=parts or None,
            validation_fraction=fv.validation_fraction,
            image_size=fv.image_size,
            salt=_salt(fv.salt_file, allow_demo=True),
            overwrite=fv.overwrite,
            workers=fv.workers,
            png_compression=fv.png_compression,
        )
    else:
        names = [s.strip() for s in fv.label_names.split(",")] if fv.label_names else None
        fractions = conversion_merge.parse_split_fractions(fv.splits)
        directory = folder_dataset.build_folder_dataset(
            fv.input,
            fv.out,
            name=name,
            label_names=names,
            split_fractions=fractions,
            image_size=fv.image_size,
            salt=_salt(fv.salt_file, allow_demo=False),
            patient_from=fv.patient_from,
            body_part=fv.body_part,
            overwrite=fv.overwrite,
            strict=fv.strict,
            workers=fv.workers,
            png_compression=fv.png_compression,
            target_column=fv.target_column,
        )
    info = records.read_info(directory)
    print(f"splits (images): {info['splits']}")
    print(f"splits (patients): {info.get('split_patients')}")
    print(f"labels: {info.get('label_names')}  counts: {info.get('label_counts')}")
    if info.get("skipped_files"):
        print(f"skipped unreadable files: {info['skipped_files']} (rerun with --strict to see the first)")
    print(f"dataset: {directory}\nevaluate with: --config.data.path={directory}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli.run(TOOL, work, argv)


if __name__ == "__main__":
    cli.app_main(TOOL, work)

"""Evaluation datasets in the record format: MURA-v1.1, or any labelled image folder / CSV.

MURA (unpacked MURA-v1.1.zip; test = MURA's valid, validation = 10% of train patients):
    python tools/make_eval_dataset.py mura /data/raw --out /data/eval
    python tools/make_eval_dataset.py mura /data/raw/MURA-v1.1 --out /data/eval --body_parts wrist --name mura_wrist

Any folder ROOT/<label>/.../<image> or CSV path,label[,patient] (PNG/JPEG/TIFF/DICOM, any size):
    AFM_SALT_FILE=~/salt.txt python tools/make_eval_dataset.py folder /data/knee --out /data/eval --name knee_oa \\
        --label_names normal,abnormal --image_size 512

The dataset lands in `<out>/<name>/1.0.0`; point an evaluation config at it
(`--config.data.path=<that dir>`). See docs/evaluate.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys
from collections.abc import Sequence

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from afm_jax.errors import ConfigError  # noqa: E402


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="source", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="data directory the dataset is written into")
    common.add_argument("--image_size", type=int, default=0, help="shrink the longest side to this (0: keep)")
    common.add_argument("--salt_file", help="file holding the hashing salt (default: $AFM_SALT_FILE or $AFM_SALT)")
    common.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="decoding threads")
    common.add_argument("--overwrite", action="store_true", help="replace an existing dataset of the same name")
    common.add_argument("--png_compression", type=int, choices=range(10), metavar="0-9",
                        help="zlib level of the stored PNGs (0: ~3x faster decoding, larger files; default OpenCV's)")
    mura = sub.add_parser("mura", parents=[common], help="MURA-v1.1 from its unpacked folder")
    mura.add_argument("root", help="the MURA-v1.1 folder or the folder holding it")
    mura.add_argument("--name", default="mura", help="dataset name (lower_snake_case)")
    mura.add_argument("--body_parts", help="comma-separated subset, e.g. wrist,elbow (default: all seven)")
    mura.add_argument("--validation_fraction", type=float, default=0.1, help="train patients moved to validation")
    folder = sub.add_parser("folder", parents=[common], help="a labelled folder ROOT/<label>/... or a CSV")
    folder.add_argument("root", help="folder ROOT/<label>/.../<image>, or CSV path,label[,patient]")
    folder.add_argument("--name", required=True, help="dataset name (lower_snake_case)")
    folder.add_argument("--label_names", help="comma-separated label names in id order, positive class last "
                                              "for binary tasks (default: sorted)")
    folder.add_argument("--splits", default="train=0.8,validation=0.1,test=0.1",
                        help="patient fractions per split (ignored when the CSV has a split column)")
    folder.add_argument("--patient_from", default="auto", choices=("auto", "csv", "dicom", "subfolder", "file"),
                        help="where patient ids come from (auto: CSV column, DICOM, ROOT/<label>/<patient>/, file)")
    folder.add_argument("--body_part", default="", help="body part for images that do not state one, e.g. KNEE")
    folder.add_argument("--strict", action="store_true", help="stop at the first unreadable file")
    return p.parse_args(argv)


def _salt(args: argparse.Namespace, allow_demo: bool) -> bytes:
    from afm_jax.data import anonymize  # pylint: disable=g-import-not-at-top

    return anonymize.load_salt(args.salt_file, allow_demo_salt=allow_demo)


def run(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s", force=True)
    if args.image_size < 0:
        raise ConfigError(f"--image_size must be >= 0, got {args.image_size}.")
    from afm_jax.data import records  # pylint: disable=g-import-not-at-top

    if not records._NAME_RE.match(args.name):  # pylint: disable=protected-access
        raise ConfigError(f"--name {args.name!r} must be lower_snake_case (letters, digits, _), e.g. knee_oa.")

    if args.source == "mura":
        from afm_jax.data import mura  # pylint: disable=g-import-not-at-top

        parts = [s for s in (args.body_parts or "").split(",") if s.strip()]
        directory = mura.build_mura_dataset(args.root, args.out, name=args.name, body_parts=parts or None,
                                            validation_fraction=args.validation_fraction, image_size=args.image_size,
                                            salt=_salt(args, allow_demo=True), overwrite=args.overwrite,
                                            workers=args.workers, png_compression=args.png_compression)
    else:
        from afm_jax.data import folder_dataset  # pylint: disable=g-import-not-at-top
        from afm_jax.data.conversion import merge as conversion_merge  # pylint: disable=g-import-not-at-top

        names = [s.strip() for s in args.label_names.split(",")] if args.label_names else None
        fractions = conversion_merge.parse_split_fractions(args.splits)
        directory = folder_dataset.build_folder_dataset(
            args.root, args.out, name=args.name, label_names=names, split_fractions=fractions,
            image_size=args.image_size, salt=_salt(args, allow_demo=False), patient_from=args.patient_from,
            body_part=args.body_part, overwrite=args.overwrite, strict=args.strict, workers=args.workers,
            png_compression=args.png_compression)
    info = records.read_info(directory)
    print(f"splits (images): {info['splits']}")
    print(f"splits (patients): {info.get('split_patients')}")
    print(f"labels: {info.get('label_names')}  counts: {info.get('label_counts')}")
    if info.get("skipped_files"):
        print(f"skipped unreadable files: {info['skipped_files']} (rerun with --strict to see the first)")
    print(f"dataset: {directory}\nevaluate with: --config.data.path={directory}")
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    from afm_jax.errors import exit_on_user_error

    sys.exit(exit_on_user_error(run, argv))


if __name__ == "__main__":
    main()

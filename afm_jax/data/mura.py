"""MURA-v1.1 (Stanford musculoskeletal radiographs) from its unpacked folder -> our record format.

MURA cannot be downloaded by a program (it needs a registration), so this reads the folder the user
unpacked (a "manual download" in TFDS terms) and writes the same TFDS-layout dataset as every
other source, read by the same pipeline:

    MURA-v1.1/train_image_paths.csv       MURA-v1.1/train/XR_ELBOW/patient00011/study1_negative/image1.png
    MURA-v1.1/train_labeled_studies.csv   MURA-v1.1/train/XR_ELBOW/patient00011/study1_negative/,0
    MURA-v1.1/valid_image_paths.csv, MURA-v1.1/valid_labeled_studies.csv, MURA-v1.1/{train,valid}/...

* Label (study-level, as MURA defines it): 1 = abnormal, 0 = normal, from `*_labeled_studies.csv`
  (the folder suffix `_positive/_negative` must agree; a study missing from the CSV takes it).
* `body_part`: `XR_ELBOW` -> "ELBOW" (upper case, like DICOM's Body Part Examined); the seven
  parts are ELBOW, FINGER, FOREARM, HAND, HUMERUS, SHOULDER, WRIST.
* Identifiers: MURA's patient numbers are already pseudonymous, but they are hashed like every
  other id (`anonymize.hash_id`) so that no dataset carries raw ids. The salt is the user's if one
  is configured ($AFM_SALT / $AFM_SALT_FILE), else the public demo salt: MURA's ids are public, so
  hashing them with a public salt reveals nothing that the public release does not. A study is
  (patient, body part, study number) — `study1` recurs across body parts of one patient.
* Splits: MURA's official `valid` split (its test set — the real test set is hidden) becomes our
  `test`; `validation` is carved out of `train` by patient (default 10%), stratified by body part
  and label. The carve-out is decided on MURA's public patient numbers, not on the salted hashes,
  so every user gets the same validation patients whatever their salt.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import pathlib
import re
from collections import Counter, defaultdict
from collections.abc import Sequence

from afm_jax.data import anonymize, folder_dataset, splits
from afm_jax.errors import ConfigError, DatasetNotFoundError

log = logging.getLogger(__name__)

MURA_DIR = "MURA-v1.1"
BODY_PARTS = ("ELBOW", "FINGER", "FOREARM", "HAND", "HUMERUS", "SHOULDER", "WRIST")
LABEL_NAMES = ("normal", "abnormal")  # label 0, 1: MURA's negative / positive studies
OFFICIAL_SPLITS = {"train": "train", "valid": "test"}  # MURA split -> our split
_STUDY_RE = re.compile(
    r"^(?P<split>train|valid)/XR_(?P<part>[A-Z]+)/(?P<patient>patient\d+)/"
    r"(?P<study>study\d+)_(?P<suffix>positive|negative)/?$"
)


def find_mura_dir(root: str | os.PathLike) -> pathlib.Path:
    """The `MURA-v1.1` folder: `root` itself or its child. Raises DatasetNotFoundError naming what is missing."""
    root = pathlib.Path(root).expanduser()
    for candidate in (root, root / MURA_DIR):
        if (candidate / "train_image_paths.csv").is_file() and (candidate / "valid_image_paths.csv").is_file():
            return candidate
    raise DatasetNotFoundError(
        f"{root} is not an unpacked MURA-v1.1 folder: expected {MURA_DIR}/train_image_paths.csv and "
        f"valid_image_paths.csv in it or in its {MURA_DIR} subfolder. Download MURA-v1.1.zip from "
        "https://stanfordmlgroup.github.io/competitions/mura/ (registration needed), unzip it, and pass "
        "the folder that holds MURA-v1.1."
    )


def _relative(entry: str) -> str:
    """A CSV path 'MURA-v1.1/train/XR_.../image1.png' -> 'train/XR_.../image1.png'."""
    entry = entry.strip().replace("\\", "/")
    marker = MURA_DIR + "/"
    return entry.split(marker, 1)[1] if marker in entry else entry.lstrip("./")


def _study_dir(relpath: str) -> str:
    return relpath.rsplit("/", 1)[0] + "/"


def read_study_labels(mura_dir: pathlib.Path, split: str) -> dict[str, int]:
    """study folder (relative, with trailing '/') -> label 0/1 from `<split>_labeled_studies.csv`."""
    path = mura_dir / f"{split}_labeled_studies.csv"
    if not path.is_file():
        log.warning("%s is missing; study labels come from the folder names.", path.name)
        return {}
    labels = {}
    with open(path, newline="") as f:
        for line, row in enumerate(csv.reader(f), start=1):
            if not row or not row[0].strip():
                continue
            if len(row) < 2 or row[1].strip() not in ("0", "1"):
                raise ConfigError(f"{path} line {line}: expected 'study_path,0|1', got {row!r}.")
            labels[_relative(row[0]).rstrip("/") + "/"] = int(row[1].strip())
    return labels


def list_mura(root: str | os.PathLike, *, body_parts: Sequence[str] | None = None) -> list[dict]:
    """One dict per image, in CSV order: relpath, path, mura_split, body_part, patient, study, label.

    Raises DatasetNotFoundError when listed images are missing, ConfigError for malformed paths or
    labels that contradict the folder names.
    """
    mura_dir = find_mura_dir(root)
    wanted = _body_parts(body_parts)
    out, missing, mismatched = [], [], 0
    for mura_split in OFFICIAL_SPLITS:
        study_labels = read_study_labels(mura_dir, mura_split)
        with open(mura_dir / f"{mura_split}_image_paths.csv", newline="") as f:
            entries = [row[0] for row in csv.reader(f) if row and row[0].strip()]
        for entry in entries:
            rel = _relative(entry)
            match = _STUDY_RE.match(_study_dir(rel))
            if match is None or match["split"] != mura_split:
                raise ConfigError(
                    f"{mura_split}_image_paths.csv lists {entry!r}, which does not look like "
                    f"{MURA_DIR}/{mura_split}/XR_<PART>/patient<N>/study<N>_<positive|negative>/<image>."
                )
            if match["part"] not in wanted:
                continue
            from_folder = int(match["suffix"] == "positive")
            label = study_labels.get(_study_dir(rel), from_folder)
            mismatched += label != from_folder
            path = mura_dir / rel
            if not path.is_file():
                missing.append(rel)
            out.append(
                {
                    "relpath": rel,
                    "path": path,
                    "mura_split": mura_split,
                    "body_part": match["part"],
                    "patient": match["patient"],
                    "study": f"{match['patient']}/{match['part']}/{match['study']}",
                    "label": label,
                }
            )
    if missing:
        raise DatasetNotFoundError(
            f"{len(missing)} images listed in the MURA CSVs are missing under {mura_dir} "
            f"(first: {missing[0]}); the unpacked folder is incomplete — unzip it again."
        )
    if mismatched:
        raise ConfigError(
            f"{mismatched} images are in studies whose label in *_labeled_studies.csv contradicts "
            "the folder name (_positive/_negative); the CSVs do not belong to this folder."
        )
    if not out:
        raise DatasetNotFoundError(f"No MURA images of body parts {sorted(wanted)} under {mura_dir}.")
    return out


def _body_parts(body_parts: Sequence[str] | None) -> set[str]:
    if not body_parts:
        return set(BODY_PARTS)
    parts = {p.strip().upper().removeprefix("XR_") for p in body_parts if p.strip()}
    unknown = sorted(parts - set(BODY_PARTS))
    if unknown:
        raise ConfigError(f"Unknown MURA body parts {unknown}; choose from {', '.join(p.lower() for p in BODY_PARTS)}.")
    return parts


def carve_validation(images: Sequence[dict], fraction: float) -> set[str]:
    """MURA patient numbers of train patients moved to `validation`: in each (body part, label) stratum,
    patients ordered by a hash of their public number, every patient whose position (k + ½)/n falls
    below `fraction`, and at least one patient of every stratum of >= 2 patients (unstratified when no
    stratum has 2), so a small subset always has a validation set. Deterministic, salt-free, stratified."""
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"validation_fraction must lie in [0, 1), got {fraction}.")
    per_patient: dict[str, Counter] = defaultdict(Counter)
    for im in images:
        if im["mura_split"] == "train":
            per_patient[im["patient"]][(im["body_part"], im["label"])] += 1
    stratum_of = {patient: splits.majority(counts) for patient, counts in per_patient.items()}
    split_of = splits.assign_stratified(
        stratum_of, [("validation", fraction), ("train", 1.0 - fraction)], order_key=_validation_order_key
    )
    chosen = {patient for patient, split in split_of.items() if split == "validation"}
    if fraction <= 0.0:
        return chosen
    # A small subset must still get a validation set: every stratum of >= 2 patients gives at least one
    # (its first in the hash order; the rest stay in train), and if no stratum has 2 patients, the
    # carve-out is made over all patients unstratified (at least one, when there are >= 2).
    strata: dict = defaultdict(list)
    for patient, stratum in stratum_of.items():
        strata[stratum].append(patient)
    for members in strata.values():
        if len(members) >= 2 and not chosen & set(members):
            chosen.add(min(members, key=_validation_order_key))
    if not chosen and len(stratum_of) >= 2:
        everyone = splits.assign_stratified(
            {p: 0 for p in stratum_of},
            [("validation", fraction), ("train", 1.0 - fraction)],
            order_key=_validation_order_key,
        )
        chosen = {p for p, split in everyone.items() if split == "validation"} or {
            min(stratum_of, key=_validation_order_key)
        }
    return chosen


def _validation_order_key(patient: str) -> bytes:
    return hashlib.sha256(f"afm-jax mura validation:{patient}".encode()).digest()


def build_mura_dataset(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    name: str = "mura",
    body_parts: Sequence[str] | None = None,
    validation_fraction: float = 0.1,
    image_size: int = 0,
    salt: bytes | None = None,
    overwrite: bool = False,
    workers: int = 2,
    png_compression: int | None = None,
) -> pathlib.Path:
    """Writes MURA-v1.1 (all seven body parts, or `body_parts`) as a dataset; returns its version directory.

    Splits: train, validation (carved from train by patient), test (= MURA's official valid).
    `image_size` shrinks the longest side (0 keeps MURA's size, at most 512 px). Unreadable images
    are an error here (MURA is a fixed release; a broken file means a broken unzip).
    """
    if salt is None:
        salt = anonymize.load_salt(allow_demo_salt=True)
    salt_kind = "public demo salt" if salt == anonymize.SYNTHETIC_DEMO_SALT else "user salt"
    images = _without_train_copies_of_test_patients(list_mura(root, body_parts=body_parts))
    validation = carve_validation(images, validation_fraction)
    items = []
    for im in images:
        split = OFFICIAL_SPLITS[im["mura_split"]]
        if im["patient"] in validation and split == "train":
            split = "validation"
        patient_id = anonymize.hash_id(f"mura:{im['patient']}", salt)
        items.append(
            folder_dataset.PlannedImage(
                path=im["path"],
                relpath=im["relpath"],
                patient_id=patient_id,
                study_id=anonymize.hash_id(f"mura:{im['study']}", salt),
                image_id=anonymize.hash_id(f"mura:{im['relpath']}", salt),
                label=im["label"],
                label_name=LABEL_NAMES[im["label"]],
                body_part=im["body_part"],
                split=split,
            )
        )
    mura_dir = find_mura_dir(root)
    info = {
        "source": "MURA-v1.1",
        "preprocessing": {"image_size": int(image_size), "channels": "luminance of RGB; 8-bit scaled x257"},
        "source_fingerprint": _csv_fingerprint(mura_dir),
        "body_parts": sorted({im["body_part"] for im in images}),
        "split_definition": {
            "test": "MURA-v1.1 valid",
            "train/validation": f"MURA-v1.1 train, "
            f"{validation_fraction:g} of patients to validation, stratified by body part and label",
        },
        "label_level": "study (every image carries its study's label)",
        "id_salt": salt_kind,
    }
    return folder_dataset.write_planned_images(
        items,
        salt,
        out_dir,
        name,
        info,
        image_size=image_size,
        workers=workers,
        strict=True,
        overwrite=overwrite,
        png_compression=png_compression,
    )


def _without_train_copies_of_test_patients(images: list[dict]) -> list[dict]:
    """The images minus train images of patients who are also in MURA's valid split (none in v1.1, but a
    patient in two splits would break the one-split-per-patient rule; the official test set is kept whole)."""
    test_patients = {im["patient"] for im in images if im["mura_split"] == "valid"}
    in_both = test_patients & {im["patient"] for im in images if im["mura_split"] == "train"}
    kept = [im for im in images if not (im["mura_split"] == "train" and im["patient"] in in_both)]
    if in_both:
        log.warning(
            "Dropped %d train images of %d patients who are also in MURA's valid (our test) split.",
            len(images) - len(kept),
            len(in_both),
        )
    return kept


def _csv_fingerprint(mura_dir: pathlib.Path) -> str:
    """SHA-256 of MURA's four CSV files: identifies the release (and any edit to it)."""
    h = hashlib.sha256()
    for split in OFFICIAL_SPLITS:
        for kind in ("image_paths", "labeled_studies"):
            path = mura_dir / f"{split}_{kind}.csv"
            h.update(path.read_bytes() if path.is_file() else b"-")
    return h.hexdigest()

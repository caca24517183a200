"""Any labelled image folder or CSV -> a dataset in our record format (so a user adds a knee set in minutes).

Two ways to say which image has which label:

* a folder `root/<label>/.../<image>`: the first folder level is the label name; files anywhere
  below it are images (PNG, JPEG, TIFF, BMP, or DICOM with or without a `.dcm` extension);
* a CSV `path,label[,patient]`, with or without a header. With a header, the columns are found by
  name (`path`, `label` or `label_name`, and optionally `patient`/`patient_id`, `study`/`study_id`,
  `split`, `body_part`); without one, by position. Paths are relative to the CSV's folder or
  absolute. An empty label means "unlabelled" (label -1).

Images of any size and type become one-channel 16-bit records, bone bright: 8-bit images are scaled
to the full 16-bit range, RGB(A) is converted to luminance (ITU-R BT.601, OpenCV's weights), other
depths are min-max scaled, and monochrome DICOM goes through `afm_jax.data.dicom` (modality/VOI LUTs,
MONOCHROME1 inverted; first frame), colour DICOM through pydicom's RGB conversion to luminance.
`image_size` optionally shrinks the longest side (never enlarges). Unreadable files are skipped and
counted by reason in the dataset info (`skipped_files`), or stop the build with `strict=True`.

Patients (splits are by patient, so this matters): taken from, in order, the CSV's patient column,
the DICOM Patient ID, the first subfolder below the label folder (`root/<label>/<patient>/...`), or
else the file itself — one patient per image, which is only right if every patient has one image.
`patient_from` forces one of these. With patients from subfolders, a second level
(`root/<label>/<patient>/<study>/...`) is the study. Raw patient keys are hashed with the user's salt
(`anonymize.hash_id`); no path or raw identifier is written into the dataset.

Splits: a CSV `split` column is used as given; otherwise patients are split train/validation/test
(default 0.8/0.1/0.1) stratified by label, deterministically from the hashed ids
(`splits.assign_patient_splits`, as the DICOM converter).
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import cv2
import numpy as np

from afm_jax import io
from afm_jax.data import anonymize, dicom, records
from afm_jax.data import splits as splits_lib
from afm_jax.data.preprocessing import resize_longest
from afm_jax.errors import ConfigError, DatasetNotFoundError, UnreadableImageError

log = logging.getLogger(__name__)

RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
PATIENT_SOURCES = ("auto", "csv", "dicom", "subfolder", "file")
PatientFrom = Literal["auto", "csv", "dicom", "subfolder", "file"]


@dataclasses.dataclass(frozen=True)
class LabelledFile:
    """One image file and what the listing says about it (raw keys; hashed before anything is written)."""

    path: pathlib.Path
    relpath: str  # relative to the folder root / CSV folder (for messages only; never written)
    label_name: str = ""  # "" = unlabelled
    patient: str = ""  # raw patient key from the CSV ("" = derive)
    study: str = ""
    split: str = ""
    body_part: str = ""
    target: str = ""  # numeric target cell of a CSV ("" = none), e.g. bone age in months
    laterality: str = ""
    in_label_folder: bool = False  # listed from ROOT/<label>/... (relpath starts with the label folder)


# ─── Listing ─────────────────────────────────────────────────────────────────────────────────────


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True for a `.dcm`-like suffix, or a file with the DICM marker at byte 128 (Part 10 files)."""
    p = pathlib.Path(path)
    if p.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(p, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def _is_image_candidate(p: pathlib.Path) -> bool:
    suffix = p.suffix.lower()
    return suffix in RASTER_SUFFIXES or suffix in DICOM_SUFFIXES or (suffix == "" and is_dicom_file(p))


def list_folder(root: str | os.PathLike) -> list[LabelledFile]:
    """Images under `root/<label>/...`, sorted by path; hidden files and folders are ignored."""
    root = pathlib.Path(root).expanduser()
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"Image folder {root} does not exist or is not a folder. Give a folder "
            "laid out as ROOT/<label>/.../<image> or a CSV path,label[,patient]."
        )
    out = []
    label_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    for label_dir in label_dirs:
        for dirpath, dirnames, filenames in os.walk(label_dir):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fname in sorted(filenames):
                p = pathlib.Path(dirpath) / fname
                if fname.startswith(".") or not _is_image_candidate(p):
                    continue
                out.append(
                    LabelledFile(
                        path=p, relpath=p.relative_to(root).as_posix(), label_name=label_dir.name, in_label_folder=True
                    )
                )
    if not out:
        raise DatasetNotFoundError(
            f"No images found under {root}/<label>/ ({', '.join(RASTER_SUFFIXES + DICOM_SUFFIXES)} or DICOM "
            f"files without extension). Folders found: {[d.name for d in label_dirs][:10]}. The layout must be "
            "ROOT/<label>/.../<image>, one folder per label."
        )
    return out


_CSV_COLUMNS = {
    "path": ("path", "file", "filename", "image", "image_path"),
    "label": ("label", "label_name", "class"),
    "patient": ("patient", "patient_id"),
    "study": ("study", "study_id"),
    "split": ("split",),
    "body_part": ("body_part",),
    "laterality": ("laterality", "side"),
    "target": ("target",),
}


def list_csv(csv_path: str | os.PathLike, target_column: str = "") -> list[LabelledFile]:
    """Images listed in a CSV `path,label[,patient]` (header optional; see the module docstring).

    `target_column` names a numeric column (e.g. `bone_age_months`) written as each record's float
    `target` (regression tasks); a column named `target` is used without it. Empty cells are NaN."""
    csv_path = pathlib.Path(csv_path).expanduser()
    if not csv_path.is_file():
        raise DatasetNotFoundError(f"CSV file {csv_path} does not exist.")
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if not rows:
        raise ConfigError(f"CSV {csv_path} is empty; it needs rows path,label[,patient].")
    header = [c.strip().lower() for c in rows[0]]
    columns: dict[str, int] = {}
    target_column = target_column.strip().lower()
    if target_column and target_column not in header:
        raise ConfigError(
            f"CSV {csv_path} has no column {target_column!r} (the target column); its header is {header}."
        )
    if any(h in _CSV_COLUMNS["path"] for h in header):
        if target_column:
            columns["target"] = header.index(target_column)
        for key, names in _CSV_COLUMNS.items():
            columns.update({key: header.index(n) for n in names if n in header and key not in columns})
        rows = rows[1:]
        unknown = [h for h in header if not any(h in names for names in _CSV_COLUMNS.values()) and h != target_column]
        if unknown:
            log.warning("CSV %s: ignoring columns %s.", csv_path.name, unknown)
    else:
        if len(rows[0]) > 3:
            raise ConfigError(
                f"CSV {csv_path} has {len(rows[0])} columns but no header; without a header the "
                "columns must be path,label[,patient]. Add a header row naming the columns "
                "(path,label,patient,study,split,body_part)."
            )
        columns = {"path": 0, "label": 1, "patient": 2}
    if "label" not in columns and "split" not in columns:
        log.warning("CSV %s has no label column; every image is unlabelled (-1).", csv_path.name)
    out = []
    for line, row in enumerate(rows, start=2 if "path" in header else 1):

        def cell(key: str) -> str:
            i = columns.get(key)
            return row[i].strip() if i is not None and i < len(row) else ""

        rel = cell("path")
        if not rel:
            raise ConfigError(f"CSV {csv_path} line {line}: empty path.")
        p = pathlib.Path(rel).expanduser()
        p = p if p.is_absolute() else csv_path.parent / p
        target = cell("target")
        if target:
            try:
                float(target)
            except ValueError:
                raise ConfigError(f"CSV {csv_path} line {line}: target {target!r} is not a number.") from None
        out.append(
            LabelledFile(
                path=p,
                relpath=rel,
                label_name=cell("label"),
                patient=cell("patient"),
                study=cell("study"),
                split=cell("split"),
                body_part=cell("body_part").upper(),
                target=target,
                laterality=cell("laterality").upper(),
            )
        )
    missing = [f for f in out if not f.path.is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"{len(missing)} of {len(out)} files listed in {csv_path} do not exist (first: "
            f"{missing[0].relpath}); paths are relative to the CSV's folder {csv_path.parent}."
        )
    return out


def list_labelled_files(source: str | os.PathLike, target_column: str = "") -> list[LabelledFile]:
    """`list_csv` for a `.csv` file, else `list_folder`."""
    p = pathlib.Path(source).expanduser()
    if p.suffix.lower() == ".csv":
        return list_csv(p, target_column)
    if target_column:
        raise ConfigError(f"A target column ({target_column!r}) needs a CSV source, not the folder {p}.")
    return list_folder(p)


def label_ids(files: Sequence[LabelledFile], label_names: Sequence[str] | None = None) -> dict[str, int]:
    """label name -> id: the order of `label_names` if given (e.g. ["normal", "abnormal"] makes
    abnormal the positive class 1), else integers as themselves when every label is one, else sorted."""
    present = sorted({f.label_name for f in files if f.label_name})
    if label_names:
        names = [str(n).strip() for n in label_names]
        if len(set(names)) != len(names):
            raise ConfigError(f"label_names {names} repeat a name.")
        unknown = sorted(set(present) - set(names))
        if unknown:
            raise ConfigError(f"Labels {unknown} are in the data but not in label_names {names}; add them.")
        return {n: i for i, n in enumerate(names)}
    if present and all(re.fullmatch(r"\d+", n) for n in present):
        return {n: int(n) for n in present}
    return {n: i for i, n in enumerate(present)}


# ─── Reading one image ───────────────────────────────────────────────────────────────────────────


def to_single_channel(image: np.ndarray) -> np.ndarray:
    """(H, W) uint8 or uint16 from a decoded grey, BGR or BGRA image of any numeric dtype.

    Colour becomes luminance (OpenCV's BT.601 weights); dtypes other than uint8/uint16 are min-max
    scaled to uint16 (a constant image becomes 0).
    """
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 3:
        if array.shape[-1] not in (3, 4):
            raise ValueError(f"Image with {array.shape[-1]} channels; expected grey, RGB or RGBA.")
        if array.dtype not in (np.uint8, np.uint16):
            array = array.astype(np.float32)
        array = cv2.cvtColor(array, cv2.COLOR_BGR2GRAY if array.shape[-1] == 3 else cv2.COLOR_BGRA2GRAY)
    if array.ndim != 2 or array.size == 0:
        raise ValueError(f"Image of shape {np.shape(image)} is not a 2-D picture.")
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.dtype in (np.uint8, np.uint16):
        return array
    values = array.astype(np.float64)
    lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
    scaled = np.zeros_like(values) if hi <= lo else (np.nan_to_num(values, nan=lo) - lo) / (hi - lo)
    return np.round(scaled * 65535.0).astype(np.uint16)


@dataclasses.dataclass
class LoadedImage:
    """A decoded image (uint8/uint16 (H, W), bone bright) and PHI-free metadata (DICOM only)."""

    image: np.ndarray
    meta: dict[str, Any]


def read_image(path: str | os.PathLike, salt: bytes | None = None) -> LoadedImage:
    """Decodes a PNG/JPEG/TIFF/BMP or DICOM file to one channel.

    DICOM is read with `afm_jax.data.dicom.read_dicom` (first frame; `salt` hashes its identifiers,
    which end up in `meta`); raster images keep their stored bit depth. Raises ValueError for a file
    that does not decode and `dicom.SkippedFile` for DICOM that is not a monochrome image.
    """
    p = pathlib.Path(path)
    if is_dicom_file(p):
        salt = salt or anonymize.load_salt()
        try:
            frame = dicom.read_dicom(p, salt)[0]
        except dicom.SkippedFile as e:
            if not e.reason.startswith("not_monochrome"):
                raise
            return _read_colour_dicom(p, salt)
        image = np.round(np.clip(frame.image, 0.0, 1.0) * 65535.0).astype(np.uint16)
        return LoadedImage(image, frame.meta)
    data = np.fromfile(p, dtype=np.uint8)
    decoded = cv2.imdecode(data, cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR) if data.size else None
    if decoded is None:
        raise ValueError("not a readable image (OpenCV cannot decode it)")
    return LoadedImage(to_single_channel(decoded), {})


def _read_colour_dicom(path: pathlib.Path, salt: bytes) -> LoadedImage:
    """A colour DICOM (secondary capture, photo): first frame as RGB (pydicom converts YBR), then luminance.

    Its study/series UIDs are hashed as `dicom.read_dicom` hashes them; nothing else is read out.
    """
    import pydicom  # pylint: disable=g-import-not-at-top  (pydicom: slow to import, only for DICOM inputs)
    from pydicom.pixels import pixel_array  # pylint: disable=g-import-not-at-top

    ds = pydicom.dcmread(path)
    rgb = pixel_array(ds, index=0) if int(ds.get("NumberOfFrames", 1) or 1) > 1 else pixel_array(ds)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"colour DICOM with pixel array of shape {rgb.shape}")
    grey = to_single_channel(np.ascontiguousarray(rgb[..., ::-1]))  # RGB -> BGR, OpenCV's channel order
    meta = {
        key: anonymize.hash_id(str(ds.get(tag)), salt) if ds.get(tag) else ""
        for key, tag in (("study_id", "StudyInstanceUID"), ("series_id", "SeriesInstanceUID"))
    }
    meta["modality"] = " ".join(str(ds.get("Modality", "") or "").split()).upper()[:64]
    return LoadedImage(grey, meta)


def shrink(image: np.ndarray, image_size: int) -> np.ndarray:
    """The image with its longest side reduced to `image_size` (area interpolation); 0 = unchanged."""
    if image_size and max(image.shape) > image_size:
        return resize_longest(image, int(image_size))
    return image


# ─── Patients ────────────────────────────────────────────────────────────────────────────────────


def _dicom_patient_key(path: pathlib.Path) -> str:
    """The raw key `dicom.read_dicom` hashes as patient_id (Patient ID, else the study), from the header."""
    import pydicom  # pylint: disable=g-import-not-at-top  (pydicom: slow to import, only for DICOM inputs)

    try:
        ds = pydicom.dcmread(
            path, stop_before_pixels=True, force=True, specific_tags=["PatientID", "StudyInstanceUID", "SOPInstanceUID"]
        )
    except Exception:  # pylint: disable=broad-except  (broken files are reported when read)
        return ""
    return dicom.patient_key(ds)[0]


def patient_keys(files: Sequence[LabelledFile], patient_from: PatientFrom = "auto") -> tuple[list[str], Counter]:
    """The raw patient key of each file and how many came from each source (see the module docstring)."""
    if patient_from not in PATIENT_SOURCES:
        raise ConfigError(f"patient_from={patient_from!r}; use one of {PATIENT_SOURCES}.")
    keys, sources = [], Counter()
    for f in files:
        candidates = {
            "csv": f.patient,
            "dicom": _dicom_patient_key(f.path) if patient_from in ("auto", "dicom") and is_dicom_file(f.path) else "",
            "subfolder": _subfolder(f, 1),
            "file": f"file:{f.relpath}",
        }
        order = ("csv", "dicom", "subfolder", "file") if patient_from == "auto" else (patient_from,)
        source = next((s for s in order if candidates[s]), None)
        if source is None:
            raise ConfigError(
                f"patient_from={patient_from!r} but {f.relpath} has no such patient information; "
                "use patient_from='auto'."
            )
        keys.append(candidates[source])
        sources[source] += 1
    return keys, sources


def _subfolder(f: LabelledFile, level: int) -> str:
    """The folder `level` below the label folder (1: ROOT/<label>/<patient>/...), if the file lies deeper."""
    parts = pathlib.PurePosixPath(f.relpath).parts
    return parts[level] if f.in_label_folder and len(parts) > level + 1 else ""


# ─── Examples and writing ────────────────────────────────────────────────────────────────────────


@dataclasses.dataclass(frozen=True)
class PlannedImage:
    """One file to read with everything already decided: hashed ids, label, body part, split."""

    path: pathlib.Path
    relpath: str  # for error messages with strict=True only; never written
    patient_id: str
    study_id: str
    image_id: str
    label: int
    label_name: str
    body_part: str
    split: str
    target: float = float("nan")
    laterality: str = ""


def _load(
    item: PlannedImage, salt: bytes, image_size: int, png_compression: int | None
) -> tuple[PlannedImage, bytes | None, dict[str, Any], str]:
    """(item, 16-bit PNG bytes or None, metadata, failure reason): one file read, shrunk and encoded."""
    try:
        loaded = read_image(item.path, salt)
    except Exception as e:  # pylint: disable=broad-except  (counted and reported, never fatal unless strict)
        return item, None, {}, getattr(e, "reason", None) or type(e).__name__
    meta, before = loaded.meta, loaded.image.shape
    meta.setdefault("orig_shape", before)
    image = shrink(loaded.image, image_size)
    spacing = meta.get("pixel_spacing_mm")
    if spacing is not None and image.shape != before:  # spacing of the stored pixels
        meta["pixel_spacing_mm"] = (spacing[0] * before[0] / image.shape[0], spacing[1] * before[1] / image.shape[1])
    return item, encode_png16(image, png_compression), meta, ""


def encode_png16(image: np.ndarray, png_compression: int | None = None) -> bytes:
    """One-channel 16-bit PNG bytes of a uint8 (scaled ×257, as the record writer does) or uint16 image."""
    array = image.astype(np.uint16) * 257 if image.dtype == np.uint8 else image
    params = [] if png_compression is None else [cv2.IMWRITE_PNG_COMPRESSION, int(png_compression)]
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(array), params)
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def iter_examples(
    items: Sequence[PlannedImage],
    salt: bytes,
    *,
    image_size: int = 0,
    workers: int = 2,
    strict: bool = False,
    failures: Counter | None = None,
    chunk: int = 64,
    png_compression: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Record dicts for `items` in order, `image` already as 16-bit PNG bytes: decoding, resizing and
    encoding run in `workers` threads (OpenCV releases the GIL; encoding is the larger cost, so it
    must not stay in the writer's thread). Unreadable files are counted in `failures` by reason and
    skipped, or with `strict` raise UnreadableImageError naming the file."""

    def load(it: PlannedImage) -> tuple[PlannedImage, bytes | None, dict[str, Any], str]:
        return _load(it, salt, image_size, png_compression)

    with concurrent.futures.ThreadPoolExecutor(max(1, int(workers))) as pool:
        for start in range(0, len(items), chunk):
            for item, png, meta, error in pool.map(load, items[start : start + chunk]):
                if png is None:
                    if strict:
                        raise UnreadableImageError(
                            f"{item.relpath} cannot be read ({error}); replace or remove it "
                            "(folder datasets: without --strict, unreadable files are skipped)."
                        )
                    if failures is not None:
                        failures[error] += 1
                    continue
                yield {
                    "image": png,
                    "patient_id": item.patient_id,
                    "study_id": item.study_id or meta.get("study_id", ""),
                    "series_id": meta.get("series_id", ""),
                    "image_id": item.image_id,
                    "body_part": item.body_part or meta.get("body_part", ""),
                    "view": meta.get("view", ""),
                    "laterality": item.laterality or meta.get("laterality", ""),
                    "modality": meta.get("modality", ""),
                    "pixel_spacing_mm": meta.get("pixel_spacing_mm"),
                    "orig_shape": meta["orig_shape"],
                    "label": item.label,
                    "label_name": item.label_name if item.label >= 0 else "",
                    "target": item.target,
                }


def build_folder_dataset(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    name: str,
    label_names: Sequence[str] | None = None,
    split_fractions: Mapping[str, float] | None = None,
    image_size: int = 0,
    salt: bytes | None = None,
    patient_from: PatientFrom = "auto",
    body_part: str = "",
    overwrite: bool = False,
    strict: bool = False,
    workers: int = 2,
    png_compression: int | None = None,
    target_column: str = "",
) -> pathlib.Path:
    """Writes the images of a labelled folder or CSV as a dataset; returns its version directory.

    Args:
      source: a folder `root/<label>/...` or a `.csv` file (see the module docstring).
      out_dir, name: where and under which name (lower_snake_case) to write, as `records.write_dataset`.
      label_names: label names in id order (default: integers as themselves, else sorted names).
      split_fractions: patient fractions per split when the CSV has no `split` column.
      image_size: shrink the longest side to this many pixels (0: keep the size).
      salt: hashing salt (default `anonymize.load_salt()`: the user's; real data needs one).
      patient_from: where patient ids come from ("auto", "csv", "dicom", "subfolder", "file").
      body_part: body part written for images that do not state one (e.g. "KNEE").
      strict: stop at the first unreadable file (naming it) instead of skipping and counting it.
      workers: decoding threads.
      target_column: a CSV's numeric column written as the records' float `target` (e.g.
        "bone_age_months"; a column named `target` is read without it).
    """
    salt = salt if salt is not None else anonymize.load_salt()
    files = list_labelled_files(source, target_column)
    ids = label_ids(files, label_names)
    raw_patients, patient_sources = patient_keys(files, patient_from)
    if patient_sources.get("file") == len(files) and len(files) > 1:
        log.warning(
            "No patient information (CSV patient column, DICOM Patient ID or ROOT/<label>/<patient>/ "
            "folders): each image is its own patient, so splits are by image. If patients have "
            "several images, add a patient column to a CSV to keep each patient in one split."
        )
    hashed = [anonymize.hash_id(p, salt) for p in raw_patients]
    labels = [ids[f.label_name] if f.label_name else -1 for f in files]
    splits = _assign_splits(files, hashed, labels, split_fractions)
    names = {v: k for k, v in ids.items()}
    items = []
    for f, raw, pid, label in zip(files, raw_patients, hashed, labels):
        study_raw = f.study or (f"{raw}/{_subfolder(f, 2)}" if _subfolder(f, 2) and raw == _subfolder(f, 1) else "")
        items.append(
            PlannedImage(
                path=f.path,
                relpath=f.relpath,
                patient_id=pid,
                study_id=anonymize.hash_id(f"study:{study_raw}", salt) if study_raw else "",
                image_id=anonymize.hash_id(f"{name}:{f.relpath}", salt),
                label=label,
                label_name=names.get(label, ""),
                body_part=f.body_part or body_part.upper(),
                split=splits[pid],
                target=float(f.target) if f.target else float("nan"),
                laterality=f.laterality,
            )
        )
    fractions = planned_split_fractions(items)
    empty = sorted(set(split_fractions or splits_lib.DEFAULT_SPLIT_FRACTIONS) - set(fractions))
    if empty and not any(f.split for f in files):
        log.warning(
            "Splits %s received no patient: there are too few patients per label (%d patients). Add "
            "patients, change --splits, or give a CSV with a split column.",
            empty,
            len(splits),
        )
    failures: Counter = Counter()
    source_p = pathlib.Path(source).expanduser()
    info = {
        "source": "labelled CSV" if source_p.suffix.lower() == ".csv" else "labelled folder",
        "preprocessing": {
            "image_size": int(image_size),
            "channels": "luminance of RGB; 8-bit scaled x257",
            "dicom": "afm_jax.data.dicom defaults (window, first frame)",
        },
        "source_fingerprint": _listing_fingerprint(items),
        "patient_id_sources": dict(patient_sources),
        "label_ids": ids,
        "target_column": target_column or ("target" if any(f.target for f in files) else ""),
    }
    directory = write_planned_images(
        items,
        salt,
        out_dir,
        name,
        info,
        image_size=image_size,
        workers=workers,
        strict=strict,
        failures=failures,
        overwrite=overwrite,
        png_compression=png_compression,
    )
    if failures:
        log.warning(
            "Skipped %d unreadable files (%s); pass strict=True (--strict) to stop at the first and see which.",
            sum(failures.values()),
            dict(failures),
        )
        _record_failures(directory, failures)
    return directory


def planned_split_fractions(items: Sequence[PlannedImage]) -> dict[str, float]:
    """{split: share of patients} of the planned images, for the dataset info (splits given, not drawn)."""
    patient_splits = {(it.patient_id, it.split) for it in items}
    return splits_lib.fractions_from_counts(Counter(split for _, split in patient_splits))


def write_planned_images(
    items: Sequence[PlannedImage],
    salt: bytes,
    out_dir: str | os.PathLike,
    name: str,
    extra_info: Mapping[str, Any],
    *,
    image_size: int = 0,
    workers: int = 2,
    strict: bool = False,
    failures: Counter | None = None,
    overwrite: bool = False,
    png_compression: int | None = None,
) -> pathlib.Path:
    """Writes `items` (read and encoded by `iter_examples`; `failures` and `strict` as there), each in the
    split its plan names, as the dataset `name` under `out_dir` (`records.write_dataset`, with
    `extra_info`); returns its version directory."""
    split_of_item = {it.image_id: it.split for it in items}
    return records.write_dataset(
        iter_examples(
            items,
            salt,
            image_size=image_size,
            workers=workers,
            strict=strict,
            failures=failures,
            png_compression=png_compression,
        ),
        out_dir,
        name=name,
        split_fractions=planned_split_fractions(items),
        extra_info=extra_info,
        num_examples_hint=len(items),
        overwrite=overwrite,
        png_compression=png_compression,
        assign_split=lambda r: split_of_item[r["image_id"]],
    )


def _record_failures(directory: pathlib.Path, failures: Counter) -> None:
    """Adds the skipped-file counts (reasons only, no paths) to metadata.json."""
    meta_file = directory / records.METADATA_FILE
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        meta["skipped_files"] = dict(failures)
        io.write_text(meta_file, json.dumps(meta, indent=2))


def _listing_fingerprint(items: Iterable[PlannedImage]) -> str:
    """SHA-256 over (hashed image id, label, size in bytes) of the inputs: changes when the source does."""
    h = hashlib.sha256()
    for it in sorted(items, key=lambda i: i.image_id):
        size = it.path.stat().st_size if it.path.exists() else -1
        h.update(f"{it.image_id},{it.label},{size};".encode())
    return h.hexdigest()


def _assign_splits(
    files: Sequence[LabelledFile],
    hashed: Sequence[str],
    labels: Sequence[int],
    split_fractions: Mapping[str, float] | None,
) -> dict[str, str]:
    """hashed patient id -> split: the CSV's split column if present, else stratified by label."""
    given = [f.split for f in files]
    if any(given):
        if not all(given):
            raise ConfigError(
                f"The CSV's split column is empty for {sum(not s for s in given)} rows; fill it for "
                "every row or drop the column to split automatically."
            )
        return splits_lib.splits_from_column(hashed, given, [f.relpath for f in files])
    per_patient: dict[str, Counter] = {}
    for pid, label in zip(hashed, labels):
        per_patient.setdefault(pid, Counter())[label] += 1
    return splits_lib.assign_patient_splits(
        per_patient, dict(split_fractions or splits_lib.DEFAULT_SPLIT_FRACTIONS), "stratified"
    )

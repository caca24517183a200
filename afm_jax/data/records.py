"""The dataset record format: schema, writer, dataset info and random-access reader.

One record per radiograph. A dataset is a directory in TFDS layout so that one read path serves the
femur data, MURA and any folder dataset, and `tfds.data_source` / `tfds.builder_from_directory`
read it without TensorFlow:

    <out_dir>/<name>/<SCHEMA_VERSION>/
        <name>-<split>.array_record-00000-of-0000N   ArrayRecord shards of serialised tf.Examples
        dataset_info.json, features.json              TFDS metadata (splits, shard lengths, features)
        metadata.json                                 our dataset info (see `read_info`)
        index/<split>.json                            image_id / patient_id / label per record, in order

Why write the files ourselves instead of a TFDS builder class: the examples arrive as one stream
(a DICOM walk of hours), already assigned to splits by patient, and a builder would need one
generator per split (two passes or buffering). We stream each example once into its split's shards
through TFDS's own serialiser, then let `tfds.folder_dataset.write_metadata` write the metadata TFDS
reads back, so the layout stays TFDS's and not a look-alike.

Images are stored as 16-bit one-channel PNG bytes and stay encoded when read (`open_split`): the
input pipeline decodes them lazily in its workers, which is where decoding parallelises.

Splits are by patient, never by image: `split_of_patient` (from `afm_jax.data.splits`, the home of
split assignment) maps the (already salted and hashed) patient id to a split deterministically, so
the same patient lands in the same split in every dataset built from the same ids.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import pathlib
import re
import shutil
import socket
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from afm_jax.data import selection as selection_lib
from afm_jax.data.splits import DEFAULT_SPLIT_FRACTIONS, split_of_patient, validate_fractions  # noqa: F401
from afm_jax.errors import ConfigError, DatasetNotFoundError
from afm_jax.version import code_version

SCHEMA_VERSION = "1.0.0"
DEFAULT_MAX_SHARD_BYTES = 1 << 30  # ~1 GiB per shard, as TFDS does
FILE_FORMAT = "array_record"
METADATA_FILE = "metadata.json"
INDEX_DIR = "index"

ID_KEYS = ("patient_id", "study_id", "series_id", "image_id")  # salted hashes, "" when unknown
STRING_KEYS = (
    *ID_KEYS,
    "body_part",
    "view",
    "laterality",
    "modality",
    "label_name",
    "fracture_type",
)
SCHEMA_KEYS = ("image", *STRING_KEYS, "pixel_spacing_mm", "orig_shape", "label", "target")
REQUIRED_KEYS = ("image", "patient_id", "image_id")
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

log = logging.getLogger(__name__)


def _not_found(problem: str) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"{problem}\n"
        "To make a dataset:\n"
        "  python -m afm_jax.data.synthetic --out DIR      # the embedded synthetic demo set\n"
        "  python tools/preprocess.py ...                  # from a DICOM tree\n"
        f"then point the config at the version directory the tool prints, e.g. "
        f"--config.data.path=DIR/<name>/{SCHEMA_VERSION}"
    )


def check_dataset_name(name: str, what: str = "Dataset name") -> str:
    """Returns `name` if it can name a dataset (lower_snake_case: it becomes part of the shard file names);
    raises ConfigError otherwise, starting with `what` (e.g. "--name")."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(f"{what} {name!r} must be lower_snake_case (letters, digits, _), e.g. knee_oa.")
    return name


# ─── Schema ──────────────────────────────────────────────────────────────────────────────────────


def features():
    """The TFDS feature spec of one record (imported lazily: tensorflow_datasets is slow to load)."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (tfds: seconds to import)

    text = tfds.features.Text
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(None, None, 1), dtype=np.uint16, encoding_format="png"),
            **{key: text() for key in STRING_KEYS},
            "pixel_spacing_mm": tfds.features.Tensor(shape=(2,), dtype=np.float32),
            "orig_shape": tfds.features.Tensor(shape=(2,), dtype=np.int32),
            "label": tfds.features.Scalar(dtype=np.int64),
            "target": tfds.features.Scalar(dtype=np.float32),
        }
    )


FEATURES_SUMMARY: dict[str, dict[str, Any]] = {
    "image": {"dtype": "uint16", "shape": [None, None, 1], "encoding": "png"},
    **{key: {"dtype": "str", "shape": []} for key in STRING_KEYS},
    "pixel_spacing_mm": {"dtype": "float32", "shape": [2]},
    "orig_shape": {"dtype": "int32", "shape": [2]},
    "label": {"dtype": "int64", "shape": [], "note": "-1 = no label"},
    "target": {"dtype": "float32", "shape": [], "note": "continuous target (e.g. bone age in months); NaN = none"},
}


# ─── Writer ──────────────────────────────────────────────────────────────────────────────────────


def write_dataset(
    examples: Iterable[dict],
    out_dir: str | os.PathLike,
    *,
    name: str,
    split_fractions: dict[str, float] | None = None,
    extra_info: dict | None = None,
    num_examples_hint: int | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    png_compression: int | None = None,
    assign_split: Callable[[dict], str] | None = None,
) -> pathlib.Path:
    """Writes `examples` as a dataset in `<out_dir>/<name>/<SCHEMA_VERSION>` and returns that directory.

    Args:
      examples: dicts with the schema keys (`SCHEMA_KEYS`). `image` is a uint16 (H, W) numpy array
        (uint8 is scaled by 257 to full 16-bit range), or already-encoded one-channel PNG bytes.
        `image`, `patient_id` and `image_id` are required; missing or None optional fields get
        defaults ("" for strings, NaN spacing, the image shape as `orig_shape`, label -1). Unknown
        keys are an error (they are usually typos). A repeated image_id is skipped with a warning.
      out_dir: the data directory (TFDS `data_dir`).
      name: dataset name, lower_snake_case (used in the shard file names).
      split_fractions: split name -> fraction of *patients*; default train .8 / validation .1 / test .1.
      extra_info: JSON-serialisable dict stored in the dataset info, by convention with keys
        `preprocessing` (parameters) and `source_fingerprint`, plus anything else worth keeping.
      num_examples_hint: total for the progress bar.
      overwrite: replace an existing dataset at the same place (otherwise FileExistsError).
      max_shard_bytes: start a new shard once a shard reaches this size.
      png_compression: zlib level 0-9 for images given as arrays (None: OpenCV's default). Level 0
        stores pixels uncompressed: ~1.7x the bytes of the default for 12-bit radiograph-like
        images, but ~3x faster to decode, and decoding is the input pipeline's main cost.
      assign_split: record dict -> split name, for callers that assign splits themselves (e.g. the
        DICOM converter's label-stratified patient splits); it must return a key of
        `split_fractions` and keep each patient in one split. Default: `split_of_patient`.

    The dataset is written into a hidden temporary directory beside the final one and renamed into
    place at the end, so a crash never leaves a half dataset that looks complete.
    """
    check_dataset_name(name)
    fractions = validate_fractions(split_fractions or DEFAULT_SPLIT_FRACTIONS)
    if png_compression is not None and not 0 <= int(png_compression) <= 9:
        raise ValueError(f"png_compression must be a zlib level 0-9 (or None), got {png_compression!r}.")
    extra_info = dict(extra_info or {})
    _check_extra_info(extra_info)
    final_dir = pathlib.Path(out_dir).expanduser().resolve() / name / SCHEMA_VERSION
    if final_dir.exists() and not overwrite:
        raise FileExistsError(
            f"A dataset already exists at {final_dir}. Delete it, choose another "
            "--out directory or name, or pass overwrite=True."
        )
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final_dir.parent)
    tmp_dir = final_dir.parent / f".incomplete-{SCHEMA_VERSION}-{_owner_tag()}-{uuid.uuid4().hex[:8]}"
    tmp_dir.mkdir()
    try:
        stats = _write_shards(
            examples, tmp_dir, name, fractions, num_examples_hint, max_shard_bytes, png_compression, assign_split
        )
        _write_metadata(tmp_dir, name, fractions, dict(extra_info, png_compression=png_compression), stats)
        _move_into_place(tmp_dir, final_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    log.info("Wrote %s: %s", final_dir, stats.counts)
    return final_dir


class _WriteStats:
    """What the writer learns while streaming: counts, ids, label names, a content fingerprint."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.patients: dict[str, set[str]] = defaultdict(set)
        self.label_counts: dict[str, Counter[int]] = defaultdict(Counter)
        self.label_names: dict[int, str] = {}
        self.label_name_conflicts = 0
        self.duplicates_skipped = 0
        self.image_ids: set[str] = set()
        self.index: dict[str, dict[str, list]] = defaultdict(lambda: {"image_id": [], "patient_id": [], "label": []})
        self.digests: list[bytes] = []
        self.split_infos: list[Any] = []

    def add(self, split: str, record: dict) -> None:
        label = int(record["label"])
        self.counts[split] += 1
        self.patients[split].add(record["patient_id"])
        self.label_counts[split][label] += 1
        if label >= 0:
            known = self.label_names.setdefault(label, record["label_name"])
            if known != record["label_name"]:
                self.label_name_conflicts += 1
        for key in ("image_id", "patient_id", "label"):
            self.index[split][key].append(record[key] if key != "label" else label)
        self.digests.append(record_digest(record))

    def content_fingerprint(self) -> str:
        """SHA-256 over the sorted record digests: the same records give the same value in any order,
        in any process (the digests are of canonical field bytes, not of the serialised protobuf,
        whose map order varies between processes)."""
        h = hashlib.sha256()
        for d in sorted(self.digests):
            h.update(d)
        return h.hexdigest()


def record_digest(record: Mapping[str, Any]) -> bytes:
    """SHA-256 of a normalised record's fields in sorted key order: key, type, length, bytes (strings
    UTF-8, arrays as little-endian with their dtype and shape, NaNs canonical, ints as int64)."""
    h = hashlib.sha256()
    for key in sorted(record):
        value = record[key]
        if isinstance(value, (bytes, bytearray)):
            kind, data = b"b", bytes(value)
        elif isinstance(value, str):
            kind, data = b"s", value.encode("utf-8")
        elif isinstance(value, (int, np.integer)):
            kind, data = b"i", np.int64(value).astype("<i8").tobytes()
        else:
            array = np.asarray(value)
            if array.dtype.kind == "f":
                array = np.where(np.isnan(array), np.nan, array).astype(array.dtype)
            kind = f"a{array.dtype.newbyteorder('<').str}{array.shape}".encode()
            data = np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes()
        h.update(key.encode() + b"\0" + kind + b"\0" + str(len(data)).encode() + b"\0" + data)
    return h.digest()


def _write_shards(
    examples: Iterable[dict],
    tmp_dir: pathlib.Path,
    name: str,
    fractions: dict[str, float],
    num_examples_hint: int | None,
    max_shard_bytes: int,
    png_compression: int | None,
    assign_split: Callable[[dict], str] | None = None,
) -> _WriteStats:
    feats = features()
    stats = _WriteStats()
    if num_examples_hint is None and hasattr(examples, "__len__"):
        num_examples_hint = len(examples)  # type: ignore[arg-type]
    writers = _SplitShardWriters(tmp_dir, name, max_shard_bytes)
    try:
        for example in tqdm(examples, total=num_examples_hint, desc=f"writing {name}", unit="img"):
            record = normalize_example(example, png_compression=png_compression)
            if record["image_id"] in stats.image_ids:
                stats.duplicates_skipped += 1
                log.warning("Skipping a second record with image_id %s.", record["image_id"])
                continue
            stats.image_ids.add(record["image_id"])
            if assign_split is None:
                split = split_of_patient(record["patient_id"], fractions)
            else:
                split = assign_split(record)
                if split not in fractions:
                    raise ValueError(f"assign_split returned {split!r}, not one of the splits {sorted(fractions)}.")
            serialized = feats.serialize_example(record)
            writers.write(split, serialized)
            stats.add(split, record)
    finally:
        writers.close()
    if not stats.counts:
        raise ValueError("No examples were given to write_dataset; nothing to write.")
    if stats.label_name_conflicts:
        log.warning(
            "%d records have a label_name that differs from the first name seen for their label.",
            stats.label_name_conflicts,
        )
    stats.split_infos = writers.finalize()
    return stats


class _SplitShardWriters:
    """One ArrayRecord writer per split, rolling over to a new shard at `max_shard_bytes`.

    Shards get temporary names while the total per split is unknown; `finalize` renames them to
    TFDS's `<name>-<split>.array_record-0000i-of-0000N` and returns the TFDS SplitInfos.
    """

    def __init__(self, directory: pathlib.Path, name: str, max_shard_bytes: int) -> None:
        self._dir, self._name, self._max_bytes = directory, name, max_shard_bytes
        self._open: dict[str, tuple[Any, int, int]] = {}  # split -> (writer, examples, bytes)
        self._done: dict[str, list[tuple[pathlib.Path, int, int]]] = defaultdict(list)  # (path, n, bytes)

    def _tmp_path(self, split: str, shard: int) -> pathlib.Path:
        return self._dir / f"{self._name}-{split}.{FILE_FORMAT}.tmp{shard:05d}"

    def write(self, split: str, serialized: bytes) -> None:
        # array_record: a native extension, loaded only by processes that write shards
        from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top

        if split not in self._open:
            path = self._tmp_path(split, len(self._done[split]))
            # One record per chunk for fast random access; no compression: PNG bytes do not shrink further.
            self._open[split] = (ArrayRecordWriter(os.fspath(path), "group_size:1,uncompressed"), 0, 0)
        writer, n, nbytes = self._open[split]
        writer.write(serialized)
        n, nbytes = n + 1, nbytes + len(serialized)
        self._open[split] = (writer, n, nbytes)
        if nbytes >= self._max_bytes:
            self._close_split(split)

    def _close_split(self, split: str) -> None:
        writer, n, nbytes = self._open.pop(split)
        writer.close()
        self._done[split].append((self._tmp_path(split, len(self._done[split])), n, nbytes))

    def close(self) -> None:
        for split in list(self._open):
            self._close_split(split)

    def finalize(self) -> list[Any]:
        import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (tfds: seconds to import)

        infos = []
        for split in sorted(self._done):
            shards = self._done[split]
            for i, (path, _, _) in enumerate(shards):
                path.rename(self._dir / f"{self._name}-{split}.{FILE_FORMAT}-{i:05d}-of-{len(shards):05d}")
            template = tfds.core.ShardedFileTemplate(
                data_dir=self._dir, dataset_name=self._name, split=split, filetype_suffix=FILE_FORMAT
            )
            infos.append(
                tfds.core.SplitInfo(
                    name=split,
                    shard_lengths=[n for _, n, _ in shards],
                    num_bytes=sum(b for _, _, b in shards),
                    filename_template=template,
                )
            )
        return infos


def normalize_example(example: Mapping[str, Any], *, png_compression: int | None = None) -> dict[str, Any]:
    """Checks one input example and returns it in record form (image as 16-bit PNG bytes)."""
    unknown = sorted(set(example) - set(SCHEMA_KEYS))
    if unknown:
        raise ValueError(f"Example has unknown keys {unknown}; the schema keys are {list(SCHEMA_KEYS)}.")
    missing = [k for k in REQUIRED_KEYS if example.get(k) is None]
    if missing:
        raise ValueError(f"Example (image_id={example.get('image_id')!r}) lacks required keys {missing}.")
    png, shape = _encode_png16(example["image"], example.get("image_id"), png_compression)
    record: dict[str, Any] = {"image": png}
    for key in STRING_KEYS:
        value = example.get(key)
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise ValueError(f"Example field {key!r} must be a str, got {type(value).__name__} ({value!r}).")
        record[key] = value
    if not record["patient_id"] or not record["image_id"]:
        raise ValueError("Example has an empty patient_id or image_id.")
    spacing = example.get("pixel_spacing_mm")
    record["pixel_spacing_mm"] = _pair("pixel_spacing_mm", (np.nan, np.nan) if spacing is None else spacing, np.float32)
    orig = example.get("orig_shape")
    record["orig_shape"] = _pair("orig_shape", shape if orig is None else orig, np.int32)
    label = example.get("label")
    record["label"] = -1 if label is None else int(label)
    target = example.get("target")
    record["target"] = np.float32(np.nan if target is None else float(target))
    return record


def _pair(key: str, value: Any, dtype: type) -> np.ndarray:
    array = np.asarray(value, dtype)
    if array.size != 2:
        raise ValueError(f"Example field {key!r} must hold 2 values (rows, columns), got {value!r}.")
    return array.reshape(2)


def _encode_png16(image: Any, image_id: Any, compression: int | None = None) -> tuple[bytes, tuple[int, int]]:
    """Returns (16-bit one-channel PNG bytes, (H, W)) for an array or PNG bytes."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        if data[:8] != _PNG_SIGNATURE or len(data) < 26:
            raise ValueError(f"Image of {image_id!r} is bytes but not a PNG; pass a uint16 (H, W) array instead.")
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        bit_depth, colour_type = data[24], data[25]
        if colour_type == 0 and bit_depth == 16:
            return data, (height, width)
        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if decoded is None:
            raise ValueError(f"Image of {image_id!r}: the PNG bytes do not decode.")
        if colour_type != 0 or decoded.ndim != 2 or decoded.dtype not in (np.uint8, np.uint16):
            raise ValueError(
                f"Image of {image_id!r} is a colour or {bit_depth}-bit PNG; records hold one-channel "
                "16-bit images. Convert to grayscale first or pass a uint16 (H, W) array."
            )
        image = decoded
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 2 or array.size == 0:
        raise ValueError(f"Image of {image_id!r} has shape {array.shape}; expected a non-empty (H, W) array.")
    if array.dtype == np.uint8:
        array = array.astype(np.uint16) * 257  # 255 -> 65535: full range, same relative intensities
    elif array.dtype != np.uint16:
        raise ValueError(
            f"Image of {image_id!r} has dtype {array.dtype}; expected uint16 (or uint8). Window/"
            "rescale it to uint16 in the preprocessing step."
        )
    params = [] if compression is None else [cv2.IMWRITE_PNG_COMPRESSION, int(compression)]
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(array), params)
    if not ok:
        raise ValueError(f"Image of {image_id!r} could not be encoded as PNG.")
    return buf.tobytes(), (int(array.shape[0]), int(array.shape[1]))


def _check_extra_info(extra_info: dict) -> None:
    reserved = sorted(set(extra_info) & set(_RESERVED_INFO_KEYS))
    if reserved:
        raise ValueError(f"extra_info keys {reserved} are written by write_dataset itself; rename them.")
    try:
        json.dumps(extra_info, allow_nan=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"extra_info must be JSON-serialisable (plain str/int/float/list/dict): {e}") from e


_RESERVED_INFO_KEYS = (
    "name",
    "version",
    "path",
    "schema_version",
    "features",
    "splits",
    "split_fractions",
    "split_patients",
    "label_counts",
    "label_names",
    "duplicates_skipped",
    "content_fingerprint",
    "tool_version",
    "created",
    "png_compression",
)


def _write_metadata(
    directory: pathlib.Path, name: str, fractions: dict[str, float], extra_info: dict, stats: _WriteStats
) -> None:
    """Writes the TFDS metadata (dataset_info.json, features.json), metadata.json and the split index."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (tfds: seconds to import)

    info = {
        "schema_version": SCHEMA_VERSION,
        "features": FEATURES_SUMMARY,
        "splits": {s: stats.counts[s] for s in sorted(stats.counts)},
        "split_fractions": fractions,
        "split_patients": {s: len(stats.patients[s]) for s in sorted(stats.patients)},
        "label_counts": {s: {str(k): v for k, v in sorted(c.items())} for s, c in sorted(stats.label_counts.items())},
        "label_names": {str(k): v for k, v in sorted(stats.label_names.items())},
        "duplicates_skipped": stats.duplicates_skipped,
        "content_fingerprint": stats.content_fingerprint(),
        "tool_version": code_version(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "preprocessing": {},
        "source_fingerprint": None,
        **extra_info,
    }
    tfds.folder_dataset.write_metadata(
        data_dir=directory,
        features=features(),
        split_infos=stats.split_infos,
        version=SCHEMA_VERSION,
        check_data=False,  # its check reads with tf.data, which needs TensorFlow
        description=f"afm-jax radiograph dataset {name!r} (record schema {SCHEMA_VERSION}).",
        metadata=tfds.core.MetadataDict(info),
    )
    (directory / INDEX_DIR).mkdir()
    for split, columns in stats.index.items():
        (directory / INDEX_DIR / f"{split}.json").write_text(json.dumps(columns))


def _owner_tag() -> str:
    return f"{socket.gethostname().replace('-', '_')}-{os.getpid()}"


def remove_stale_temporaries(parent: pathlib.Path, max_age_s: float = 6 * 3600) -> list[pathlib.Path]:
    """Removes the `.incomplete-*` / `.replaced-*` folders a killed writer left in `parent`: those of
    a dead process on this host, and those of other hosts (or without an owner) untouched for
    `max_age_s`. Returns what was removed."""
    removed = []
    host = socket.gethostname().replace("-", "_")
    for path in parent.glob(".incomplete-*") if parent.is_dir() else []:
        parts = path.name.split("-")  # .incomplete, <schema version>, <host>, <pid>, <random>
        stale = False
        if len(parts) == 5 and parts[2] == host and parts[3].isdigit():
            stale = not _pid_alive(int(parts[3]))
        else:
            try:
                stale = time.time() - path.stat().st_mtime > max_age_s
            except OSError:
                continue
        if stale:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    for path in parent.glob(".replaced-*") if parent.is_dir() else []:
        try:
            if time.time() - path.stat().st_mtime > 60:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        except OSError:
            continue
    if removed:
        log.warning("Removed %d temporary folder(s) left by an interrupted write in %s.", len(removed), parent)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _move_into_place(tmp_dir: pathlib.Path, final_dir: pathlib.Path) -> None:
    if final_dir.exists():  # only with overwrite=True
        trash = final_dir.parent / f".replaced-{uuid.uuid4().hex[:8]}"
        final_dir.rename(trash)
        tmp_dir.rename(final_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp_dir.rename(final_dir)


# ─── Reader ──────────────────────────────────────────────────────────────────────────────────────


def resolve_dataset_dir(path: str | os.PathLike) -> pathlib.Path:
    """The version directory for `path`, which may also be `<out_dir>/<name>` (newest version is used)
    or an `<out_dir>` holding exactly one dataset. Raises DatasetNotFoundError otherwise."""
    if not str(path):
        raise _not_found("No dataset path is set (config key `data.path` is empty).")
    p = pathlib.Path(path).expanduser()
    if (p / "dataset_info.json").is_file():
        return p
    if not p.exists():
        raise _not_found(f"Dataset path {p} does not exist.")
    versions = _version_dirs(p)
    if versions:  # p is <out_dir>/<name>
        return versions[-1]
    datasets = sorted({v.parent for v in _version_dirs(p, depth=2)})
    if len(datasets) == 1:  # p is an <out_dir> with one dataset
        return _version_dirs(datasets[0])[-1]
    if datasets:
        raise _not_found(
            f"{p} holds several datasets ({', '.join(d.name for d in datasets)}); point "
            "`data.path` at one version directory, e.g. " + str(_version_dirs(datasets[0])[-1])
        )
    raise _not_found(f"{p} is not a dataset directory (no dataset_info.json in it or below it).")


def _version_dirs(p: pathlib.Path, depth: int = 1) -> list[pathlib.Path]:
    """Complete version directories `depth` levels below p, oldest first (hidden temp dirs excluded)."""
    pattern = "/".join(["*"] * depth) + "/dataset_info.json"
    dirs = [f.parent for f in p.glob(pattern) if not any(part.startswith(".") for part in f.relative_to(p).parts)]
    return sorted(dirs, key=lambda d: _version_key(d.name))


def _version_key(version: str) -> tuple:
    return tuple(int(x) if x.isdigit() else -1 for x in version.split("."))


def read_info(path: str | os.PathLike) -> dict:
    """The dataset info: name, version, path, features, splits ({split: num_examples}), split_patients,
    label_counts, label_names, preprocessing, source_fingerprint, content_fingerprint, tool_version, ...

    Split counts come from TFDS's dataset_info.json (the shard lengths TFDS itself reads), so they
    match what `open_split` serves."""
    directory = resolve_dataset_dir(path)
    tfds_info = json.loads((directory / "dataset_info.json").read_text())
    meta_file = directory / METADATA_FILE
    info = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    info.update(
        name=tfds_info.get("name"),
        version=tfds_info.get("version"),
        path=str(directory),
        splits={s["name"]: sum(int(n) for n in s.get("shardLengths", [])) for s in tfds_info.get("splits", [])},
    )
    return info


def open_split(path: str | os.PathLike, split: str, *, selection: str | None = None) -> "RecordSource":
    """A random-access source over one split: `len()` and `[i]` -> dict with `image` still PNG bytes,
    strings as str, arrays as numpy. Picklable, so grain worker processes can use it.

    `split` is a split name, or TFDS slice syntax such as "train[:1000]". `selection` is the path of
    a JSON list of image_id strings: only those records are served (in dataset order). Raises
    DatasetNotFoundError for a missing dataset or unknown split (naming the available splits)."""
    directory = resolve_dataset_dir(path)
    splits = read_info(directory)["splits"]
    base = split.split("[", 1)[0]
    if base not in splits:
        raise _not_found(
            f"Dataset {directory} has no split {split!r}; available splits: {', '.join(sorted(splits)) or 'none'}."
        )
    indices = None
    if selection:
        if base != split:
            raise ConfigError(f"A selection cannot be combined with a sliced split ({split!r}); use {base!r}.")
        indices = _selected_indices(directory, base, selection)
    return RecordSource(str(directory), split, indices)


def split_index(path: str | os.PathLike, split: str) -> dict[str, list]:
    """{"image_id": [...], "patient_id": [...], "label": [...]} of `split` in record order, read from the
    index written beside the shards (or, for datasets without one, by reading every record)."""
    directory = resolve_dataset_dir(path)
    index_file = directory / INDEX_DIR / f"{split}.json"
    if index_file.is_file():
        return json.loads(index_file.read_text())
    log.warning("%s has no index; reading every record of %r for the ids.", directory, split)
    source = RecordSource(str(directory), split, None)
    columns: dict[str, list] = {"image_id": [], "patient_id": [], "label": []}
    for i in range(len(source)):
        ex = source[i]
        for key in columns:
            columns[key].append(ex[key])
    return columns


def _selected_indices(directory: pathlib.Path, split: str, selection: str | os.PathLike) -> np.ndarray:
    wanted_set = set(selection_lib.read_selection(selection))
    ids = split_index(directory, split)["image_id"]
    indices = np.asarray([i for i, image_id in enumerate(ids) if image_id in wanted_set], np.int64)
    if indices.size == 0:
        raise ConfigError(
            f"Selection {pathlib.Path(selection).expanduser()} ({len(wanted_set)} ids) matches none "
            f"of the {len(ids)} records of split {split!r} in {directory}: it was made for another "
            "dataset or split (config keys `data.selection`, `data.path`)."
        )
    return indices


class RecordSource(Sequence):
    """Random access to the records of one split (grain's RandomAccessDataSource protocol).

    TFDS resolves the split (and slices like "train[:10%]") to shard files and reads the raw
    records; `parse_record` turns them into dicts. Opened lazily, so pickling it to a worker process
    sends only the path.
    """

    def __init__(self, path: str, split: str, indices: np.ndarray | None = None) -> None:
        self.path, self.split, self.indices = path, split, indices
        self._source: Any = None
        self._len: int | None = None if indices is None else int(len(indices))

    def _open(self) -> Any:
        if self._source is None:
            import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (tfds: seconds to import)

            builder = tfds.builder_from_directory(self.path)
            raw = tfds.decode.DeserializeMethod.RAW_BYTES
            self._source = builder.as_data_source(self.split, deserialize_method=raw)
        return self._source

    def __len__(self) -> int:
        if self._len is None:
            self._len = len(self._open())
        return self._len

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"Record {index} is out of range for {len(self)} records.")
        if self.indices is not None:
            index = int(self.indices[index])
        return parse_record(self._open()[index])

    def __getstate__(self) -> dict:
        return {"path": self.path, "split": self.split, "indices": self.indices, "_len": self._len}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._source = None

    def __repr__(self) -> str:
        selected = "" if self.indices is None else f", selected={len(self.indices)}"
        return f"RecordSource({self.path!r}, split={self.split!r}{selected})"


_ARRAY_DTYPES = {"pixel_spacing_mm": np.float32, "orig_shape": np.int32}


def parse_record(raw: bytes) -> dict[str, Any]:
    """A serialised record -> dict: `image` as PNG bytes, strings as str, `label` as int, arrays as numpy.

    The same result as TFDS's `deserialize_example_np` with the image left encoded, at a tenth of
    its cost (it matters: the pipeline parses every record of every epoch).
    """
    from tensorflow_datasets.proto import tf_example_pb2  # pylint: disable=g-import-not-at-top  (tfds: slow import)

    out: dict[str, Any] = {}
    for key, feature in tf_example_pb2.Example.FromString(raw).features.feature.items():
        kind = feature.WhichOneof("kind")
        values = getattr(feature, kind).value if kind else []
        if key == "image":
            out[key] = values[0]
        elif key in _ARRAY_DTYPES:
            out[key] = np.asarray(values, _ARRAY_DTYPES[key])
        elif kind == "bytes_list":
            out[key] = values[0].decode("utf-8") if values else ""
        elif key == "label":
            out[key] = int(values[0])
        elif key == "target":
            out[key] = float(values[0]) if len(values) else float("nan")
        else:  # a feature this reader does not know (newer schema): keep it as an array
            out[key] = np.asarray(values)
    return out

"""One DICOM file -> images (float32 in [0, 1], bone bright) + PHI-free metadata.

Why a module of its own: the order of the grey-scale pipeline decides the pixels, and the standard
(PS3.3 C.11, PS3.4 N.2) fixes it:

    stored values ──Modality LUT──▶ modality values ──VOI LUT──▶ values of interest
        ──Presentation LUT (MONOCHROME1 / INVERSE)──▶ P-values (bone bright)

* **Modality LUT**: Rescale Slope/Intercept, or a Modality LUT Sequence (pydicom's
  `apply_modality_lut`, the reference implementation of that step).
* **VOI LUT** (`DicomOptions.voi`): ``"window"`` uses Window Center/Width (item `window_index` when
  several; VOI LUT Function LINEAR, LINEAR_EXACT or SIGMOID, formulas of C.11.2.1.2), else a VOI LUT
  Sequence, else the image's own min-max; ``"none"`` maps the full range the Modality LUT can
  produce for the stored bit depth linearly to [0, 1] (nothing is clipped; a later normalisation
  step of the preprocessing variant decides contrast).
* **Inversion**: only MONOCHROME1 (minimum = white) is inverted, once. Presentation LUT Shape
  INVERSE appears with MONOCHROME1 in the DX IOD (where it asks for that same single inversion); on
  MONOCHROME2 it asks a viewer to show bone dark, which the bone-bright contract overrides (the file
  is read as MONOCHROME2 and a note is recorded).
* **Pixel padding**: Pixel Padding Value (and Range Limit) are matched on the *stored* values, before
  any LUT; the returned mask marks them so that crops and intensity statistics can ignore them. A
  value written with the other signedness than the pixels (US on signed pixels, SS on unsigned) is
  reinterpreted in the pixels' bit width.
* **Blank after windowing**: a window that maps (nearly) every pixel to one value — e.g. a window
  lying entirely below the stored values — is not used: the other windows of the file are tried,
  then the image's min-max; `voi_used` and the `notes` say so.

How it stays fast on 500,000 large radiographs: for integer pixel data of up to 16 bits the whole
chain (modality, VOI, inversion) is evaluated once on every possible stored value — a 65,536-entry
table — and applied to the image with one gather. That is exact (each step is a function of the
stored value alone) and costs a few milliseconds per image instead of several full-image float64
passes.

Files that are not images (SR, RT, presentation states, DICOMDIR, anything without Pixel Data),
colour images and undecodable transfer syntaxes raise `SkippedFile` with a short reason code; the
converter records the reason in its manifest. Before decoding, `dicom_checks` repairs what can be
repaired (missing transfer syntax, unusable LUT items; each with a note in `meta["notes"]`) and
checks the header against the pixel data and the pixel budget `DicomOptions.max_pixels`. Identifiers are hashed with the user's salt
(`anonymize.hash_id`); names, dates, accession numbers and institutions are never read out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import time
from typing import Any, Literal

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi, pixel_array

from afm_jax.data import anonymize, dicom_checks
from afm_jax.data.dicom_checks import DEFAULT_MAX_PIXELS, SkippedFile
from afm_jax.errors import DecodeError, TruncatedFileError

VoiMode = Literal["window", "none"]
FrameMode = Literal["first", "all", "skip"]
VOI_MODES = ("window", "none")
FRAME_MODES = ("first", "all", "skip")

_NON_IMAGE_SOP_WORDS = (
    "Structured Report",
    "SR Storage",
    "Presentation State",
    "Key Object",
    "Encapsulated",
    "Raw Data",
    "Waveform",
    "Spectroscopy",
    "Media Storage Directory",
    "Segmentation",
    "Registration",
    "Measurement Report",
    "RT Dose",
    "RT Plan",
    "RT Ion",
    "RT Structure",
    "RT Beams",
    "RT Treatment",
)


@dataclasses.dataclass(frozen=True)
class DicomOptions:
    """How to read a DICOM file. Part of a preprocessing variant (recorded in the dataset info)."""

    voi: VoiMode = "window"
    window_index: int = 0  # which Window Center/Width pair (or VOI LUT item) when there are several
    frames: FrameMode = "first"  # multi-frame files: first frame, every frame, or skip the file
    max_pixels: int = DEFAULT_MAX_PIXELS  # pixels decoded per file (Rows x Columns [x frames]); 0: no limit

    def __post_init__(self) -> None:
        if self.voi not in VOI_MODES:
            raise ValueError(f"voi must be one of {VOI_MODES}, got {self.voi!r}.")
        if self.frames not in FRAME_MODES:
            raise ValueError(f"frames must be one of {FRAME_MODES}, got {self.frames!r}.")
        if int(self.window_index) < 0:
            raise ValueError(f"window_index must be >= 0, got {self.window_index!r}.")
        if int(self.max_pixels) < 0:
            raise ValueError(f"max_pixels must be >= 0 (0: no limit), got {self.max_pixels!r}.")


@dataclasses.dataclass
class DicomImage:
    """One frame: `image` float32 (H, W) in [0, 1], bone bright; `padding` True where the stored value
    was Pixel Padding (None if the file declares none); `meta` PHI-free metadata (see `read_dicom`)."""

    image: np.ndarray
    padding: np.ndarray | None
    meta: dict[str, Any]


def read_dicom(path: str | os.PathLike, salt: bytes, options: DicomOptions = DicomOptions()) -> list[DicomImage]:
    """Reads one file and returns its frame(s) (one, unless `options.frames == "all"`).

    `meta` keys: patient_id, study_id, series_id, image_id (salted hashes; image_id gets a ``/f<k>``
    suffix before hashing for frames k > 0 of a multi-frame file), body_part, view, laterality,
    modality, manufacturer, pixel_spacing_mm ((row, column) mm or (nan, nan)), spacing_source,
    orig_shape, photometric, bits_stored, transfer_syntax, sop_class, voi_used, frame, num_frames,
    pixel_hash (SHA-256 of the decoded stored pixels — every frame, or the first with
    `frames="first"` — for exact-duplicate detection), notes (what was repaired or overridden, "; "-
    separated; "" when nothing).

    Raises SkippedFile for files that are deliberately not converted; any other exception means the
    file is broken (truncated, corrupt) and is the caller's to report.
    """
    dicom_checks.check_input_path(path)
    _inject_fault_for_tests(path)
    ds = _read_dataset(path)
    notes = dicom_checks.repair(ds)
    _check_is_image(ds)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise SkippedFile(f"not_monochrome:{photometric or 'missing'}")
    num_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if num_frames > 1 and options.frames == "skip":
        raise SkippedFile(f"multi_frame:{num_frames}")
    index = 0 if (num_frames > 1 and options.frames == "first") else None
    dicom_checks.check_before_decode(ds, all_frames=index is None, max_pixels=int(options.max_pixels))
    stored = _decode(ds, index)
    if stored.ndim == 2:
        stored = stored[None]
    if stored.ndim != 3:
        raise SkippedFile(f"not_monochrome:pixel array of shape {stored.shape}")
    digest = hashlib.sha256(f"{stored.dtype.str}{stored.shape}".encode())
    digest.update(memoryview(np.ascontiguousarray(stored)).cast("B"))  # no copy of the pixels
    pixel_hash = digest.hexdigest()[:32]

    transform, voi_used = grey_transform(ds, options, stored)
    first = transform(stored[0])  # kept: the LUT pass is the costliest step for uncompressed files
    if options.voi == "window" and not voi_used.startswith("minmax") and is_blank(first, padding_mask(ds, stored[0])):
        transform, used = _unblank(ds, options, stored, voi_used)
        notes.append(f"{voi_used} leaves the image blank; used {used}")
        voi_used, first = used, transform(stored[0])
    if photometric == "MONOCHROME2" and str(ds.get("PresentationLUTShape", "")).strip().upper() == "INVERSE":
        notes.append("Presentation LUT Shape INVERSE on MONOCHROME2 not applied (bone bright kept)")
    meta = _metadata(ds, salt)
    meta.update(
        photometric=photometric,
        bits_stored=int(ds.get("BitsStored", 0) or 0),
        voi_used=voi_used,
        notes="; ".join(notes),
        num_frames=num_frames,
        pixel_hash=pixel_hash,
        orig_shape=(int(stored.shape[1]), int(stored.shape[2])),
    )
    out = []
    for k, frame in enumerate(stored):
        frame_meta = dict(meta, frame=k)
        if k > 0:
            frame_meta["image_id"] = anonymize.hash_id(f"{meta['_sop_uid']}/f{k}", salt)
        out.append(DicomImage(first if k == 0 else transform(frame), padding_mask(ds, frame), frame_meta))
    for image in out:
        image.meta.pop("_sop_uid", None)
    return out


# ─── Reading and classifying ─────────────────────────────────────────────────────────────────────


def _read_dataset(path: str | os.PathLike) -> Any:

    try:
        return pydicom.dcmread(path)
    except InvalidDicomError:
        pass  # no preamble/'DICM': maybe a raw data set (old exports); accept only if it looks like one
    try:
        ds = pydicom.dcmread(path, force=True)
        if "SOPClassUID" in ds or "PixelData" in ds:
            ds.SOPClassUID  # pylint: disable=pointless-statement  (parse now: garbage fails here)
            return ds
    except Exception:  # pylint: disable=broad-except  (forced parse of a non-DICOM file)
        pass
    raise SkippedFile("not_dicom")


def _sop_class_name(ds: Any) -> str:
    uid = ds.get("SOPClassUID") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)
    if uid is None:
        return ""
    return str(getattr(uid, "name", uid))


def _inject_fault_for_tests(path: str | os.PathLike) -> None:
    """Test hook (fault injection): with AFM_JAX_TEST_DECODER_FAULT=<mode>:<text>[,<mode>:<text>...], a
    file whose path contains <text> makes this process abort (`abort`), hang (`hang`) or allocate
    without end (`oom`) — how a decoder crash on a hostile file looks from outside. Unset in normal use."""
    specs = [part.partition(":") for part in os.environ.get("AFM_JAX_TEST_DECODER_FAULT", "").split(",")]
    mode = next((m for m, _, text in specs if text and text in os.fspath(path)), "")
    if mode == "abort":
        os.abort()
    if mode == "hang":
        time.sleep(3600)
    if mode == "oom":
        hog = []
        while True:
            hog.append(np.ones(1 << 27, np.uint8))  # 128 MiB at a time, touched


def _check_is_image(ds: Any) -> None:
    media = str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "") or "")
    if media == "1.2.840.10008.1.3.10" or "DirectoryRecordSequence" in ds:
        raise SkippedFile("dicomdir")
    name = _sop_class_name(ds)
    if any(word in name for word in _NON_IMAGE_SOP_WORDS):
        raise SkippedFile(f"non_image:{name}")
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise SkippedFile("float_pixel_data")
        if "Rows" in ds and "Columns" in ds:  # the Image Pixel module without its Pixel Data: cut short
            raise TruncatedFileError(
                "the file ends before its Pixel Data element (Rows and Columns are given): truncated file"
            )
        raise SkippedFile(f"no_pixel_data:{name or 'unknown SOP class'}")


def transfer_syntax_name(ds: Any) -> str:
    """The transfer syntax's name (e.g. 'JPEG 2000 Image Compression (Lossless Only)')."""
    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return "" if uid is None else str(getattr(uid, "name", uid))


def _decode(ds: Any, index: int | None) -> np.ndarray:
    """Stored pixel values (no LUT applied), all frames or frame `index`."""

    try:
        if index is None:
            return ds.pixel_array
        return pixel_array(ds, index=index)
    except NotImplementedError as e:
        raise SkippedFile(f"unsupported_syntax:{transfer_syntax_name(ds)}") from e
    except (SkippedFile, DecodeError, MemoryError):
        raise
    except RuntimeError as e:
        text = str(e)
        if "missing dependencies" in text or "no pixel data decoders" in text.lower():
            raise SkippedFile(f"unsupported_syntax:{transfer_syntax_name(ds)}") from e
        if "raised by all available plugins" in text:  # a decodable syntax, broken data
            lines = [_plugin_error(line) for line in text.split("\n")[1:] if line.strip()]
            raise DecodeError(f"no decoder could read the pixel data ({_what(ds)}): " + "; ".join(lines)) from e
        raise DecodeError(f"decoding failed ({_what(ds)}): {type(e).__name__}: {text}") from e
    except Exception as e:  # pylint: disable=broad-except  (a decoder's own bug or odd data: say which)
        raise DecodeError(f"decoding failed ({_what(ds)}): {type(e).__name__}: {e}") from e


def _what(ds: Any) -> str:
    return (
        f"{transfer_syntax_name(ds) or 'no transfer syntax'}, {ds.get('Rows')}x{ds.get('Columns')}, "
        f"{ds.get('BitsStored')} bits stored"
    )


def _plugin_error(line: str) -> str:
    """One line of pydicom's 'raised by all available plugins' error, made readable."""
    plugin, _, message = line.strip().partition(":")
    message = message.strip()
    if "'NoneType' object has no attribute" in message:
        message = "the library returned no image (corrupt data, or a size it cannot allocate)"
    return f"{plugin} failed: {message or 'no message (corrupt data, or a size it cannot allocate)'}"


# ─── Grey-scale transform ────────────────────────────────────────────────────────────────────────


def grey_transform(ds: Any, options: DicomOptions, stored: np.ndarray, *, minmax: bool = False):
    """(function stored frame -> float32 [0, 1] bone bright, description of the VOI step used).

    Integer data of up to 16 bits goes through one table over every possible stored value; other
    data (32-bit, float) through the same steps applied to the array. `minmax`: use the image's own
    min-max instead of the file's VOI (the fallback for a window that blanks the image)."""
    invert = str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1"
    dtype = stored.dtype
    if dtype.kind in "ui" and dtype.itemsize <= 2:
        unsigned = np.dtype(f"u{dtype.itemsize}")
        domain = np.arange(1 << (8 * dtype.itemsize), dtype=np.int64).astype(unsigned).view(dtype)
        table, voi_used = _chain(ds, options, domain, stored, _stored_range(ds, dtype), minmax)
        table = (1.0 - table if invert else table).astype(np.float32)

        def transform(frame: np.ndarray) -> np.ndarray:
            return table[frame.view(unsigned)]

        return transform, voi_used

    def direct(frame: np.ndarray) -> np.ndarray:
        values, _ = _chain(ds, options, frame, frame, (float(np.min(frame)), float(np.max(frame))), minmax)
        return (1.0 - values if invert else values).astype(np.float32)

    return direct, _chain(ds, options, stored[:1, :1, :1].reshape(-1), stored, (0.0, 1.0), minmax)[1]


def is_blank(frame: np.ndarray, padding: np.ndarray | None = None, *, spread: float = 1 / 1024) -> bool:
    """True if the non-padding pixels of a [0, 1] frame are (nearly) one value: the 0.5th and 99.5th
    percentiles (of at most ~65k evenly sampled pixels) lie closer than `spread`."""
    step = max(1, int(math.ceil(math.sqrt(frame.size / 65536))))
    values = frame[::step, ::step]
    if padding is not None:
        values = values[~padding[::step, ::step]]
    if values.size == 0:
        return False  # all padding: the padding check, not this one, decides
    lo, hi = np.percentile(values, (0.5, 99.5))
    return bool(hi - lo < spread)


def _unblank(ds: Any, options: DicomOptions, stored: np.ndarray, used: str):
    """(transform, description) for a file whose VOI step `used` blanks the image: another window of
    the file that does not, else the image's min-max."""
    centres = ds.get("WindowCenter")
    count = len(centres) if hasattr(centres, "__len__") and not isinstance(centres, (str, bytes)) else 0
    mask = padding_mask(ds, stored[0])
    for k in range(count):
        if k == options.window_index:
            continue
        transform, voi_used = grey_transform(ds, dataclasses.replace(options, window_index=k), stored)
        if voi_used.startswith("window") and not is_blank(transform(stored[0]), mask):
            return transform, voi_used
    transform, _ = grey_transform(ds, options, stored, minmax=True)
    return transform, "minmax (the file's window blanks the image)"


def _stored_range(ds: Any, dtype: np.dtype) -> tuple[float, float]:
    """The range of values the stored bits can hold (Bits Stored, Pixel Representation)."""
    bits = int(ds.get("BitsStored", 8 * dtype.itemsize) or 8 * dtype.itemsize)
    bits = min(max(bits, 1), 8 * dtype.itemsize)
    if dtype.kind == "i":
        return -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    return 0.0, 2.0**bits - 1


def _chain(
    ds: Any,
    options: DicomOptions,
    values: np.ndarray,
    image: np.ndarray,
    stored_range: tuple[float, float],
    minmax: bool = False,
) -> tuple[np.ndarray, str]:
    """Modality LUT then VOI on `values`; returns float64 in [0, 1] and the VOI step's description.

    `image` (the stored pixels) is only used for the min-max fallback, `stored_range` for `voi="none"`.
    """

    modality = np.asarray(apply_modality_lut(values, ds), dtype=np.float64)
    if minmax:
        lo, hi = _modality_min_max(ds, image)
        return _linear(modality, lo, hi), "minmax"
    if options.voi == "window":
        windowed = _apply_window(modality, ds, options.window_index)
        if windowed is not None:
            return windowed
        lut = _apply_voi_lut_sequence(modality, values, ds, options.window_index)
        if lut is not None:
            return lut
        lo, hi = _modality_min_max(ds, image)
        return _linear(modality, lo, hi), "minmax (no valid window in file)"
    lo, hi = _modality_range(ds, stored_range)
    return _linear(modality, lo, hi), "none"


def _linear(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if not hi > lo:
        return np.zeros_like(x, dtype=np.float64)
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0)


def _modality_range(ds: Any, stored_range: tuple[float, float]) -> tuple[float, float]:
    """Min and max of the Modality LUT's output over the stored range."""

    ends = np.asarray(stored_range, dtype=np.float64)
    if "ModalityLUTSequence" in ds:
        dtype = np.uint16 if stored_range[0] >= 0 else np.int16
        domain = np.arange(int(stored_range[0]), int(stored_range[1]) + 1).astype(dtype)
        out = np.asarray(apply_modality_lut(domain, ds), np.float64)
    else:
        out = np.asarray(apply_modality_lut(ends, ds), np.float64)
    return float(out.min()), float(out.max())


def _modality_min_max(ds: Any, image: np.ndarray) -> tuple[float, float]:
    """Min and max of the Modality LUT's output over the image's own (non-padding) stored values."""

    mask = padding_mask(ds, image)
    values = image[~mask] if mask is not None and (~mask).any() else image
    # Rescale is monotonic, so the ends of the stored values map to the ends; a Modality LUT Sequence
    # need not be, so every value goes through it.
    if "ModalityLUTSequence" not in ds:
        values = np.asarray([values.min(), values.max()], dtype=image.dtype)
    out = np.asarray(apply_modality_lut(values, ds), np.float64)
    return float(out.min()), float(out.max())


def _nth(value: Any, index: int) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or hasattr(value, "__getitem__") and not isinstance(value, str):
        items = list(value)
        if not items:
            return None
        return float(items[min(index, len(items) - 1)])
    return float(value)


def _apply_window(x: np.ndarray, ds: Any, index: int) -> tuple[np.ndarray, str] | None:
    """Window Center/Width per PS3.3 C.11.2.1.2, output scaled to [0, 1]; None if the file has none or
    only an invalid one (width < 1 for LINEAR, <= 0 otherwise), so that the next VOI source is used."""
    try:
        centre, width = _nth(ds.get("WindowCenter"), index), _nth(ds.get("WindowWidth"), index)
    except (TypeError, ValueError):
        return None
    if centre is None or width is None or not math.isfinite(centre) or not math.isfinite(width):
        return None
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if width < (1.0 if function not in ("LINEAR_EXACT", "SIGMOID") else np.finfo(np.float64).tiny):
        return None  # a width the standard forbids (e.g. 0 written by a broken modality): not a window
    return window(x, centre, width, function), f"window[{index}] {function} c={centre:g} w={width:g}"


def window(x: np.ndarray, centre: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """The VOI window of PS3.3 C.11.2.1.2 with output range [0, 1] (y_min = 0, y_max = 1).

    LINEAR:        x <= c - 0.5 - (w-1)/2 -> 0;  x > c - 0.5 + (w-1)/2 -> 1;  else ((x - (c-0.5)) / (w-1) + 0.5)
    LINEAR_EXACT:  x <= c - w/2 -> 0;  x > c + w/2 -> 1;  else (x - c) / w + 0.5
    SIGMOID:       1 / (1 + exp(-4 (x - c) / w))
    """
    x = np.asarray(x, dtype=np.float64)
    if function == "SIGMOID":
        if width <= 0:
            raise ValueError(f"Window Width must be > 0 for SIGMOID, got {width}.")
        return 1.0 / (1.0 + np.exp(-4.0 * (x - centre) / width))
    if function == "LINEAR_EXACT":
        if width <= 0:
            raise ValueError(f"Window Width must be > 0 for LINEAR_EXACT, got {width}.")
        y = (x - centre) / width + 0.5
        y = np.where(x <= centre - width / 2, 0.0, np.where(x > centre + width / 2, 1.0, y))
        return np.clip(y, 0.0, 1.0)
    if width < 1:
        raise ValueError(f"Window Width must be >= 1 for LINEAR, got {width}.")
    lo, hi = centre - 0.5 - (width - 1) / 2, centre - 0.5 + (width - 1) / 2
    y = (x - (centre - 0.5)) / max(width - 1, 1e-12) + 0.5
    return np.clip(np.where(x <= lo, 0.0, np.where(x > hi, 1.0, y)), 0.0, 1.0)


def _apply_voi_lut_sequence(x: np.ndarray, values: np.ndarray, ds: Any, index: int) -> tuple[np.ndarray, str] | None:
    """VOI LUT Sequence item `index` (pydicom's implementation), output scaled by the LUT's bit depth."""

    sequence = ds.get("VOILUTSequence")
    if not sequence:
        return None
    item = sequence[min(index, len(sequence) - 1)]
    descriptor = item.LUTDescriptor
    bits = int(descriptor[2]) if int(descriptor[2]) > 0 else 16
    # The LUT's input is the modality output; pydicom indexes with it (rounded, clipped to the table).
    out = np.asarray(apply_voi(np.rint(x).astype(np.int64), ds, index=min(index, len(sequence) - 1)), np.float64)
    return np.clip(out / (2.0**bits - 1), 0.0, 1.0), f"voi_lut[{index}]"


def padding_mask(ds: Any, stored: np.ndarray) -> np.ndarray | None:
    """True where the stored value is Pixel Padding (Value, or the range up to Range Limit)."""
    value = ds.get("PixelPaddingValue")
    if value is None or isinstance(value, (bytes, bytearray)):
        return None
    limit = ds.get("PixelPaddingRangeLimit")
    ends = [int(value)] if limit is None or isinstance(limit, (bytes, bytearray)) else [int(value), int(limit)]
    bits = 8 * stored.dtype.itemsize
    if stored.dtype.kind == "u":  # written with the wrong VR (SS on unsigned pixels): reinterpret as unsigned
        ends = [e & ((1 << bits) - 1) if e < 0 else e for e in ends]
    elif stored.dtype.kind == "i":  # US on signed pixels: the same bits read as two's complement
        ends = [e - (1 << bits) if e >= (1 << (bits - 1)) else e for e in ends]
    lo, hi = min(ends), max(ends)
    mask = (stored >= lo) & (stored <= hi)
    return mask if mask.any() else None


# ─── Metadata ────────────────────────────────────────────────────────────────────────────────────


def _text(ds: Any, *keywords: str) -> str:
    for keyword in keywords:
        value = ds.get(keyword)
        if value is not None and str(value).strip():
            return " ".join(str(value).split()).upper()[:64]
    return ""


def _spacing(ds: Any) -> tuple[tuple[float, float], str]:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        try:
            if value is not None and len(value) == 2:
                row, col = float(value[0]), float(value[1])
                if row > 0 and col > 0:
                    return (row, col), keyword
        except (TypeError, ValueError):
            continue
    return (math.nan, math.nan), ""


def patient_key(ds: Any) -> tuple[str, str]:
    """(raw key, its source): what `patient_id` is the salted hash of. The Patient ID; without one the
    study stands in for the patient (keeps one study's images in one split), else the instance.
    ("", "") when the file has none of them. Never write the raw key anywhere: hash it."""
    patient = str(ds.get("PatientID", "") or "").strip()
    if patient:
        return patient, "PatientID"
    study = str(ds.get("StudyInstanceUID", "") or "")
    sop = str(
        ds.get("SOPInstanceUID", "") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPInstanceUID", "") or ""
    )
    if study:
        return f"study:{study}", "StudyInstanceUID"
    return (f"study:{sop}", "SOPInstanceUID") if sop else ("", "")


def _metadata(ds: Any, salt: bytes) -> dict[str, Any]:
    """PHI-free metadata: hashed identifiers, acquisition descriptors; names, dates, accession numbers
    and institutions are not read at all."""
    sop = str(
        ds.get("SOPInstanceUID", "") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPInstanceUID", "") or ""
    )
    study = str(ds.get("StudyInstanceUID", "") or "")
    series = str(ds.get("SeriesInstanceUID", "") or "")
    if not sop:
        raise SkippedFile("no_sop_instance_uid")
    key, patient_source = patient_key(ds)
    spacing, spacing_source = _spacing(ds)
    return {
        "patient_id": anonymize.hash_id(key, salt),
        "patient_id_source": patient_source,
        "study_id": anonymize.hash_id(study, salt) if study else "",
        "series_id": anonymize.hash_id(series, salt) if series else "",
        "image_id": anonymize.hash_id(sop, salt),
        "_sop_uid": sop,  # removed before read_dicom returns
        "body_part": _text(ds, "BodyPartExamined"),
        "view": _text(ds, "ViewPosition"),
        "laterality": _text(ds, "ImageLaterality", "Laterality"),
        "modality": _text(ds, "Modality"),
        "manufacturer": _text(ds, "Manufacturer"),
        "pixel_spacing_mm": spacing,
        "spacing_source": spacing_source,
        "transfer_syntax": transfer_syntax_name(ds),
        "sop_class": _sop_class_name(ds),
    }

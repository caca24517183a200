"""Checks and repairs of a DICOM data set before its pixel data is decoded.

Why a module of its own: a 500,000-file hospital archive certainly holds files whose headers lie —
a JPEG 2000 codestream claiming 60000×60000 pixels in a 512×512 image, pixel data shorter than
Rows × Columns × frames × bits, an empty Modality LUT Sequence item, a raw data set without file
meta. Decoders meet such files with a crash (``std::bad_alloc`` -> abort), an unreadable message or
a silent wrong image. What can be checked from the header is checked here, cheaply and before any
decoder allocates memory; what cannot (a decoder crash on data that looks fine) is the job of
`decode_isolation`, which runs each file in a child process.

* `check_input_path`: the input entry is a regular file (a dangling symlink is a failure, a FIFO or a
  device is skipped — reading one would block or never end).
* `repair`: fixes what a reader can fix and returns notes for the manifest: a missing transfer
  syntax (raw data set, or file meta without the element) is taken from the encoding pydicom
  detected with ``force=True``; Modality LUT / VOI LUT Sequence items that pydicom cannot apply are
  dropped (rescale, the next VOI source or min-max is used instead).
* `check_before_decode`: Rows, Columns, frames, bits are present and sane; the number of pixels to
  decode is within the budget `max_pixels` (else the file is skipped as ``too_many_pixels``);
  native pixel data is at least as long as the header says; a JPEG 2000 codestream's own size (its
  SIZ marker) equals Rows × Columns.
"""

from __future__ import annotations

import os
import stat
import struct
from typing import Any

import numpy as np

from afm_jax.errors import DecodeError, TruncatedFileError

DEFAULT_MAX_PIXELS = 100_000_000  # 100 megapixels: 4x the largest CR/DX/MG detector (~43x43 cm at 0.07 mm)

_J2K_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.4.91",
        "1.2.840.10008.1.2.4.92",
        "1.2.840.10008.1.2.4.93",
        "1.2.840.10008.1.2.4.201",
        "1.2.840.10008.1.2.4.202",
        "1.2.840.10008.1.2.4.203",
    }
)


class SkippedFile(Exception):
    """The file is deliberately not converted; `reason` is a short code for the manifest
    (e.g. ``not_dicom``, ``no_pixel_data``, ``non_image:Basic Text SR Storage``). Defined here, the
    lower of the two modules; `dicom.SkippedFile` is the same class."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def check_input_path(path: str | os.PathLike) -> None:
    """Raises for an input entry that is not a regular file: FileNotFoundError for a dangling
    symbolic link, `SkippedFile("missing_file")` for a path that does not exist, `SkippedFile("not_a_regular_file:
    <kind>")` for a folder, FIFO, socket or device."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            raise FileNotFoundError("dangling symbolic link: its target does not exist") from None
        raise SkippedFile("missing_file") from None
    if not stat.S_ISREG(mode):
        kind = (
            "folder"
            if stat.S_ISDIR(mode)
            else "fifo"
            if stat.S_ISFIFO(mode)
            else "socket"
            if stat.S_ISSOCK(mode)
            else "device"
        )
        raise SkippedFile(f"not_a_regular_file:{kind}")


# ─── Repairs ─────────────────────────────────────────────────────────────────────────────────────


def repair(ds: Any) -> list[str]:
    """Fixes a missing transfer syntax and drops LUT items pydicom cannot apply; returns notes."""
    notes = []
    note = _assume_transfer_syntax(ds)
    if note:
        notes.append(note)
    notes += _drop_unusable_luts(ds)
    return notes


def _assume_transfer_syntax(ds: Any) -> str:
    from pydicom.dataset import FileMetaDataset  # pylint: disable=g-import-not-at-top
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian  # pylint: disable=g-import-not-at-top

    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID"):
        return ""
    if "PixelData" in ds and _looks_encapsulated(ds):
        return ""  # compressed data of an unknown syntax: nothing to assume (decoding reports it)
    implicit, little = getattr(ds, "original_encoding", (True, True))
    if implicit is None:
        implicit, little = True, True
    uid = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    meta.TransferSyntaxUID = uid
    return f"no transfer syntax in the file meta: assumed {uid.name} (the encoding of the data set)"


def _looks_encapsulated(ds: Any) -> bool:
    value = ds.get("PixelData")
    return isinstance(value, (bytes, bytearray)) and value[:4] == b"\xfe\xff\x00\xe0"


def _drop_unusable_luts(ds: Any) -> list[str]:
    """Modality LUT and VOI LUT Sequence items that pydicom's LUT functions cannot apply (empty item,
    missing or short LUT Data, a bad descriptor) are removed, with a note each."""
    from pydicom.pixels import apply_modality_lut, apply_voi  # pylint: disable=g-import-not-at-top

    notes = []
    probe = np.zeros(2, np.uint16 if int(ds.get("PixelRepresentation", 0) or 0) == 0 else np.int16)
    if "ModalityLUTSequence" in ds:
        try:
            if not ds.ModalityLUTSequence:
                raise ValueError("empty sequence")
            _lut_shape_ok(ds.ModalityLUTSequence[0])
            apply_modality_lut(probe, ds)
        except Exception as e:  # pylint: disable=broad-except  (any malformation: fall back)
            del ds.ModalityLUTSequence
            notes.append(
                f"unusable Modality LUT Sequence ignored ({_short(e)}); "
                + ("Rescale Slope/Intercept used" if "RescaleSlope" in ds else "identity used")
            )
    if "VOILUTSequence" in ds:
        kept = []
        for k, item in enumerate(ds.VOILUTSequence):
            try:
                _lut_shape_ok(item)
                apply_voi(probe.astype(np.int64), _with_voi_items(ds, [item]), index=0)
                kept.append(item)
            except Exception as e:  # pylint: disable=broad-except
                notes.append(f"unusable VOI LUT Sequence item {k} ignored ({_short(e)})")
        if not kept:
            del ds.VOILUTSequence
        elif len(kept) < len(ds.VOILUTSequence):
            ds.VOILUTSequence = kept
    return notes


def _lut_shape_ok(item: Any) -> None:
    descriptor = item.get("LUTDescriptor")
    data = item.get("LUTData")
    if descriptor is None or len(descriptor) != 3:
        raise ValueError("no LUT Descriptor of 3 values")
    if data is None or len(data) == 0:
        raise ValueError("no LUT Data")


def _with_voi_items(ds: Any, items: list) -> Any:
    from pydicom.dataset import Dataset  # pylint: disable=g-import-not-at-top

    probe = Dataset()
    for keyword in ("BitsStored", "PixelRepresentation"):
        if keyword in ds:
            setattr(probe, keyword, ds.get(keyword))
    probe.VOILUTSequence = items
    return probe


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())[:80]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# ─── Header checks ───────────────────────────────────────────────────────────────────────────────


def check_before_decode(ds: Any, *, all_frames: bool, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Raises DecodeError (header inconsistent with the pixel data), TruncatedFileError (pixel data
    shorter than the header says) or `SkippedFile("too_many_pixels:...")` (over the `max_pixels` budget;
    0 = no budget) — before a decoder touches the data."""

    def number(keyword: str) -> int:
        value = ds.get(keyword)
        try:
            return int(value)
        except (TypeError, ValueError):
            raise DecodeError(f"{keyword} is {value!r}: an image needs a positive whole number") from None

    rows, cols, bits = number("Rows"), number("Columns"), number("BitsAllocated")
    frames = int(ds.get("NumberOfFrames", 1) or 1) if str(ds.get("NumberOfFrames", 1) or 1).strip().isdigit() else -1
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if rows < 1 or cols < 1 or frames < 1:
        raise DecodeError(
            f"Rows {rows}, Columns {cols}, Number of Frames {ds.get('NumberOfFrames', 1)!r}: not an image size"
        )
    if bits not in (1, 8, 16, 32, 64):
        raise DecodeError(f"Bits Allocated is {bits}; DICOM allows 1, 8, 16, 32 or 64")
    decoded = rows * cols * (frames if all_frames else 1)
    if max_pixels and decoded > max_pixels:
        raise SkippedFile(f"too_many_pixels:{rows}x{cols}x{frames if all_frames else 1}>{max_pixels}")
    uid = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    data = ds.get("PixelData")
    if not isinstance(data, (bytes, bytearray)):
        return  # a deferred or unusual value: the decoder checks
    if _looks_encapsulated(ds) or uid in _J2K_SYNTAXES:
        if uid in _J2K_SYNTAXES:
            _check_j2k_size(data, rows, cols)
        return
    needed = -(-rows * cols * frames * samples * bits // 8)
    if len(data) < needed:
        raise TruncatedFileError(
            f"the pixel data holds {len(data)} bytes, but {rows}x{cols} pixels x {frames} "
            f"frame(s) x {samples} sample(s) x {bits} bits need {needed}: truncated file "
            "or a wrong header"
        )


def _check_j2k_size(data: bytes, rows: int, cols: int) -> None:
    """The first frame's JPEG 2000 SIZ marker (image size the decoder will allocate) vs Rows x Columns."""
    from pydicom.encaps import generate_fragments  # pylint: disable=g-import-not-at-top

    try:
        first = next((f for k, f in enumerate(generate_fragments(data)) if k > 0 and len(f)), None)
    except Exception as e:  # pylint: disable=broad-except
        raise DecodeError(f"the encapsulated pixel data is malformed ({_short(e)})") from None
    if first is None:
        raise TruncatedFileError("the encapsulated pixel data holds no fragment with image data")
    at = bytes(first[:65536]).find(b"\xff\x4f\xff\x51")  # SOC then SIZ (possibly inside a JP2 box)
    if at < 0 or len(first) < at + 4 + 22:
        raise DecodeError("the JPEG 2000 data has no codestream header (SOC/SIZ markers): corrupt or truncated")
    xsiz, ysiz, xo, yo = struct.unpack(">IIII", bytes(first[at + 8 : at + 24]))
    width, height = xsiz - xo, ysiz - yo
    if (height, width) != (rows, cols):
        raise DecodeError(
            f"the JPEG 2000 codestream says {height}x{width} pixels, the DICOM header "
            f"{rows}x{cols}: a broken or forged file (a decoder would allocate the former)"
        )

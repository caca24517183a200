"""Per-image quality signals and the filters that turn them into removal reasons.

Each signal is one number per image, cheap enough for 500k radiographs: the decoded image is
area-downsampled to a small working copy (long side `work_size`) and every signal is a histogram
statistic or one morphological operation on it, ~1 ms per image. The signals go into the manifest
so a user can re-threshold without rescanning; the filters (`quality_reasons`) compare them with
the config thresholds (afm_jax.data.curation.config).

Conventions: float image in [0, 1], bone bright. Over-exposure darkens a film, under-exposure
washes it out; metal (implants) is solid clipped white; burned-in text and side markers are thin
bright strokes that a white top-hat isolates from the (thicker, dimmer) bone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np

from afm_jax.data import records
from afm_jax.data.curation.config import METADATA_PREFIX, QUALITY_REASONS, csv_items, parse_field_rules

SIGNAL_NAMES = (
    "mean",
    "std",
    "p01",
    "p05",
    "p50",
    "p95",
    "p99",
    "dynamic_range",
    "dark_fraction",
    "bright_fraction",
    "metal_fraction",
    "text_fraction",
    "field_mm",
    "height",
    "width",
)
WHITE_LEVEL = 0.98  # "clipped white": metal, saturation
DARK_LEVEL = 0.02  # "clipped black"
TEXT_CONTRAST = 0.35  # a stroke must stand this much above its surroundings (white top-hat)
# Record fields that are identifiers or labels, never metadata to filter on.
NON_METADATA_FIELDS = frozenset(
    {
        "image",
        *records.ID_KEYS,
        "label",
        "label_name",
        "fracture_type",
        "pixel_spacing_mm",
        "orig_shape",
    }
)


def working_copy(pixels: np.ndarray, work_size: int) -> np.ndarray:
    """Integer or float (H, W[, 1]) pixels -> float32 (h, w) in [0, 1], long side <= work_size (area)."""
    image = pixels[..., 0] if pixels.ndim == 3 else pixels
    if image.dtype == np.uint16:
        image = image.astype(np.float32) * np.float32(1 / 65535)
    elif image.dtype == np.uint8:
        image = image.astype(np.float32) * np.float32(1 / 255)
    else:
        image = image.astype(np.float32, copy=False)
    scale = work_size / max(image.shape)
    if scale < 1.0:
        size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    return image


def _kernel(small: np.ndarray) -> np.ndarray:
    """An odd square structuring element of ~1/24 of the working image (3 px at 64, 5 px at 128)."""
    k = max(3, int(round(max(small.shape) / 24)) | 1)
    return cv2.getStructuringElement(cv2.MORPH_RECT, (k, k))


def image_signals(
    pixels: np.ndarray,
    *,
    work_size: int = 128,
    pixel_spacing_mm: Sequence[float] | None = None,
    orig_shape: Sequence[int] | None = None,
    stored_shape: Sequence[int] | None = None,
) -> dict[str, float]:
    """The quality signals of one image (see SIGNAL_NAMES).

    - mean, std, p01..p99: intensity statistics; dynamic_range = p99 - p01.
    - dark_fraction / bright_fraction: pixels <= 0.02 / >= 0.98 (clipped).
    - metal_fraction: clipped-white area that survives a morphological opening (solid regions,
      not strokes) — implants, but also large saturated areas.
    - text_fraction: area of thin strokes standing > 0.35 above their surroundings (white top-hat).
    - field_mm: short side of the field of view in mm: `stored_shape` x `pixel_spacing_mm` (NaN if
      the spacing is unknown). In our records the spacing is that of the *stored* (cropped, resized)
      pixels (docs/design-notes.md), so the shape must be the stored image's, not `orig_shape` — the
      DICOM's rows x columns would overstate the field by the resize factor. Without `stored_shape`,
      `orig_shape` (else the shape of `pixels`) is taken as the shape the spacing refers to.
    - height, width: `orig_shape` (the acquisition's size; the duplicate representative rule prefers
      the larger), else the shape of `pixels`.
    """
    small = working_copy(pixels, work_size)
    p01, p05, p50, p95, p99 = np.percentile(small, (1, 5, 50, 95, 99))
    kernel = _kernel(small)
    white = (small >= WHITE_LEVEL).astype(np.uint8)
    metal = cv2.morphologyEx(white, cv2.MORPH_OPEN, kernel)
    tophat = cv2.morphologyEx(small, cv2.MORPH_TOPHAT, kernel)
    h, w = (int(s) for s in (orig_shape if orig_shape is not None and len(orig_shape) == 2 else pixels.shape[:2]))
    rows, cols = (int(s) for s in stored_shape[:2]) if stored_shape is not None else (h, w)
    field = math.nan
    if pixel_spacing_mm is not None and len(pixel_spacing_mm) == 2 and all(np.isfinite(pixel_spacing_mm)):
        field = float(min(rows * float(pixel_spacing_mm[0]), cols * float(pixel_spacing_mm[1])))
    return {
        "mean": float(small.mean()),
        "std": float(small.std()),
        "p01": float(p01),
        "p05": float(p05),
        "p50": float(p50),
        "p95": float(p95),
        "p99": float(p99),
        "dynamic_range": float(p99 - p01),
        "dark_fraction": float((small <= DARK_LEVEL).mean()),
        "bright_fraction": float(white.mean()),
        "metal_fraction": float(metal.mean()),
        "text_fraction": float((tophat > TEXT_CONTRAST).mean()),
        "field_mm": field,
        "height": float(h),
        "width": float(w),
    }


def metadata_fields(record: Mapping[str, Any]) -> dict[str, str]:
    """The string metadata of a record (body_part, view, modality and any newer field such as
    series_description or image_type), identifiers and labels excluded. Multi-valued fields (an
    unknown feature comes back as an array of bytes) are joined with backslashes, as DICOM does."""
    out = {}
    for key, value in record.items():
        if key in NON_METADATA_FIELDS:
            continue
        if isinstance(value, str):
            out[key] = value
        elif isinstance(value, bytes):
            out[key] = value.decode("utf-8", "replace")
        elif isinstance(value, np.ndarray) and value.dtype.kind in "SOU":
            out[key] = "\\".join(
                v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in value.ravel()
            )
    return out


def quality_reasons(signals: Mapping[str, float], quality_cfg: Mapping[str, Any]) -> list[str]:
    """The quality reasons (QUALITY_REASONS order) whose threshold `signals` cross."""
    q = quality_cfg
    checks = {
        "blank": signals["std"] < q["blank_max_std"],
        "underexposed": signals["p05"] > q["underexposed_min_p05"],
        "overexposed": signals["p95"] < q["overexposed_max_p95"],
        "saturated": signals["bright_fraction"] > q["saturated_max_bright_fraction"],
        "low_contrast": signals["dynamic_range"] < q["low_contrast_max_range"],
        "metal": signals["metal_fraction"] > q["metal_max_fraction"],
        "text": signals["text_fraction"] > q["text_max_fraction"],
        "tiny_fov": bool(np.isfinite(signals["field_mm"])) and signals["field_mm"] < q["tiny_fov_min_mm"],
    }
    disabled = set(csv_items(q.get("disable", "")))
    return [r for r in QUALITY_REASONS if checks[r] and r not in disabled]


class MetadataFilter:
    """Allow/deny rules over string fields, parsed once from the config (see config.metadata).

    allow: the field must *equal* one of the values (case-insensitive); an empty or absent field
    passes, since an unknown body part is no evidence of a wrong one. deny: the field must not
    *contain* any of the values (e.g. image_type "ORIGINAL\\PRIMARY\\LOCALIZER").
    """

    def __init__(self, allow: str, deny: str) -> None:
        self.allow = parse_field_rules(allow, "metadata.allow")
        self.deny = parse_field_rules(deny, "metadata.deny")

    def reasons(self, fields: Mapping[str, str]) -> list[str]:
        """ "metadata:<field>" for each field that breaks a rule."""
        out = []
        for field, values in self.allow.items():
            value = fields.get(field, "").strip().upper()
            if value and value not in values:
                out.append(METADATA_PREFIX + field)
        for field, values in self.deny.items():
            value = fields.get(field, "").upper()
            if value and any(v in value for v in values) and METADATA_PREFIX + field not in out:
                out.append(METADATA_PREFIX + field)
        return out

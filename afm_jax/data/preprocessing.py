"""Named, versioned preprocessing variants: from a DICOM frame ([0, 1], bone bright) to stored pixels.

Preprocessing is an experiment variable ("how does it change the foundation model?"), so each
variant is a named, frozen set of parameters with a version number; the full parameter set is
written into the dataset info (`records.read_info(path)["preprocessing"]`), and the dataset name
carries the variant name, so two variants of one source live side by side.

Steps, in order (each one optional, all parameters in `Variant`):

1. **Field crop** (`crop_field`): remove collimation borders and blank margins — rows/columns at the
   edges that are (nearly) uniform, or pixel padding — measured on a small thumbnail. "Nearly
   uniform" is relative to the image: a line's std below `crop_threshold` × the thumbnail's value
   range (so a low-contrast windowed image keeps its field).
2. **Canonical laterality** (`flip_to`): mirror images of the other side left-right (the record's
   `laterality` keeps the side that was imaged).
3. **Resize** (`image_size`): longest side to `image_size` (aspect kept; area interpolation when
   shrinking, never enlarged unless `upscale`), then optionally padded to a square (`pad_square`).
4. **Intensity normalisation** (`normalization`): ``window`` (the DICOM VOI window as read; nothing
   more), ``percentile`` (clip to the `percentiles` of the non-padding pixels, stretch to [0, 1]),
   ``minmax``, ``equalize`` (global histogram equalisation over `histogram_bins` bins), ``clahe``
   (OpenCV CLAHE on 16-bit data, `clahe_clip` and `clahe_tiles`).
5. **Bit depth** (`bit_depth`): 16 stores the full uint16 range; 8 quantises to 256 levels (stored
   as multiples of 257 in the uint16 PNG the record schema requires, so readers need not care).
6. **Content check** (`reject_blank`): an output whose non-padding pixels are (nearly) one value
   (0.5–99.5th percentile spread under 1/1024) is not stored: `BlankImage` (a `SkippedFile` with
   reason ``blank_after_windowing``). `dicom.read_dicom` has already replaced a window that blanks
   the image by another window or the min-max, so what is left here are images with no content.

Normalising after resizing makes the statistics cheap (a 512² image, not a 3000² one); area
interpolation is linear, so min-max and window results are the same up to rounding, and percentiles
of a slightly smoothed image are what we want anyway (single hot pixels do not set the range).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import warnings
from typing import Any

import cv2
import numpy as np

from afm_jax.data.dicom import DEFAULT_MAX_PIXELS, DicomOptions, SkippedFile, is_blank  # noqa: F401  (re-exported)

NORMALIZATIONS = ("window", "percentile", "minmax", "equalize", "clahe")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One preprocessing variant. `name` + `version` identify it; change `version` whenever a change
    of code or parameters changes the pixels."""

    name: str
    version: int = 1
    description: str = ""
    image_size: int = 512  # longest side after resizing; 0 keeps the (cropped) size
    upscale: bool = False  # also enlarge images smaller than image_size
    pad_square: bool = False  # pad (bottom/right, value 0) to image_size x image_size
    normalization: str = "percentile"
    percentiles: tuple[float, float] = (0.5, 99.5)
    histogram_bins: int = 4096
    clahe_clip: float = 2.0
    clahe_tiles: int = 8
    bit_depth: int = 16
    crop_field: bool = True
    crop_threshold: float = 0.01  # a row/column is blank if its std is below this (image range 0..1)
    crop_max_fraction: float = 0.4  # never remove more than this fraction of a side
    flip_to: str = ""  # "", "L" or "R": mirror images of the other laterality
    voi: str = "window"  # DicomOptions.voi: read with the file's VOI window, or "none"
    window_index: int = 0
    frames: str = "first"  # DicomOptions.frames: "first", "all", "skip"
    png_compression: int = 1  # zlib level for the stored PNGs (1: fastest, Huffman only; 0 stored; 9 smallest)
    max_pixels: int = DEFAULT_MAX_PIXELS  # DicomOptions.max_pixels: larger files are skipped (too_many_pixels)

    def __post_init__(self) -> None:
        problems = []
        if not self.name or not self.name.replace("_", "").isalnum() or self.name.lower() != self.name:
            problems.append(f"name {self.name!r} must be lower_snake_case")
        if self.normalization not in NORMALIZATIONS:
            problems.append(f"normalization {self.normalization!r} must be one of {NORMALIZATIONS}")
        if self.bit_depth not in (8, 16):
            problems.append(f"bit_depth {self.bit_depth!r} must be 8 or 16")
        if self.image_size < 0 or (self.pad_square and self.image_size == 0):
            problems.append(f"image_size {self.image_size!r} must be >= 0 (> 0 with pad_square)")
        lo, hi = self.percentiles
        if not 0 <= lo < hi <= 100:
            problems.append(f"percentiles {self.percentiles!r} must satisfy 0 <= low < high <= 100")
        if self.flip_to not in ("", "L", "R"):
            problems.append(f"flip_to {self.flip_to!r} must be '', 'L' or 'R'")
        if not 0 <= self.crop_max_fraction < 1:
            problems.append("crop_max_fraction must be in [0, 1)")
        if not 0 <= self.png_compression <= 9:
            problems.append("png_compression must be a zlib level 0-9")
        if self.histogram_bins < 2 or self.clahe_tiles < 1 or self.clahe_clip <= 0:
            problems.append("histogram_bins >= 2, clahe_tiles >= 1 and clahe_clip > 0 are required")
        try:
            self.dicom_options  # pylint: disable=pointless-statement  (validates the DICOM options)
        except ValueError as e:
            problems.append(str(e))
        if problems:
            raise ValueError(f"Preprocessing variant {self.name!r}: " + "; ".join(problems) + ".")

    @property
    def dicom_options(self) -> DicomOptions:
        return DicomOptions(
            voi=self.voi,
            window_index=self.window_index,
            frames=self.frames,  # type: ignore[arg-type]
            max_pixels=int(self.max_pixels),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe parameters (what the dataset info stores), plus a fingerprint of them."""
        params = dataclasses.asdict(self)
        params["percentiles"] = list(self.percentiles)
        params["fingerprint"] = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
        return params

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> "Variant":
        """Inverse of `to_dict` (the fingerprint is recomputed, not trusted); unknown keys are an error."""
        params = {k: v for k, v in params.items() if k != "fingerprint"}
        unknown = sorted(set(params) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(
                f"Unknown preprocessing parameters {unknown}; known: {[f.name for f in dataclasses.fields(cls)]}."
            )
        if "percentiles" in params:
            params["percentiles"] = tuple(float(p) for p in params["percentiles"])
        return cls(**params)


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("std512", description="Default: 512 px longest side, field crop, 0.5-99.5 percentile stretch, 16-bit."),
        Variant(
            "window512",
            normalization="window",
            description="The DICOM VOI window as the modality set it, 512 px, field crop, 16-bit.",
        ),
        Variant("clahe512", normalization="clahe", description="CLAHE (clip 2, 8x8 tiles) after field crop, 512 px."),
        Variant("equalize512", normalization="equalize", description="Global histogram equalisation, 512 px."),
        Variant("std1024", image_size=1024, description="As std512 at 1024 px (for high-resolution pretraining)."),
        Variant("std512_8bit", bit_depth=8, description="As std512, stored with 8-bit depth."),
        Variant("std512_canon_r", flip_to="R", description="As std512 with left femurs mirrored to the right."),
        Variant(
            "raw",
            image_size=0,
            normalization="minmax",
            crop_field=False,
            voi="none",
            description="Full resolution, no crop, min-max of the modality values (for studying preprocessing).",
        ),
    )
}


def get_variant(name_or_path: str, overrides: dict[str, Any] | None = None) -> Variant:
    """A built-in variant by name, or one from a JSON file of parameters; `overrides` replace fields.

    Overrides that change the pixels should come with a new `name` (the dataset name carries it)."""
    if name_or_path in VARIANTS:
        params = VARIANTS[name_or_path].to_dict()
    else:
        path = pathlib.Path(name_or_path).expanduser()
        if not path.is_file():
            raise ValueError(
                f"Unknown preprocessing variant {name_or_path!r}: use one of "
                f"{', '.join(VARIANTS)} or the path of a JSON file of parameters."
            )
        try:
            params = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"Variant file {path} is not JSON ({e}).") from None
        if not isinstance(params, dict):
            raise ValueError(
                f"Variant file {path} must hold a JSON object of parameters, e.g. "
                '{"name": "std384", "image_size": 384}.'
            )
        params.setdefault("name", path.stem)
    params.update(overrides or {})
    return Variant.from_dict(params)


# ─── Steps ───────────────────────────────────────────────────────────────────────────────────────


def field_box(
    image: np.ndarray,
    padding: np.ndarray | None = None,
    *,
    threshold: float = 0.01,
    max_fraction: float = 0.4,
    thumb: int = 256,
) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the exposed field: edge rows/columns that are nearly uniform
    (std < `threshold` × the thumbnail's value range: collimator shadow, blank film margin) or all
    padding are cut off.

    Measured on every k-th row and column (at most `thumb` of each) for speed, then scaled back to
    the outermost sampled field rows/columns: up to k-1 rows of field may be lost at a side. At most `max_fraction` of each side is removed.
    """
    h, w = image.shape
    step = max(1, -(-max(h, w) // thumb))  # subsample (not average): as cheap as it gets, and a
    small = image[::step, ::step]  # margin's std stays ~0 while the field's noise stays visible
    blank = None if padding is None else padding[::step, ::step].astype(np.float32)

    def keep(values: np.ndarray, axis: int) -> tuple[int, int]:
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN (all padding) lines
            std = np.nanstd(values, axis=axis)
            all_pad = np.all(np.isnan(values), axis=axis)
        empty = all_pad | (np.nan_to_num(std, nan=0.0) < threshold)
        n = len(empty)
        limit = int(n * max_fraction)
        start = 0
        while start < limit and empty[start]:
            start += 1
        stop = n
        while n - stop < limit and empty[stop - 1]:
            stop -= 1
        return start, stop

    values = small if blank is None else np.where(blank > 0.5, np.nan, small)
    if np.isfinite(values).any():  # relative to the image's own range (a windowed image may use 2% of [0, 1])
        threshold = threshold * max(float(np.nanmax(values) - np.nanmin(values)), 1e-6)
    top, bottom = keep(values, 1)  # rows over the full width,
    left, right = keep(values[top:bottom], 0)  # columns within those rows,
    top, bottom = keep(values[:, left:right], 1)  # rows again within those columns (corners resolved)
    left, right = keep(values[top:bottom], 0)
    # Thumbnail row r is image row r * step; rows between kept thumbnail rows are in the field.
    return (
        min(h - 1, top * step),
        max(1, min(h, (bottom - 1) * step + 1)),
        min(w - 1, left * step),
        max(1, min(w, (right - 1) * step + 1)),
    )


def resize_longest(
    image: np.ndarray, size: int, *, upscale: bool = False, interpolation: int | None = None
) -> np.ndarray:
    """Resized so that the longest side is `size` (aspect ratio kept); unchanged if size == 0 or the
    image is smaller and not `upscale`."""
    h, w = image.shape[:2]
    if size <= 0 or (max(h, w) <= size and not upscale) or max(h, w) == size:
        return image
    scale = size / max(h, w)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    if interpolation is None:
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    return cv2.resize(image, new, interpolation=interpolation)


def normalize(image: np.ndarray, variant: Variant, valid: np.ndarray | None = None) -> np.ndarray:
    """Intensity normalisation of a [0, 1] float32 image per `variant.normalization`; statistics over
    `valid` pixels only (not padding). Returns float32 in [0, 1]."""
    values = image if valid is None else image[valid]
    method = variant.normalization
    if method == "window" or values.size == 0:
        out = image
    elif method in ("percentile", "minmax"):
        if method == "percentile":
            lo, hi = np.percentile(values, variant.percentiles)
        else:
            lo, hi = values.min(), values.max()
        out = (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)
    elif method == "equalize":
        out = equalize_histogram(image, variant.histogram_bins, valid)
    else:  # clahe
        clahe = cv2.createCLAHE(clipLimit=variant.clahe_clip, tileGridSize=(variant.clahe_tiles, variant.clahe_tiles))
        out = clahe.apply(np.round(np.clip(image, 0, 1) * 65535).astype(np.uint16)).astype(np.float32) / 65535
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


def equalize_histogram(image: np.ndarray, bins: int, valid: np.ndarray | None = None) -> np.ndarray:
    """Global histogram equalisation: level i -> (cdf(i) - cdf_min) / (N - cdf_min), over `bins`
    equal levels of [0, 1] (the formula of OpenCV's equalizeHist, which it equals for 256 bins)."""
    levels = np.minimum((np.clip(image, 0, 1) * bins).astype(np.int64), bins - 1)
    counted = levels if valid is None else levels[valid]
    hist = np.bincount(counted.ravel(), minlength=bins)
    cdf = np.cumsum(hist)
    nonzero = cdf[hist > 0]
    cdf_min = nonzero[0] if nonzero.size else 0
    total = cdf[-1]
    if total == cdf_min:
        return np.zeros_like(image, dtype=np.float32)
    table = np.clip((cdf - cdf_min) / (total - cdf_min), 0, 1).astype(np.float32)
    return table[levels]


def quantize(image: np.ndarray, bit_depth: int) -> np.ndarray:
    """[0, 1] float -> uint16: 16-bit full range, or 8-bit levels scaled by 257 (255 -> 65535)."""
    clipped = np.clip(image, 0.0, 1.0)
    if bit_depth == 8:
        return (np.round(clipped * 255).astype(np.uint16) * 257).astype(np.uint16)
    return np.round(clipped * 65535).astype(np.uint16)


@dataclasses.dataclass
class Processed:
    """The stored image (uint16) and what the steps did (crop box in original pixels, scale, flip)."""

    image: np.ndarray
    crop: tuple[int, int, int, int]
    scale: float
    flipped: bool


class BlankImage(SkippedFile):
    """The preprocessed image has no content (one value everywhere): reason ``blank_after_windowing``."""

    def __init__(self) -> None:
        super().__init__("blank_after_windowing")


def apply_variant(
    image: np.ndarray,
    variant: Variant,
    *,
    padding: np.ndarray | None = None,
    laterality: str = "",
    reject_blank: bool = True,
) -> Processed:
    """All steps of `variant` on one float32 [0, 1] bone-bright frame (as `dicom.read_dicom` gives).

    Raises BlankImage if the result is (nearly) constant and `reject_blank`."""
    h, w = image.shape
    crop = (0, h, 0, w)
    if variant.crop_field:
        crop = field_box(image, padding, threshold=variant.crop_threshold, max_fraction=variant.crop_max_fraction)
        top, bottom, left, right = crop
        image = image[top:bottom, left:right]
        padding = None if padding is None else padding[top:bottom, left:right]
    flipped = bool(variant.flip_to and laterality in ("L", "R") and laterality != variant.flip_to)
    if flipped:
        image = image[:, ::-1]
        padding = None if padding is None else padding[:, ::-1]
    before = max(image.shape)
    image = resize_longest(np.ascontiguousarray(image, dtype=np.float32), variant.image_size, upscale=variant.upscale)
    scale = max(image.shape) / before
    valid = None
    if padding is not None:
        valid = (
            resize_longest(
                np.ascontiguousarray(padding, np.float32),
                variant.image_size,
                upscale=variant.upscale,
                interpolation=cv2.INTER_AREA,
            )
            < 0.5
        )
    image = normalize(image, variant, valid)
    if reject_blank and is_blank(image, None if valid is None else ~valid):
        raise BlankImage()
    if valid is not None:
        image = np.where(valid, image, 0.0).astype(np.float32)
    if variant.pad_square:
        out = np.zeros((variant.image_size, variant.image_size), np.float32)
        out[: image.shape[0], : image.shape[1]] = image[: variant.image_size, : variant.image_size]
        image = out
    return Processed(quantize(image, variant.bit_depth), crop, scale, flipped)


def encode_png(image: np.ndarray, level: int) -> bytes:
    """A (uint16) image as PNG bytes at zlib `level`. Level 1 uses zlib's Huffman-only strategy: on
    noisy 16-bit radiographs LZ77 matching finds little, and Huffman-only is ~2.5x faster than level 1's
    default strategy at the same size (measured: 512x427 noisy 16-bit, 16.5 vs 42.6 ms, 396 vs 398 kB).
    Lossless either way: the decoded pixels are identical."""
    params = [cv2.IMWRITE_PNG_COMPRESSION, int(level)]
    if level == 1:
        params += [cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY]
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(image), params)
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def variant_dir_name(base: str, variant: Variant) -> str:
    """The dataset name for `base` converted with `variant`: `<base>_<variant>_v<version>`."""
    return f"{base}_{variant.name}_v{variant.version}"

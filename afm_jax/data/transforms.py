"""Image ops of the input pipeline: small numpy functions, registered by name, composed by config.

Image convention (DESIGN "Contracts"): float32 in [0, 1], shape (H, W, 1), bone bright — what the
transforms hand to the model. Nothing here is colour-specific; normalisation to mean/std happens at
the model's input. Inside a chain, the geometric ops (crop, resize, flip) also work on the decoded
integer pixels, so chains run them first and convert the small result with `to_float`; intensity
ops need float input.

Every op has the signature `op(image, rng, **params) -> image` (deterministic ops ignore `rng`) and
is looked up by name in `OPS`, big_vision style. A chain is plain data — a list of (name, params)
pairs — so it pickles to grain worker processes and reads back from a config. Randomness comes only
from the `np.random.Generator` grain derives per element from (seed, element index)
(`MapDataset.random_map`), so augmentations are deterministic for a seed and independent of how
many workers run them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import cv2
import grain
import numpy as np

from afm_jax.errors import ConfigError

Op = Callable[..., np.ndarray]
Chain = tuple[tuple[str, dict[str, Any]], ...]

OPS: dict[str, Op] = {}


def register(name: str) -> Callable[[Op], Op]:
    """Registers an op `fn(image, rng, **params) -> image` under `name`."""

    def wrap(fn: Op) -> Op:
        if name in OPS:
            raise ValueError(f"Image op {name!r} is registered twice.")
        OPS[name] = fn
        return fn

    return wrap


def apply_chain(
    image: np.ndarray, chain: Sequence[tuple[str, Mapping[str, Any]]], rng: np.random.Generator | None = None
) -> np.ndarray:
    """Applies the ops of `chain` in order."""
    for name, params in chain:
        try:
            op = OPS[name]
        except KeyError:
            raise ValueError(f"Unknown image op {name!r}; known ops: {', '.join(sorted(OPS))}.") from None
        image = op(image, rng, **params)
    return image


# ─── Decoding ────────────────────────────────────────────────────────────────────────────────────

_UNIT_SCALE = {np.dtype(np.uint8): np.float32(1 / 255), np.dtype(np.uint16): np.float32(1 / 65535)}


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> its integer pixels, (H, W, 1) uint8 or uint16. Colour PNGs are converted to gray."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError(f"Cannot decode image bytes as PNG ({len(data)} bytes, starting {bytes(data[:8])!r}).")
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY if image.shape[-1] == 4 else cv2.COLOR_BGR2GRAY)
    if image.dtype not in _UNIT_SCALE:
        raise ValueError(f"Unsupported PNG pixel type {image.dtype}; expected 8- or 16-bit.")
    return image[..., None]


@register("to_float")
def to_float(image: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """Integer pixels -> float32 in [0, 1] (uint8 / 255, uint16 / 65535); float images pass through."""
    del rng
    scale = _UNIT_SCALE.get(image.dtype)
    if scale is None:
        return image.astype(np.float32, copy=False)
    return np.multiply(image, scale, dtype=np.float32)


def decode_png16(data: bytes) -> np.ndarray:
    """PNG bytes (8- or 16-bit) -> float32 (H, W, 1) in [0, 1]. Colour PNGs are converted to gray."""
    return to_float(decode_png(data))


# ─── Geometry ────────────────────────────────────────────────────────────────────────────────────


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """(h, w, 1) -> (height, width, 1) of the same dtype, antialiased when shrinking, and cheap.

    Shrinking by an integer factor k >= 2 first averages k x k blocks (OpenCV's fast exact-area
    path; up to k - 1 edge rows/columns are dropped to make the size divisible), then bilinear
    interpolation covers the remaining factor, which is below 2 and so does not alias. A direct
    INTER_AREA resize at a fractional factor gives about the same image ~8x slower.
    """
    src = image[..., 0]
    k = int(min(src.shape[0] / height, src.shape[1] / width))
    if k >= 2:
        h, w = src.shape[0] // k, src.shape[1] // k
        src = cv2.resize(src[: h * k, : w * k], (w, h), interpolation=cv2.INTER_AREA)
    return cv2.resize(src, (width, height), interpolation=cv2.INTER_LINEAR)[..., None]


@register("resize")
def resize(image: np.ndarray, rng: np.random.Generator | None, *, size: int) -> np.ndarray:
    """The whole image resized to (size, size) — deterministic (the eval transform)."""
    del rng
    return _resize(image, size, size)


def sample_crop_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: Sequence[float],
    ratio: Sequence[float],
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop covering `scale` of the area with aspect ratio w/h in `ratio`.

    The Inception / torchvision RandomResizedCrop recipe: up to `attempts` draws, then a centre crop
    with the ratio clamped to the allowed range.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


@register("random_resized_crop")
def random_resized_crop(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    size: int,
    scale: Sequence[float] = (0.2, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
) -> np.ndarray:
    """A random crop (area fraction in `scale`, aspect ratio in `ratio`) resized to (size, size)."""
    top, left, h, w = sample_crop_box(image.shape[0], image.shape[1], rng, scale, ratio)
    return _resize(image[top : top + h, left : left + w], size, size)


@register("flip_lr")
def flip_lr(image: np.ndarray, rng: np.random.Generator, *, p: float = 0.5) -> np.ndarray:
    """Mirrors left-right with probability p (laterality is not a label the model should learn)."""
    return image[:, ::-1] if rng.random() < p else image


# ─── Intensity ───────────────────────────────────────────────────────────────────────────────────


@register("intensity_jitter")
def intensity_jitter(
    image: np.ndarray,
    rng: np.random.Generator,
    *,
    brightness: float = 0.0,
    contrast: float = 0.0,
    gamma: float = 0.0,
    p: float = 1.0,
) -> np.ndarray:
    """Mild exposure changes, each drawn independently and skipped at strength 0; clipped to [0, 1].

    gamma: x ** g with log g ~ U(-gamma, gamma); contrast: scale about the image mean by
    c ~ U(1 - contrast, 1 + contrast); brightness: add b ~ U(-brightness, brightness).
    p < 1 applies the whole jitter with probability p (DINO's RandomApply(ColorJitter, p=0.8));
    at p = 1 no extra random number is drawn, so existing chains keep their exact output.
    """
    if image.dtype.kind != "f":
        raise ValueError(f"intensity_jitter needs a float image in [0, 1], got {image.dtype}; put it after to_float.")
    if p < 1.0 and rng.random() >= p:
        return image
    g = math.exp(rng.uniform(-gamma, gamma)) if gamma > 0 else 1.0
    c = rng.uniform(1 - contrast, 1 + contrast) if contrast > 0 else 1.0
    b = rng.uniform(-brightness, brightness) if brightness > 0 else 0.0
    out = np.clip(image, 0.0, 1.0).astype(np.float32, copy=False)  # a new array: the ops below are in place
    if g != 1.0:
        np.power(out, np.float32(g), out=out)
    if c != 1.0 or b != 0.0:  # (x - mean) * c + mean + b, as one multiply-add
        mean = float(out.mean()) if c != 1.0 else 0.0
        out *= np.float32(c)
        out += np.float32(mean * (1 - c) + b)
    return np.clip(out, 0.0, 1.0, out=out)


@register("gaussian_blur")
def gaussian_blur(
    image: np.ndarray, rng: np.random.Generator, *, p: float = 0.5, sigma: Sequence[float] = (0.1, 2.0)
) -> np.ndarray:
    """Gaussian blur with probability p, sigma ~ U(sigma) in output pixels (DINO: PIL radius 0.1–2).

    Float images only (put it after `to_float`); the kernel is cut at 4 sigma, borders reflect."""
    if image.dtype.kind != "f":
        raise ValueError(f"gaussian_blur needs a float image in [0, 1], got {image.dtype}; put it after to_float.")
    if rng.random() >= p:
        return image
    s = float(rng.uniform(float(sigma[0]), float(sigma[1])))
    radius = max(1, int(math.ceil(4.0 * s)))
    blurred = cv2.GaussianBlur(
        np.ascontiguousarray(image[..., 0]), (2 * radius + 1, 2 * radius + 1), s, borderType=cv2.BORDER_REFLECT_101
    )
    return blurred[..., None].astype(np.float32, copy=False)


@register("solarize")
def solarize(image: np.ndarray, rng: np.random.Generator, *, p: float = 0.2, threshold: float = 0.5) -> np.ndarray:
    """With probability p, inverts every pixel at or above `threshold` (x -> 1 - x), as PIL's
    solarize at 128 of 256 in DINO's second global view. Float images in [0, 1] only."""
    if image.dtype.kind != "f":
        raise ValueError(f"solarize needs a float image in [0, 1], got {image.dtype}; put it after to_float.")
    if rng.random() >= p:
        return image
    return np.where(image >= np.float32(threshold), np.float32(1.0) - image, image).astype(np.float32, copy=False)


# ─── Chains from config ──────────────────────────────────────────────────────────────────────────


def default_augment_config() -> dict[str, Any]:
    """The training augmentation: random resized crop, horizontal flip, mild intensity jitter."""
    return dict(
        crop=True, crop_scale=(0.2, 1.0), crop_ratio=(3 / 4, 4 / 3), flip=True, brightness=0.1, contrast=0.1, gamma=0.1
    )


def train_chain(augment: Mapping[str, Any] | None, image_size: int) -> Chain:
    """The op chain of training images from an `augment` config (keys of `default_augment_config`;
    missing keys take their defaults). crop=False resizes the whole image instead of cropping;
    flip=False and jitter strengths of 0 switch those ops off."""
    cfg = default_augment_config()
    unknown = sorted(set(augment or {}) - set(cfg))
    if unknown:
        raise ConfigError(
            f"Unknown augment config keys {unknown} (config key `data.augment`); known keys: {sorted(cfg)}."
        )
    cfg.update(dict(augment or {}))
    _check_range("crop_scale", cfg["crop_scale"], 0.0, 1.0)
    _check_range("crop_ratio", cfg["crop_ratio"], 0.0, math.inf)
    for key in ("brightness", "contrast", "gamma"):
        if not 0 <= float(cfg[key]) < 1:
            raise ConfigError(f"Config key `data.augment.{key}` = {cfg[key]!r} must be in [0, 1).")
    chain: list[tuple[str, dict[str, Any]]] = []
    if cfg["crop"]:
        chain.append(
            (
                "random_resized_crop",
                dict(
                    size=int(image_size),
                    scale=tuple(map(float, cfg["crop_scale"])),
                    ratio=tuple(map(float, cfg["crop_ratio"])),
                ),
            )
        )
    else:
        chain.append(("resize", dict(size=int(image_size))))
    if cfg["flip"]:
        chain.append(("flip_lr", dict(p=0.5)))
    chain.append(("to_float", {}))
    jitter = {k: float(cfg[k]) for k in ("brightness", "contrast", "gamma") if float(cfg[k]) > 0}
    if jitter:
        chain.append(("intensity_jitter", jitter))
    return tuple(chain)


def eval_chain(image_size: int) -> Chain:
    """The op chain of evaluation images: the whole image resized to a square, nothing random."""
    return (("resize", dict(size=int(image_size))), ("to_float", {}))


def _check_range(key: str, value: Any, low: float, high: float) -> None:
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"Config key `data.augment.{key}` = {value!r} must be a pair (min, max).") from None
    if not low < a <= b <= high:
        raise ConfigError(f"Config key `data.augment.{key}` = {value!r} must satisfy {low} < min <= max <= {high}.")


# ─── grain transforms ────────────────────────────────────────────────────────────────────────────


@dataclasses.dataclass(frozen=True)
class TrainTransform(grain.transforms.RandomMap):
    """Record -> {'image': float32 (S, S, 1), 'label': int32}: decode, then the random op chain.

    The chain starts on the decoded integer pixels: geometry first, then `to_float`, then intensity
    ops — converting the small output rather than the full image saves ~8% of the decode time."""

    chain: Chain

    def random_map(self, element: Mapping[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        image = apply_chain(decode_png(element["image"]), self.chain, rng)
        return {"image": np.ascontiguousarray(image, np.float32), "label": np.int32(element["label"])}


@dataclasses.dataclass(frozen=True)
class EvalTransform(grain.transforms.Map):
    """Record -> {'image', 'label', 'patient_id', 'image_id'} with the deterministic eval chain."""

    chain: Chain

    def map(self, element: Mapping[str, Any]) -> dict[str, Any]:
        image = apply_chain(decode_png(element["image"]), self.chain)
        return {
            "image": np.ascontiguousarray(image, np.float32),
            "label": np.int32(element["label"]),
            "patient_id": element["patient_id"],
            "image_id": element["image_id"],
        }

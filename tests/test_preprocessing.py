"""Preprocessing variants: each step against an independent formula or library."""

import json

import cv2
import numpy as np
import pytest

from afm_jax.data import preprocessing
from afm_jax.data.preprocessing import Variant


def _textured(h, w, seed=0):
    rng = np.random.default_rng(seed)
    return np.clip(
        cv2.resize(rng.uniform(0.2, 0.8, (8, 8)).astype(np.float32), (w, h))
        + rng.normal(0, 0.05, (h, w)).astype(np.float32),
        0,
        1,
    )


def test_field_box_removes_collimation_and_blank_margins():
    image = np.zeros((120, 90), np.float32)
    image[10:100, 15:80] = _textured(90, 65)
    image[:10] = 1.0  # collimator shadow (unexposed: bright)
    image[100:] = 0.95
    top, bottom, left, right = preprocessing.field_box(image)
    assert (top, bottom, left, right) == (10, 100, 15, 80)
    # A real edge feature is not cropped away, and a fully textured image is left alone.
    assert preprocessing.field_box(_textured(64, 48)) == (0, 64, 0, 48)


def test_field_box_on_a_large_image_uses_a_thumbnail_and_stays_close():
    image = np.ones((1200, 1000), np.float32)
    image[200:1100, 100:900] = _textured(900, 800)
    top, bottom, left, right = preprocessing.field_box(image)
    tol = 2 * 1200 / 256  # two thumbnail pixels
    assert abs(top - 200) <= tol and abs(bottom - 1100) <= tol and abs(left - 100) <= tol and abs(right - 900) <= tol
    assert top >= 200 and left >= 100 and bottom <= 1100 and right <= 900  # rounded inwards


def test_field_box_never_removes_more_than_max_fraction():
    image = np.ones((100, 100), np.float32)
    image[45:55, 45:55] = _textured(10, 10)
    top, bottom, left, right = preprocessing.field_box(image, max_fraction=0.3)
    assert top <= 30 and bottom >= 70 and left <= 30 and right >= 70


def test_resize_longest_keeps_aspect():
    image = _textured(300, 200)
    out = preprocessing.resize_longest(image, 150)
    assert out.shape == (150, 100)
    assert preprocessing.resize_longest(image, 512).shape == (300, 200)  # no upscaling by default
    assert preprocessing.resize_longest(image, 600, upscale=True).shape == (600, 400)


def test_percentile_and_minmax_normalisation_match_numpy():
    image = _textured(64, 64)
    variant = Variant("t", normalization="percentile", percentiles=(2.0, 98.0))
    lo, hi = np.percentile(image, [2.0, 98.0])
    np.testing.assert_allclose(
        preprocessing.normalize(image, variant), np.clip((image - lo) / (hi - lo), 0, 1), atol=1e-6
    )
    minmax = preprocessing.normalize(image, Variant("t", normalization="minmax"))
    np.testing.assert_allclose(minmax, (image - image.min()) / (image.max() - image.min()), atol=1e-6)
    valid = np.ones_like(image, bool)
    valid[:, :10] = False
    masked = preprocessing.normalize(image, variant, valid)
    lo, hi = np.percentile(image[valid], [2.0, 98.0])
    np.testing.assert_allclose(masked, np.clip((image - lo) / (hi - lo), 0, 1), atol=1e-6)


def test_histogram_equalisation_equals_opencv_for_256_levels():
    rng = np.random.default_rng(1)
    u8 = np.clip(rng.normal(90, 30, (50, 70)), 0, 255).astype(np.uint8)
    image = (u8.astype(np.float32) + 0.5) / 256  # level i lies in bin i of 256
    ours = preprocessing.equalize_histogram(image, 256)
    reference = cv2.equalizeHist(u8).astype(np.float32) / 255
    np.testing.assert_allclose(ours, reference, atol=0.5 / 255 + 1e-6)


def test_clahe_uses_opencv_on_16_bit():
    image = _textured(64, 64)
    variant = Variant("t", normalization="clahe", clahe_clip=3.0, clahe_tiles=4)
    ours = preprocessing.normalize(image, variant)
    reference = (
        cv2.createCLAHE(clipLimit=3.0, tileGridSize=(4, 4))
        .apply(np.round(image * 65535).astype(np.uint16))
        .astype(np.float32)
        / 65535
    )
    np.testing.assert_allclose(ours, reference, atol=1e-6)
    assert not np.allclose(ours, image, atol=0.01)


def test_bit_depths():
    x = np.linspace(0, 1, 1000, dtype=np.float32)[None]
    eight = preprocessing.quantize(x, 8)
    assert eight.dtype == np.uint16 and np.all(eight % 257 == 0) and len(np.unique(eight)) == 256
    sixteen = preprocessing.quantize(x, 16)
    assert sixteen.max() == 65535 and len(np.unique(sixteen)) == 1000


def test_flip_to_canonical_laterality_and_pad_square():
    image = np.zeros((40, 20), np.float32)
    image[:, :5] = np.linspace(0.2, 1, 40)[:, None]  # bright band on the left
    variant = Variant("t", image_size=32, pad_square=True, flip_to="R", crop_field=False, normalization="window")
    left = preprocessing.apply_variant(image, variant, laterality="L")
    right = preprocessing.apply_variant(image, variant, laterality="R")
    assert left.flipped and not right.flipped
    assert left.image.shape == right.image.shape == (32, 32)
    assert right.image[:, :4].mean() > right.image[:, 10:16].mean()  # unflipped: band at the left
    assert left.image[:, 12:16].mean() > left.image[:, :4].mean()  # flipped: band at the right of the content
    assert (left.image[:, 16:] == 0).all()  # padding


def test_variant_round_trip_and_validation(tmp_path):
    v = preprocessing.get_variant("std512", {"image_size": 256, "name": "std256"})
    assert Variant.from_dict(v.to_dict()) == v
    assert v.to_dict()["fingerprint"] != preprocessing.VARIANTS["std512"].to_dict()["fingerprint"]
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"normalization": "minmax", "bit_depth": 8}))
    mine = preprocessing.get_variant(str(path))
    assert mine.name == "mine" and mine.bit_depth == 8
    with pytest.raises(ValueError, match="bit_depth"):
        Variant("x", bit_depth=12)
    with pytest.raises(ValueError, match="normalization"):
        Variant("x", normalization="zscore")
    with pytest.raises(ValueError, match="Unknown preprocessing parameters"):
        preprocessing.get_variant("std512", {"imagesize": 3})
    with pytest.raises(ValueError, match="std512"):
        preprocessing.get_variant("no_such_variant")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        preprocessing.get_variant(str(tmp_path / "list.json"))

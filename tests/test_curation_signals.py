"""Curation quality signals, filters, metadata rules and hashes, against independent numpy/scipy formulas."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import scipy.fft
import scipy.ndimage

from afm_jax.data.curation import config as config_lib
from afm_jax.data.curation import duplicates, quality
from afm_jax.errors import ConfigError


def _image(seed: int = 0, size: int = 96) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = cv2.GaussianBlur(rng.random((size, size)).astype(np.float32), (0, 0), 3)
    return (x - x.min()) / (x.max() - x.min()) * 0.8


def test_intensity_signals_match_numpy():
    x = _image()
    s = quality.image_signals(x, work_size=128)  # 96 px: no resize, so numpy sees the same pixels
    p = np.percentile(x, (1, 5, 50, 95, 99))
    assert s["std"] == pytest.approx(x.std(), rel=1e-5) and s["mean"] == pytest.approx(x.mean(), rel=1e-5)
    assert [s[k] for k in ("p01", "p05", "p50", "p95", "p99")] == pytest.approx(p, rel=1e-5)
    assert s["dynamic_range"] == pytest.approx(p[4] - p[0], rel=1e-5)
    assert s["dark_fraction"] == pytest.approx(np.mean(x <= 0.02))
    assert np.isnan(s["field_mm"]) and s["height"] == 96


def test_metal_fraction_is_a_binary_opening_of_clipped_white():
    x = _image(1)
    x[20:60, 30:45] = 1.0  # a plate (solid white)
    x[70, 10:80] = 1.0  # a 1-px white line: not metal
    s = quality.image_signals(x, work_size=128)
    k = max(3, int(round(96 / 24)) | 1)
    ref = scipy.ndimage.binary_opening(x >= 0.98, structure=np.ones((k, k)))
    assert s["metal_fraction"] == pytest.approx(ref.mean())
    assert s["metal_fraction"] == pytest.approx(40 * 15 / 96**2)
    assert s["bright_fraction"] > s["metal_fraction"]


def test_text_fraction_is_a_white_tophat():
    mask = np.zeros((96, 96), np.uint8)
    cv2.putText(mask, "AP 12 PORTABLE", (4, 50), cv2.FONT_HERSHEY_SIMPLEX, 0.45, 255, 1)
    x = np.where(mask > 0, 1.0, 0.2).astype(np.float32)
    s = quality.image_signals(x, work_size=128)
    k = max(3, int(round(96 / 24)) | 1)
    ref = scipy.ndimage.white_tophat(x, size=(k, k), mode="nearest")
    assert s["text_fraction"] == pytest.approx(np.mean(ref > quality.TEXT_CONTRAST), abs=2e-3)
    assert s["text_fraction"] > 0.02 and s["metal_fraction"] == 0.0


def test_field_of_view_from_spacing_and_shape():
    s = quality.image_signals(_image(), pixel_spacing_mm=(0.2, 0.1), orig_shape=(1000, 3000))
    assert s["field_mm"] == pytest.approx(min(1000 * 0.2, 3000 * 0.1))


def test_field_of_view_of_a_converted_record_uses_the_stored_pixels():
    """tools/preprocess.py stores the spacing of the *stored* (resized) pixels beside the DICOM's
    orig_shape: the field is stored shape x stored spacing (45 mm here), not orig_shape x stored
    spacing (1406 mm, which would let every close-up pass the tiny_fov filter)."""
    from afm_jax.data.curation import scan  # pylint: disable=g-import-not-at-top

    ok, png = cv2.imencode(".png", np.round(_image() * 65535).astype(np.uint16))
    assert ok
    stored_spacing = 3000 * 0.015 / 96  # a 45 mm close-up: 3000 px of 0.015 mm, stored at 96 px
    record = {
        "image": png.tobytes(),
        "image_id": "i",
        "patient_id": "p",
        "label": -1,
        "pixel_spacing_mm": np.float32([stored_spacing, stored_spacing]),
        "orig_shape": np.int32([3000, 3000]),
    }
    signals = scan._scan_record(record, 128)["signals"]  # pylint: disable=protected-access
    assert signals["field_mm"] == pytest.approx(96 * stored_spacing, rel=1e-5)  # 45 mm
    assert (signals["height"], signals["width"]) == (3000, 3000)  # the acquisition's size, for representatives
    assert "tiny_fov" in quality.quality_reasons(signals, config_lib.default_config().quality)


@pytest.mark.parametrize(
    "change,reason",
    [
        (lambda x: np.full_like(x, 0.4), "blank"),
        (lambda x: 0.7 + 0.3 * x, "underexposed"),
        (lambda x: 0.2 * x, "overexposed"),
        (lambda x: 0.4 + 0.1 * x, "low_contrast"),
    ],
)
def test_quality_reasons(change, reason):
    cfg = config_lib.default_config()
    good = _image(2) + np.linspace(0, 0.2, 96)[None]
    assert quality.quality_reasons(quality.image_signals(good), cfg.quality) == []
    reasons = quality.quality_reasons(quality.image_signals(change(good).astype(np.float32)), cfg.quality)
    assert reasons[0] == reason
    cfg.quality.disable = reason
    assert reason not in quality.quality_reasons(quality.image_signals(change(good).astype(np.float32)), cfg.quality)


def test_metadata_filter_allow_and_deny_on_any_string_field():
    f = quality.MetadataFilter("body_part=FEMUR,LEG", "image_type=LOCALIZER;series_description=SCOUT")
    assert f.reasons({"body_part": "femur", "view": "AP"}) == []
    assert f.reasons({"body_part": ""}) == []  # unknown passes
    assert f.reasons({"body_part": "HAND"}) == ["metadata:body_part"]
    assert f.reasons({"body_part": "LEG", "image_type": "ORIGINAL\\PRIMARY\\LOCALIZER"}) == ["metadata:image_type"]
    assert f.reasons({"series_description": "Scout AP"}) == ["metadata:series_description"]
    record = {
        "image": b"",
        "patient_id": "p",
        "image_id": "i",
        "body_part": "KNEE",
        "image_type": np.asarray([b"DERIVED", b"LOCALIZER"]),
    }  # an unknown feature comes back as bytes
    fields = quality.metadata_fields(record)
    assert fields == {"body_part": "KNEE", "image_type": "DERIVED\\LOCALIZER"}
    assert f.reasons(fields) == ["metadata:body_part", "metadata:image_type"]
    with pytest.raises(ConfigError, match="metadata.allow"):
        quality.MetadataFilter("body_part", "")


def test_perceptual_hash_matches_scipy_dct():
    x = _image(3)
    small = cv2.resize(x, (32, 32), interpolation=cv2.INTER_AREA)
    low = scipy.fft.dctn(small.astype(np.float64), type=2, norm="ortho")[:16, :16].ravel()
    ref = np.packbits(low > np.median(low[1:]))
    got = duplicates.perceptual_hash(x)
    assert got.shape == (32,) and np.unpackbits(got ^ ref).sum() <= 2  # float32 vs float64 at the median


def test_config_validation_names_the_key():
    cfg = config_lib.default_config()
    config_lib.validate(cfg)
    cfg.clustering.levels = (4, 8)
    with pytest.raises(ConfigError, match="clustering.levels"):
        config_lib.validate(cfg)
    cfg = config_lib.default_config()
    cfg.quality.disable = "blank,nonsense"
    with pytest.raises(ConfigError, match="quality.disable"):
        config_lib.validate(cfg)

"""Tests for the synthetic femur radiographs and their DICOM writer (small images, a few seconds)."""

import collections
import csv
import dataclasses

import numpy as np
import pydicom
import pytest

from afm_jax.data import anonymize, synthetic

SIZE = 64


def _images(num_patients, seed=0, size=SIZE, **kw):
    return list(synthetic.iter_synthetic_images(num_patients, seed=seed, image_size=size, **kw))


def _render_pair(label_name, fracture_type, position, seed=3, size=128):
    """The normal image and the fractured image for one (rng seed, anatomy, pose), framed on the hip and
    proximal shaft so that both fracture levels are in the picture."""
    anatomy = synthetic.FemurAnatomy.sample(np.random.default_rng(seed))
    kw = dict(size=size, view="AP", laterality="R", fracture_position=position, anatomy=anatomy, framing="proximal")
    normal = synthetic.render_femur(np.random.default_rng(seed + 100), label_name="normal", fracture_type="none", **kw)
    fractured = synthetic.render_femur(
        np.random.default_rng(seed + 100), label_name=label_name, fracture_type=fracture_type, **kw
    )
    return normal.astype(np.int64), fractured.astype(np.int64)


def _changed_rows(a, b, threshold=0.02 * 65535):
    return np.nonzero(np.abs(a - b).max(axis=1) > threshold)[0]


# ─── Determinism ─────────────────────────────────────────────────────────────────────────────────


def test_same_seed_same_images_and_different_seed_different():
    a, b, c = _images(3, seed=1), _images(3, seed=1), _images(3, seed=2)
    assert len(a) == len(b) >= 6
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.pixels, y.pixels)
        assert (x.patient_id, x.sop_uid, x.label, x.view) == (y.patient_id, y.sop_uid, y.label, y.view)
    assert not np.array_equal(a[0].pixels, c[0].pixels)
    assert a[0].sop_uid != c[0].sop_uid


def test_patient_images_do_not_depend_on_num_patients():
    small, large = _images(3, seed=5), _images(6, seed=5)
    assert len(large) > len(small)
    for x, y in zip(small, large):
        assert dataclasses.asdict(x).keys() == dataclasses.asdict(y).keys()
        np.testing.assert_array_equal(x.pixels, y.pixels)
        assert (x.patient_id, x.study_uid, x.sop_uid, x.label_name) == (
            y.patient_id,
            y.study_uid,
            y.sop_uid,
            y.label_name,
        )
    assert synthetic.count_synthetic_images(6, seed=5) == len(large)


# ─── Pixels ──────────────────────────────────────────────────────────────────────────────────────


def test_dtype_shape_and_range():
    for img in _images(4):
        assert img.pixels.dtype == np.uint16 and img.pixels.shape == (SIZE, SIZE)
        assert int(img.pixels.max()) - int(img.pixels.min()) > 0.6 * 65535
        assert img.pixels.max() > 50000
        assert 0.2 < img.pixel_spacing_mm[0] * SIZE / synthetic._FIELD_MM < 2.0


def _layered(
    seed,
    view,
    *,
    size=128,
    laterality="L",
    label_name="normal",
    fracture_type="none",
    framing=None,
    implant="none",
    position=0.5,
):
    anatomy = synthetic.FemurAnatomy.sample(np.random.default_rng(seed))
    return synthetic._render(
        np.random.default_rng(seed + 50),
        label_name=label_name,
        fracture_type=fracture_type,
        size=size,
        view=view,
        laterality=laterality,
        fracture_position=position,
        anatomy=anatomy,
        framing=framing,
        implant=implant,
        layers=True,
    )


def _open_field(out):
    """Pixels inside the collimated field and away from the side marker."""
    return (out.layers["collimator"] > 0.99) & (out.layers["marker"] == 0)


# Replaces the old single-row check (brightest pixel of row 0.7 = bone): with collimation, knee framings
# and a lead marker the brightest pixel of a row is no longer bone, so the tissues are found by their layers.
@pytest.mark.parametrize(
    "seed,view,framing", [(0, "AP", "proximal"), (1, "LAT", "mid"), (2, "AP", "distal"), (3, "LAT", None)]
)
def test_bone_brighter_than_soft_tissue_brighter_than_air(seed, view, framing):
    out = _layered(seed, view, framing=framing)
    pixels, layers, field = out.pixels.astype(np.int64), out.layers, _open_field(out)
    bone = field & (layers["bone"] > 0.5)
    soft = field & (layers["bone"] == 0) & (layers["soft"] > 0.3)
    air = field & (layers["soft"] == 0) & (layers["bone"] == 0)
    assert bone.sum() > 100 and soft.sum() > 100
    assert np.median(pixels[bone]) > np.median(pixels[soft]) + 6000
    if air.sum() > 50:  # the thigh may fill the collimated field
        assert np.median(pixels[soft]) > np.median(pixels[air]) + 3000


# ─── Physics ─────────────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("fracture_type", ["oblique", "spiral", "comminuted", "transverse"])
def test_fracture_gap_is_as_bright_as_soft_tissue_never_darker(fracture_type):
    """Where a fracture removes bone only soft tissue is left on the ray: the gap shows at the level of
    soft tissue of the same depth (a little brighter from blur), never below the darkest soft tissue —
    the old generator drew black wedges there."""
    label = "aff" if fracture_type == "transverse" else "nff"
    checked = 0
    for seed in range(8):
        view, laterality = ("AP", "LAT")[seed % 2], "LR"[seed % 2]
        kw = dict(size=384, view=view, laterality=laterality, framing="proximal")
        normal = _layered(seed, **kw)
        fractured = _layered(seed, label_name=label, fracture_type=fracture_type, **kw)
        np.testing.assert_array_equal(normal.layers["soft"], fractured.layers["soft"])  # fracture: bone only
        field = _open_field(normal)
        gap = field & (normal.layers["bone"] > 0.3) & (fractured.layers["bone"] < 0.05 * normal.layers["bone"])
        if gap.sum() < 8:
            continue
        rows = np.unique(np.nonzero(gap)[0])
        band = np.zeros_like(gap)
        band[rows.min() : rows.max() + 1] = True
        soft = field & band & (normal.layers["bone"] == 0) & (fractured.layers["bone"] == 0)
        depth = np.median(fractured.layers["soft"][gap])
        same_depth = soft & (np.abs(fractured.layers["soft"] - depth) < 0.15 * depth)
        img, before = fractured.pixels / 65535.0, normal.pixels / 65535.0
        assert np.percentile(img[gap], 1) >= np.percentile(img[soft], 1)  # not darker than the darkest soft tissue
        if gap.sum() >= 50:  # wide enough to escape the blur of the bone around it
            soft_level, bone_level = np.median(img[same_depth]), np.median(before[gap])
            assert np.percentile(img[same_depth], 5) - 0.02 <= np.median(img[gap])
            assert np.median(img[gap]) <= soft_level + 0.3 * (bone_level - soft_level), (seed, soft_level, bone_level)
            checked += 1
    assert checked >= 2


@pytest.mark.parametrize("implant", ["nail", "plate", "hip"])
@pytest.mark.parametrize("view", ["AP", "LAT"])
def test_implants_are_brighter_than_cortical_bone(implant, view):
    framing = "mid" if implant == "plate" else "proximal"
    for seed in range(3):
        out = _layered(seed, view, size=256, framing=framing, implant=implant)
        field, img = _open_field(out), out.pixels / 65535.0
        metal = field & (out.layers["metal"] > 1.0)
        cortex = field & (out.layers["metal"] == 0) & (out.layers["bone"] > 0.6)
        assert metal.sum() > 20 and cortex.sum() > 50, (seed, metal.sum(), cortex.sum())
        assert np.median(img[metal]) > np.percentile(img[cortex], 95) + 0.02
        assert np.percentile(img, 100) < 0.98  # not clipped white (curation's metal filter is for defects)


def test_rejects_inconsistent_arguments():
    kw = dict(size=64, view="AP", laterality="R", fracture_position=0.5)
    with pytest.raises(ValueError, match="does not fit label"):
        synthetic.render_femur(np.random.default_rng(0), label_name="aff", fracture_type="oblique", **kw)
    with pytest.raises(ValueError, match="view"):
        synthetic.render_femur(
            np.random.default_rng(0), label_name="normal", fracture_type="none", **{**kw, "view": "PA"}
        )
    with pytest.raises(ValueError, match="framing"):
        synthetic.render_femur(
            np.random.default_rng(0), label_name="normal", fracture_type="none", **{**kw, "framing": "whole"}
        )
    with pytest.raises(ValueError, match="implant"):
        synthetic.render_femur(
            np.random.default_rng(0), label_name="normal", fracture_type="none", **{**kw, "implant": "cast"}
        )


# ─── Classes and patients ────────────────────────────────────────────────────────────────────────


def test_class_balance_and_consistent_patients():
    images = _images(60, size=32)
    patients = collections.defaultdict(list)
    for img in images:
        patients[img.patient_id].append(img)
    assert len(patients) == 60
    labels = [imgs[0].label_name for imgs in patients.values()]  # in patient order
    for n in range(10, 61, 5):  # low-discrepancy assignment: every prefix is balanced, tighter than i.i.d.
        counts = collections.Counter(labels[:n])
        for name, fraction in zip(synthetic.LABEL_NAMES, (0.34, 0.33, 0.33)):
            assert abs(counts[name] - n * fraction) <= 2, (n, counts)
    for imgs in patients.values():
        assert len(imgs) >= 2 and {"AP", "LAT"} <= {i.view for i in imgs}
        assert len({(i.label, i.label_name, i.fracture_type, i.laterality) for i in imgs}) == 1
        assert imgs[0].fracture_type in synthetic.FRACTURE_TYPES[imgs[0].label_name]
        assert synthetic.LABEL_NAMES[imgs[0].label] == imgs[0].label_name
    assert {i.fracture_type for i in images} == {"none", "oblique", "spiral", "comminuted", "transverse"}
    skewed = collections.Counter(i.label for i in _images(40, size=32, class_fractions=(0.5, 0.5, 0.0)))
    assert skewed[2] == 0 and skewed[0] > 0 and skewed[1] > 0


def test_aff_sign_is_local_and_follows_fracture_position():
    centres = []
    for position in (0.0, 1.0):
        normal, aff = _render_pair("aff", "transverse", position)
        rows = _changed_rows(normal, aff)
        assert rows.size > 0 and np.abs(normal - aff).max() > 0.1 * 65535  # the sign is visible
        assert rows.max() - rows.min() < 0.3 * normal.shape[0]  # ... and confined to the fracture zone
        weights = np.abs(normal - aff).sum(axis=1)
        centres.append((weights * np.arange(len(weights))).sum() / weights.sum())
    assert centres[1] - centres[0] > 0.2 * normal.shape[0]  # sub-trochanteric is above mid-shaft


@pytest.mark.parametrize("fracture_type", ["oblique", "spiral", "comminuted"])
def test_nff_leaves_the_femur_above_the_fracture_unchanged(fracture_type):
    size = 128
    normal, high = _render_pair("nff", fracture_type, 0.0, size=size)
    _, low = _render_pair("nff", fracture_type, 1.0, size=size)
    rows_high, rows_low = _changed_rows(normal, high), _changed_rows(normal, low)
    assert rows_high.size > 0 and rows_low.size > 0
    assert rows_low.min() > 0.45 * size  # head, neck and proximal shaft untouched by a mid-shaft fracture
    assert rows_high.min() < rows_low.min() - 0.1 * size


# ─── Records ─────────────────────────────────────────────────────────────────────────────────────


def test_to_record_hashes_identifiers_and_keeps_no_raw_ones():
    salt = b"test salt"
    img = _images(1)[0]
    record = synthetic.to_record(img, salt)
    assert set(record) == {
        "image",
        "patient_id",
        "study_id",
        "series_id",
        "image_id",
        "body_part",
        "view",
        "laterality",
        "modality",
        "pixel_spacing_mm",
        "orig_shape",
        "label",
        "label_name",
        "fracture_type",
    }
    raw = [
        img.patient_id,
        img.patient_name,
        *img.patient_name.split("^"),
        img.birth_date,
        img.accession_number,
        img.study_uid,
        img.series_uid,
        img.sop_uid,
    ]
    for key, value in record.items():
        if isinstance(value, str):
            assert not any(r in value for r in raw), (key, value)
    assert record["patient_id"] == anonymize.hash_id(img.patient_id, salt)
    assert record["image_id"] == anonymize.hash_id(img.sop_uid, salt)
    assert synthetic.to_record(img, salt)["patient_id"] == record["patient_id"]  # stable
    assert synthetic.to_record(img, b"other salt")["patient_id"] != record["patient_id"]
    assert record["image"] is img.pixels and record["label"] == img.label
    assert record["pixel_spacing_mm"].dtype == np.float32 and record["pixel_spacing_mm"].shape == (2,)
    assert record["orig_shape"].dtype == np.int32 and tuple(record["orig_shape"]) == (SIZE, SIZE)


def test_build_synthetic_dataset_writes_all_images(synthetic_dataset):
    from afm_jax.data import records

    info = records.read_info(synthetic_dataset)
    assert sum(info["splits"].values()) == synthetic.count_synthetic_images(24, seed=0)
    assert info["label_names"] == {"0": "normal", "1": "nff", "2": "aff"}


# ─── DICOM ───────────────────────────────────────────────────────────────────────────────────────


def test_dicom_files_round_trip(tmp_path):
    paths = synthetic.write_dicom_files(tmp_path, num_patients=8, seed=0, image_size=SIZE)
    images = _images(8)
    assert len(paths) == len(images)
    with open(tmp_path / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(tmp_path / r["path"]) for r in rows] == paths
    assert [r["label_name"] for r in rows] == [i.label_name for i in images]
    assert any(p.suffix == "" for p in paths) and any(p.suffix == ".dcm" for p in paths)
    assert all(len(p.relative_to(tmp_path).parts) == 3 for p in paths)  # patient/study/file

    seen = collections.Counter()
    for path, img in zip(paths, images):
        ds = pydicom.dcmread(path)
        top = (1 << ds.BitsStored) - 1
        stored = ds.pixel_array.astype(np.int64)
        seen[ds.Modality, ds.PhotometricInterpretation, ds.BitsStored] += 1
        assert ds.SOPInstanceUID == img.sop_uid and ds.ViewPosition == img.view
        assert ds.PatientName == img.patient_name and ds.PatientBirthDate == img.birth_date
        assert ds.AccessionNumber == img.accession_number and ds.ImageLaterality == img.laterality
        assert ds.BodyPartExamined in ("FEMUR", "LEG") and ds.BitsStored in (12, 16)
        assert stored.max() <= top
        assert ("PixelSpacing" in ds) or ("ImagerPixelSpacing" in ds)
        bone_bright = top - stored if ds.PhotometricInterpretation == "MONOCHROME1" else stored
        np.testing.assert_allclose(bone_bright * (65535 / top), img.pixels, atol=65535 / top / 2 + 1)
    assert {k[0] for k in seen} == {"CR", "DX"}
    assert {k[1] for k in seen} == {"MONOCHROME1", "MONOCHROME2"}
    assert {k[2] for k in seen} == {12, 16}


# ─── No class cue outside the fracture ───────────────────────────────────────────────────────────

TRIVIAL_PATIENTS = 1200  # ~3,400 images: AUROC standard error ~0.02 at patient level, ~0.015 per image


@pytest.fixture(scope="module")
def trivial_sample():
    """The images at 32 px, and each image's normal twin (same everything, fracture left out)."""
    kw = dict(seed=0, image_size=32, class_fractions=synthetic._DEFAULT_FRACTIONS)
    real = list(synthetic._iter_images(TRIVIAL_PATIENTS, **kw))
    twins = list(synthetic._iter_images(TRIVIAL_PATIENTS, fractures=False, **kw))
    assert [t.sop_uid for t in twins] == [r.sop_uid for r in real]
    assert all(
        t.label == r.label and t.framing == r.framing and t.marker_xy == r.marker_xy and t.implant == r.implant
        for t, r in zip(twins, real)
    )
    return real, twins


def _cv_auroc(features, labels, groups):
    """Mean over 5 patient-grouped folds of the held-out AUROC of a logistic regression on `features`.

    AUROC is taken within each fold: pooling out-of-fold scores would mix the folds' intercepts, which
    follow each training fold's class balance and so anti-correlate with the held-out labels (a
    feature without information would then score below 0.5)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(features, np.float64)
    aurocs = []
    for train, test in GroupKFold(n_splits=5).split(x, labels, groups):
        model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000)).fit(x[train], labels[train])
        aurocs.append(roc_auc_score(labels[test], model.predict_proba(x[test])[:, 1]))
    return float(np.mean(aurocs))


def _thumbnail(pixels):
    import cv2

    return cv2.resize(pixels.astype(np.float32) / 65535.0, (16, 16), interpolation=cv2.INTER_AREA).ravel()


COMPARISONS = {"aff_vs_nff": ((2,), (1,)), "fractured_vs_normal": ((1, 2), (0,))}


def _nuisance_features(images):
    """Per-image nuisance features (name -> (n, k) array) and per-patient ones, with their labels."""
    one_hot = lambda values, names: np.asarray([[v == n for n in names] for v in values], np.float64)  # noqa: E731
    image = {
        "mean_intensity": np.asarray([[img.pixels.mean()] for img in images]),
        "laterality": one_hot([i.laterality for i in images], synthetic.LATERALITIES)[:, :1],
        "view": one_hot([i.view for i in images], synthetic.VIEWS)[:, :1],
        "marker_position": np.asarray([i.marker_xy for i in images]),
        "implant": one_hot([i.implant for i in images], synthetic.IMPLANTS),
        "framing": one_hot([i.framing for i in images], synthetic.FRAMINGS),
        "pixel_spacing": np.asarray([[i.pixel_spacing_mm[0]] for i in images]),
    }
    per_patient = collections.defaultdict(list)
    for img in images:
        per_patient[img.patient_id].append(img)
    patients = list(per_patient.values())
    patient = {
        "images_per_patient": np.asarray([[len(p)] for p in patients], np.float64),
        "laterality_per_patient": np.asarray([[p[0].laterality == "L"] for p in patients], np.float64),
        "implant_per_patient": np.asarray([[any(i.implant != "none" for i in p)] for p in patients], np.float64),
    }
    return image, patient, patients


@pytest.mark.parametrize("comparison", sorted(COMPARISONS))
def test_trivial_features_do_not_predict_the_class(trivial_sample, comparison):
    """Mean intensity, laterality, view, marker position, implant, framing, pixel spacing and images per
    patient carry no class (AUROC 0.5 +- 0.07); nor do 16x16 thumbnails of the normal twins — the images
    with the fracture itself left out and all else kept (thumbnails of the real images may show a
    displaced fracture at 16 px, which is a class cue *inside* the fracture and allowed)."""
    real, twins = trivial_sample
    positive, negative = COMPARISONS[comparison]
    keep = [i for i, img in enumerate(real) if img.label in positive + negative]
    images = [real[i] for i in keep]
    labels = np.asarray([img.label in positive for img in images], np.int64)
    groups = np.asarray([img.patient_id for img in images])
    assert labels.sum() > 600 and (1 - labels).sum() > 600
    image_features, patient_features, patients = _nuisance_features(images)
    aurocs = {name: _cv_auroc(x, labels, groups) for name, x in image_features.items()}
    patient_labels = np.asarray([p[0].label in positive for p in patients], np.int64)
    patient_groups = np.asarray([p[0].patient_id for p in patients])
    aurocs.update({name: _cv_auroc(x, patient_labels, patient_groups) for name, x in patient_features.items()})
    twin_thumbs = np.stack([_thumbnail(twins[i].pixels) for i in keep])
    aurocs["thumbnail_16px_without_fracture"] = _cv_auroc(twin_thumbs, labels, groups)
    off = {k: round(v, 3) for k, v in aurocs.items() if abs(v - 0.5) > 0.07}
    assert not off, (off, {k: round(v, 3) for k, v in aurocs.items()})
    # The same test sees a real cue: the fracture itself, in thumbnails of the real images (so it can fail).
    if comparison == "fractured_vs_normal":
        real_thumbs = np.stack([_thumbnail(real[i].pixels) for i in keep])
        assert _cv_auroc(real_thumbs - twin_thumbs, labels, groups) > 0.6

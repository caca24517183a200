"""One DICOM -> image + metadata: pydicom's test files, lossless twins, LUT order, MONOCHROME1, frames."""

import os

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file, get_testdata_files

from afm_jax.data import dicom, preprocessing, synthetic
from afm_jax.data.conversion import chunks as conversion
from afm_jax.data.conversion.inputs import InputFile

SALT = b"test salt"
# Files of pydicom's test set that are deliberately broken (truncated or undecodable pixel data).
BROKEN = {"MR_truncated.dcm", "JPEG2000-embedded-sequence-delimiter.dcm", "JPEG-lossy.dcm"}


def _has_image(path: str) -> bool:
    """Independent of dicom.py: does pydicom see monochrome pixel data in a non-directory file?"""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=False)
    except Exception:  # pylint: disable=broad-except
        return False
    return (
        "PixelData" in ds
        and str(ds.get("PhotometricInterpretation", "")).startswith("MONOCHROME")
        and "DirectoryRecordSequence" not in ds
    )


def test_every_pydicom_test_file_converts_or_is_reported():
    variant = preprocessing.get_variant("std512", {"image_size": 64})
    files = [f for f in get_testdata_files() if os.path.isfile(f)]
    assert len(files) > 150
    statuses = {}
    for i, path in enumerate(files):
        row, pngs = conversion.convert_file(InputFile(i, 0, os.path.basename(path), path), variant, SALT, {})
        status = row["status"]
        assert status == "converted" or status.startswith(("skipped:", "failed:")), status
        assert (len(pngs) > 0) == (status == "converted")
        assert path not in status and "\n" not in status
        statuses[os.path.basename(path)] = status
        if _has_image(path) and os.path.basename(path) not in BROKEN:
            assert status == "converted" or status.startswith("skipped:"), (path, status)
    for name in BROKEN:
        assert statuses[name].startswith("failed:"), (name, statuses[name])
    assert statuses["rtplan.dcm"].startswith("skipped:non_image")
    assert statuses["DICOMDIR"] == "skipped:dicomdir"
    assert statuses["README.txt"] == "skipped:not_dicom"
    assert statuses["reportsi.dcm"].startswith("skipped:non_image")
    assert statuses["SC_rgb_rle.dcm"].startswith("skipped:not_monochrome")
    assert statuses["MR_small.dcm"] == "converted"
    assert sum(s == "converted" for s in statuses.values()) >= 40


def test_lossless_encodings_give_identical_pixels():
    names = [
        "MR_small.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
        "MR_small_expb.dcm",
        "MR_small_padded.dcm",
    ]
    variant = preprocessing.get_variant("std512")
    outputs, syntaxes = [], set()
    for name in names:
        image = dicom.read_dicom(get_testdata_file(name), SALT)[0]
        syntaxes.add(image.meta["transfer_syntax"])
        outputs.append(preprocessing.apply_variant(image.image, variant).image)
    assert len(syntaxes) >= 6
    for name, out in zip(names[1:], outputs[1:]):
        np.testing.assert_array_equal(out, outputs[0], err_msg=name)
    assert outputs[0].std() > 1000  # not a blank image


@pytest.mark.parametrize("bits,rescale", [(12, (1.0, 0.0)), (16, (0.5, 0.0)), (12, (2.0, -100.0))])
@pytest.mark.parametrize("voi", ["window", "none"])
def test_monochrome1_and_monochrome2_twins_give_the_same_output(tmp_path, bits, rescale, voi):
    img = next(iter(synthetic.iter_synthetic_images(1, image_size=48)))
    one = synthetic.write_dicom_twin(
        img, tmp_path / "m1.dcm", photometric="MONOCHROME1", bits_stored=bits, rescale=rescale
    )
    two = synthetic.write_dicom_twin(
        img, tmp_path / "m2.dcm", photometric="MONOCHROME2", bits_stored=bits, rescale=rescale
    )
    raw1, raw2 = pydicom.dcmread(one).pixel_array, pydicom.dcmread(two).pixel_array
    assert not np.array_equal(raw1, raw2)  # the stored pixels really differ (inverted)
    options = dicom.DicomOptions(voi=voi)
    a, b = dicom.read_dicom(one, SALT, options)[0], dicom.read_dicom(two, SALT, options)[0]
    np.testing.assert_allclose(a.image, b.image, atol=1e-6)
    for name in ("std512", "window512", "clahe512"):
        variant = preprocessing.get_variant(name, {"voi": voi})
        np.testing.assert_array_equal(
            preprocessing.apply_variant(a.image, variant).image, preprocessing.apply_variant(b.image, variant).image
        )
    # Bone bright: the synthetic source is bone bright, so output correlates positively with it.
    assert np.corrcoef(a.image.ravel(), img.pixels.ravel())[0, 1] > 0.9


def _dataset(stored, *, photometric="MONOCHROME2", bits=12, signed=False, **elements):
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.SOPClassUID = pydicom.uid.DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3.4", "1.2.3", "1.2.3.5"
    ds.PatientID = "P1"
    arr = np.asarray(stored, np.int16 if signed else np.uint16)
    ds.set_pixel_data(arr, photometric, bits, generate_instance_uid=False)
    for key, value in elements.items():
        setattr(ds, key, value)
    return ds


def _read(ds, tmp_path, options=dicom.DicomOptions()):
    path = tmp_path / "x.dcm"
    ds.save_as(path, enforce_file_format=True)
    return dicom.read_dicom(path, SALT, options)


def test_rescale_then_linear_window_by_hand(tmp_path):
    stored = [[150, 300, 400], [349, 350, 250]]
    ds = _dataset(stored, RescaleSlope=2, RescaleIntercept=-100, WindowCenter=500, WindowWidth=200)
    out = _read(ds, tmp_path)[0].image
    # modality = 2x - 100: 200, 500, 700, 598, 600, 400. LINEAR (C.11.2.1.2.1), c=500, w=200:
    # x <= 500 - 0.5 - 99.5 = 400 -> 0; x > 500 - 0.5 + 99.5 = 599 -> 1; else (x - 499.5)/199 + 0.5.
    expected = [[0.0, (500 - 499.5) / 199 + 0.5, 1.0], [(598 - 499.5) / 199 + 0.5, 1.0, 0.0]]
    np.testing.assert_allclose(out, expected, atol=1e-6)
    # MONOCHROME1 with the same values: inverted (and INVERSE beside it does not invert twice).
    ds1 = _dataset(
        stored,
        photometric="MONOCHROME1",
        RescaleSlope=2,
        RescaleIntercept=-100,
        WindowCenter=500,
        WindowWidth=200,
        PresentationLUTShape="INVERSE",
    )
    np.testing.assert_allclose(_read(ds1, tmp_path)[0].image, 1 - np.asarray(expected), atol=1e-6)
    # INVERSE alone (MONOCHROME2) asks a viewer for bone dark; the bone-bright contract keeps the image
    # as MONOCHROME2 (issue 14, item 6: it used to invert) and records a note.
    ds2 = _dataset(
        stored, RescaleSlope=2, RescaleIntercept=-100, WindowCenter=500, WindowWidth=200, PresentationLUTShape="INVERSE"
    )
    read2 = _read(ds2, tmp_path)[0]
    np.testing.assert_allclose(read2.image, expected, atol=1e-6)
    assert "INVERSE" in read2.meta["notes"]


def test_window_functions_and_choice_of_window_by_hand(tmp_path):
    stored = [[100, 200, 300, 400]]
    exact = _dataset(stored, WindowCenter=250, WindowWidth=200, VOILUTFunction="LINEAR_EXACT")
    np.testing.assert_allclose(_read(exact, tmp_path)[0].image, [[0.0, (200 - 250) / 200 + 0.5, 0.75, 1.0]], atol=1e-6)
    sigmoid = _dataset(stored, WindowCenter=250, WindowWidth=200, VOILUTFunction="SIGMOID")
    expected = 1 / (1 + np.exp(-4 * (np.asarray(stored, float) - 250) / 200))
    np.testing.assert_allclose(_read(sigmoid, tmp_path)[0].image, expected, atol=1e-6)
    several = _dataset(stored, WindowCenter=[250, 300], WindowWidth=[200, 101])
    second = _read(several, tmp_path, dicom.DicomOptions(window_index=1))[0]
    # c=300, w=101: lo = 300 - 0.5 - 50 = 249.5, hi = 349.5
    np.testing.assert_allclose(second.image, [[0.0, 0.0, (300 - 299.5) / 100 + 0.5, 1.0]], atol=1e-6)
    assert second.meta["voi_used"].startswith("window[1]")
    none = _read(several, tmp_path, dicom.DicomOptions(voi="none"))[0]  # full 12-bit range, nothing clipped
    np.testing.assert_allclose(none.image, np.asarray(stored) / 4095, atol=1e-6)


def test_voi_lut_sequence_matches_pydicom(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    del ds.WindowCenter, ds.WindowWidth
    lut = pydicom.Dataset()
    lut.add_new(0x00283002, "US", [4096, 0, 12])  # LUT Descriptor: 4096 entries from 0, 12 bits
    lut.add_new(0x00283006, "US", [(i * 7919) % 4096 for i in range(4096)])  # scrambled: misindexing shows
    ds.VOILUTSequence = pydicom.Sequence([lut])
    ds.save_as(tmp_path / "x.dcm")
    out = dicom.read_dicom(tmp_path / "x.dcm", SALT)[0]
    reference = pydicom.pixels.apply_voi_lut(pydicom.pixels.apply_modality_lut(ds.pixel_array, ds), ds) / 4095.0
    np.testing.assert_allclose(out.image, reference, atol=1e-6)
    # By hand (C.11.2.1.1): no rescale, first mapped value 0, so the stored value indexes the LUT Data.
    by_hand = np.asarray(lut[0x00283006].value)[np.clip(ds.pixel_array, 0, 4095)] / 4095.0
    np.testing.assert_allclose(out.image, by_hand, atol=1e-6)
    assert out.meta["voi_used"] == "voi_lut[0]"


def test_pixel_padding_is_masked_and_black(tmp_path):
    stored = np.full((8, 8), 1000)
    stored[:, :2] = 4095
    stored[3, 4] = 2000
    ds = _dataset(stored, PixelPaddingValue=4095, WindowCenter=1500, WindowWidth=2000)
    image = _read(ds, tmp_path)[0]
    assert image.padding is not None and image.padding[:, :2].all() and not image.padding[:, 2:].any()
    processed = preprocessing.apply_variant(
        image.image, preprocessing.get_variant("std512", {"crop_field": False}), padding=image.padding
    )
    assert (processed.image[:, :2] == 0).all()
    assert processed.image[3, 4] == 65535  # percentile stretch over the non-padding pixels only


def test_multi_frame_modes(tmp_path):
    frames = np.stack([np.full((4, 5), 100 * (k + 1)) for k in range(3)]).astype(np.uint16)
    ds = _dataset(frames, WindowCenter=200, WindowWidth=400)
    ds.NumberOfFrames = 3
    path = tmp_path / "mf.dcm"
    ds.save_as(path, enforce_file_format=True)
    first = dicom.read_dicom(path, SALT, dicom.DicomOptions(frames="first"))
    every = dicom.read_dicom(path, SALT, dicom.DicomOptions(frames="all"))
    assert len(first) == 1 and len(every) == 3
    np.testing.assert_allclose(first[0].image, every[0].image)
    assert len({f.meta["image_id"] for f in every}) == 3
    assert every[2].image.mean() > every[0].image.mean()
    with pytest.raises(dicom.SkippedFile, match="multi_frame"):
        dicom.read_dicom(path, SALT, dicom.DicomOptions(frames="skip"))


def test_metadata_is_hashed_and_complete(tmp_path):
    paths = synthetic.write_dicom_files(tmp_path, num_patients=2, image_size=32)
    ds = pydicom.dcmread(paths[0])
    meta = dicom.read_dicom(paths[0], SALT)[0].meta
    assert meta["patient_id"] == synthetic.anonymize.hash_id(ds.PatientID, SALT)
    assert meta["image_id"] == synthetic.anonymize.hash_id(ds.SOPInstanceUID, SALT)
    assert meta["modality"] in ("CR", "DX") and meta["view"] in ("AP", "LAT") and meta["laterality"] in ("L", "R")
    assert meta["body_part"] and meta["manufacturer"] == "AFM-JAX SYNTHETIC"
    assert meta["pixel_spacing_mm"][0] > 0 and meta["spacing_source"] in ("PixelSpacing", "ImagerPixelSpacing")
    assert meta["orig_shape"] == (32, 32)
    flat = repr(meta)
    for raw in (
        str(ds.PatientName),
        ds.PatientID,
        ds.PatientBirthDate,
        ds.AccessionNumber,
        ds.InstitutionName,
        ds.SOPInstanceUID,
        ds.StudyInstanceUID,
    ):
        assert raw not in flat


def test_not_dicom_and_empty_files_are_skipped(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "empty").write_bytes(b"")
    for name in ("a.txt", "empty"):
        with pytest.raises(dicom.SkippedFile, match="not_dicom"):
            dicom.read_dicom(tmp_path / name, SALT)


def test_invalid_window_width_falls_back_instead_of_failing(tmp_path):
    """A Window Width the standard forbids (0, written by some modalities) is no window: the next VOI
    source (here the image's min-max) is used and the file still converts."""
    stored = [[100, 200, 300, 400]]
    out = _read(_dataset(stored, WindowCenter=250, WindowWidth=0), tmp_path)[0]
    np.testing.assert_allclose(out.image, [[0.0, 1 / 3, 2 / 3, 1.0]], atol=1e-6)
    assert out.meta["voi_used"].startswith("minmax")
    exact = _read(_dataset(stored, WindowCenter=250, WindowWidth=0, VOILUTFunction="LINEAR_EXACT"), tmp_path)[0]
    assert exact.meta["voi_used"].startswith("minmax")


def test_patient_key_falls_back_to_study_then_instance():
    ds = pydicom.Dataset()
    ds.SOPInstanceUID = "1.2.9"
    assert dicom.patient_key(ds) == ("study:1.2.9", "SOPInstanceUID")
    ds.StudyInstanceUID = "1.2.3"
    assert dicom.patient_key(ds) == ("study:1.2.3", "StudyInstanceUID")
    ds.PatientID = " P7 "
    assert dicom.patient_key(ds) == ("P7", "PatientID")
    assert dicom.patient_key(pydicom.Dataset()) == ("", "")


@pytest.mark.parametrize("voi", ["window", "none"])
def test_modality_lut_sequence_by_hand(tmp_path, voi):
    """A Modality LUT Sequence (C.11.1) maps stored values through its table (clipped to the table's
    ends); without a window the output spans the modality values' range — the table's, which need not
    be monotonic, so the ends of the stored range do not give it."""
    ds = _dataset([[0, 1, 2, 3]])
    item = pydicom.Dataset()
    item.add_new(0x00283002, "US", [4, 0, 16])  # LUT Descriptor: 4 entries, first mapped value 0, 16 bits
    item.add_new(0x00283006, "US", [100, 50, 300, 200])  # LUT Data
    item.ModalityLUTType = "US"
    ds.ModalityLUTSequence = pydicom.Sequence([item])
    out = _read(ds, tmp_path, dicom.DicomOptions(voi=voi))[0]
    np.testing.assert_allclose(out.image, [[(100 - 50) / 250, 0.0, 1.0, (200 - 50) / 250]], atol=1e-6)

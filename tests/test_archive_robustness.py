"""What a real hospital archive holds somewhere (issue 14): each numbered problem, one test or more.

Built from pydicom's bundled files and small synthetic DICOMs written here. References are pydicom's
own LUT functions (`apply_modality_lut`, `apply_voi_lut`) and hand-computed values, never our output.
"""

import csv
import os
import pathlib
import resource
import shutil
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_fragments
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from afm_jax.data import decode_isolation, dicom, preprocessing, records
from afm_jax.errors import DecodeError, DecoderCrashError, DecodeTimeoutError, TruncatedFileError

SALT = b"robustness test salt"
ROOT = pathlib.Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "preprocess.py"


def _dataset(
    stored, *, photometric="MONOCHROME2", bits=16, signed=False, sop_class="1.2.840.10008.5.1.4.1.1.1.1", **elements
):
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.Modality = "P1", "DX"
    arr = np.asarray(stored, np.int16 if signed else np.uint16)
    ds.set_pixel_data(arr, photometric, bits, generate_instance_uid=False)
    for key, value in elements.items():
        setattr(ds, key, value)
    return ds


def _save(ds, path):
    ds.save_as(path, enforce_file_format=True)
    return path


def _oversized_j2k(path, *, rows_in_header):
    """pydicom's 693_J2KI.dcm (512x512 J2K) with its codestream's SIZ marker claiming 60000x60000."""
    ds = pydicom.dcmread(get_testdata_file("693_J2KI.dcm"))
    codestream = bytearray([f for f in generate_fragments(ds.PixelData) if len(f)][0])
    at = codestream.find(b"\xff\x4f\xff\x51")
    struct.pack_into(">II", codestream, at + 8, 60000, 60000)  # Xsiz, Ysiz (ISO 15444-1 A.5.1)
    ds.PixelData = encapsulate([bytes(codestream)])
    ds.Rows = ds.Columns = rows_in_header
    ds.save_as(path)
    return path


# ─── 1. One file can stop the whole run ──────────────────────────────────────────────────────────


def test_isolated_worker_survives_abort_timeout_and_memory_blowup():
    worker = decode_isolation.IsolatedWorker(decode_isolation.IsolationOptions(timeout_s=3, max_memory_mb=1024))
    try:
        assert worker.call(sum, [1, 2, 3]) == 6
        with pytest.raises(DecoderCrashError, match="SIGABRT"):
            worker.call(os.abort)  # what GDCM's uncaught std::bad_alloc does to a process
        with pytest.raises(DecodeTimeoutError):
            worker.call(__import__("time").sleep, 60)
        with pytest.raises(MemoryError):
            worker.call(bytearray, 4 << 30)  # over the 1 GiB address-space cap of the child
        assert worker.call(sum, [4, 5]) == 9  # restarted after each death
    finally:
        worker.close()


def test_pre_decode_checks_dimensions_budget_and_j2k_header(tmp_path):
    good = _dataset(np.arange(64, dtype=np.uint16).reshape(8, 8))
    assert dicom.read_dicom(_save(good, tmp_path / "good.dcm"), SALT)[0].image.shape == (8, 8)
    short = _dataset(np.arange(64, dtype=np.uint16).reshape(8, 8))
    short.PixelData = short.PixelData[:100]  # 8x8x16 bits need 128 bytes
    with pytest.raises(TruncatedFileError, match="100 bytes.*need 128"):
        dicom.read_dicom(_save(short, tmp_path / "short.dcm"), SALT)
    with pytest.raises(dicom.SkippedFile, match="too_many_pixels:8x8x1>63"):
        dicom.read_dicom(tmp_path / "good.dcm", SALT, dicom.DicomOptions(max_pixels=63))
    with pytest.raises(DecodeError, match="60000x60000 pixels, the DICOM header 512x512"):
        dicom.read_dicom(_oversized_j2k(tmp_path / "forged.dcm", rows_in_header=512), SALT)
    with pytest.raises(dicom.SkippedFile, match="too_many_pixels:60000x60000"):
        dicom.read_dicom(_oversized_j2k(tmp_path / "huge.dcm", rows_in_header=60000), SALT)


# ─── 2. Decodable images lost as failures, unreadable reasons ────────────────────────────────────


def test_empty_modality_and_voi_lut_items_fall_back_with_a_note(tmp_path):
    stored = np.array([[100, 200], [300, 400]], np.uint16)
    ds = _dataset(stored, RescaleSlope=2, RescaleIntercept=-50, WindowCenter=450, WindowWidth=500)
    ds.ModalityLUTSequence = [Dataset()]  # an empty item (as a real archive had)
    ds.VOILUTSequence = [Dataset()]
    out = dicom.read_dicom(_save(ds, tmp_path / "x.dcm"), SALT)[0]
    reference = _dataset(stored, RescaleSlope=2, RescaleIntercept=-50, WindowCenter=450, WindowWidth=500)
    expected = apply_voi_lut(apply_modality_lut(stored, reference), reference)  # pydicom: LINEAR window
    # pydicom's window output spans the rescaled stored range (pydicom/pixels/processing.py, apply_windowing:
    # y_min = 0 * slope + intercept, y_max = (2^BitsStored - 1) * slope + intercept); ours is [0, 1].
    y_min, y_max = -50.0, 65535 * 2 - 50.0
    np.testing.assert_allclose(out.image, (expected - y_min) / (y_max - y_min), atol=1e-5)
    assert "Modality LUT Sequence ignored" in out.meta["notes"] and "VOI LUT Sequence item 0" in out.meta["notes"]


def test_raw_dataset_without_file_meta_decodes_as_implicit_little_endian(tmp_path):
    stored = np.array([[0, 100], [200, 300]], np.uint16)
    ds = _dataset(stored, photometric="MONOCHROME1", sop_class="1.2.840.10008.5.1.4.1.1.1")  # CR
    del ds.file_meta
    path = tmp_path / "raw"
    pydicom.dcmwrite(path, ds, enforce_file_format=False, implicit_vr=True, little_endian=True)
    assert path.read_bytes()[128:132] != b"DICM"
    out = dicom.read_dicom(path, SALT)[0]
    np.testing.assert_allclose(out.image, 1.0 - stored / 300.0, atol=1e-6)  # min-max, MONOCHROME1: bone bright
    assert "Implicit VR Little Endian" in out.meta["notes"]


def test_decoder_failure_reason_is_readable(tmp_path, monkeypatch):
    path = _save(_dataset(np.zeros((4, 4), np.uint16)), tmp_path / "x.dcm")

    def failing(self):
        raise RuntimeError(
            "Unable to decode as exceptions were raised by all available plugins:\n"
            "  gdcm: 'NoneType' object has no attribute 'encode'\n  pylibjpeg: "
        )

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(failing))
    with pytest.raises(DecodeError) as info:
        dicom.read_dicom(path, SALT)
    text = str(info.value)
    assert "NoneType" not in text and "gdcm failed: the library returned no image" in text
    assert "Explicit VR Little Endian, 4x4, 16 bits stored" in text and "pylibjpeg failed: no message" in text


# ─── 3. A blank image stored as training data ────────────────────────────────────────────────────


def test_window_below_the_stored_values_falls_back_and_constant_images_are_skipped(tmp_path):
    rng = np.random.default_rng(0)
    stored = rng.integers(32744, 65536, size=(64, 64)).astype(np.uint16)  # the file: c=2725, w=5310
    ds = _dataset(stored, WindowCenter=2725, WindowWidth=5310)
    frame = dicom.read_dicom(_save(ds, tmp_path / "x.dcm"), SALT)[0]
    np.testing.assert_allclose(
        frame.image, (stored - float(stored.min())) / (float(stored.max()) - stored.min()), atol=1e-6
    )
    assert frame.meta["voi_used"].startswith("minmax") and "leaves the image blank" in frame.meta["notes"]
    out = preprocessing.apply_variant(frame.image, preprocessing.VARIANTS["std512"])
    assert out.image.max() - out.image.min() > 60000
    flat = dicom.read_dicom(_save(_dataset(np.full((32, 32), 700, np.uint16)), tmp_path / "flat.dcm"), SALT)[0]
    with pytest.raises(dicom.SkippedFile, match="blank_after_windowing"):
        preprocessing.apply_variant(flat.image, preprocessing.VARIANTS["window512"])


# ─── 4. Non-deterministic dataset fingerprint ────────────────────────────────────────────────────

_FINGERPRINT_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from afm_jax.data import records
    rng = np.random.default_rng(0)
    examples = [{"image": rng.integers(0, 65535, (8, 8)).astype(np.uint16), "patient_id": f"p{i % 3}",
                 "image_id": f"i{i}", "study_id": "s", "series_id": "r", "body_part": "FEMUR", "view": "AP",
                 "laterality": "L", "modality": "DX", "label": i % 2, "label_name": ["NFF", "AFF"][i % 2],
                 "pixel_spacing_mm": (0.1, float("nan"))} for i in range(6)]
    path = records.write_dataset(examples, sys.argv[1], name="fp")
    print(records.read_info(path)["content_fingerprint"])
""")


def test_content_fingerprint_is_equal_across_processes_and_runs(tmp_path):
    prints = []
    for k, seed in enumerate(("1", "2", "3")):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(ROOT))
        done = subprocess.run(
            [sys.executable, "-c", _FINGERPRINT_SCRIPT, str(tmp_path / f"run{k}")],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        prints.append(done.stdout.strip().splitlines()[-1])
    assert len(set(prints)) == 1, prints
    assert len(prints[0]) == 64


# ─── 5. Misfiled reasons; stale temporaries ──────────────────────────────────────────────────────


def test_docs_list_every_skip_reason():
    text = (ROOT / "docs" / "preprocess.md").read_text()
    for reason in (
        "float_pixel_data",
        "blank_after_windowing",
        "too_many_pixels",
        "not_a_regular_file",
        "TruncatedFileError",
        "DecoderCrashError",
        "DecodeTimeoutError",
        "notes",
    ):
        assert reason in text, reason


_KILLED_WRITE = textwrap.dedent("""
    import os, sys
    import numpy as np
    from afm_jax.data import records
    def examples():
        for i in range(4):
            if i == 2:
                os._exit(9)  # killed in the middle of the write
            yield {"image": np.zeros((8, 8), np.uint16) + i, "patient_id": "p", "image_id": f"i{i}"}
    records.write_dataset(examples(), sys.argv[1], name="killed")
""")


def test_a_killed_write_leaves_no_temporary_folder_after_the_next_run(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", _KILLED_WRITE, str(tmp_path)], env=env, timeout=300)
    assert done.returncode == 9
    parent = tmp_path / "killed"
    assert list(parent.glob(".incomplete-*"))  # what the kill leaves
    records.write_dataset(
        [{"image": np.ones((8, 8), np.uint16), "patient_id": "p", "image_id": "i"}], tmp_path, name="killed"
    )
    assert not list(parent.glob(".incomplete-*")) and (parent / records.SCHEMA_VERSION).is_dir()


# ─── 6. Display semantics ────────────────────────────────────────────────────────────────────────


def test_presentation_lut_inverse_on_monochrome2_keeps_bone_bright(tmp_path):
    src = get_testdata_file("MR_small.dcm")  # MONOCHROME2
    plain = dicom.read_dicom(src, SALT)[0]
    ds = pydicom.dcmread(src)
    ds.PresentationLUTShape = "INVERSE"
    inverse = dicom.read_dicom(_save(ds, tmp_path / "inverse.dcm"), SALT)[0]
    np.testing.assert_array_equal(inverse.image, plain.image)
    stored = ds.pixel_array  # bright where the stored value is high (pydicom's reading of MONOCHROME2)
    assert inverse.image[stored == stored.max()].min() > inverse.image[stored == stored.min()].max()


def test_unsigned_padding_value_on_signed_pixels_is_reinterpreted(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))  # signed, Pixel Padding Value -2000 (SS)
    arr = ds.pixel_array.copy()
    arr[:3, :] = -2000  # make sure padding is present
    ds.PixelData = arr.tobytes()
    reference = dicom.read_dicom(_save(ds, tmp_path / "ss.dcm"), SALT)[0].padding
    np.testing.assert_array_equal(reference, arr == -2000)
    del ds.PixelPaddingValue
    ds.add_new(0x00280120, "US", 63536)  # the same 16 bits written unsigned (as some modalities do)
    path = tmp_path / "us.dcm"
    ds.save_as(path)
    assert pydicom.dcmread(path)[0x00280120].VR == "US"
    np.testing.assert_array_equal(dicom.read_dicom(path, SALT)[0].padding, arr == -2000)


def test_field_crop_threshold_is_relative_to_the_image_range():
    rng = np.random.default_rng(1)
    image = np.full((200, 200), 0.40, np.float32)  # collimator margin
    image[20:180, 30:170] = 0.45 + 0.004 * rng.standard_normal((160, 140))  # low-contrast field (std 0.004)
    top, bottom, left, right = preprocessing.field_box(image, threshold=0.01, max_fraction=0.4)
    assert abs(top - 20) <= 1 and abs(bottom - 180) <= 1 and abs(left - 30) <= 1 and abs(right - 170) <= 1


# ─── The whole archive through the tool, under a memory limit ────────────────────────────────────


@pytest.fixture(scope="module")
def hostile_archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    good = root / "good"
    good.mkdir()
    rng = np.random.default_rng(2)
    for k in range(4):
        ds = _dataset(rng.integers(0, 4096, (48, 40)).astype(np.uint16), bits=12, PatientID=f"patient{k}")
        _save(ds, good / f"img{k}.dcm")
    shutil.copy(get_testdata_file("MR_small.dcm"), good / "crashme_abort.dcm")
    shutil.copy(get_testdata_file("CT_small.dcm"), good / "crashme_hang.dcm")
    _save(_dataset(np.full((32, 32), 700, np.uint16)), root / "flat.dcm")
    _save(
        _dataset(
            rng.integers(32744, 65536, (40, 40)).astype(np.uint16),
            WindowCenter=2725,
            WindowWidth=5310,
            PatientID="saturated",
        ),
        root / "saturated.dcm",
    )
    _oversized_j2k(root / "huge_j2k.dcm", rows_in_header=60000)
    _oversized_j2k(root / "forged_j2k.dcm", rows_in_header=512)
    data = pathlib.Path(get_testdata_file("693_J2KI.dcm")).read_bytes()
    (root / "truncated_j2k.dcm").write_bytes(data[: data.find(b"\xe0\x7f\x10\x00") + 6])
    lut = _dataset(rng.integers(0, 4096, (30, 30)).astype(np.uint16), bits=12, PatientID="lut")
    lut.ModalityLUTSequence = [Dataset()]
    _save(lut, root / "empty_lut.dcm")
    os.symlink(root / "does_not_exist.dcm", root / "dangling.dcm")
    os.mkfifo(root / "a_fifo")
    return root


def _tool(archive, out, *extra, workers, memory_gb=None):
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        AFM_SALT="robustness salt",
        AFM_JAX_TEST_DECODER_FAULT="abort:crashme_abort,hang:crashme_hang",
    )

    def limit():
        if memory_gb:
            resource.setrlimit(resource.RLIMIT_AS, (memory_gb << 30, memory_gb << 30))

    return subprocess.run(
        [
            sys.executable,
            str(TOOL),
            "--input",
            str(archive),
            "--out",
            str(out),
            "--quiet",
            "--workers",
            str(workers),
            "--chunk_size",
            "4",
            "--file_timeout",
            "20",
            "--config.image_size=32",
            "--config.name=small",
            *extra,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=limit,
    )


@pytest.mark.parametrize("workers", [0, 2])
def test_hostile_archive_converts_with_one_row_per_input_under_a_memory_limit(hostile_archive, tmp_path, workers):
    done = _tool(hostile_archive, tmp_path, workers=workers, memory_gb=6)
    assert done.returncode == 0, done.stderr[-3000:]
    directory = tmp_path / "femur_small_v1" / records.SCHEMA_VERSION
    with open(directory / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    entries = [p for p in hostile_archive.rglob("*") if not p.is_dir() or p.is_symlink()]
    assert len(rows) == len(entries) == 14
    text = "\n".join(r["status"] for r in rows)
    assert text.count("failed:DecoderCrashError: the decoding process died from SIGABRT") == 1
    assert text.count("failed:DecodeTimeoutError") == 1
    assert "failed:DecodeError: the JPEG 2000 codestream says 60000x60000" in text
    assert "skipped:too_many_pixels:60000x60000x1" in text
    assert "failed:TruncatedFileError" in text and "failed:FileNotFoundError: dangling symbolic link" in text
    assert "skipped:not_a_regular_file:fifo" in text and "skipped:blank_after_windowing" in text
    assert sum(r["status"] == "converted" for r in rows) == 6, text
    assert any("Modality LUT Sequence ignored" in r["notes"] for r in rows)
    assert any("leaves the image blank" in r["notes"] for r in rows)
    import cv2

    info = records.read_info(directory)
    for split, n in info["splits"].items():
        source = records.open_split(directory, split)
        for i in range(n):
            png = (
                cv2.imdecode(np.frombuffer(source[i]["image"], np.uint8), cv2.IMREAD_UNCHANGED)
                if isinstance(source[i]["image"], bytes)
                else np.asarray(source[i]["image"])
            )
            assert int(png.max()) - int(png.min()) > 1000  # no blank training image


def test_real_decoder_memory_blowup_under_ulimit_fails_only_that_file(hostile_archive, tmp_path):
    """--config.max_pixels=0 lets the 60000x60000 J2K reach the decoder: under the address-space limit it
    fails (MemoryError or a decoder abort, depending on the library) and the run finishes."""
    done = _tool(hostile_archive, tmp_path, "--config.max_pixels=0", workers=0, memory_gb=6)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(tmp_path / "femur_small_v1" / records.SCHEMA_VERSION / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    huge = [r["status"] for r in rows if "60000" in r["status"] or "Memory" in r["status"]]
    assert any(s.startswith(("failed:MemoryError", "failed:DecoderCrashError")) for s in huge), huge
    assert sum(r["status"] == "converted" for r in rows) == 6

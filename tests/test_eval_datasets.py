"""MURA reader on a tiny fake tree with MURA's exact layout; labelled folder/CSV datasets; the CLI."""

import csv
import importlib.util
import pathlib
import shutil

import cv2
import numpy as np
import pytest

from afm_jax import errors
from afm_jax.data import anonymize, folder_dataset, mura, records
from afm_jax.errors import ConfigError, DatasetNotFoundError

SALT = b"test salt for eval datasets"

# (mura split, body part, patient, study, positive?, number of images)
_MURA_STUDIES = [
    ("train", "ELBOW", "patient00011", "study1", False, 2),
    ("train", "HAND", "patient00011", "study1", True, 1),  # study1 again, other body part: another study
    ("train", "ELBOW", "patient00012", "study1", True, 2),
    ("train", "ELBOW", "patient00012", "study2", False, 1),
    ("train", "WRIST", "patient00013", "study1", True, 3),
    ("train", "WRIST", "patient00014", "study1", False, 1),
    ("train", "WRIST", "patient00015", "study1", False, 2),
    ("train", "ELBOW", "patient00016", "study1", False, 1),
    ("valid", "ELBOW", "patient11185", "study1", True, 2),
    ("valid", "WRIST", "patient11186", "study1", False, 1),
]


def _study_rel(split, part, patient, study, positive):
    return f"MURA-v1.1/{split}/XR_{part}/{patient}/{study}_{'positive' if positive else 'negative'}/"


def _make_mura(root: pathlib.Path) -> dict[str, np.ndarray]:
    """Writes the fake tree and CSVs exactly as MURA-v1.1 ships them; returns relpath -> expected grey image."""
    rng = np.random.default_rng(0)
    expected = {}
    rows = {"train": ([], []), "valid": ([], [])}
    for k, (split, part, patient, study, positive, n) in enumerate(_MURA_STUDIES):
        study_rel = _study_rel(split, part, patient, study, positive)
        (root / study_rel).mkdir(parents=True, exist_ok=True)
        rows[split][1].append([study_rel, str(int(positive))])
        for i in range(1, n + 1):
            rel = f"{study_rel}image{i}.png"
            h, w = 20 + k, 16 + i
            if k == 4 and i == 2:  # an RGB image (MURA has a few): stored as luminance
                bgr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                cv2.imwrite(str(root / rel), bgr)
                expected[rel] = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
            else:
                grey = rng.integers(0, 256, (h, w), dtype=np.uint8)
                cv2.imwrite(str(root / rel), grey)
                expected[rel] = grey
            rows[split][0].append([rel])
    for split, (paths, studies) in rows.items():
        with open(root / "MURA-v1.1" / f"{split}_image_paths.csv", "w", newline="") as f:
            csv.writer(f).writerows(paths)
        with open(root / "MURA-v1.1" / f"{split}_labeled_studies.csv", "w", newline="") as f:
            csv.writer(f).writerows(studies)
    (root / "MURA-v1.1" / "train" / "XR_ELBOW" / "._hidden.png").write_bytes(b"junk")  # macOS litter, unlisted
    return expected


def _read_all(directory, split):
    source = records.open_split(directory, split)
    out = []
    for i in range(len(source)):
        ex = source[i]
        ex["pixels"] = cv2.imdecode(np.frombuffer(ex["image"], np.uint8), cv2.IMREAD_UNCHANGED)
        out.append(ex)
    return out


def _all_bytes(directory: pathlib.Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file())


@pytest.fixture(scope="module")
def mura_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("mura_raw")
    expected = _make_mura(root)
    out = tmp_path_factory.mktemp("mura_out")
    directory = mura.build_mura_dataset(root, out, validation_fraction=0.34, salt=SALT, workers=2)
    return root, expected, directory


def test_mura_splits_labels_and_ids(mura_dataset):
    _, expected, directory = mura_dataset
    info = records.read_info(directory)
    assert set(info["splits"]) == {"train", "validation", "test"}
    assert info["label_names"] == {"0": "normal", "1": "abnormal"}
    assert sum(info["splits"].values()) == len(expected)
    by_split = {s: _read_all(directory, s) for s in info["splits"]}
    hashed = {anonymize.hash_id(f"mura:{p}", SALT): p for _, _, p, _, _, _ in _MURA_STUDIES}
    patients = {s: {hashed[ex["patient_id"]] for ex in exs} for s, exs in by_split.items()}
    assert patients["test"] == {"patient11185", "patient11186"}  # MURA's valid is our test
    assert not patients["train"] & patients["validation"]
    assert not patients["test"] & (patients["train"] | patients["validation"])
    assert patients["validation"] and patients["train"]
    study_label = {anonymize.hash_id(f"mura:{p}/{part}/{s}", SALT): int(pos) for _, part, p, s, pos, _ in _MURA_STUDIES}
    assert len(study_label) == len(_MURA_STUDIES)  # study1 of ELBOW and of HAND (same patient) are two studies
    seen = set()
    for exs in by_split.values():
        for ex in exs:
            label = study_label[ex["study_id"]]
            assert ex["label"] == label and ex["label_name"] == ("abnormal" if label else "normal")
            assert ex["body_part"] in {"ELBOW", "HAND", "WRIST"}
            seen.add(ex["study_id"])
    assert seen == set(study_label)
    assert info["id_salt"] == "user salt" and info["source"] == "MURA-v1.1"


def test_mura_pixels_and_no_raw_ids(mura_dataset):
    _, expected, directory = mura_dataset
    pixels = sorted(
        (ex["pixels"].shape, ex["pixels"].tobytes())
        for s in ("train", "validation", "test")
        for ex in _read_all(directory, s)
    )
    want = sorted((img.shape, (img.astype(np.uint16) * 257).tobytes()) for img in expected.values())
    assert pixels == want  # every image once, one 16-bit channel, RGB as luminance
    blob = _all_bytes(directory)
    for raw in (b"patient000", b"patient111", b"XR_", b"study1_", b"image1"):
        assert raw not in blob


def test_mura_body_part_filter_and_validation_is_salt_free(tmp_path, mura_dataset):
    root, _, _ = mura_dataset
    directory = mura.build_mura_dataset(
        root / "MURA-v1.1",
        tmp_path,
        name="mura_wrist",
        body_parts=["wrist"],
        validation_fraction=0.0,
        salt=b"another salt",
    )
    exs = [ex for s in records.read_info(directory)["splits"] for ex in _read_all(directory, s)]
    assert {ex["body_part"] for ex in exs} == {"WRIST"} and len(exs) == 3 + 1 + 2 + 1
    assert set(records.read_info(directory)["splits"]) == {"train", "test"}
    images = mura.list_mura(root)
    assert mura.carve_validation(images, 0.34) == mura.carve_validation(list(reversed(images)), 0.34)


def test_mura_carve_is_stratified():
    images = [
        {"mura_split": "train", "patient": f"patient{i:05d}", "body_part": part, "label": label}
        for i, (part, label) in enumerate((p, y) for p in ("ELBOW", "WRIST") for y in (0, 1) for _ in range(50))
    ]
    chosen = mura.carve_validation(images, 0.1)
    for part in ("ELBOW", "WRIST"):
        for label in (0, 1):
            stratum = {im["patient"] for im in images if im["body_part"] == part and im["label"] == label}
            assert len(stratum & chosen) == 5


def test_mura_errors_name_the_fix(tmp_path, mura_dataset):
    root, _, _ = mura_dataset
    with pytest.raises(DatasetNotFoundError, match="MURA-v1.1"):
        mura.list_mura(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(root, broken)
    next((broken / "MURA-v1.1" / "valid").rglob("image1.png")).unlink()
    with pytest.raises(DatasetNotFoundError, match="missing"):
        mura.list_mura(broken)
    flipped = tmp_path / "flipped"
    shutil.copytree(root, flipped)
    studies = flipped / "MURA-v1.1" / "valid_labeled_studies.csv"
    studies.write_text(studies.read_text().replace(",1", ",X1").replace(",0", ",1").replace(",X1", ",0"))
    with pytest.raises(ConfigError, match="contradicts"):
        mura.list_mura(flipped)
    with pytest.raises(ConfigError, match="body parts"):
        mura.list_mura(root, body_parts=["knee"])


# ─── Folder and CSV datasets ─────────────────────────────────────────────────────────────────────


def _dicom_copy(dst: pathlib.Path, name="CT_small.dcm"):
    from pydicom.data import get_testdata_file

    shutil.copyfile(get_testdata_file(name), dst)


def _make_folder(root: pathlib.Path):
    rng = np.random.default_rng(1)
    files = {}

    def put(rel, image, writer=cv2.imwrite):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        writer(str(p), image)
        files[rel] = image

    put("normal/JohnDoe1/a.png", rng.integers(0, 256, (30, 20), dtype=np.uint8))
    put("normal/JohnDoe1/b.png", rng.integers(0, 65536, (24, 24), dtype=np.uint16))  # 16-bit kept as is
    put("normal/JaneRoe2/c.png", rng.integers(0, 256, (18, 40, 3), dtype=np.uint8))  # RGB
    put("abnormal/MaxMu3/d.jpg", np.full((32, 32), 200, np.uint8))  # JPEG of a flat image decodes exactly
    put("abnormal/EvaZed4/e.png", rng.integers(0, 256, (64, 48), dtype=np.uint8))
    put("abnormal/single.png", rng.integers(0, 256, (10, 12), dtype=np.uint8))  # no patient folder
    (root / "abnormal" / "notes.txt").write_text("not an image")  # ignored by extension
    (root / "abnormal" / "EvaZed4" / "broken.png").write_bytes(b"\x89PNG broken")  # unreadable: skipped
    (root / "normal" / "Scan5").mkdir()
    _dicom_copy(root / "normal" / "Scan5" / "ct_no_extension")  # DICOM without a suffix
    return files


def test_folder_dataset_images_patients_and_failures(tmp_path):
    root = tmp_path / "knee"
    files = _make_folder(root)
    directory = folder_dataset.build_folder_dataset(
        root,
        tmp_path / "out",
        name="knee",
        salt=SALT,
        label_names=["normal", "abnormal"],
        body_part="knee",
        split_fractions={"train": 0.5, "test": 0.5},
    )
    info = records.read_info(directory)
    assert info["label_names"] == {"0": "normal", "1": "abnormal"}
    assert info["skipped_files"] == {"ValueError": 1}
    exs = [ex for s in info["splits"] for ex in _read_all(directory, s)]
    assert len(exs) == len(files) + 1  # + the DICOM
    by_patient = {}
    for s in info["splits"]:
        for ex in _read_all(directory, s):
            by_patient.setdefault(ex["patient_id"], set()).add(s)
    assert all(len(v) == 1 for v in by_patient.values())  # a patient's images share one split
    john = anonymize.hash_id("JohnDoe1", SALT)
    assert sum(ex["patient_id"] == john for ex in exs) == 2
    assert anonymize.hash_id("1CT1", SALT) in by_patient  # the DICOM's Patient ID, hashed
    assert {ex["body_part"] for ex in exs} == {"KNEE"}
    got = sorted(ex["pixels"].tobytes() for ex in exs if ex["modality"] != "CT")
    want = []
    for image in files.values():
        grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.ndim == 3 else image
        want.append((grey.astype(np.uint16) * 257 if grey.dtype == np.uint8 else grey).tobytes())
    assert got == sorted(want)
    from afm_jax.data import dicom

    ct = next(ex for ex in exs if ex["modality"] == "CT")
    ref = dicom.read_dicom(root / "normal" / "Scan5" / "ct_no_extension", SALT)[0].image
    np.testing.assert_array_equal(ct["pixels"], np.round(ref * 65535).astype(np.uint16))
    assert ct["study_id"] and np.all(np.isfinite(ct["pixel_spacing_mm"]))
    blob = _all_bytes(directory)
    for raw in (b"JohnDoe", b"JaneRoe", b"MaxMu", b"EvaZed", b"1CT1", b"Scan5", b"single"):
        assert raw not in blob
    with pytest.raises(errors.UnreadableImageError, match="broken.png"):
        folder_dataset.build_folder_dataset(root, tmp_path / "out2", name="knee", salt=SALT, strict=True)


def test_csv_dataset_with_header_splits_and_resize(tmp_path):
    rng = np.random.default_rng(2)
    (tmp_path / "img").mkdir()
    rows = [["path", "label", "patient", "split"]]
    for i in range(8):
        cv2.imwrite(str(tmp_path / "img" / f"{i}.png"), rng.integers(0, 256, (40, 100), dtype=np.uint8))
        rows.append([f"img/{i}.png", str(i % 2), f"P{i // 2}", "train" if i < 4 else "test"])
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    directory = folder_dataset.build_folder_dataset(
        tmp_path / "labels.csv", tmp_path / "out", name="wrist", salt=SALT, image_size=50
    )
    info = records.read_info(directory)
    assert info["splits"] == {"train": 4, "test": 4} and info["split_patients"] == {"test": 2, "train": 2}
    assert info["label_names"] == {"0": "0", "1": "1"}  # integer labels keep their values
    for ex in _read_all(directory, "train"):
        assert ex["pixels"].shape == (20, 50) and tuple(ex["orig_shape"]) == (40, 100)
    rows[3][3] = "test"  # patient P1 now in two splits
    with open(tmp_path / "bad.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    with pytest.raises(ConfigError, match="two splits"):
        folder_dataset.build_folder_dataset(tmp_path / "bad.csv", tmp_path / "out", name="bad", salt=SALT)


def test_csv_without_header_and_stratified_splits(tmp_path):
    rng = np.random.default_rng(3)
    lines = []
    for i in range(40):
        p = tmp_path / f"{i}.png"
        cv2.imwrite(str(p), rng.integers(0, 256, (8, 8), dtype=np.uint8))
        lines.append(f"{p},{'fracture' if i % 4 == 0 else 'normal'},pt{i // 2}")
    (tmp_path / "list.csv").write_text("\n".join(lines) + "\n")
    listed = folder_dataset.list_csv(tmp_path / "list.csv")
    assert len(listed) == 40 and listed[0].patient == "pt0" and listed[0].label_name == "fracture"
    directory = folder_dataset.build_folder_dataset(
        tmp_path / "list.csv", tmp_path / "out", name="frac", salt=SALT, label_names=["normal", "fracture"]
    )
    info = records.read_info(directory)
    assert info["split_patients"]["train"] == 16 and sum(info["split_patients"].values()) == 20
    for split in info["splits"]:  # stratified: both classes in every split
        assert set(info["label_counts"][split]) == {"0", "1"}, split
    with pytest.raises(ConfigError, match="not in label_names"):
        folder_dataset.build_folder_dataset(
            tmp_path / "list.csv", tmp_path / "o", name="x", salt=SALT, label_names=["normal"]
        )


def test_to_single_channel():
    bgra = np.zeros((4, 5, 4), np.uint8)
    bgra[..., 2] = 255  # red
    np.testing.assert_array_equal(folder_dataset.to_single_channel(bgra), cv2.cvtColor(bgra, cv2.COLOR_BGRA2GRAY))
    f = np.array([[0.0, 0.5], [1.0, 2.0]], np.float32)
    np.testing.assert_array_equal(folder_dataset.to_single_channel(f), [[0, 16384], [32768, 65535]])
    with pytest.raises(ValueError, match="channels"):
        folder_dataset.to_single_channel(np.zeros((3, 3, 2), np.uint8))


def test_colour_dicom_becomes_luminance():
    import pydicom
    from pydicom.data import get_testdata_file

    path = get_testdata_file("SC_rgb_small_odd.dcm")  # RGB secondary capture, uncompressed
    rgb = pydicom.dcmread(path).pixel_array
    loaded = folder_dataset.read_image(path, SALT)
    np.testing.assert_array_equal(loaded.image, cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
    assert loaded.meta["study_id"] == anonymize.hash_id(str(pydicom.dcmread(path).StudyInstanceUID), SALT)


def test_folder_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        folder_dataset.list_labelled_files(tmp_path / "nope")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match="No images"):
        folder_dataset.list_labelled_files(tmp_path / "empty")
    (tmp_path / "x.csv").write_text("path,label\nmissing.png,1\n")
    with pytest.raises(DatasetNotFoundError, match="do not exist"):
        folder_dataset.list_labelled_files(tmp_path / "x.csv")


# ─── CLI ─────────────────────────────────────────────────────────────────────────────────────────


def _cli():
    path = pathlib.Path(__file__).resolve().parents[1] / "tools" / "make_eval_dataset.py"
    spec = importlib.util.spec_from_file_location("make_eval_dataset", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_mura_and_folder(tmp_path, mura_dataset, capsys, monkeypatch):
    root, expected, _ = mura_dataset
    cli = _cli()
    monkeypatch.setenv("AFM_SALT", "cli salt")
    assert (
        cli.main(
            [
                "mura",
                "--input",
                str(root),
                "--out",
                str(tmp_path / "o"),
                "--body_parts",
                "elbow,hand",
                "--png_compression",
                "0",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "dataset:" in out and "mura/1.0.0" in out
    folder = tmp_path / "f"
    _make_folder(folder)
    assert (
        cli.main(
            [
                "folder",
                "--input",
                str(folder),
                "--out",
                str(tmp_path / "o"),
                "--name",
                "knee",
                "--label_names",
                "normal,abnormal",
            ]
        )
        == 0
    )
    assert "skipped unreadable files" in capsys.readouterr().out
    (tmp_path / "a_file").write_text("x")
    for argv, message in (
        (["mura", "--input", str(tmp_path), "--out", str(tmp_path / "o")], "MURA-v1.1"),
        (["folder", "--input", str(folder), "--out", str(tmp_path / "o"), "--name", "Bad-Name"], "lower_snake"),
        (["folder", "--input", str(folder), "--out", str(tmp_path / "o"), "--name", "knee"], "already exists"),
        (
            ["folder", "--input", str(folder), "--out", str(tmp_path / "o"), "--name", "k", "--splits", "train=0.5"],
            "--splits",
        ),
        (["folder", "--input", str(folder), "--out", str(tmp_path / "a_file"), "--name", "k"], "is a file"),
        (["folder", "--input", str(folder), "--out", str(tmp_path / "o"), "--name", "k", "--workers", "-1"], "workers"),
        (["tiff", "--input", str(folder), "--out", str(tmp_path / "o")], "mura` or `folder"),
    ):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "error:" in err and message in err.split("error:", 1)[1] and "Traceback" not in err, (argv, err)
    monkeypatch.delenv("AFM_SALT")
    # real (folder) data needs the user's salt
    assert cli.main(["folder", "--input", str(folder), "--out", str(tmp_path / "o2"), "--name", "knee2"]) == 2
    assert "salt" in capsys.readouterr().err

"""DICOM tree -> dataset: manifest accounts for every file, PHI-free, resumable, shardable, patient splits."""

import importlib.util
import os
import pathlib
import shutil
from collections import Counter

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from afm_jax import errors
from afm_jax.data import preprocessing, records, synthetic
from afm_jax.data.conversion import chunks as conversion
from afm_jax.data.conversion import inputs as conversion_inputs
from afm_jax.data.conversion import merge as conversion_merge
from afm_jax.errors import ConfigError

SALT = b"conversion test salt"
PYDICOM_FILES = (
    "MR_small.dcm",
    "CT_small.dcm",
    "rtplan.dcm",
    "MR_truncated.dcm",
    "README.txt",
    "reportsi.dcm",
    "SC_rgb_rle.dcm",
    "MR_small_RLE.dcm",
)  # MR_small_RLE: same image as MR_small


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """Synthetic femur DICOMs (fake PHI, labels.csv) mixed with pydicom test files and a duplicate."""
    root = tmp_path_factory.mktemp("archive")
    paths = synthetic.write_dicom_files(root / "synth", num_patients=10, image_size=40)
    (root / "misc" / "sub").mkdir(parents=True)
    for name in PYDICOM_FILES:
        shutil.copy(get_testdata_file(name), root / "misc" / "sub" / name)
    shutil.copy(get_testdata_file("DICOMDIR"), root / "misc" / "DICOMDIR")
    shutil.copy(paths[0], root / "misc" / "copy_of_first")  # exact duplicate (same SOP UID)
    return root


def _convert(
    archive,
    out,
    *,
    shards=None,
    workers=0,
    variant="std512",
    chunk_size=5,
    interrupt_after=None,
    work=None,
    split_mode="stratified",
):
    files = conversion_inputs.list_inputs([archive], archive / "synth" / "labels.csv")
    v = preprocessing.get_variant(variant, {"image_size": 32})
    plan = conversion.make_plan(files, v, work or (out / ".work"), SALT, chunk_size=chunk_size)
    for shard in shards or [(0, 1)]:
        calls = []

        def stop(chunk):
            calls.append(chunk)
            if interrupt_after is not None and len(calls) >= interrupt_after:
                raise KeyboardInterrupt

        conversion.run_shard(plan, SALT, shard=shard, workers=workers, progress=False, on_chunk_done=stop)
    directory, summary = conversion_merge.merge(
        plan, out, preprocessing.variant_dir_name("femur", v), split_mode=split_mode
    )
    return plan, directory, summary


def _records(directory):
    info = records.read_info(directory)
    return {split: [records.open_split(directory, split)[i] for i in range(n)] for split, n in info["splits"].items()}


def _same_if_nan(value):
    """NaN (a record without a regression `target`) compares unequal to itself: compare it as a string."""
    return "nan" if isinstance(value, float) and value != value else value


def _comparable(directory):
    """Everything of a dataset except its creation time: records, index, manifest, info."""
    info = records.read_info(directory)
    info.pop("created")
    info.pop("path")
    recs = {
        s: [{k: _same_if_nan(v.tolist() if isinstance(v, np.ndarray) else v) for k, v in r.items()} for r in rs]
        for s, rs in _records(directory).items()
    }
    index = {p.name: p.read_text() for p in (directory / "index").iterdir()}
    return info, recs, index, (directory / "manifest.csv").read_text()


@pytest.fixture(scope="module")
def reference(archive, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    return _convert(archive, out)


def test_manifest_accounts_for_every_input(archive, reference):
    plan, directory, summary = reference
    manifest = conversion_merge.read_manifest(directory / "manifest.csv")
    all_files = [p for p in archive.rglob("*") if p.is_file()]
    assert len(manifest) == len(all_files) == len(plan.files)
    assert [int(r["file_index"]) for r in manifest] == list(range(len(all_files)))
    status = Counter(r["status"].split(":")[0] for r in manifest)
    assert status["converted"] + status["skipped"] + status["failed"] == len(all_files)
    by_reason = Counter(r["status"] for r in manifest)
    assert by_reason["skipped:not_dicom"] == 2  # README.txt and labels.csv
    assert by_reason["skipped:dicomdir"] == 1
    assert by_reason["skipped:duplicate_sop_instance_uid"] == 2  # copy_of_first, MR_small_RLE
    assert any(s.startswith("failed:") for s in by_reason)  # MR_truncated
    assert any(s.startswith("skipped:non_image") for s in by_reason)
    converted = [r for r in manifest if r["status"] == "converted"]
    n_synthetic = synthetic.count_synthetic_images(10)
    assert len(converted) == n_synthetic + 2  # + MR_small, CT_small
    info = records.read_info(directory)
    assert sum(info["splits"].values()) == len(converted)
    assert info["preprocessing"]["name"] == "std512" and info["preprocessing"]["image_size"] == 32
    assert info["conversion"]["status_counts"] == summary
    # Every converted row points at its record, and the record carries the row's ids.
    recs = _records(directory)
    for row in converted:
        split, index = row["output"].split(":")
        assert recs[split][int(index)]["image_id"] == row["image_id"]
    dup = next(r for r in manifest if r["status"] == "skipped:duplicate_sop_instance_uid" and r["modality"] != "MR")
    assert dup["duplicate_of"] in {r["file_id"] for r in converted}


def test_dataset_reads_with_tfds_and_labels_are_attached(reference):
    import tensorflow_datasets as tfds

    _, directory, _ = reference
    source = tfds.data_source(directory.parent.name, data_dir=os.fspath(directory.parent.parent), split="train")
    example = source[0]
    assert example["image"].dtype == np.uint16 and example["image"].ndim == 3
    assert max(example["image"].shape[:2]) <= 32
    recs = _records(directory)
    labelled = [r for rs in recs.values() for r in rs if r["label"] >= 0]
    assert {r["label_name"] for r in labelled} <= {"aff", "nff", "normal"} and len(labelled) >= 20
    assert records.read_info(directory)["label_names"] == {"0": "aff", "1": "nff", "2": "normal"}


def test_no_phi_anywhere_in_the_output_tree(archive, tmp_path):
    _, directory, _ = _convert(archive, tmp_path, workers=0)
    secrets = set()
    for path in (archive / "synth").rglob("IM*"):
        ds = pydicom.dcmread(path)
        secrets |= {
            str(ds.PatientName),
            str(ds.PatientName).split("^")[0],
            ds.PatientID,
            ds.PatientBirthDate,
            ds.AccessionNumber,
            ds.InstitutionName,
            ds.StudyInstanceUID,
            ds.SOPInstanceUID,
            ds.SeriesInstanceUID,
            str(ds.ReferringPhysicianName).split("^")[0],
        }
        secrets.add(str(path.relative_to(archive)))
    secrets.add(SALT.decode())
    secrets = {s for s in secrets if len(s) >= 4}
    assert len(secrets) > 50
    blobs = [(p, p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file()]
    assert len(blobs) >= 6
    for p, blob in blobs:
        for secret in secrets:
            assert secret.encode() not in blob, (p, secret)


def test_interrupted_run_resumes_to_the_same_dataset(archive, reference, tmp_path):
    plan, directory, _ = reference
    with pytest.raises(KeyboardInterrupt):
        _convert(archive, tmp_path, interrupt_after=2)
    work = tmp_path / ".work"
    done = sorted(work.glob("chunks/*.jsonl"))
    assert len(done) == 2
    # A killed worker's leftovers: a half-written chunk of an unfinished chunk.
    (work / "chunks" / "chunk-000004.array_record.tmp-999-abc").write_bytes(b"partial")
    (work / "chunks" / ".chunk-000004.jsonl.tmp-0123abcd").write_bytes(b"{")  # killed inside _atomic_write
    _, resumed, _ = _convert(archive, tmp_path)
    assert not [p.name for p in (work / "chunks").iterdir() if ".tmp-" in p.name]  # hidden ones included
    assert _comparable(resumed) == _comparable(directory)


def test_shards_merged_equal_a_single_run(archive, reference, tmp_path):
    _, directory, _ = reference
    _, sharded, _ = _convert(archive, tmp_path, shards=[(2, 3), (0, 3), (1, 3)])
    assert _comparable(sharded) == _comparable(directory)


def test_worker_processes_give_the_same_dataset(archive, reference, tmp_path):
    _, directory, _ = reference
    _, pooled, _ = _convert(archive, tmp_path, workers=2, chunk_size=8)
    a, b = _comparable(pooled), _comparable(directory)
    assert a[1:] == b[1:]  # records, index, manifest
    a[0].pop("conversion"), b[0].pop("conversion")  # differs only in chunk_size
    assert a[0] == b[0]


def test_merge_refuses_missing_chunks_and_other_plans(archive, tmp_path):
    files = conversion_inputs.list_inputs([archive])
    v = preprocessing.get_variant("std512", {"image_size": 32})
    plan = conversion.make_plan(files, v, tmp_path / "w", SALT, chunk_size=5)
    conversion.run_shard(plan, SALT, shard=(0, 4), progress=False)
    with pytest.raises(errors.IncompleteConversionError, match="chunks are not converted"):
        conversion_merge.merge(plan, tmp_path, "x")
    with pytest.raises(ConfigError, match="variant"):
        conversion.make_plan(files, preprocessing.get_variant("clahe512"), tmp_path / "w", SALT, chunk_size=5)
    with pytest.raises(ConfigError, match="salt"):
        conversion.make_plan(files, v, tmp_path / "w", b"another salt", chunk_size=5)


def test_two_variants_live_side_by_side(archive, reference, tmp_path):
    _, directory, _ = reference
    out = directory.parent.parent
    _, other, _ = _convert(archive, out, variant="clahe512", work=tmp_path / "w")
    assert other.parent.name == "femur_clahe512_v1" and directory.parent.name == "femur_std512_v1"
    assert records.read_info(other)["preprocessing"]["normalization"] == "clahe"
    assert records.read_info(directory)["preprocessing"]["normalization"] == "percentile"
    assert records.read_info(other)["splits"] == records.read_info(directory)["splits"]


def test_no_patient_in_two_splits(reference):
    _, directory, _ = reference
    info = records.read_info(directory)
    seen = {}
    for split in info["splits"]:
        for patient in records.split_index(directory, split)["patient_id"]:
            assert seen.setdefault(patient, split) == split


def test_stratified_patient_splits_hit_the_fractions_per_label():
    rng = np.random.default_rng(0)
    patients = {
        f"p{i:05d}": Counter({int(rng.choice([0, 1, -1], p=[0.2, 0.3, 0.5])): int(rng.integers(1, 4))})
        for i in range(3000)
    }
    fractions = {"train": 0.7, "validation": 0.1, "test": 0.2}
    splits = conversion_merge.assign_patient_splits(patients, fractions)
    for label in (0, 1, -1):
        members = [p for p, c in patients.items() if label in c]
        counts = Counter(splits[p] for p in members)
        for split, fraction in fractions.items():
            assert abs(counts[split] - fraction * len(members)) <= 1, (label, split, counts)
    hashed = conversion_merge.assign_patient_splits(patients, fractions, mode="hash")
    assert hashed == {p: records.split_of_patient(p, fractions) for p in patients}
    assert abs(Counter(hashed.values())["test"] / 3000 - 0.2) < 0.03


def test_inputs_from_csv_and_sharding_are_deterministic(archive, tmp_path):
    csv_path = tmp_path / "list.csv"
    targets = sorted(p for p in (archive / "synth").rglob("IM*"))[:4]
    csv_path.write_text(
        "path,label\n"
        + "".join(f"{p},{'AFF' if i % 2 else 'NFF'}\n" for i, p in enumerate(targets))
        + "missing/file.dcm,AFF\n"
    )
    files = conversion_inputs.list_inputs([csv_path])
    assert [f.label_name for f in files] == ["NFF", "AFF", "NFF", "AFF", "AFF"]
    assert conversion_inputs.label_ids(files) == {"AFF": 0, "NFF": 1}
    row, _ = conversion.convert_file(files[-1], preprocessing.get_variant("std512"), SALT, {})
    assert row["status"] == "skipped:missing_file"
    shards = [conversion_inputs.chunks_of_shard(10, (i, 3)) for i in range(3)]
    assert sorted(sum(shards, [])) == list(range(10)) and shards[1] == [1, 4, 7]
    with pytest.raises(ConfigError, match="i/n"):
        conversion_inputs.parse_shard("3")
    with pytest.raises(ConfigError, match="does not exist"):
        conversion_inputs.list_inputs([tmp_path / "nope"])


def test_cli_end_to_end_and_user_errors(archive, tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location(
        "preprocess", pathlib.Path(__file__).resolve().parents[1] / "tools" / "preprocess.py"
    )
    preprocess = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(preprocess)

    monkeypatch.delenv("AFM_SALT", raising=False)
    monkeypatch.delenv("AFM_SALT_FILE", raising=False)
    args = [
        "--input",
        str(archive),
        "--out",
        str(tmp_path / "out"),
        "--workers",
        "0",
        "--quiet",
        "--config.image_size=24",
        "--config.name=tiny",
        "--chunk_size",
        "7",
    ]
    code = preprocess.main(args)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and "AFM_SALT" in err
    monkeypatch.setenv("AFM_SALT", "cli salt")
    assert preprocess.main(args + ["--input", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("x")
    binary = tmp_path / "labels.csv"
    binary.write_bytes(bytes(range(256)) * 4)
    for bad, message in (
        (["--shard", "2/2"], "0 <= i < n"),
        (["--splits", "train=0.5,test=0.1"], "sum to"),
        (["--variant", "no_such"], "std512"),
        (["--config.name=std512"], "changes the pixels"),
        (["--config.image_size=abc"], "config.image_size"),
        (["--workers", "-1"], ">= 0"),
        (["--out", str(tmp_path / "a_file")], "is a file"),
        (["--labels", str(binary)], "binary"),
        (["--config.no_such_key=1"], "no_such_key"),
    ):
        code = preprocess.main(args + bad)
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error:") and message in err and "Traceback" not in err, (bad, err)
    (tmp_path / "no_dicom").mkdir()
    (tmp_path / "no_dicom" / "notes.txt").write_text("not an image")
    code = preprocess.main(args + ["--input", str(tmp_path / "no_dicom"), "--out", str(tmp_path / "empty_out")])
    err = capsys.readouterr().err
    assert code == 2 and "No file was converted" in err and "not_dicom" in err
    assert preprocess.main(args + ["--shard", "1/2"]) == 0
    assert preprocess.main(args + ["--merge"]) == 2
    assert "not converted yet" in capsys.readouterr().err
    preprocess.main(args + ["--shard", "0/2"])
    assert preprocess.main(args + ["--merge"]) == 0
    printed = capsys.readouterr().out
    assert "converted:" in printed and "skipped:dicomdir" in printed
    directory = tmp_path / "out" / "femur_tiny_v1" / records.SCHEMA_VERSION
    assert records.read_info(directory)["preprocessing"]["image_size"] == 24
    manifest = conversion_merge.read_manifest(directory / "manifest.csv")
    failed = next(r for r in manifest if r["status"].startswith("failed:"))
    preprocess.main(["--input", str(archive), "--locate", failed["file_id"]])
    assert "MR_truncated.dcm" in capsys.readouterr().out

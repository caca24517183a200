"""The record format: write -> read back through our reader and through TFDS itself, splits, errors."""

from __future__ import annotations

import json
import os
import re

import cv2
import numpy as np
import pytest
import tensorflow_datasets as tfds

from afm_jax import errors
from afm_jax.data import records

NUM_EXAMPLES = 48


def make_examples(n: int = NUM_EXAMPLES, seed: int = 0) -> list[dict]:
    """Small images of varied shapes and input forms (uint16 and uint8 arrays, 16- and 8-bit PNG
    bytes), 3 images per patient."""
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(n):
        image = rng.integers(0, 65536, (12 + i % 5, 16 + i % 7), dtype=np.uint16)
        image[0, 0], image[0, 1] = 0, 65535
        ex = {
            "image": image,
            "patient_id": f"pat{i // 3:04d}",
            "study_id": f"st{i // 3}",
            "series_id": f"se{i}",
            "image_id": f"img{i:04d}",
            "body_part": "FEMUR",
            "view": ["AP", "LAT"][i % 2],
            "laterality": ["L", "R", ""][i % 3],
            "modality": "DX",
            "pixel_spacing_mm": [0.1 + i / 1000, 0.2],
            "orig_shape": [1000 + i, 2000],
            "label": [-1, 0, 1][i % 3],
            "label_name": ["", "NFF", "AFF"][i % 3],
            "fracture_type": "subtroch" if i % 3 == 2 else "",
        }
        if i % 8 == 3:
            ex["image"] = cv2.imencode(".png", image)[1].tobytes()  # already-encoded PNG bytes
        if i % 8 == 5:
            ex["image"] = (image >> 8).astype(np.uint8)  # uint8 input: stored as value * 257
        if i % 8 == 7:
            ex["image"] = cv2.imencode(".png", (image >> 8).astype(np.uint8))[1].tobytes()  # 8-bit PNG bytes
        examples.append(ex)
    return examples


def expected_pixels(ex: dict) -> np.ndarray:
    image = ex["image"]
    if isinstance(image, bytes):
        image = cv2.imdecode(np.frombuffer(image, np.uint8), cv2.IMREAD_UNCHANGED)
    return image.astype(np.uint16) * 257 if image.dtype == np.uint8 else image


def decode16(png: bytes) -> np.ndarray:
    out = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    assert out.dtype == np.uint16 and out.ndim == 2
    return out


@pytest.fixture(scope="module")
def examples() -> list[dict]:
    return make_examples()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, examples):
    out_dir = tmp_path_factory.mktemp("data")
    path = records.write_dataset(
        iter(examples),
        out_dir,
        name="toy_femur",
        num_examples_hint=len(examples),
        extra_info={"preprocessing": {"window": "full", "max_side": 512}, "source_fingerprint": "abc123"},
        max_shard_bytes=4000,
    )  # small shards: exercises rolling over
    return out_dir, path


def test_layout_is_tfds_and_shards_are_numbered(dataset):
    out_dir, path = dataset
    assert path == out_dir.resolve() / "toy_femur" / records.SCHEMA_VERSION
    names = sorted(os.listdir(path))
    for required in ("dataset_info.json", "features.json", "metadata.json", "index"):
        assert required in names
    shards = [n for n in names if ".array_record-" in n]
    train = sorted(n for n in shards if n.startswith("toy_femur-train."))
    assert len(train) > 1
    for i, n in enumerate(train):
        assert re.fullmatch(rf"toy_femur-train\.array_record-{i:05d}-of-{len(train):05d}", n)
    assert not [n for n in names if n.startswith(".") or "tmp" in n]
    assert not [n for n in os.listdir(path.parent) if n.startswith(".")]


def test_open_split_round_trip_is_exact(dataset, examples):
    _, path = dataset
    by_id = {ex["image_id"]: ex for ex in examples}
    seen = 0
    for split in records.read_info(path)["splits"]:
        source = records.open_split(path, split)
        for i in range(len(source)):
            rec = source[i]
            ex = by_id[rec["image_id"]]
            assert isinstance(rec["image"], bytes)
            np.testing.assert_array_equal(decode16(rec["image"]), expected_pixels(ex))
            for key in records.STRING_KEYS:
                assert rec[key] == ex[key] and isinstance(rec[key], str), key
            assert rec["label"] == ex["label"]
            np.testing.assert_allclose(rec["pixel_spacing_mm"], np.float32(ex["pixel_spacing_mm"]))
            np.testing.assert_array_equal(rec["orig_shape"], ex["orig_shape"])
            assert rec["orig_shape"].dtype == np.int32 and rec["pixel_spacing_mm"].dtype == np.float32
            seen += 1
    assert seen == len(examples)


def test_tfds_reads_the_dataset_without_tensorflow(dataset, examples):
    out_dir, path = dataset
    by_id = {ex["image_id"]: ex for ex in examples}
    builder = tfds.builder_from_directory(path)
    assert builder.info.metadata["source_fingerprint"] == "abc123"
    for split, info in builder.info.splits.items():
        source = builder.as_data_source(split)
        assert len(source) == info.num_examples
        for i in range(len(source)):
            ex = source[i]
            np.testing.assert_array_equal(ex["image"][..., 0], expected_pixels(by_id[ex["image_id"].decode()]))
            assert ex["image"].dtype == np.uint16
    by_name = tfds.data_source("toy_femur", data_dir=out_dir, split="train")
    assert len(by_name) == builder.info.splits["train"].num_examples


def test_parse_record_agrees_with_tfds_decoding(dataset):
    _, path = dataset
    tfds_source = tfds.builder_from_directory(path).as_data_source(
        "train", decoders={"image": tfds.decode.SkipDecoding()}
    )
    ours = records.open_split(path, "train")
    for i in range(len(ours)):
        theirs, mine = tfds_source[i], ours[i]
        assert set(theirs) == set(mine) == set(records.SCHEMA_KEYS)
        for key, value in theirs.items():
            expected = value.decode() if isinstance(value, bytes) and key != "image" else value
            np.testing.assert_array_equal(mine[key], expected, err_msg=key)


def test_splits_are_disjoint_by_patient_and_counts_match_info(dataset, examples):
    _, path = dataset
    info = records.read_info(path)
    assert sum(info["splits"].values()) == len(examples)
    patients = {}
    for split, count in info["splits"].items():
        source = records.open_split(path, split)
        assert len(source) == count
        patients[split] = {source[i]["patient_id"] for i in range(count)}
        assert info["split_patients"][split] == len(patients[split])
        assert all(records.split_of_patient(p, records.DEFAULT_SPLIT_FRACTIONS) == split for p in patients[split])
    names = list(patients)
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            assert not patients[names[a]] & patients[names[b]]
    assert set().union(*patients.values()) == {ex["patient_id"] for ex in examples}


def test_info_holds_preprocessing_fingerprints_and_version(dataset):
    _, path = dataset
    info = records.read_info(path)
    assert info["preprocessing"] == {"window": "full", "max_side": 512}
    assert info["source_fingerprint"] == "abc123"
    assert info["schema_version"] == records.SCHEMA_VERSION and info["version"] == records.SCHEMA_VERSION
    assert info["name"] == "toy_femur" and info["tool_version"]
    assert re.fullmatch(r"[0-9a-f]{64}", info["content_fingerprint"])
    assert info["label_names"] == {"0": "NFF", "1": "AFF"}
    assert set(info["features"]) == set(records.SCHEMA_KEYS)


def test_content_fingerprint_ignores_order_but_not_content(tmp_path, dataset, examples):
    _, path = dataset
    reordered = records.write_dataset(list(reversed(examples)), tmp_path / "a", name="toy_femur")
    assert records.read_info(reordered)["content_fingerprint"] == records.read_info(path)["content_fingerprint"]
    assert records.read_info(reordered)["splits"] == records.read_info(path)["splits"]
    changed = [dict(ex, label_name="x") if i == 0 else ex for i, ex in enumerate(examples)]
    other = records.write_dataset(changed, tmp_path / "b", name="toy_femur")
    assert records.read_info(other)["content_fingerprint"] != records.read_info(path)["content_fingerprint"]


def test_split_of_patient_is_deterministic_and_proportional():
    fractions = {"train": 0.8, "validation": 0.1, "test": 0.1}
    ids = [f"{i:016x}" for i in range(4000)]
    splits = [records.split_of_patient(p, fractions) for p in ids]
    assert splits == [records.split_of_patient(p, dict(reversed(fractions.items()))) for p in ids]
    counts = {s: splits.count(s) / len(ids) for s in fractions}
    for s, f in fractions.items():
        assert abs(counts[s] - f) < 0.03, counts
    with pytest.raises(ValueError, match="sum"):
        records.split_of_patient("x", {"train": 0.8, "test": 0.1})
    with pytest.raises(ValueError, match="positive"):
        records.split_of_patient("x", {"train": 1.2, "test": -0.2})


def test_missing_path_says_how_to_make_a_dataset(tmp_path):
    for path in (tmp_path / "nope", ""):
        with pytest.raises(errors.DatasetNotFoundError) as err:
            records.open_split(path, "train")
        message = str(err.value)
        assert "python -m afm_jax.data.synthetic --out DIR" in message
        assert "tools/preprocess.py" in message and "--config.data.path=" in message
    with pytest.raises(errors.DatasetNotFoundError, match="not a dataset directory"):
        records.read_info(tmp_path)


def test_unknown_split_lists_available_splits(dataset):
    _, path = dataset
    with pytest.raises(errors.DatasetNotFoundError, match=r"no split 'trian'; available splits: .*train"):
        records.open_split(path, "trian")


def test_parent_directories_resolve_to_the_version_dir(dataset):
    out_dir, path = dataset
    assert records.resolve_dataset_dir(out_dir / "toy_femur") == path
    assert records.resolve_dataset_dir(out_dir) == path


def test_selection_serves_only_selected_images_in_order(tmp_path, dataset):
    _, path = dataset
    ids = records.split_index(path, "train")["image_id"]
    chosen = ids[1::3] + ["not-in-this-split"]
    selection = tmp_path / "selection.json"
    selection.write_text(json.dumps(chosen))
    source = records.open_split(path, "train", selection=str(selection))
    assert [source[i]["image_id"] for i in range(len(source))] == ids[1::3]
    selection.write_text(json.dumps(["nothing-matches"]))
    with pytest.raises(ValueError, match="matches none"):
        records.open_split(path, "train", selection=str(selection))
    with pytest.raises(FileNotFoundError, match="data.selection"):
        records.open_split(path, "train", selection=str(tmp_path / "missing.json"))


def test_selection_mistakes_are_user_errors(tmp_path, dataset):
    """Each of these is the user's to fix, so the tools print it as `error: ...` instead of a traceback."""
    _, path = dataset
    selection = tmp_path / "selection.json"
    selection.write_text(json.dumps(["nothing-matches"]))
    with pytest.raises(errors.UserError, match="matches none"):
        records.open_split(path, "train", selection=str(selection))
    with pytest.raises(errors.DatasetNotFoundError, match="data.selection"):
        records.open_split(path, "train", selection=str(tmp_path / "missing.json"))
    selection.write_text(json.dumps({"not": "a list"}))
    with pytest.raises(errors.ConfigError, match="JSON list of image_id strings"):
        records.open_split(path, "train", selection=str(selection))
    selection.write_text("[not json")
    with pytest.raises(errors.ConfigError, match="not JSON"):
        records.open_split(path, "train", selection=str(selection))
    ids = records.split_index(path, "train")["image_id"]
    selection.write_text(json.dumps(ids))
    with pytest.raises(errors.ConfigError, match="sliced split"):
        records.open_split(path, "train[:2]", selection=str(selection))


@pytest.mark.parametrize("name", ["knee_oa", "mura", "a1_b2"])
def test_check_dataset_name_accepts_lower_snake_case(name):
    assert records.check_dataset_name(name) == name


@pytest.mark.parametrize("name", ["Bad-Name", "1mura", "", "knee oa", "_x", "Mura"])
def test_check_dataset_name_rejects_others_as_config_errors(name):
    with pytest.raises(errors.ConfigError, match="--name .* must be lower_snake_case"):
        records.check_dataset_name(name, "--name")


def test_source_pickles_without_its_open_files(dataset):
    import pickle

    _, path = dataset
    source = records.open_split(path, "train")
    first = source[0]
    clone = pickle.loads(pickle.dumps(source))
    assert clone._source is None
    assert clone[0]["image_id"] == first["image_id"] and len(clone) == len(source)


def test_failed_write_leaves_nothing_that_looks_complete(tmp_path, examples):
    def crashing():
        yield from examples[:5]
        raise RuntimeError("scanner on fire")

    with pytest.raises(RuntimeError, match="scanner on fire"):
        records.write_dataset(crashing(), tmp_path, name="crash")
    assert not (tmp_path / "crash" / records.SCHEMA_VERSION).exists()
    assert os.listdir(tmp_path / "crash") == []
    with pytest.raises(errors.DatasetNotFoundError):
        records.open_split(tmp_path, "train")


def test_existing_dataset_is_not_overwritten_by_accident(tmp_path, examples):
    path = records.write_dataset(examples[:6], tmp_path, name="once", split_fractions={"train": 1.0})
    with pytest.raises(FileExistsError, match="overwrite=True"):
        records.write_dataset(examples[:6], tmp_path, name="once")
    again = records.write_dataset(examples[:9], tmp_path, name="once", split_fractions={"train": 1.0}, overwrite=True)
    assert again == path and records.read_info(path)["splits"] == {"train": 9}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"colour": "red"}, "unknown keys"),
        ({"image_id": None}, "lacks required keys"),
        ({"image": np.zeros((4, 4), np.float32)}, "dtype float32"),
        ({"image": np.zeros((4, 4, 3), np.uint16)}, "shape"),
        ({"image": b"not a png"}, "not a PNG"),
        ({"view": 3}, "must be a str"),
    ],
)
def test_bad_examples_are_rejected_with_the_reason(tmp_path, examples, change, message):
    bad = dict(examples[0], **change)
    with pytest.raises(ValueError, match=message):
        records.write_dataset([bad], tmp_path, name="bad")


def test_uncompressed_png_round_trips_and_is_recorded(tmp_path, examples):
    path = records.write_dataset(examples[:6], tmp_path, name="raw", split_fractions={"train": 1.0}, png_compression=0)
    assert records.read_info(path)["png_compression"] == 0
    source = records.open_split(path, "train")
    by_id = {ex["image_id"]: ex for ex in examples}
    for i in range(len(source)):
        rec = source[i]
        np.testing.assert_array_equal(decode16(rec["image"]), expected_pixels(by_id[rec["image_id"]]))
    with pytest.raises(ValueError, match="zlib level"):
        records.write_dataset(examples[:1], tmp_path, name="bad", png_compression=12)


def test_duplicate_image_ids_are_skipped_and_counted(tmp_path, examples):
    path = records.write_dataset(examples[:4] + [examples[0]], tmp_path, name="dup", split_fractions={"train": 1.0})
    info = records.read_info(path)
    assert info["splits"] == {"train": 4} and info["duplicates_skipped"] == 1

"""Transforms and the grain input pipeline: shapes, determinism, worker-count independence,
checkpoint/resume, per-process sharding and the padded eval pass."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from afm_jax import errors
from afm_jax.data import pipeline, records, transforms

IMAGE_SIZE = 16
NUM_EXAMPLES = 64


# ─── Transforms ──────────────────────────────────────────────────────────────────────────────────


def ramp(h: int = 40, w: int = 60) -> np.ndarray:
    """A float image whose pixels are all different: crops and flips are visible in it."""
    return np.arange(h * w, dtype=np.float32).reshape(h, w, 1) / (h * w)


def test_decode_png16_reads_8_and_16_bit_to_unit_range():
    u16 = np.array([[0, 65535], [32768, 1]], np.uint16)
    out = transforms.decode_png16(cv2.imencode(".png", u16)[1].tobytes())
    assert out.shape == (2, 2, 1) and out.dtype == np.float32
    np.testing.assert_allclose(out[..., 0], u16 / 65535, rtol=1e-6)
    u8 = np.array([[0, 255]], np.uint8)
    np.testing.assert_allclose(transforms.decode_png16(cv2.imencode(".png", u8)[1].tobytes())[..., 0], [[0, 1]])
    with pytest.raises(ValueError, match="Cannot decode"):
        transforms.decode_png16(b"garbage")


@pytest.mark.parametrize("shape", [(40, 60), (90, 20), (10, 8), (16, 16)])
def test_random_resized_crop_shape_and_range(shape):
    rng = np.random.default_rng(0)
    image = ramp(*shape)
    for _ in range(20):
        out = transforms.random_resized_crop(image, rng, size=IMAGE_SIZE)
        assert out.shape == (IMAGE_SIZE, IMAGE_SIZE, 1) and out.dtype == np.float32
        assert 0.0 <= out.min() and out.max() <= 1.0


def test_crop_box_respects_bounds_scale_and_ratio():
    rng = np.random.default_rng(1)
    scale, ratio = (0.2, 1.0), (3 / 4, 4 / 3)
    for _ in range(500):
        top, left, h, w = transforms.sample_crop_box(300, 400, rng, scale, ratio)
        assert 0 <= top and top + h <= 300 and 0 <= left and left + w <= 400
        assert 0.19 <= h * w / (300 * 400) <= 1.0
        assert 0.74 <= w / h <= 1.34


def test_flip_mirrors_with_probability_p():
    image = ramp()
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(transforms.flip_lr(image, rng, p=1.0), image[:, ::-1])
    np.testing.assert_array_equal(transforms.flip_lr(image, rng, p=0.0), image)
    flips = sum(transforms.flip_lr(image, rng, p=0.5)[0, 0, 0] != image[0, 0, 0] for _ in range(400))
    assert 150 < flips < 250


def test_intensity_jitter_stays_in_unit_range_and_is_off_at_zero():
    rng = np.random.default_rng(0)
    image = ramp()
    np.testing.assert_array_equal(transforms.intensity_jitter(image, rng), image)
    for _ in range(50):
        out = transforms.intensity_jitter(image, rng, brightness=0.5, contrast=0.5, gamma=0.5)
        assert out.dtype == np.float32 and 0.0 <= out.min() and out.max() <= 1.0
    assert not np.allclose(out, image)


def test_geometry_on_integer_pixels_matches_geometry_on_floats():
    """Chains resize the decoded uint16 image and convert afterwards (cheaper); the result must be
    the float pipeline's up to uint16 rounding."""
    u16 = (ramp(300, 200)[..., 0] * 65535).astype(np.uint16)[..., None]
    via_int = transforms.apply_chain(u16, transforms.eval_chain(IMAGE_SIZE))
    via_float = transforms.apply_chain(transforms.to_float(u16), transforms.eval_chain(IMAGE_SIZE))
    assert via_int.dtype == np.float32
    np.testing.assert_allclose(via_int, via_float, atol=1e-4)


def test_train_transform_is_deterministic_for_a_seed():
    record = {"image": cv2.imencode(".png", (ramp()[..., 0] * 65535).astype(np.uint16))[1].tobytes(), "label": 1}
    transform = transforms.TrainTransform(transforms.train_chain(None, IMAGE_SIZE))

    def run(seed):
        return transform.random_map(record, np.random.default_rng(seed))["image"]

    np.testing.assert_array_equal(run(3), run(3))
    assert not np.array_equal(run(3), run(4))


def test_eval_resize_is_deterministic_and_preserves_flat_images():
    image = ramp(300, 200)
    out = transforms.apply_chain(image, transforms.eval_chain(IMAGE_SIZE))
    assert out.shape == (IMAGE_SIZE, IMAGE_SIZE, 1)
    np.testing.assert_array_equal(out, transforms.apply_chain(image, transforms.eval_chain(IMAGE_SIZE)))
    flat = np.full((123, 77, 1), 0.25, np.float32)
    np.testing.assert_allclose(transforms.resize(flat, None, size=IMAGE_SIZE), 0.25, atol=1e-6)
    # The mean brightness survives the (antialiased) resize.
    assert abs(out.mean() - image.mean()) < 0.01


def test_train_chain_follows_the_config():
    assert [name for name, _ in transforms.train_chain(None, 8)] == [
        "random_resized_crop",
        "flip_lr",
        "to_float",
        "intensity_jitter",
    ]
    off = dict(crop=False, flip=False, brightness=0.0, contrast=0.0, gamma=0.0)
    assert transforms.train_chain(off, 8) == (("resize", {"size": 8}), ("to_float", {}))
    jitter = dict(transforms.train_chain(dict(brightness=0.0), 8))["intensity_jitter"]
    assert jitter == {"contrast": 0.1, "gamma": 0.1}
    with pytest.raises(ValueError, match="Unknown augment config keys"):
        transforms.train_chain({"hue": 0.1}, 8)
    with pytest.raises(ValueError, match="crop_scale"):
        transforms.train_chain({"crop_scale": (0.5, 0.2)}, 8)


@pytest.mark.parametrize(
    "augment, message",
    [
        ({"hue": 0.1}, "Unknown augment config keys"),
        ({"brightness": 1.5}, "data.augment.brightness"),
        ({"crop_scale": 0.5}, "data.augment.crop_scale"),
    ],
)
def test_bad_augment_configs_are_user_errors(augment, message):
    """The tools show a UserError as one `error:` line, so these config mistakes never end in a traceback."""
    with pytest.raises(errors.UserError, match=message):
        transforms.train_chain(augment, 8)


# ─── Pipelines ───────────────────────────────────────────────────────────────────────────────────


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    """64 small images, each with a unique label so that batches say which examples they hold."""
    rng = np.random.default_rng(0)
    examples = (
        {
            "image": rng.integers(0, 65536, (20 + i % 9, 24 + i % 5), dtype=np.uint16),
            "patient_id": f"p{i // 2:03d}",
            "image_id": f"i{i:03d}",
            "label": i,
        }
        for i in range(NUM_EXAMPLES)
    )
    return str(
        records.write_dataset(
            examples, tmp_path_factory.mktemp("data"), name="pipe", split_fractions={"train": 0.75, "validation": 0.25}
        )
    )


def data_config(path: str, num_workers: int = 0, **changes) -> "pipeline.ml_collections.ConfigDict":
    cfg = pipeline.default_data_config()
    cfg.path, cfg.num_workers = path, num_workers
    cfg.update(changes)
    return cfg


def take(it, n: int) -> list[dict]:
    return [next(it) for _ in range(n)]


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_train_batches_have_the_contracted_form(dataset):
    it = pipeline.build_train_iterator(data_config(dataset), global_batch_size=8, seed=0, image_size=IMAGE_SIZE)
    batch = next(it)
    assert batch["image"].shape == (8, IMAGE_SIZE, IMAGE_SIZE, 1) and batch["image"].dtype == np.float32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["label"].shape == (8,) and type(batch["image"]) is np.ndarray
    it.close()


def test_train_iterator_is_deterministic_for_a_seed(dataset):
    def run(seed):
        it = pipeline.build_train_iterator(data_config(dataset), global_batch_size=8, seed=seed, image_size=IMAGE_SIZE)
        return take(it, 3)

    assert_same_batches(run(5), run(5))
    assert not np.array_equal(run(5)[0]["image"], run(6)[0]["image"])


def test_epochs_cover_the_split_and_are_reshuffled(dataset):
    n_train = len(records.open_split(dataset, "train"))
    it = pipeline.build_train_iterator(data_config(dataset), global_batch_size=1, seed=0, image_size=IMAGE_SIZE)
    labels = np.concatenate([b["label"] for b in take(it, 2 * n_train)])
    first, second = labels[:n_train], labels[n_train:]
    train_labels = sorted(records.split_index(dataset, "train")["label"])
    assert sorted(first) == sorted(second) == train_labels
    assert list(first) != list(second) and list(first) != train_labels


@pytest.mark.slow
def test_workers_do_not_change_batches_and_state_resumes_exactly(dataset):
    """num_workers 0 and 2 give the same batches; a state saved after k batches (JSON round trip)
    resumes into a fresh iterator with either worker count exactly where it left off — across an
    epoch boundary (48 train examples, 6 batches of 12 = 1.5 epochs)."""
    kwargs = dict(global_batch_size=12, seed=3, image_size=IMAGE_SIZE)
    reference = take(pipeline.build_train_iterator(data_config(dataset, 0), **kwargs), 6)

    it = pipeline.build_train_iterator(data_config(dataset, 2), **kwargs)
    assert_same_batches(take(it, 3), reference[:3])
    state = json.loads(json.dumps(pipeline.iterator_state(it)))
    it.close()
    assert state["next_batch"] == 3

    for num_workers in (2, 0):
        fresh = pipeline.build_train_iterator(data_config(dataset, num_workers), **kwargs)
        pipeline.restore_iterator_state(fresh, state)
        assert_same_batches(take(fresh, 3), reference[3:])
        fresh.close()


def test_restore_refuses_a_state_from_a_different_pipeline(dataset):
    it = pipeline.build_train_iterator(data_config(dataset), global_batch_size=8, seed=0, image_size=IMAGE_SIZE)
    next(it)
    state = pipeline.iterator_state(it)
    other = pipeline.build_train_iterator(data_config(dataset), global_batch_size=8, seed=1, image_size=IMAGE_SIZE)
    with pytest.raises(ValueError, match="seed: saved 0, now 1"):
        pipeline.restore_iterator_state(other, state)


def test_grain_orbax_handler_saves_and_restores_the_iterator(dataset, tmp_path):
    """The trainer checkpoints the iterator with grain's orbax handler (JSON per process)."""
    import grain
    from etils import epath

    kwargs = dict(global_batch_size=8, seed=0, image_size=IMAGE_SIZE)
    reference = take(pipeline.build_train_iterator(data_config(dataset), **kwargs), 4)
    it = pipeline.build_train_iterator(data_config(dataset), **kwargs)
    take(it, 2)
    handler = grain.checkpoint.CheckpointHandler()
    handler.save(epath.Path(tmp_path), item=it)
    fresh = handler.restore(epath.Path(tmp_path), item=pipeline.build_train_iterator(data_config(dataset), **kwargs))
    assert_same_batches(take(fresh, 2), reference[2:])
    fresh.close()
    with pytest.raises(ValueError, match="closed"):
        next(fresh)


def test_processes_read_disjoint_slices_redealt_each_epoch(dataset):
    """Two simulated hosts: each sees half the split per epoch, no example on both in an epoch."""
    n_train = len(records.open_split(dataset, "train"))
    assert n_train % 2 == 0, "the union check below needs an even split"
    per_host = n_train // 2
    epochs = []  # [host][epoch] -> set of labels
    for process_index in (0, 1):
        it = pipeline.build_train_iterator(
            data_config(dataset),
            global_batch_size=4,
            seed=0,
            image_size=IMAGE_SIZE,
            process_index=process_index,
            process_count=2,
        )
        batches = take(it, 2 * per_host // 2)
        assert batches[0]["image"].shape[0] == 2  # local batch = global // process_count
        labels = np.concatenate([b["label"] for b in batches])
        epochs.append([set(labels[:per_host]), set(labels[per_host:])])
        assert all(len(e) == per_host for e in epochs[-1])
    train_labels = set(records.split_index(dataset, "train")["label"])
    for epoch in (0, 1):
        assert not epochs[0][epoch] & epochs[1][epoch]
        assert epochs[0][epoch] | epochs[1][epoch] == train_labels
    assert epochs[0][0] != epochs[0][1]
    with pytest.raises(ValueError, match="multiple of the 2 processes"):
        pipeline.build_train_iterator(
            data_config(dataset), global_batch_size=5, seed=0, image_size=IMAGE_SIZE, process_index=0, process_count=2
        )


def test_selection_limits_training_to_selected_images(dataset, tmp_path):
    index = records.split_index(dataset, "train")
    chosen = index["image_id"][:10]
    selection = tmp_path / "sel.json"
    selection.write_text(json.dumps(chosen))
    it = pipeline.build_train_iterator(
        data_config(dataset, selection=str(selection)), global_batch_size=5, seed=0, image_size=IMAGE_SIZE
    )
    labels = np.concatenate([b["label"] for b in take(it, 4)])
    assert set(labels) == set(index["label"][:10])


def test_eval_covers_each_example_once_in_order_with_mask(dataset):
    source = records.open_split(dataset, "validation")
    n = len(source)
    assert n % 8, "the test needs a padded last batch"
    ev = pipeline.build_eval_iterator(data_config(dataset), split="validation", batch_size=8, image_size=IMAGE_SIZE)
    batches = list(ev)
    assert len(batches) == len(ev) == -(-n // 8)
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.dtype == bool and mask.sum() == n and mask[:n].all() and not mask[n:].any()
    labels = np.concatenate([b["label"] for b in batches])[mask]
    assert list(labels) == [source[i]["label"] for i in range(n)]
    patients = np.concatenate([b["patient_id"] for b in batches])[mask]
    assert list(patients) == [source[i]["patient_id"] for i in range(n)]
    first = transforms.apply_chain(transforms.decode_png(source[0]["image"]), transforms.eval_chain(IMAGE_SIZE))
    np.testing.assert_array_equal(batches[0]["image"][0], first)
    assert not batches[-1]["image"][~batches[-1]["mask"]].any()


def test_eval_hosts_assemble_global_batches_in_order(dataset):
    n = len(records.open_split(dataset, "validation"))
    per_host = [
        list(
            pipeline.build_eval_iterator(
                data_config(dataset),
                split="validation",
                batch_size=8,
                image_size=IMAGE_SIZE,
                process_index=i,
                process_count=2,
            )
        )
        for i in (0, 1)
    ]
    assert len(per_host[0]) == len(per_host[1])
    global_labels = np.concatenate([np.concatenate([a["label"], b["label"]]) for a, b in zip(*per_host)])
    global_mask = np.concatenate([np.concatenate([a["mask"], b["mask"]]) for a, b in zip(*per_host)])
    assert list(global_labels[global_mask]) == records.split_index(dataset, "validation")["label"]
    assert global_mask.sum() == n


def test_too_small_a_training_split_for_the_processes_is_a_user_error(dataset, tmp_path):
    selection = tmp_path / "one.json"
    selection.write_text(json.dumps(records.split_index(dataset, "train")["image_id"][:1]))
    with pytest.raises(errors.UserError, match="too few for 2 processes"):
        pipeline.build_train_dataset(
            data_config(dataset, selection=str(selection)),
            global_batch_size=2,
            seed=0,
            image_size=IMAGE_SIZE,
            process_index=0,
            process_count=2,
        )

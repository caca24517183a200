"""Multi-crop input for DINO: shapes, determinism, DINO's per-view ops, iBOT block masks."""

import os

import numpy as np
import pytest

from afm_jax.data import multicrop, transforms
from afm_jax.train.defaults import default_config


def _config(path, **multicrop_overrides):
    config = default_config("dino", "mu/8")
    config.data.path = os.fspath(path)
    config.data.num_workers = 0
    config.image_size = 32
    config.batch_size = 4
    config.multicrop.update(num_local=3, local_size=16, **multicrop_overrides)
    return config


def _batches(config, n, **kw):
    it = multicrop.build_multicrop_iterator(config, patch_size=8, **kw)
    try:
        return [next(it) for _ in range(n)]
    finally:
        it.close()


def test_multicrop_batches_have_one_array_per_crop_size(synthetic_dataset):
    config = _config(synthetic_dataset)
    config.dino.ibot.update(enabled=True, mask_probability=1.0, mask_ratio=(0.2, 0.4))
    (batch,) = _batches(config, 1, ibot=config.dino.ibot)
    assert batch["global"].shape == (4, 2, 32, 32, 1) and batch["global"].dtype == np.float32
    assert batch["local"].shape == (4, 3, 16, 16, 1) and batch["local"].dtype == np.float32
    assert batch["masks"].shape == (4, 2, 16) and batch["masks"].dtype == bool
    assert batch["label"].shape == (4,)
    for key in ("global", "local"):
        assert 0.0 <= batch[key].min() and batch[key].max() <= 1.0
    counts = batch["masks"].sum(-1)
    assert np.all(counts >= 1) and np.all(counts <= int(16 * 0.4))  # every crop masked, within the ratio
    # The views differ from each other (independent crops), the two globals included.
    assert not np.allclose(batch["global"][:, 0], batch["global"][:, 1])


def test_multicrop_is_deterministic_for_a_seed(synthetic_dataset):
    config = _config(synthetic_dataset)
    a, b = _batches(config, 2), _batches(config, 2)
    for x, y in zip(a, b):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    config.seed = 1
    c = _batches(config, 1)
    assert not np.array_equal(a[0]["global"], c[0]["global"])


def test_multicrop_iterator_state_resumes_exactly(synthetic_dataset):
    config = _config(synthetic_dataset)
    it = multicrop.build_multicrop_iterator(config, patch_size=8)
    next(it)
    state = it.get_state()
    want = next(it)
    it.close()
    fresh = multicrop.build_multicrop_iterator(config, patch_size=8)
    fresh.set_state(state)
    got = next(fresh)
    fresh.close()
    np.testing.assert_array_equal(got["local"], want["local"])


def test_view_chains_follow_dino():
    config = default_config("dino", "S/16")
    globals_, local = multicrop.multicrop_chains(config.multicrop, 224)
    ops = lambda chain: {name: params for name, params in chain}
    g1, g2, loc = ops(globals_[0]), ops(globals_[1]), ops(local)
    # DINO main_dino.py L107 / L114: --global_crops_scale (0.4, 1.), --local_crops_scale (0.05, 0.4)
    # ((0.32, 1) / (0.05, 0.32) are DINOv2's, configs/dinov2_vitl14.py; tests/test_recipes.py).
    assert g1["random_resized_crop"]["size"] == 224 and g1["random_resized_crop"]["scale"] == (0.4, 1.0)
    assert loc["random_resized_crop"]["size"] == 96 and loc["random_resized_crop"]["scale"] == (0.05, 0.4)
    assert (g1["gaussian_blur"]["p"], g2["gaussian_blur"]["p"], loc["gaussian_blur"]["p"]) == (1.0, 0.1, 0.5)
    assert "solarize" not in g1 and g2["solarize"]["p"] == 0.2 and "solarize" not in loc
    assert g1["intensity_jitter"]["p"] == 0.8


def test_solarize_and_blur_ops():
    rng = np.random.default_rng(0)
    image = rng.random((20, 24, 1), dtype=np.float32)
    sol = transforms.solarize(image, rng, p=1.0)
    np.testing.assert_allclose(sol, np.where(image >= 0.5, 1 - image, image))
    np.testing.assert_array_equal(transforms.solarize(image, rng, p=0.0), image)
    scipy_ndimage = pytest.importorskip("scipy.ndimage")
    blurred = transforms.gaussian_blur(image, rng, p=1.0, sigma=(1.5, 1.5))
    want = scipy_ndimage.gaussian_filter(image[..., 0], 1.5, mode="mirror", truncate=4.0)
    np.testing.assert_allclose(blurred[..., 0], want, atol=1e-4)
    np.testing.assert_array_equal(transforms.gaussian_blur(image, rng, p=0.0), image)


def test_intensity_jitter_with_p_one_draws_as_before():
    image = np.random.default_rng(1).random((8, 8, 1), dtype=np.float32)
    a = transforms.intensity_jitter(image, np.random.default_rng(5), brightness=0.2, contrast=0.2, gamma=0.2)
    b = transforms.intensity_jitter(image, np.random.default_rng(5), brightness=0.2, contrast=0.2, gamma=0.2, p=1.0)
    np.testing.assert_array_equal(a, b)
    skipped = transforms.intensity_jitter(image, np.random.default_rng(5), brightness=0.2, p=0.0)
    np.testing.assert_array_equal(skipped, image)


@pytest.mark.parametrize("target", [4, 20, 50])
def test_block_mask_masks_at_most_the_target_in_rectangles(target):
    rng = np.random.default_rng(target)
    mask = multicrop.block_mask((10, 10), target, rng)
    assert mask.shape == (10, 10) and 0 < mask.sum() <= target
    assert mask.sum() >= 0.5 * target  # the generator gets close to its target

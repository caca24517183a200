"""Shared fixtures: a small synthetic femur dataset built once per test session, tiny configs."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory):
    """~24 patients of 64×64 synthetic femurs, written in the record format (train/validation/test)."""
    from afm_jax.data import synthetic
    root = tmp_path_factory.mktemp("synthetic")
    return synthetic.build_synthetic_dataset(root, num_patients=24, seed=0, image_size=64)


@pytest.fixture
def tiny_mae_config(synthetic_dataset):
    """A MAE config small enough to train a few steps in seconds on a CPU."""
    from afm_jax.train.defaults import pretrain_config
    config = pretrain_config("mae", "mu/8")
    config.data.path = os.fspath(synthetic_dataset)
    config.data.num_workers = 0
    config.image_size = 32
    config.batch_size = 8
    config.total_steps = 6
    config.optim.warmup_epochs = 0.5
    config.optim.base_lr = 1e-3
    config.mae.update(decoder_dim=32, decoder_depth=1, decoder_heads=2)
    config.log_every = 1
    config.checkpoint_every = 100
    config.image_every = 0
    return config

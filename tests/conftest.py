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
    from afm_jax.train.defaults import default_config

    config = default_config("mae", "mu/8")
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


@pytest.fixture
def compilation_cache(tmp_path):
    """A persistent XLA cache for one test: a resume test's runs compile the same step, so the later
    runs load it instead of compiling again (~2/3 of such a test's CPU time). Restored afterwards, so
    later tests compile as before, without the deleted directory."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    saved = {n: jax.config.values[n] for n in names}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "xla_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    cc.reset_cache()
    yield
    for n, v in saved.items():
        jax.config.update(n, v)
    cc.reset_cache()

"""Models from config: size overrides, validation, and the demo's "same starting point" baseline."""

import jax
import numpy as np
import pytest
from flax import nnx

from afm_jax import errors
from afm_jax.models import factory
from afm_jax.train.defaults import default_config


def _config(**model):
    config = default_config("mae", "mu/8")
    config.image_size = 32
    config.mae.update(decoder_dim=32, decoder_depth=1, decoder_heads=2)
    config.model.update(model)
    return config


def test_random_init_baseline_is_exactly_the_mae_starting_encoder():
    config = _config()
    mae_encoder = factory.build_mae(config, nnx.Rngs(config.seed)).encoder
    baseline = factory.build_encoder(config.model, config.image_size, nnx.Rngs(config.seed))
    a, b = nnx.to_pure_dict(nnx.state(mae_encoder)), nnx.to_pure_dict(nnx.state(baseline))
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_size_overrides_change_only_what_they_name():
    encoder = factory.build_encoder(_config(depth=2, width=64, num_heads=4).model, 32, nnx.Rngs(0))
    assert len(encoder.blocks) == 2 and encoder.embed_dim == 64 and encoder.num_heads == 4
    assert encoder.mlp_dim == 4 * 64  # follows the new width unless mlp_dim is given


@pytest.mark.parametrize(
    "model, key",
    [
        (dict(num_heads=5), "model.num_heads"),
        (dict(variant="XL/16"), "model.variant"),
        (dict(depth=0), "model.depth"),
        (dict(pos_embed="fourier"), "model.pos_embed"),
    ],
)
def test_bad_model_values_name_the_key(model, key):
    with pytest.raises(errors.ConfigError, match=key.replace(".", r"\.")):
        factory.validate_model_config(_config(**model))


def test_image_size_must_be_a_multiple_of_the_patch():
    config = _config()
    config.image_size = 36
    with pytest.raises(errors.ConfigError, match="image_size"):
        factory.validate_model_config(config)

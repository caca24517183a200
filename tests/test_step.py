"""Gradient accumulation equals one big-batch step; rematerialisation leaves gradients unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from afm_jax.models.vit import VisionTransformer
from afm_jax.train import state as state_lib
from afm_jax.train import step as step_lib


class _Regressor(nnx.Module):
    """A ViT + linear head regressing a per-image target: a deterministic loss that is a batch mean."""

    def __init__(self, remat: str = "none"):
        self.encoder = VisionTransformer("mu/8", img_size=16, depth=2, remat=remat, rngs=nnx.Rngs(0))
        self.head = nnx.Linear(32, 1, rngs=nnx.Rngs(1))


def _loss(model, batch, key, extra, step):
    pred = model.head(model.encoder.pooled_features(batch["image"], pool="avg"))[:, 0]
    return jnp.mean((pred - batch["target"]) ** 2), (
        {"pred_mean": pred.mean()},
        {"target_mean": batch["target"].mean()},
    )


def _batch(n=12):
    rng = np.random.default_rng(0)
    return {
        "image": jnp.asarray(rng.random((n, 16, 16, 1), dtype=np.float32)),
        "target": jnp.asarray(rng.normal(size=n).astype(np.float32)),
    }


def _one_step(accum_steps: int, remat: str = "none"):
    tx = optax.sgd(0.5)  # params then move by the gradient itself (Adam's first step is sign-like)
    graphdef, state = state_lib.create_train_state(_Regressor(remat), tx, seed=0)
    seen = {}

    def update_extra(extra, params, outputs, step):
        seen.update(outputs)
        return extra

    fn = step_lib.make_train_step(
        graphdef, _loss, tx, lambda s: 1e-2, update_extra=update_extra, accum_steps=accum_steps
    )
    new_state, metrics = jax.jit(fn)(state, _batch())
    return new_state, metrics, seen


@pytest.mark.parametrize("accum_steps", [2, 3, 4])
def test_accumulated_micro_batches_equal_one_full_batch_step(accum_steps):
    full, full_metrics, full_out = _one_step(1)
    acc, acc_metrics, acc_out = _one_step(accum_steps)
    np.testing.assert_allclose(acc_metrics["loss"], full_metrics["loss"], rtol=1e-5)
    np.testing.assert_allclose(acc_metrics["grad_norm"], full_metrics["grad_norm"], rtol=1e-5)
    np.testing.assert_allclose(acc_metrics["pred_mean"], full_metrics["pred_mean"], rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(acc.params), jax.tree.leaves(full.params)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert acc_out.keys() == full_out.keys() == {"target_mean"}


def test_accumulation_rejects_an_indivisible_batch():
    with pytest.raises(ValueError, match="not divisible by accum_steps"):
        _one_step(5)


def test_micro_batches_interleave_examples():
    batch = {"x": jnp.arange(6)}
    micro = step_lib.split_micro_batches(batch, 2)
    np.testing.assert_array_equal(micro["x"], [[0, 2, 4], [1, 3, 5]])


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
def test_remat_gives_the_same_gradients(policy):
    def grads(remat):
        model = _Regressor(remat)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss_of(p):
            return _loss(nnx.merge(graphdef, p, rest), _batch(), None, None, None)[0]

        return jax.jit(jax.grad(loss_of))(params)

    for a, b in zip(jax.tree.leaves(grads(policy)), jax.tree.leaves(grads("none"))):
        np.testing.assert_allclose(a, b, atol=1e-6)

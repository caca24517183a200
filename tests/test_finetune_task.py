"""Fine-tuning / linear-probe tasks: loss and class weights against hand computations, layer-wise
lr decay in the optimiser, a frozen encoder that stays frozen, early stopping, and a short run
through the trainer that writes the best model's test predictions."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from afm_jax.errors import ConfigError
from afm_jax.models import classifier as ft
from afm_jax.train import loop
from afm_jax.train import state as state_lib
from afm_jax.train.defaults import default_config
from afm_jax.train.tasks import get_task


def test_balanced_class_weights_equal_sklearn():
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.random.default_rng(0).choice(2, size=97, p=[0.8, 0.2])
    ours = ft.class_weights(labels, 2, "balanced")
    np.testing.assert_allclose(ours, compute_class_weight("balanced", classes=np.arange(2), y=labels), rtol=1e-6)
    np.testing.assert_array_equal(ft.class_weights(labels, 2, "none"), [1.0, 1.0])
    with pytest.raises(ValueError, match="no training examples"):
        ft.class_weights(np.zeros(5, int), 2)


def test_weighted_cross_entropy_matches_numpy_and_ignores_other_labels():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(7, 2)).astype(np.float32)
    targets = np.array([0, 1, 1, -1, 0, 1, -1])
    weights = np.array([0.7, 2.5], np.float32)
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    valid = targets >= 0
    w = weights[targets[valid]]
    expected = -(w * logp[valid, targets[valid]]).sum() / w.sum()
    got = float(ft.weighted_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights)))
    assert got == pytest.approx(expected, rel=1e-5)


def test_binary_targets_map_label_groups():
    labels = np.array([0, 1, 2, 2, 1, 0, 3])
    np.testing.assert_array_equal(ft.binary_targets(labels, (2,), (1,)), [-1, 0, 1, 1, 0, -1, -1])
    np.testing.assert_array_equal(ft.binary_targets(jnp.asarray(labels), (1, 2), (0,)), [0, 1, 1, 1, 1, 0, -1])


@pytest.fixture
def tiny_ft_config(synthetic_dataset):
    def make(task="finetune"):
        config = default_config(task, "mu/8")
        config.data.path = os.fspath(synthetic_dataset)
        config.data.num_workers = 0
        config.image_size = 32
        config.batch_size = 8
        config.total_steps = 4
        config.eval_every = 2
        config.log_every = 2
        config.checkpoint_every = 100
        config.optim.update(base_lr=0.05, warmup_epochs=0.0)
        return config

    return make


def test_layer_decay_scales_updates_per_block(tiny_ft_config):
    config = tiny_ft_config()
    config.model.depth = 3
    config.optim.weight_decay = 0.0
    config.finetune.layer_decay = 0.5
    task = get_task("finetune")
    model = task.build_model(config, nnx.Rngs(0))
    _, params, _ = state_lib.split_model(model)
    tx = task.make_optimizer(config, optax.constant_schedule(1e-2), params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    flat = dict(nnx.to_flat_state(updates))
    head = float(jnp.abs(flat[("head", "kernel")][...]).mean())
    block0 = float(jnp.abs(flat[("encoder", "blocks", 0, "mlp", "fc1", "kernel")][...]).mean())
    patch = float(jnp.abs(flat[("encoder", "patch_embed", "proj", "kernel")][...]).mean())
    # Adam's first step moves every weight by ~lr; layer decay multiplies by 0.5 ** (depth + 1 - layer).
    assert head == pytest.approx(1e-2, rel=1e-3)
    assert block0 / head == pytest.approx(0.5**3, rel=1e-3)
    assert patch / head == pytest.approx(0.5**4, rel=1e-3)


def test_early_stopping_after_patience_evaluations(tiny_ft_config, tmp_path):
    config = tiny_ft_config()
    config.finetune.patience = 2
    task = get_task("finetune")
    task.setup(config, workdir=str(tmp_path), total_steps=10, steps_per_epoch=2)
    val_scores = iter([[0.1, 0.2, 0.8, 0.9], [0.1, 0.9, 0.2, 0.8], [0.3, 0.9, 0.2, 0.8]])  # AUROC 1, 0.5, 0.5
    y = np.array([0, 0, 1, 1])

    def fake_predict(model, split):
        s = np.array([0.2, 0.4, 0.6, 0.8]) if split == "test" else np.array(next(val_scores))
        return {
            "y_true": y,
            "y_score": s,
            "label": y,
            "patient_id": np.array(list("abcd")),
            "image_id": np.array(list("wxyz")),
        }

    task.predict_split = fake_predict
    results = [task.evaluate(None, {}, step) for step in (2, 4, 6)]
    assert [r["should_stop"] for r in results] == [False, False, True]
    assert results[0]["val_auroc"] == pytest.approx(1.0) and results[1]["val_auroc"] < 1.0
    best = json.loads((tmp_path / "finetune_best.json").read_text())
    assert best["step"] == 2 and best["evals_since_best"] == 2
    # A resumed task reads the bookkeeping back.
    again = get_task("finetune")
    again.setup(config, workdir=str(tmp_path), total_steps=10, steps_per_epoch=2)
    assert again.best["step"] == 2


def test_finetune_trains_through_the_trainer_and_writes_test_predictions(tiny_ft_config, tmp_path):
    config = tiny_ft_config()
    config.model.drop_path_rate = 0.1
    result = loop.train(config, str(tmp_path), get_task("finetune"))
    assert result.finished and result.step == 4
    selection = json.loads((tmp_path / "finetune_selection.json").read_text())
    from afm_jax.data import records

    index = records.split_index(config.data.path, "train")
    label_of = dict(zip(index["image_id"], index["label"]))
    assert selection and {label_of[i] for i in selection} <= {1, 2}  # normals are left out
    with np.load(tmp_path / "predictions" / "test.npz") as z:
        test_index = records.split_index(config.data.path, "test")
        n_task = sum(1 for l in test_index["label"] if l in (1, 2))
        assert len(z["y_score"]) == n_task and set(np.unique(z["y_true"])) <= {0, 1}
        assert np.all((z["y_score"] >= 0) & (z["y_score"] <= 1))
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/val_auroc" in l for l in lines) and any("train_accuracy" in l for l in lines)


def test_linear_probe_task_keeps_the_encoder_frozen(tiny_ft_config, tmp_path):
    config = tiny_ft_config("linprobe")
    task = get_task("linprobe")
    result = loop.train(config, str(tmp_path), task)
    start = task.build_model(config, nnx.Rngs(config.seed))  # the same init the trainer drew
    trained = state_lib.merge_model(result.graphdef, jax.device_get(result.state))
    before, after = (
        nnx.to_pure_dict(nnx.state(start.encoder, nnx.Param)),
        nnx.to_pure_dict(nnx.state(trained.encoder, nnx.Param)),
    )
    diffs = jax.tree.leaves(
        jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), before, after)
    )
    assert max(diffs) < 1e-7  # (jit vs eager initialisation rounding only)
    assert float(np.max(np.abs(np.asarray(trained.head.kernel[...]) - np.asarray(start.head.kernel[...])))) > 1e-4


def test_bad_finetune_config_names_the_key(tiny_ft_config, tmp_path):
    config = tiny_ft_config()
    config.finetune.negative_labels = (2,)
    with pytest.raises(ConfigError, match="finetune.negative_labels"):
        loop.train(config, str(tmp_path), get_task("finetune"))
    config = tiny_ft_config()
    config.finetune.positive_labels = (7,)
    with pytest.raises(ConfigError, match="positive_labels"):
        loop.train(config, str(tmp_path / "b"), get_task("finetune"))

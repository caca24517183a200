"""Fine-tuning beyond binary: multi-class softmax and the ordinal cumulative head, checked against
numpy re-implementations, and a short multi-class fine-tune through the study protocol."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from afm_jax.data import pipeline
from afm_jax.models import classifier as ft


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def test_cumulative_head_probabilities_and_loss_match_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(9, 4)) * 2  # 5 grades
    exceed = np.minimum.accumulate(_sigmoid(logits), axis=1)
    expected = np.concatenate([1 - exceed[:, :1], exceed[:, :-1] - exceed[:, 1:], exceed[:, -1:]], axis=1)
    got = np.asarray(ft.cumulative_probabilities(jnp.asarray(logits)))
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert np.all(got >= -1e-7) and np.allclose(got.sum(1), 1.0, atol=1e-6)
    targets = np.array([0, 4, 2, -1, 1, 3, 3, 0, 2])
    weights = np.array([0.5, 1.0, 2.0, 1.5, 0.7])
    valid = targets >= 0
    above = (targets[:, None] > np.arange(4)[None, :]).astype(float)
    p = _sigmoid(logits)
    bce = -(above * np.log(p) + (1 - above) * np.log(1 - p)).sum(1)
    w = weights[np.where(valid, targets, 0)] * valid
    expected_loss = (w * bce).sum() / w.sum()
    got_loss = float(ft.cumulative_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights)))
    assert got_loss == pytest.approx(expected_loss, rel=1e-5)


def test_class_targets_map_label_groups():
    labels = np.array([0, 1, 2, 3, 2, 5])
    np.testing.assert_array_equal(ft.class_targets(labels, ((0,), (1, 3), (2,))), [0, 1, 2, 1, 2, -1])


@pytest.fixture
def ft_config(synthetic_dataset):
    from afm_jax.train.defaults import default_config

    config = default_config("finetune", "mu/8")
    config.data.path = os.fspath(synthetic_dataset)
    config.data.num_workers = 0
    config.image_size = 32
    config.batch_size = 8
    config.total_steps = 4
    config.eval_every = 2
    config.log_every = 2
    config.checkpoint_every = 100
    config.finetune.head_init_std = 1.0
    config.finetune.update(kind="multiclass", classes=((0,), (1,), (2,)))
    return config


def _eval_images(config):
    images, labels = [], []
    batches = pipeline.build_eval_iterator(
        config.data, split="test", batch_size=16, image_size=32, process_index=0, process_count=1
    )
    for batch in batches:
        images.append(batch["image"][batch["mask"]])
        labels.append(batch["label"][batch["mask"]])
    batches.close()
    return np.concatenate(images), np.concatenate(labels)


@pytest.mark.parametrize("kind,head", [("multiclass", "softmax"), ("ordinal", "cumulative")])
def test_multiclass_and_ordinal_scores_are_the_heads_probabilities(ft_config, tmp_path, kind, head):
    from afm_jax.train.tasks import get_task

    ft_config.finetune.update(kind=kind, ordinal_head=head)
    task = get_task("finetune")
    task.setup(ft_config, workdir=str(tmp_path), total_steps=4, steps_per_epoch=2)
    model = task.build_model(ft_config, nnx.Rngs(1))
    got = task.predict_split(model, "test")
    x, labels = _eval_images(ft_config)
    logits = np.asarray(model(jnp.asarray(x)), np.float64)
    if head == "softmax":
        assert logits.shape[1] == 3
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
    else:
        assert logits.shape[1] == 2  # K − 1 exceedance logits
        e = np.minimum.accumulate(_sigmoid(logits), axis=1)
        p = np.concatenate([1 - e[:, :1], e[:, :-1] - e[:, 1:], e[:, -1:]], axis=1)
    np.testing.assert_array_equal(got["y_true"], labels)  # class k = label k here
    np.testing.assert_allclose(got["y_score"], p, rtol=1e-5, atol=1e-6)


def test_three_class_finetune_through_the_protocol(synthetic_dataset, tmp_path):
    from afm_jax.evaluation import backbones as bb
    from afm_jax.evaluation import protocols as pr

    data = os.fspath(synthetic_dataset)
    task = pr.TaskSpec(
        "fracture_type",
        data=data,
        kind="multiclass",
        classes=((0,), (1,), (2,)),
        class_names=("normal", "NFF", "AFF"),
        unit="patient",
    )
    spec = bb.BackboneSpec("random_init", variant="mu/8", image_size=32)
    options = {"total_steps": 4, "batch_size": 8, "eval_every": 2, "log_every": 2, "optim.warmup_epochs": 0.0}
    val, test, info = pr.run_protocol(
        spec,
        task,
        "finetune",
        cache=pr.FeatureCache(tmp_path / "c"),
        data_path=data,
        workdir=os.fspath(tmp_path / "ft"),
        options=options,
    )
    assert test.y_score.shape == (len(test.y_true), 3) and np.allclose(test.y_score.sum(1), 1, atol=1e-5)
    assert "validation_macro_auroc" in info and info["steps_run"] == 4
    scored = pr.score_predictions(val, test, task, n_boot=20)
    assert scored["kind"] == "multiclass" and "macro_auroc" in scored["metrics"]

"""End-to-end training on tiny models: the loss goes down, resume is exact, outputs are stamped."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from afm_jax import errors
from afm_jax.train import loop
from afm_jax.train.tasks import get_task
from afm_jax.train.tasks.mae import MAETask


def _metrics(workdir):
    lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [l for l in lines if "loss" in l], [l for l in lines if l.get("event") == "start"]


def _params(result):
    return jax.device_get(nnx.to_pure_dict(result.state.params))


def test_short_training_lowers_the_loss(tiny_mae_config, tmp_path):
    config = tiny_mae_config
    config.total_steps = 40
    config.optim.base_lr = 0.05  # peak lr 0.05 × 8/256 ≈ 1.6e-3
    config.data.augment.update(crop=False, flip=False, brightness=0.0, contrast=0.0, gamma=0.0)
    result = loop.train(config, str(tmp_path), get_task("mae"))
    assert result.finished and result.step == 40
    losses = [m["loss"] for m in _metrics(tmp_path)[0]]
    assert len(losses) == 40 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])


def test_kill_and_resume_reaches_the_same_parameters(tiny_mae_config, tmp_path):
    config = tiny_mae_config
    k = 3
    config.total_steps = 2 * k
    config.model.drop_path_rate = 0.1  # exercises the per-step RNG as well as the masking RNG
    uninterrupted = loop.train(config, str(tmp_path / "a"), get_task("mae"))

    interrupted = loop.train(config, str(tmp_path / "b"), get_task("mae"), stop_at_step=k)
    assert not interrupted.finished and interrupted.step == k
    resumed = loop.train(config, str(tmp_path / "b"), get_task("mae"))
    assert resumed.finished and resumed.step == 2 * k

    a, b = _params(uninterrupted), _params(resumed)
    diffs = jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b))
    assert max(diffs) <= 1e-6
    # And resuming really continued training (parameters moved after step k).
    moved = jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), _params(interrupted), b))
    assert max(moved) > 0


def test_outputs_record_config_and_code_version(tiny_mae_config, tmp_path):
    config = tiny_mae_config
    config.total_steps = 2
    config.image_every = 2
    loop.train(config, str(tmp_path), get_task("mae"))
    _, starts = _metrics(tmp_path)
    assert starts[0]["config"]["mae"]["decoder_dim"] == 32 and starts[0]["code_version"]
    panels = list((tmp_path / "images").glob("mae_reconstruction_*.png"))
    assert len(panels) == 1
    metas = list((tmp_path / "checkpoints").glob("*/meta/*"))
    assert metas and any("code_version" in p.read_text() for p in metas if p.is_file())


class _NaNLossTask(MAETask):
    """The MAE task with a loss that turns NaN, as a too-high learning rate makes it."""

    def loss(self, model, batch, key, extra, step):
        loss, aux = super().loss(model, batch, key, extra, step)
        return loss * float("nan"), aux


def test_divergence_is_a_user_error_that_names_the_fix(tiny_mae_config, tmp_path):
    from afm_jax.errors import UserError

    tiny_mae_config.total_steps = 2
    with pytest.raises(errors.TrainingDivergedError, match="base_lr") as caught:
        loop.train(tiny_mae_config, str(tmp_path), _NaNLossTask())
    assert isinstance(caught.value, UserError)

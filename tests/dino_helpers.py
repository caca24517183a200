"""Small helpers shared by the DINO tests (ViT and ResNet backbones)."""

import numpy as np
from flax import nnx

from afm_jax.train.tasks import get_task


def setup_dino_task(config, total_steps=10, steps_per_epoch=2):
    """A validated DINO task, set up as the trainer would for a run of `total_steps`."""
    task = get_task("dino")
    task.validate(config)
    task.setup(config, workdir="", total_steps=total_steps, steps_per_epoch=steps_per_epoch)
    return task


def flat_state(tree):
    """{'a/b/c': array} of an nnx state, for comparing two states leaf by leaf."""
    return {"/".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(tree)}


# ─── numpy references (written from the papers' code, shared by the DINO tests) ──────────────────


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def log_softmax(x, axis=-1):
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def reference_sinkhorn(teacher_output, temp, n_iterations=3):
    """DINOv2 dinov2/loss/dino_clstoken_loss.py `sinkhorn_knopp_teacher` on one process (Q is K x B)."""
    q = np.exp(teacher_output / temp).T
    b, k = q.shape[1], q.shape[0]
    q /= q.sum()
    for _ in range(n_iterations):
        q /= q.sum(axis=1, keepdims=True)
        q /= k
        q /= q.sum(axis=0, keepdims=True)
        q /= b
    q *= b
    return q.T

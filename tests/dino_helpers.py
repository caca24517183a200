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

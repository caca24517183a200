"""The full default config of a training run (pretraining or fine-tuning); config files start from it and change what differs.

Every key a task reads exists here, so the locked ConfigDict rejects misspelt overrides.
"""

from __future__ import annotations

import ml_collections

from afm_jax.data.pipeline import default_data_config
from afm_jax.models.factory import default_model_config
from afm_jax.train.optim import default_optim_config
from afm_jax.train.sharding import default_sharding_config
from afm_jax.train.tasks import get_task_class


def default_config(task: str = "mae", variant: str = "B/16") -> ml_collections.ConfigDict:
    """Every key any task reads, with defaults, then the task's own section (`config.<task>`) and its
    changes of common defaults (e.g. fine-tuning's recipe): pretraining and fine-tuning alike."""
    config = ml_collections.ConfigDict()
    config.task = task
    config.seed = 0
    config.image_size = 224
    config.batch_size = 4096  # global, over all processes and devices
    config.num_epochs = 800.0
    config.total_steps = 0  # > 0 overrides num_epochs
    config.data = default_data_config()
    config.data.synthetic = ml_collections.ConfigDict(dict(enabled=False, num_patients=300, image_size=256, seed=0))
    config.model = default_model_config(variant)
    config.optim = default_optim_config()
    config.accum_steps = 1  # gradient accumulation: micro-batches per optimiser step
    # Start from other weights: a timm/DINO/DINOv2 file, an export of ours, or one of our workdirs.
    config.init_from = ""
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))  # -1 = the rest of the devices
    config.sharding = default_sharding_config()
    config.log_every = 50
    config.checkpoint_every = 1000
    config.keep_checkpoints = 3
    config.image_every = 1000  # MAE reconstruction panels (0 = never)
    config.num_panel_images = 4
    config.eval_every = 0  # the task's periodic evaluation (e.g. DINO's kNN monitor); 0 = never
    # After pretraining: AFF-vs-NFF linear probes on frozen features with a fraction of the training
    # patients labelled (image_size 0 = the training size); patient-level AUROC with a bootstrap CI.
    config.probe = ml_collections.ConfigDict(
        dict(
            enabled=False,
            pool="avg",
            batch_size=64,
            image_size=0,
            fractions=(0.1, 1.0),
            seeds=(0, 1, 2),
            n_boot=1000,
            unit="patient",
        )
    )
    get_task_class(task).extend_config(config)  # the method's own section, e.g. config.mae
    return config

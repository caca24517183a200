"""A tiny MAE for the multi-process path on one CPU machine (CI and tests).

Command:  launch/local_multiprocess.sh 2 --config configs/ci/multiprocess_mae.py --workdir /tmp/mp
Hardware: one CPU machine; 2 processes joined by jax.distributed (gloo collectives), 1 device each.
Runtime:  ~1 min on 2 cores (mostly start-up and compilation; 20 synthetic patients are rendered first).
Expected: both processes print `[process i/2] step 8 loss <same value>`; rerunning the same command
          with one process (`python -m afm_jax.main ... --config.total_steps=12`) resumes from step 8.
"""

from afm_jax.train.defaults import default_config


def get_config(arg=None):
    config = default_config("mae", "mu/8")
    config.model.update(width=64, num_heads=2, depth=2)
    config.data.synthetic.update(enabled=True, num_patients=20, image_size=64, seed=0)
    config.data.num_workers = 0
    config.image_size = 32
    config.batch_size = 8
    config.total_steps = 8
    config.optim.update(base_lr=1e-3, warmup_epochs=0.5)
    config.mae.update(decoder_dim=32, decoder_depth=1, decoder_heads=2)
    config.log_every = 2
    config.checkpoint_every = 4
    config.image_every = 0
    return config

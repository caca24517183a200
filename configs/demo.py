"""The demo: a small MAE on the embedded synthetic femurs, then an AFF-vs-NFF linear probe.

Command:  make demo      (= python -m afm_jax.main --config configs/demo.py --workdir demo_out)
Hardware: a laptop CPU (sized for 2 cores).
Runtime:  TBD (measured in the README's results table).
Expected: last line `AUROC (AFF vs NFF, linear probe): mae=<float> random_init=<float>` with mae >
          random_init: MAE features of held-out synthetic patients separate atypical from normal
          femoral fractures better than the same ViT at random initialisation.
Deviations from the paper, for CPU size: ViT-Ti/16 at 128 px, decoder 128-d × 2 blocks × 4 heads,
a few hundred steps instead of 800 epochs, base lr 1.5e-3 (10×, short schedule), gradient clipping 1.
"""

from afm_jax.train.defaults import pretrain_config


def get_config(arg=None):
    config = pretrain_config("mae", "Ti/16")
    config.data.synthetic.update(enabled=True, num_patients=300, image_size=256, seed=0)
    config.image_size = 128
    config.batch_size = 64
    config.total_steps = 600
    config.optim.update(base_lr=1.5e-3, warmup_epochs=5.0, grad_clip_norm=1.0)
    config.mae.update(decoder_dim=128, decoder_depth=2, decoder_heads=4)
    config.log_every = 25
    config.checkpoint_every = 200
    config.image_every = 200
    config.probe.enabled = True
    return config

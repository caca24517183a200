"""MAE ViT-S/16 — the small model for one GPU and for benchmarks (bench/train_step.py).

Command:  python -m afm_jax.main --config configs/mae_vits.py --workdir $WORK/mae_vits \
              --config.data.path=$DATA/femur/1.0.0
Hardware: one GPU (global batch 1024, bf16). On this 2-core CPU the train step runs at a few img/s
          (see bench/ and the README's results table) — for benchmarks, not for training.
Runtime:  not yet measured on a GPU.
Expected: a small femur encoder for quick ablations (preprocessing variants, curation).
Paper defaults as in mae_vitl.py, except the smaller global batch (lr scales with it).
"""

from afm_jax.train.defaults import default_config


def get_config(arg=None):
    config = default_config("mae", "S/16")
    config.batch_size = 1024
    config.model.dtype = "bfloat16"
    config.data.path = ""
    return config

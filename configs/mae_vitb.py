"""MAE ViT-B/16 on the femur dataset.

Command:  python -m afm_jax.main --config configs/mae_vitb.py --workdir $WORK/mae_vitb \
              --config.data.path=$DATA/femur/1.0.0
Hardware: one 8×A100 node (global batch 4096 = 512/device, bf16).
Runtime:  not yet measured on A100.
Expected: a ViT-B femur encoder; compare with mae_vitl.py and DINO in the evaluation study.
Paper defaults as in mae_vitl.py.
"""

from afm_jax.train.defaults import default_config


def get_config(arg=None):
    config = default_config("mae", "B/16")
    config.model.dtype = "bfloat16"
    config.data.path = ""
    return config

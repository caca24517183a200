"""MAE ViT-L/16 on the femur dataset — the main pretraining run.

Command:  python -m afm_jax.main --config configs/mae_vitl.py --workdir $WORK/mae_vitl \
              --config.data.path=$DATA/femur/1.0.0
Hardware: sized for 4 nodes × 8 A100 (global batch 4096, bf16 compute, 128/device); on fewer
          devices lower --config.batch_size (lr scales with it).
Runtime:  not yet measured on A100 (the scale-out issue adds the GPU check); 800 epochs of 500k
          images is ~98k steps.
Expected: a femur foundation encoder whose frozen features beat ImageNet/DINO initialisations on AFF vs
          NFF (to be shown by the evaluation issue's study).
MAE paper defaults (He et al. 2021): mask 0.75, norm-pix loss, decoder 512×8×16, AdamW(0.9, 0.95),
wd 0.05, base lr 1.5e-4 per 256, 40 warmup epochs, no gradient clipping.
"""

from afm_jax.train.defaults import default_config


def get_config(arg=None):
    config = default_config("mae", "L/16")
    config.model.dtype = "bfloat16"
    config.data.path = ""  # required: a dataset made by tools/preprocess.py or afm_jax.data.synthetic
    return config

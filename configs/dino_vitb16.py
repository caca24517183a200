"""DINO ViT-B/16 — the paper's released ViT-B/16 arguments (DINO repository, `args.txt` of vitb16).

Command:  python -m afm_jax.main --config configs/dino_vitb16.py --workdir $WORK/dino_vitb16 \
              --config.data.path=$DATA/femur/1.0.0
Hardware: 4 nodes × 8 A100 in the paper (global batch 1024, 32 per GPU); on one 8×A100 node use
          --config.accum_steps=2 if 128 images per GPU do not fit (bf16 compute, fp32 params).
Runtime:  not yet measured on a GPU (the paper's 400 epochs of ImageNet took ~4 days on 32 V100s).
Expected: as dino_vits16.py; ViT-B needs the tighter clipping below to stay stable.
Differences from dino_vits16.py, all from the released arguments: 400 epochs, lr 7.5e-4 × batch/256,
min lr 2e-6, 10 local crops, global crops 0.25–1 and local 0.05–0.25 of the area, per-tensor
gradient clipping at 0.3, last layer frozen for 3 epochs, teacher temperature warm-up over 50 epochs.
Radiograph deviations as in dino_vits16.py; the rest of the recipe (init, weight-decay set, freeze,
position-embedding interpolation) as there.
"""

from afm_jax.train.defaults import default_config


def get_config(arg=None):
    config = default_config("dino", "B/16")
    config.model.dtype = "bfloat16"
    config.batch_size = 1024
    config.num_epochs = 400.0
    config.optim.update(base_lr=7.5e-4, min_lr=2e-6, grad_clip_norm=0.3)
    config.multicrop.update(num_local=10, global_scale=(0.25, 1.0), local_scale=(0.05, 0.25))
    config.dino.update(freeze_last_layer_epochs=3.0, warmup_teacher_temp_epochs=50.0)
    config.log_every = 50
    config.checkpoint_every = 1000
    config.eval_every = 2000
    config.data.path = ""
    return config

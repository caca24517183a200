"""DINO ViT-S/16 — the paper's reference recipe (Caron et al. 2021, `main_dino.py` defaults, 100 epochs).

Command:  python -m afm_jax.main --config configs/dino_vits16.py --workdir $WORK/dino_vits16 \
              --config.data.path=$DATA/femur/1.0.0
          (multi-node: launch/ scripts; the same command per process)
Hardware: one 8×A100 node (global batch 1024 = 128 per GPU, bf16 compute, fp32 params).
Runtime:  not yet measured on a GPU. On the 2-core development CPU the step runs at ~1 img/s
          (docs/dino.md, bench/train_step.py) — for benchmarks only.
Expected: kNN accuracy (eval/knn_acc, teacher backbone) rising over the first epochs, teacher
          entropy well between 0 and log(65536) = 11.1 (0 = one-prototype collapse, 11.1 = uniform).
Recipe (all config keys; defaults of `afm_jax/train/tasks/dino.py`, table in docs/dino.md): 2 × 224
global crops (area 0.4–1) + 8 × 96 local crops (0.05–0.4); head 2048-2048-256 -> 65536 prototypes,
weight-normalised last layer with fixed norm (norm_last_layer), frozen for the first epoch with a fresh
Adam state at the unfreeze (`dino.freeze_last_layer_mode="fresh_adam"`); student temperature 0.1,
teacher 0.04 -> 0.07 over 30 epochs (the paper's and README's setting; main_dino.py's code default is
0.04 constant), centre momentum 0.9, teacher momentum cosine 0.996 -> 1; AdamW(0.9, 0.999), lr 5e-4 ×
batch/256 after 10 warm-up epochs, cosine to 1e-6; weight decay cosine 0.04 -> 0.4 on every tensor of
rank >= 2, class token and position embedding included (`optim.weight_decay_rule="rank"`); per-tensor
gradient clipping at 3; drop-path 0.1 linear over depth; learned position embeddings, resampled for
the local crops as DINO does (plain bicubic, +0.1 offset: `model.pos_embed_interpolation="dino"`);
trunc-normal(0.02) init (`model.init="dino"`).
Deviations from the paper, for radiographs: one input channel; intensity jitter (brightness 0.4,
contrast 0.4, gamma 0.2, p 0.8) instead of colour jitter and grayscale; bf16 compute (DINO: fp16
autocast).
"""

from afm_jax.train.defaults import default_config


def get_config(arg=None):
    config = default_config("dino", "S/16")
    config.model.dtype = "bfloat16"
    config.batch_size = 1024
    config.num_epochs = 100.0
    config.log_every = 50
    config.checkpoint_every = 1000
    config.eval_every = 2000  # kNN monitor on the labelled validation split
    config.data.path = ""
    return config

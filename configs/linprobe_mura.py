"""Linear probe (frozen encoder, trained head) on MURA-v1.1 abnormal vs normal, from one of our runs.

Command:  python -m afm_jax.main --config configs/linprobe_mura.py --workdir runs/lp_mura \
              --config.data.path=DATA/mura/1.0.0 --config.init_from=runs/mae_vitb
          (DATA/mura from MURA-v1.1's unpacked folder: see docs/evaluate.md, "Add a dataset".)
          MURA's `valid` split serves as test; `data.eval_split` is the validation split made from
          training patients when the dataset was written.
Hardware: one A100 (ViT-B/16, 224 px, batch 1024); on a 2-core CPU use --config.model.variant=mu/8
          --config.image_size=64 --config.batch_size=64 --config.total_steps=200 for a smoke run.
Runtime:  ~1 h on one A100 for 90 epochs of MURA's 36,808 training images (features are recomputed
          every step because of the augmentation; tools/evaluate.py's cached-feature probe takes minutes).
Expected: image-level validation AUROC printed every 200 steps; the best model's test predictions in
          <workdir>/predictions/test.npz; study-level kappa via tools/evaluate.py or a study.
Recipe: MAE linear probing (He et al. 2021, Table 10): frozen encoder, no weight decay, 10 warmup
  epochs, 90 epochs, augmentation on; AdamW instead of LARS (named deviation: LARS needs its 16k batch).
"""

from afm_jax.train.defaults import default_config


def get_config(arg=None):
    config = default_config("linprobe", "B/16")
    config.data.path = ""  # set --config.data.path=.../mura/1.0.0
    config.init_from = ""  # set --config.init_from=<workdir | timm file | export folder>
    config.image_size = 224
    config.batch_size = 1024
    config.num_epochs = 90.0
    config.finetune.update(positive_labels=(1,), negative_labels=(0,), patience=10)
    config.eval_every = 200
    config.checkpoint_every = 1000
    return config

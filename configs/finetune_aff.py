"""Fine-tune a ViT on AFF vs NFF (synthetic femurs by default), starting from one of our MAE runs.

Command:  python -m afm_jax.main --config configs/finetune_aff.py --workdir runs/ft_aff \
              --config.init_from=demo_out            # the demo's MAE workdir (or a timm/DINO file)
          Real data: --config.data.path=DATA/femur/1.0.0 --config.data.synthetic.enabled=False
          --config.model.variant=B/16 --config.image_size=224 --config.batch_size=1024 (MAE recipe).
Hardware: sized for a laptop CPU (2 cores) at these defaults; the MAE recipe is for 8×A100.
Runtime:  ~4 min on 2 cores (300 steps × 32 images of 128 px, ViT-Ti with 6 blocks, evaluations
          every 50 steps on 256-px validation images).
Expected: `eval @ <step>: val_auroc=… best_val_auroc=…` lines; the best model's test predictions in
          <workdir>/predictions/test.npz (y_true, y_score, patient_id, image_id). Test AUROC of the
          demo's MAE start ≈ the demo's linear probe or better; from random init, lower.
Recipe (MAE fine-tuning, He et al. 2021, Table 9), with CPU-size deviations as named keys:
  AdamW(0.9, 0.999), wd 0.05, layer-wise lr decay 0.75, drop-path 0.1, 5 warmup epochs, balanced
  class weights, early stopping after 5 evaluations without validation-AUROC gain. Deviations: the
  demo's ViT-Ti/16 with 6 blocks at 128 px (must match the init_from run), 300 steps of batch 32,
  base lr 1e-3, no mixup/cutmix/label smoothing.
"""

from afm_jax.train.defaults import default_config


def get_config(arg=None):
    config = default_config("finetune", "Ti/16")
    config.model.depth = 6
    config.data.synthetic.update(enabled=True, num_patients=1000, image_size=256, seed=0)
    config.image_size = 128
    config.batch_size = 32
    config.total_steps = 300
    config.optim.update(base_lr=1e-3, warmup_epochs=1.0, grad_clip_norm=1.0)
    config.finetune.update(positive_labels=(2,), negative_labels=(1,), eval_image_size=256, patience=5)
    config.eval_every = 50
    config.log_every = 25
    config.checkpoint_every = 100
    return config

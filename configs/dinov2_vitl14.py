"""DINOv2-style ViT-L/14: DINO + iBOT masked-patch loss + KoLeo + Sinkhorn-Knopp centring + registers.

Command:  python -m afm_jax.main --config configs/dinov2_vitl14.py --workdir $WORK/dinov2_vitl14 \
              --config.data.path=$DATA/femur/1.0.0
Hardware: 8×A100 80 GB, one node or more (global batch 1024 as 4 accumulated micro-batches of 32 per
          GPU, DINOv2's per-GPU batch; bf16 compute, fp32 params, activations rematerialised).
Runtime:  not yet measured on a GPU.
Expected: kNN accuracy (eval/knn_acc) rising; teacher entropy between 0 and log(131072) = 11.8.
Recipe: DINOv2's `configs/train/vitl14.yaml` on top of its `ssl_default_config.yaml` (Oquab et al.
2023), as far as the switches here reach: separate DINO and iBOT heads with 131072 prototypes and a
384-d bottleneck; iBOT on half of the global crops with mask ratios 0.1–0.5 (block masks); KoLeo
weight 0.1; Sinkhorn-Knopp (3 iterations) instead of the EMA centre; teacher momentum 0.994 -> 1;
weight decay 0.04 -> 0.2; lr warm-up 80 epochs; drop-path 0.4; 2 × 224 global and 8 × 98 local
crops; global-norm clipping at 3 (DINOv2 clips the global norm, DINO v1 per tensor); layer-wise lr
decay 0.9 and patch-embedding lr × 0.2 (ssl_default values — check vitl14.yaml's layerwise_decay
before a long run; some releases set it to 1.0).
Learning rate: DINOv2 scales base_lr by sqrt(batch/1024); this repository scales linearly by
batch/256, so base_lr = 5e-5 gives DINOv2's peak of 2e-4 at batch 1024 (change both if you change
the batch). 500 epochs of LVD-142M in the paper; 100 epochs here (set num_epochs for your data).
Deviations: plain GELU MLP instead of SwiGLU; LayerScale init 1e-5 as DINOv2; 4 register tokens (DINOv2 with registers, Darcet et al. 2024);
radiograph intensity jitter instead of colour jitter, as in dino_vits16.py.
"""

from afm_jax.train.defaults import default_config


def get_config(arg=None):
    config = default_config("dino", "L/14")
    config.model.update(dtype="bfloat16", drop_path_rate=0.4, num_reg_tokens=4, remat="full",
                        layer_scale_init=1e-5)
    config.batch_size = 1024
    config.accum_steps = 4
    config.num_epochs = 100.0
    config.optim.update(base_lr=5e-5, min_lr=1e-6, warmup_epochs=80.0, grad_clip_norm=3.0)
    config.multicrop.update(local_size=98)
    config.dino.update(
        out_dim=131072, bottleneck_dim=384, momentum_teacher=0.994, weight_decay_end=0.2,
        centering="sinkhorn_knopp", koleo_weight=0.1, clip_per_tensor=False,
        layer_decay=0.9, patch_embed_lr_mult=0.2)
    config.dino.ibot.update(enabled=True, separate_head=True, out_dim=131072, mask_probability=0.5,
                            mask_ratio=(0.1, 0.5), loss_weight=1.0)
    config.log_every = 50
    config.checkpoint_every = 1000
    config.eval_every = 2000
    config.data.path = ""
    return config

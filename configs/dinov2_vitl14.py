"""DINOv2-style ViT-L/14: DINO + iBOT masked-patch loss + KoLeo + Sinkhorn-Knopp centring + registers.

Command:  python -m afm_jax.main --config configs/dinov2_vitl14.py --workdir $WORK/dinov2_vitl14 \
              --config.data.path=$DATA/femur/1.0.0
Hardware: 8×A100 80 GB, one node or more (global batch 1024 as 4 accumulated micro-batches of 32 per
          GPU, DINOv2's per-GPU batch; bf16 compute, fp32 params, activations rematerialised).
Runtime:  not yet measured on a GPU.
Expected: kNN accuracy (eval/knn_acc) rising; teacher entropy between 0 and log(131072) = 11.8.
Recipe: DINOv2's `configs/train/vitl14.yaml` on top of its `ssl_default_config.yaml` (Oquab et al.
2023; table in docs/dino.md): separate DINO and iBOT heads with 131072 prototypes, the DINO head's
bottleneck 384 and the iBOT head's 256 (hidden 2048, 3 layers); trainable weight-norm gains
(DINOv2 never freezes them: `dino.norm_last_layer=False`); last layer at lr 0 for the first epoch,
its Adam moments accumulating (`dino.freeze_last_layer_mode="lr_zero"`); iBOT on half of the global
crops with mask ratios 0.1–0.5 (block masks); KoLeo weight 0.1; Sinkhorn-Knopp (3 iterations)
instead of the EMA centre; teacher momentum 0.994 -> 1, temperature 0.04 -> 0.07 over 30 epochs;
weight decay 0.04 -> 0.2 on everything but biases, norms and LayerScale gammas (tokens included:
`optim.weight_decay_rule="dinov2"`); lr warm-up 80 epochs; drop-path 0.4 on every block
(`model.drop_path_uniform`); 2 × 224 global crops (area 0.32–1) and 8 × 98 local crops (0.05–0.32);
each student module (backbone, DINO head, iBOT head) clipped at norm 3 (`dino.clip_mode="per_module"`);
no layer-wise lr decay (vitl14.yaml: `layerwise_decay: 1.0`), patch-embedding lr × 0.2; LayerScale
1e-5; trunc-normal(0.02) init with class/register tokens at std 1e-6 (`model.init="dinov2"`);
position embeddings resampled DINOv2's way (plain bicubic, +0.1 offset).
Continuing from released DINOv2 weights: --config.init_from=<dinov2_vitl14_reg4_pretrain.pth>
--config.model.pos_embed_size=518 keeps their 37×37 table and resamples it per crop as DINOv2 does
(the student and teacher then compute DINOv2's own features at step 0; tests/test_dino_continuation.py).
Learning rate: DINOv2 scales base_lr by sqrt(batch/1024); this repository scales linearly by
batch/256, so base_lr = 5e-5 gives DINOv2's peak of 2e-4 at batch 1024 (change both if you change
the batch). 500 epochs of LVD-142M in the paper; 100 epochs here (set num_epochs for your data).
Deviations: plain GELU MLP instead of SwiGLU (vitl14.yaml: `ffn_layer: swiglufused`); 4 register tokens
(DINOv2 with registers, Darcet et al. 2024); 100 epochs (DINOv2: 500); radiograph intensity jitter
instead of colour jitter, as in dino_vits16.py; bf16 compute (DINOv2: fp16 FSDP mixed precision).
"""

from afm_jax.train.defaults import default_config


def get_config(arg=None):
    config = default_config("dino", "L/14")
    config.model.update(
        dtype="bfloat16",
        drop_path_rate=0.4,
        drop_path_uniform=True,
        num_reg_tokens=4,
        remat="full",
        layer_scale_init=1e-5,
        init="dinov2",
        pos_embed_interpolation="dino",
    )
    config.batch_size = 1024
    config.accum_steps = 4
    config.num_epochs = 100.0
    config.optim.update(base_lr=5e-5, min_lr=1e-6, warmup_epochs=80.0, grad_clip_norm=3.0)
    config.optim.weight_decay_rule = "dinov2"
    config.multicrop.update(local_size=98, global_scale=(0.32, 1.0), local_scale=(0.05, 0.32))
    config.dino.update(
        out_dim=131072,
        bottleneck_dim=384,
        norm_last_layer=False,
        momentum_teacher=0.994,
        weight_decay_end=0.2,
        centering="sinkhorn_knopp",
        koleo_weight=0.1,
        clip_mode="per_module",
        freeze_last_layer_mode="lr_zero",
        layer_decay=1.0,
        patch_embed_lr_mult=0.2,
    )
    config.dino.ibot.update(
        enabled=True,
        separate_head=True,
        out_dim=131072,
        hidden_dim=2048,
        bottleneck_dim=256,
        nlayers=3,
        mask_probability=0.5,
        mask_ratio=(0.1, 0.5),
        loss_weight=1.0,
    )
    config.log_every = 50
    config.checkpoint_every = 1000
    config.eval_every = 2000
    config.data.path = ""
    return config

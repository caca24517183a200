"""DINO ResNet-50 continued from RadImageNet — DINO's ResNet-50 recipe, started from a CNN pretrained
on radiology images instead of from scratch.

Command:  python -m afm_jax.main --config configs/dino_resnet50_radimagenet.py --workdir $WORK/dino_rn50_rin \
              --config.data.path=$DATA/femur/1.0.0 \
              --config.init_from=$WEIGHTS/RadImageNet-ResNet50.pth   # torchvision layout, .pth/.pt/.safetensors
          (without init_from: DINO ResNet-50 from scratch; an ImageNet torchvision resnet50 file works too)
Hardware: one 8×A100 node (global batch 1024 = 128 per GPU, 2 × 224 + 6 × 96 crops, bf16 compute,
          fp32 params and BatchNorm). BatchNorm statistics are over the global batch (SPMD jit:
          the batch mean inside the step is the all-device mean, i.e. DINO's SyncBatchNorm).
Runtime:  not yet measured on a GPU. On the 2-core development CPU only the tests' one-block-per-stage
          ResNet at 32-64 px runs (tests/test_dino_resnet.py).
Expected: eval/knn_acc (teacher, avg-pooled 2048-d, running BN statistics) starting at RadImageNet's
          level and rising; teacher_entropy well between 0 and log(60000) = 11.0. Compare against
          the RadImageNet file itself with the evaluation tools (it is the init_from baseline).
Recipe (DINO's released ResNet-50 run, facebookresearch/dino `--arch resnet50`): LARS (momentum
0.9, eta 0.001, no weight decay or trust ratio on 1-D tensors), lr 0.3 × batch/256 after 10 warm-up
epochs, cosine to 0.0048; weight decay 1e-6 constant; no gradient clipping; 60000 prototypes, head
2048-2048-256, weight-normalised last layer with fixed norm, frozen for the first epoch; teacher
temperature 0.04 -> 0.07 over 50 epochs, student 0.1, centre momentum 0.9, teacher momentum cosine
0.996 -> 1; global crops 0.14–1 of the area, 6 local crops 0.05–0.14; BatchNorm in train mode in
student and teacher (the teacher keeps its own running averages; the EMA copies parameters only).
Deviations, named: 100 epochs (DINO: 800 from scratch; this run continues from pretrained weights);
batch 1024 (DINO: 4080); no BatchNorm in the head (DINO's ResNet run used `use_bn_in_head`; our
DINOHead has none); one grey channel (RGB stem summed on import, normalised with the ImageNet
channel means 0.449/0.226 — check RadImageNet's own preprocessing and set model inputs if it
differs); intensity jitter instead of colour jitter (as every DINO config here).
"""

from afm_jax.train.defaults import default_config


def get_config(arg=None):
    config = default_config("dino", "S/16")
    config.model.update(
        arch="resnet50", dtype="bfloat16", drop_path_rate=0.0, class_token=False, pos_embed="sincos"
    )  # the last two are ViT keys, not read for a ResNet
    config.batch_size = 1024
    config.num_epochs = 100.0
    config.image_size = 224
    config.optim.update(base_lr=0.3, min_lr=0.0048, warmup_epochs=10.0, weight_decay=1e-6, grad_clip_norm=0.0)
    config.multicrop.update(num_local=6, local_size=96, global_scale=(0.14, 1.0), local_scale=(0.05, 0.14))
    config.dino.update(
        optimizer="lars",
        out_dim=60000,
        weight_decay_end=1e-6,
        warmup_teacher_temp_epochs=50.0,
        freeze_last_layer_epochs=1.0,
    )
    config.dino.knn.pool = "avg"
    config.init_from = ""  # set: the RadImageNet ResNet-50 weights file
    config.log_every = 50
    config.checkpoint_every = 1000
    config.eval_every = 2000
    config.data.path = ""
    return config

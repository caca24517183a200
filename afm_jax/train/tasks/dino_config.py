"""`config.dino`: the DINO / DINOv2 recipe's keys with their defaults, and the checks of their values.

Why separate from the task: a recipe is data; `train/tasks/dino.py` reads it, `docs/dino.md` documents
it, tests assert its published values. Every check raises ConfigError naming the key.
"""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder

from afm_jax import configuration
from afm_jax.data import multicrop
from afm_jax.data.records import STRING_KEYS
from afm_jax.models import factory
from afm_jax.train import optim

CENTERINGS = ("center", "sinkhorn_knopp")


def default_dino_config() -> ml_collections.ConfigDict:
    """`config.dino`: DINO ViT-S/16 defaults (official `main_dino.py`); DINOv2 parts switched off."""
    return ml_collections.ConfigDict(
        dict(
            out_dim=65536,
            hidden_dim=2048,
            bottleneck_dim=256,
            nlayers=3,
            norm_last_layer=True,  # weight-norm gains fixed to 1
            student_temp=0.1,
            teacher_temp=0.07,
            warmup_teacher_temp=0.04,
            warmup_teacher_temp_epochs=30.0,
            momentum_teacher=0.996,
            final_momentum_teacher=1.0,
            centering="center",  # "center" (EMA, momentum below) or "sinkhorn_knopp" (DINOv2)
            center_momentum=0.9,
            sinkhorn_iterations=3,
            weight_decay_end=0.4,  # cosine from optim.weight_decay (0.04) to this
            freeze_last_layer_epochs=1.0,
            clip_mode="per_tensor",  # per_tensor (DINO v1) | per_module (DINOv2: backbone, heads) | global
            freeze_last_layer_mode="fresh_adam",  # fresh_adam (DINO v1: no grads, Adam state new at unfreeze) | lr_zero (DINOv2)
            dino_loss_weight=1.0,
            koleo_weight=0.0,  # DINOv2: 0.1
            layer_decay=1.0,  # DINOv2: 0.9 (1 = off)
            patch_embed_lr_mult=1.0,  # DINOv2: 0.2
            optimizer="adamw",  # adamw | lars (DINO's ResNet-50: LARS, momentum 0.9, eta 0.001)
            lars_momentum=0.9,
            lars_trust_coefficient=0.001,
            ibot=ml_collections.ConfigDict(
                dict(
                    enabled=False,
                    loss_weight=1.0,
                    mask_probability=0.5,
                    mask_ratio=(0.1, 0.5),
                    separate_head=False,
                    out_dim=placeholder(int),  # None = dino.out_dim
                    # sizes of a separate iBOT head (None = the DINO head's; DINOv2 keeps 2048 / 256 / 3 for it)
                    hidden_dim=placeholder(int),
                    bottleneck_dim=placeholder(int),
                    nlayers=placeholder(int),
                )
            ),
            knn=ml_collections.ConfigDict(
                dict(
                    train_split="train",
                    eval_split="validation",
                    max_train=2000,
                    max_eval=1000,
                    label_key="label",  # or a record string field such as "view" or "body_part"
                    random_init_baseline=True,  # also log the kNN accuracy of the network at its initialisation
                    k=20,
                    temperature=0.07,
                    batch_size=64,
                    pool="cls",
                )
            ),
        )
    )


def validate_dino_config(config: ml_collections.ConfigDict, granularity: int) -> None:
    """Checks `config.dino` and `config.multicrop` (crop sizes multiples of `granularity`)."""
    factory.validate_model_config(config)
    req = configuration.require
    if factory.is_resnet(config.model):
        _validate_resnet(config)
    else:
        req(config, "model.class_token", bool, "True (DINO's head reads the class token)")
    multicrop.validate_multicrop_config(config, granularity)
    for key in ("out_dim", "hidden_dim", "bottleneck_dim", "nlayers"):
        req(config, f"dino.{key}", lambda v: int(v) >= 1, "a positive integer")
    for key in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
        req(config, f"dino.{key}", lambda v: float(v) > 0, "a positive temperature")
    req(config, "dino.warmup_teacher_temp_epochs", lambda v: float(v) >= 0, "epochs >= 0")
    for key in ("momentum_teacher", "final_momentum_teacher", "center_momentum"):
        req(config, f"dino.{key}", lambda v: 0 <= float(v) <= 1, "a momentum in [0, 1]")
    configuration.require_choice(config, "dino.centering", CENTERINGS)
    configuration.require_choice(config, "dino.clip_mode", optim.CLIP_MODES)
    configuration.require_choice(config, "dino.freeze_last_layer_mode", optim.FREEZE_MODES)
    for key in ("hidden_dim", "bottleneck_dim", "nlayers"):
        req(
            config, f"dino.ibot.{key}", lambda v: v is None or int(v) >= 1, "None (= the DINO head's) or a positive int"
        )
    req(config, "dino.sinkhorn_iterations", lambda v: int(v) >= 1, "at least 1 iteration")
    req(config, "dino.weight_decay_end", lambda v: float(v) >= 0, "a non-negative weight decay")
    req(config, "dino.freeze_last_layer_epochs", lambda v: float(v) >= 0, "epochs >= 0")
    for key in ("dino_loss_weight", "koleo_weight", "ibot.loss_weight"):
        req(config, f"dino.{key}", lambda v: float(v) >= 0, "a weight >= 0")
    req(config, "dino.layer_decay", lambda v: 0 < float(v) <= 1, "a decay in (0, 1] (1 = off)")
    configuration.require_choice(config, "dino.optimizer", ("adamw", "lars"))
    req(config, "dino.lars_momentum", lambda v: 0 <= float(v) < 1, "a momentum in [0, 1)")
    req(config, "dino.lars_trust_coefficient", lambda v: float(v) > 0, "a positive trust coefficient (eta)")
    req(config, "dino.patch_embed_lr_mult", lambda v: float(v) > 0, "a positive multiplier")
    req(config, "dino.ibot.mask_probability", lambda v: 0 <= float(v) <= 1, "a probability")
    req(config, "dino.ibot.mask_ratio", lambda v: 0 < float(v[0]) <= float(v[1]) < 1, "a pair 0 < min <= max < 1")
    req(config, "dino.ibot.out_dim", lambda v: v is None or int(v) >= 1, "None (= dino.out_dim) or a positive int")
    req(
        config,
        "dino.koleo_weight",
        lambda v: float(v) == 0 or int(config.batch_size) >= 2,
        "0 when the batch has a single image (KoLeo needs a nearest neighbour)",
    )
    req(config, "dino.knn.k", lambda v: int(v) >= 1, "k >= 1")
    req(config, "dino.knn.max_train", lambda v: int(v) >= 1, "a positive image count")
    req(config, "dino.knn.max_eval", lambda v: int(v) >= 1, "a positive image count")
    configuration.require_choice(config, "dino.knn.pool", ("cls", "avg"))
    configuration.require_choice(config, "dino.knn.label_key", ("label",) + tuple(STRING_KEYS))


def _validate_resnet(config: ml_collections.ConfigDict) -> None:
    """What a ResNet backbone cannot do: patch tokens (iBOT), class-token pooling, per-block rates."""
    req = configuration.require
    req(
        config,
        "dino.ibot.enabled",
        lambda v: not v,
        "False with model.arch=resnet50 (iBOT needs patch tokens; a ResNet has none)",
    )
    req(config, "dino.knn.pool", lambda v: v == "avg", '"avg" with model.arch=resnet50 (a ResNet has no class token)')
    if "probe" in config:
        req(config, "probe.pool", lambda v: v == "avg", '"avg" with model.arch=resnet50 (a ResNet has no class token)')
    req(
        config,
        "dino.layer_decay",
        lambda v: float(v) == 1.0,
        "1.0 with model.arch=resnet50 (layer-wise lr decay counts ViT blocks)",
    )
    req(
        config,
        "dino.patch_embed_lr_mult",
        lambda v: float(v) == 1.0,
        "1.0 with model.arch=resnet50 (a ResNet has no patch embedding)",
    )

"""DINO (Caron et al. 2021) and DINOv2-style (Oquab et al. 2023) self-distillation as a trainer task.

The student is the trained model (`DINOModel`: ViT + DINO head [+ iBOT head, mask token]); the
teacher is the same module merged with the EMA params kept in `state.extra["teacher"]`, beside the
centres, so checkpoints, resume and sharding cover them with no extra code. One step:

1. the teacher (no gradient, no drop-path) embeds the global crops -> prototype logits t;
2. the student embeds the global crops (iBOT: with masked patches replaced by the mask token) and,
   in one more batched pass, all local crops -> logits s;
3. loss = DINO cross-entropy between softmax((t - c)/τ_t) (or Sinkhorn-Knopp targets) and every
   other student view, + optional KoLeo on the student's global class tokens, + optional iBOT
   masked-patch loss;
4. after the optimiser update (`update_extra`): teacher <- EMA of student (momentum cosine to 1),
   centre <- EMA of the teacher's batch-mean logits (the global batch under data parallelism).

With `model.arch="resnet50"` the backbone is a torchvision-layout ResNet whose BatchNorm trains in
train mode, as DINO's ResNet-50 run: the student's running averages advance in `state.frozen`
(written back by the step); the teacher also normalises with its batch statistics and keeps its own
running averages in `extra["teacher_stats"]`, updated by its forward pass (outputs of the loss, so
averaged over accumulation micro-batches) — the EMA copies parameters only, as DINO's does. The
DINO head reads the 2048-d pooled feature; iBOT, registers and class-token pooling are refused.

Collapse monitors go to the logs as metrics: the teacher's target entropy (0 = collapsed to one
prototype, log K = uniform, i.e. collapsed to the centre), the KL between teacher targets and
student predictions, the centre norm; `afm_jax.evaluation.monitors.KnnMonitor` (passed to the trainer by `main`)
adds a kNN accuracy of the teacher backbone (`monitored_encoder`) on a small labelled subset every
`config.eval_every` steps.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from ml_collections.config_dict import placeholder

from afm_jax import configuration
from afm_jax.data import multicrop
from afm_jax.models import factory
from afm_jax.models import dino as dino_lib
from afm_jax.models.vit import parse_variant
from afm_jax.train import dino_schedules, optim
from afm_jax.train.tasks.base import Task

CENTERINGS = ("center", "sinkhorn_knopp")


def default_dino_config() -> ml_collections.ConfigDict:
    """`config.dino`: DINO ViT-S/16 defaults (official `main_dino.py`); DINOv2 parts switched off."""
    return ml_collections.ConfigDict(dict(
        out_dim=65536, hidden_dim=2048, bottleneck_dim=256, nlayers=3,
        norm_last_layer=True,                 # weight-norm gains fixed to 1
        student_temp=0.1,
        teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=30.0,
        momentum_teacher=0.996, final_momentum_teacher=1.0,
        centering="center",                   # "center" (EMA, momentum below) or "sinkhorn_knopp" (DINOv2)
        center_momentum=0.9,
        sinkhorn_iterations=3,
        weight_decay_end=0.4,                 # cosine from optim.weight_decay (0.04) to this
        freeze_last_layer_epochs=1.0,
        clip_per_tensor=True,                 # DINO v1 clips each tensor at optim.grad_clip_norm; False = global norm
        dino_loss_weight=1.0,
        koleo_weight=0.0,                     # DINOv2: 0.1
        layer_decay=1.0,                      # DINOv2: 0.9 (1 = off)
        patch_embed_lr_mult=1.0,              # DINOv2: 0.2
        optimizer="adamw",                    # adamw | lars (DINO's ResNet-50: LARS, momentum 0.9, eta 0.001)
        lars_momentum=0.9, lars_trust_coefficient=0.001,
        ibot=ml_collections.ConfigDict(dict(
            enabled=False, loss_weight=1.0, mask_probability=0.5, mask_ratio=(0.1, 0.5),
            separate_head=False, out_dim=placeholder(int))),   # None = dino.out_dim
        knn=ml_collections.ConfigDict(dict(
            train_split="train", eval_split="validation", max_train=2000, max_eval=1000,
            label_key="label",                # or a record string field such as "view" or "body_part"
            random_init_baseline=True,        # also log the kNN accuracy of the network at its initialisation
            k=20, temperature=0.07, batch_size=64, pool="cls")),
    ))


class DINOTask(Task):
    """DINO/DINOv2 self-distillation of a ViT with multi-crop input."""

    name = "dino"
    batch_keys = ("global", "local")

    # ─── Config ──────────────────────────────────────────────────────────────────────────────
    @classmethod
    def extend_config(cls, config: ml_collections.ConfigDict) -> None:
        """DINO's section plus its changes of the common defaults (official ViT-S/16, 100 epochs)."""
        config.dino = default_dino_config()
        config.multicrop = multicrop.default_multicrop_config()
        config.batch_size = 1024
        config.num_epochs = 100.0
        config.image_size = 224            # the global crop size
        config.image_every = 0
        config.model.pos_embed = "learned"
        config.model.drop_path_rate = 0.1
        config.optim.update(base_lr=5e-4, min_lr=1e-6, warmup_epochs=10.0, b1=0.9, b2=0.999,
                            weight_decay=0.04, grad_clip_norm=3.0)

    def validate(self, config: ml_collections.ConfigDict) -> None:
        factory.validate_model_config(config)
        req = configuration.require
        if factory.is_resnet(config.model):
            self._validate_resnet(config)
        else:
            req(config, "model.class_token", bool, "True (DINO's head reads the class token)")
        multicrop.validate_multicrop_config(config, self._granularity(config))
        for key in ("out_dim", "hidden_dim", "bottleneck_dim", "nlayers"):
            req(config, f"dino.{key}", lambda v: int(v) >= 1, "a positive integer")
        for key in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
            req(config, f"dino.{key}", lambda v: float(v) > 0, "a positive temperature")
        req(config, "dino.warmup_teacher_temp_epochs", lambda v: float(v) >= 0, "epochs >= 0")
        for key in ("momentum_teacher", "final_momentum_teacher", "center_momentum"):
            req(config, f"dino.{key}", lambda v: 0 <= float(v) <= 1, "a momentum in [0, 1]")
        configuration.require_choice(config, "dino.centering", CENTERINGS)
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
        req(config, "dino.ibot.mask_ratio", lambda v: 0 < float(v[0]) <= float(v[1]) < 1,
            "a pair 0 < min <= max < 1")
        req(config, "dino.ibot.out_dim", lambda v: v is None or int(v) >= 1, "None (= dino.out_dim) or a positive int")
        req(config, "dino.koleo_weight", lambda v: float(v) == 0 or int(config.batch_size) >= 2,
            "0 when the batch has a single image (KoLeo needs a nearest neighbour)")
        req(config, "dino.knn.k", lambda v: int(v) >= 1, "k >= 1")
        req(config, "dino.knn.max_train", lambda v: int(v) >= 1, "a positive image count")
        req(config, "dino.knn.max_eval", lambda v: int(v) >= 1, "a positive image count")
        configuration.require_choice(config, "dino.knn.pool", ("cls", "avg"))
        from afm_jax.data.records import STRING_KEYS
        configuration.require_choice(config, "dino.knn.label_key", ("label",) + tuple(STRING_KEYS))

    @staticmethod
    def _validate_resnet(config: ml_collections.ConfigDict) -> None:
        """What a ResNet backbone cannot do: patch tokens (iBOT), class-token pooling, per-block rates."""
        req = configuration.require
        req(config, "dino.ibot.enabled", lambda v: not v,
            "False with model.arch=resnet50 (iBOT needs patch tokens; a ResNet has none)")
        req(config, "dino.knn.pool", lambda v: v == "avg",
            '"avg" with model.arch=resnet50 (a ResNet has no class token)')
        if "probe" in config:
            req(config, "probe.pool", lambda v: v == "avg",
                '"avg" with model.arch=resnet50 (a ResNet has no class token)')
        req(config, "dino.layer_decay", lambda v: float(v) == 1.0,
            "1.0 with model.arch=resnet50 (layer-wise lr decay counts ViT blocks)")
        req(config, "dino.patch_embed_lr_mult", lambda v: float(v) == 1.0,
            "1.0 with model.arch=resnet50 (a ResNet has no patch embedding)")

    @staticmethod
    def _granularity(config: ml_collections.ConfigDict) -> int:
        """Crop sizes must be multiples of this: the ViT's patch size, a ResNet's total stride 32."""
        if factory.is_resnet(config.model):
            return 32
        return {**parse_variant(config.model.variant), **factory.size_overrides(config.model)}["patch_size"]

    def setup(self, config: ml_collections.ConfigDict, *, workdir: str, total_steps: int,
              steps_per_epoch: int) -> None:
        super().setup(config, workdir=workdir, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
        d = config.dino
        self.patch_size = self._granularity(config)
        self.ibot = bool(d.ibot.enabled)
        keys = ["global"] + (["local"] if int(config.multicrop.num_local) > 0 else []) + (["masks"] if self.ibot else [])
        self.batch_keys = tuple(keys)
        self.teacher_temp = dino_schedules.teacher_temperature_schedule(
            d.warmup_teacher_temp, d.teacher_temp, int(round(d.warmup_teacher_temp_epochs * self.steps_per_epoch)))
        self.momentum = dino_schedules.teacher_momentum_schedule(
            d.momentum_teacher, self.total_steps, d.final_momentum_teacher)
        self.freeze_steps = int(round(d.freeze_last_layer_epochs * self.steps_per_epoch))

    # ─── Model, state, optimiser, input ──────────────────────────────────────────────────────
    def build_model(self, config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> dino_lib.DINOModel:
        # A ResNet trains its BatchNorm in train mode (batch statistics), as DINO's ResNet-50 does.
        encoder = factory.build_backbone(config.model, config.image_size, rngs, train_batch_norm=True)
        d = config.dino
        return dino_lib.DINOModel(
            encoder, out_dim=d.out_dim, hidden_dim=d.hidden_dim, bottleneck_dim=d.bottleneck_dim,
            nlayers=d.nlayers, norm_last_layer=d.norm_last_layer, ibot=d.ibot.enabled,
            ibot_separate_head=d.ibot.separate_head, ibot_out_dim=d.ibot.out_dim,
            dtype=factory.DTYPES[config.model.dtype], param_dtype=factory.DTYPES[config.model.param_dtype], rngs=rngs)

    def init_extra(self, model: dino_lib.DINOModel) -> dict:
        """The teacher starts as a copy of the student; centres start at zero."""
        params = nnx.state(model, nnx.Param)
        extra = {"teacher": jax.tree.map(lambda x: jnp.array(x, copy=True), params),
                 "center": jnp.zeros((self.config.dino.out_dim,), jnp.float32)}
        stats = nnx.state(model, nnx.BatchStat)
        if jax.tree.leaves(stats):   # the teacher's own BatchNorm running averages (ResNet)
            extra["teacher_stats"] = jax.tree.map(lambda x: jnp.array(x, copy=True), stats)
        if model.ibot:
            head = model.ibot_head if model.ibot_head is not None else model.dino_head
            extra["patch_center"] = jnp.zeros((head.last_layer.weight_v.shape[1],), jnp.float32)
        return extra

    def make_optimizer(self, config: ml_collections.ConfigDict, schedule: optax.Schedule,
                       params: Any) -> optax.GradientTransformation:
        """AdamW with cosine weight decay (0.04 -> 0.4) off biases/norms/tokens, clipping, the last
        layer frozen for the first epoch(s), and optional layer-wise lr decay (DINOv2)."""
        o, d = config.optim, config.dino
        is_last = jax.tree_util.tree_map_with_path(
            lambda path, _: "last_layer" in [str(getattr(k, "key", k)) for k in path], params)
        parts = []
        if o.grad_clip_norm and o.grad_clip_norm > 0:
            parts.append(dino_schedules.clip_per_tensor(o.grad_clip_norm) if d.clip_per_tensor
                         else optax.clip_by_global_norm(o.grad_clip_norm))
        if self.freeze_steps > 0:
            parts.append(dino_schedules.freeze_for_steps(is_last, self.freeze_steps))
        wd = dino_schedules.weight_decay_schedule(o.weight_decay, d.weight_decay_end, self.total_steps)
        if d.optimizer == "lars":
            # DINO's LARS (utils.LARS): g + wd·p, then trust ratio eta·||p||/||g + wd·p|| and momentum;
            # both skip 1-D tensors (biases, BatchNorm), as DINO's does.
            not_1d = lambda tree: jax.tree.map(lambda p: getattr(p, "ndim", 0) > 1, tree)
            parts += [optax.add_decayed_weights(wd, mask=optim.weight_decay_mask),
                      optax.masked(optax.scale_by_trust_ratio(trust_coefficient=float(d.lars_trust_coefficient)),
                                   not_1d),
                      optax.trace(decay=float(d.lars_momentum)),
                      optax.scale_by_learning_rate(schedule)]
        else:
            parts += [optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps),
                      optax.add_decayed_weights(wd, mask=optim.weight_decay_mask),
                      optax.scale_by_learning_rate(schedule)]
        if d.layer_decay < 1.0 or d.patch_embed_lr_mult != 1.0:
            from afm_jax.train import layer_decay
            depth = {**parse_variant(config.model.variant), **factory.size_overrides(config.model)}["depth"]
            parts.append(layer_decay.scale_updates_by_tree(layer_decay.lr_scale_tree(
                params, num_layers=depth, decay=float(d.layer_decay), patch_embed_scale=float(d.patch_embed_lr_mult))))
        if self.freeze_steps > 0:
            parts.append(dino_schedules.freeze_for_steps(is_last, self.freeze_steps))
        return optax.chain(*parts)

    def build_train_iterator(self, config: ml_collections.ConfigDict):
        return multicrop.build_multicrop_iterator(config, patch_size=self.patch_size,
                                                  ibot=config.dino.ibot if self.ibot else None)

    def example_batch(self, config: ml_collections.ConfigDict, batch_size: int, seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        mc, s = config.multicrop, config.image_size
        batch = {"global": rng.random((batch_size, mc.num_global, s, s, 1), dtype=np.float32),
                 "local": rng.random((batch_size, mc.num_local, mc.local_size, mc.local_size, 1), dtype=np.float32)}
        if config.dino.ibot.enabled:
            g = s // parse_variant(config.model.variant)["patch_size"]
            spec = multicrop.MaskSpec((g, g), config.dino.ibot.mask_probability, tuple(config.dino.ibot.mask_ratio))
            batch["masks"] = np.stack([[spec.sample(rng) for _ in range(mc.num_global)] for _ in range(batch_size)])
        return {k: batch[k] for k in self.batch_keys}

    # ─── The loss (pure, jitted) ─────────────────────────────────────────────────────────────
    def teacher_of(self, model: dino_lib.DINOModel, teacher_params: Any,
                   teacher_stats: Any = None) -> dino_lib.DINOModel:
        """The student's module with the teacher's params (no gradient flows into them) and, when
        given, the teacher's own BatchNorm running averages."""
        graphdef, _, stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
        if teacher_stats is not None:
            stats = teacher_stats
        return nnx.merge(graphdef, jax.lax.stop_gradient(teacher_params), jax.lax.stop_gradient(stats), rest,
                         copy=True)

    def loss(self, model: dino_lib.DINOModel, batch: dict, key: jax.Array, extra: dict,
             step: jax.Array) -> tuple[jax.Array, tuple[dict, dict]]:
        d = self.config.dino
        glob = batch["global"]                                   # (B, G, S, S, C)
        b, ng = glob.shape[:2]
        crops_first = lambda x: jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])   # (G·B, ...), crop-major
        g_images = crops_first(glob)
        masks = crops_first(batch["masks"]) if self.ibot else None
        key_g, key_l = jax.random.split(key)

        teacher = self.teacher_of(model, extra["teacher"], extra.get("teacher_stats"))
        t_cls, t_patch = teacher.backbone(g_images)
        t_logits = jax.lax.stop_gradient(teacher.dino_head(t_cls)).reshape(ng, b, -1)

        s_cls, s_patch = model.backbone(g_images, masks=masks, rngs=key_g)
        s_logits = [model.dino_head(s_cls).reshape(ng, b, -1)]
        if "local" in batch:
            loc = batch["local"]
            l_cls, _ = model.backbone(crops_first(loc), rngs=key_l)
            s_logits.append(model.dino_head(l_cls).reshape(loc.shape[1], b, -1))
        s_logits = jnp.concatenate(s_logits, axis=0)             # (V, B, K), global views first

        temp = self.teacher_temp(step)
        if d.centering == "center":
            t_probs = dino_lib.teacher_softmax(t_logits, extra["center"], temp)
        else:
            k = t_logits.shape[-1]
            t_probs = dino_lib.sinkhorn_knopp(t_logits.reshape(-1, k), temp, d.sinkhorn_iterations).reshape(t_logits.shape)
        t_probs = jax.lax.stop_gradient(t_probs)
        loss_dino = dino_lib.dino_loss(s_logits, t_probs, d.student_temp)
        teacher_entropy = dino_lib.entropy(t_probs)
        total = d.dino_loss_weight * loss_dino
        metrics = {"loss_dino": loss_dino, "teacher_entropy": teacher_entropy,
                   # every teacher view meets V - 1 student views, so the mean entropy over pairs is this one
                   "kl_teacher_student": loss_dino - teacher_entropy,
                   "student_entropy": dino_lib.entropy(jax.nn.softmax(s_logits / d.student_temp, axis=-1)),
                   "center_norm": jnp.linalg.norm(extra["center"]),
                   "teacher_temp": jnp.asarray(temp, jnp.float32),
                   "teacher_momentum": self.momentum(step)}
        outputs = {"teacher_mean": jnp.mean(t_logits, axis=(0, 1))}
        if "teacher_stats" in extra:   # the teacher's running averages after its train-mode forward
            outputs["teacher_stats"] = jax.lax.stop_gradient(nnx.state(teacher, nnx.BatchStat))

        if d.koleo_weight > 0:
            per_view = s_cls.reshape(ng, b, -1)
            loss_koleo = sum(dino_lib.koleo_loss(per_view[i]) for i in range(ng))
            total = total + d.koleo_weight * loss_koleo
            metrics["loss_koleo"] = loss_koleo

        if self.ibot:
            loss_ibot, ibot_metrics, ibot_outputs = self._ibot(model, teacher, s_patch, t_patch, masks, extra, temp)
            total = total + d.ibot.loss_weight * loss_ibot
            metrics.update(loss_ibot=loss_ibot, **ibot_metrics)
            outputs.update(ibot_outputs)
        return total, (metrics, outputs)

    def _ibot(self, model, teacher, s_patch, t_patch, masks, extra, temp):
        """iBOT's masked-patch term on at most ceil(N · max ratio) gathered patches per crop."""
        d = self.config.dino
        n = masks.shape[1]
        n_max = max(1, min(n, int(math.ceil(n * float(d.ibot.mask_ratio[1])))))
        order = jnp.argsort(jnp.logical_not(masks), axis=1, stable=True)[:, :n_max]   # masked patches first
        sel = jnp.take_along_axis(masks, order, axis=1)                              # (G·B, n_max)
        gather = lambda x: jnp.take_along_axis(x, order[..., None], axis=1)
        s_logits = model.patch_head(gather(s_patch))
        t_logits = jax.lax.stop_gradient(teacher.patch_head(gather(t_patch)))       # (G·B, n_max, K)
        if d.centering == "center":
            t_probs = dino_lib.teacher_softmax(t_logits, extra["patch_center"], temp)
        else:
            k = t_logits.shape[-1]
            t_probs = dino_lib.sinkhorn_knopp(t_logits.reshape(-1, k), temp, d.sinkhorn_iterations,
                                              weights=sel.reshape(-1)).reshape(t_logits.shape)
        t_probs = jax.lax.stop_gradient(t_probs)
        loss = dino_lib.ibot_patch_loss(s_logits, t_probs, sel, d.student_temp)
        m = sel.astype(jnp.float32)
        # Means over crops (batch means, as the step's contract asks); their ratio is the masked-patch mean.
        outputs = {"patch_logit_sum": jnp.mean(jnp.einsum("cn,cnk->ck", m, t_logits), axis=0),
                   "patch_count": jnp.mean(jnp.sum(m, axis=1))}
        metrics = {"masked_fraction": jnp.sum(m) / (masks.shape[0] * n),
                   "patch_center_norm": jnp.linalg.norm(extra["patch_center"])}
        return loss, metrics, outputs

    def update_extra(self, extra: dict, params: Any, outputs: dict, step: jax.Array) -> dict:
        d = self.config.dino
        new = dict(extra)
        new["teacher"] = dino_schedules.ema_update(extra["teacher"], params, self.momentum(step))
        if "teacher_stats" in outputs:
            new["teacher_stats"] = outputs["teacher_stats"]
        if d.centering == "center":
            new["center"] = dino_lib.update_center(extra["center"], outputs["teacher_mean"], d.center_momentum)
            if self.ibot:
                count = outputs["patch_count"]
                batch_center = outputs["patch_logit_sum"] / jnp.maximum(count, 1e-6)
                updated = dino_lib.update_center(extra["patch_center"], batch_center, d.center_momentum)
                new["patch_center"] = jnp.where(count > 0, updated, extra["patch_center"])
        return new

    # ─── Monitoring ──────────────────────────────────────────────────────────────────────────
    def monitored_encoder(self, model: dino_lib.DINOModel, extra: dict) -> nnx.Module:
        """The *teacher* backbone: what DINO evaluates and exports (evaluation/monitors.py runs the kNN)."""
        stats = extra.get("teacher_stats")
        teacher = self.teacher_of(model, jax.device_get(extra["teacher"]),
                                  None if stats is None else jax.device_get(stats))
        return teacher.encoder


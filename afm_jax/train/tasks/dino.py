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

from afm_jax.data import multicrop
from afm_jax.models import dino as dino_lib
from afm_jax.models import factory
from afm_jax.train import dino_schedules, optim
from afm_jax.train.tasks.base import Task
from afm_jax.train.tasks.dino_config import default_dino_config, validate_dino_config


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
        config.image_size = 224  # the global crop size
        config.image_every = 0
        config.model.pos_embed = "learned"
        config.model.drop_path_rate = 0.1
        config.model.init = "dino"  # trunc-normal 0.02 (DINO vision_transformer.py)
        config.model.pos_embed_interpolation = "dino"  # plain bicubic + 0.1 offset (interpolate_pos_encoding)
        config.optim.update(
            base_lr=5e-4,
            min_lr=1e-6,
            warmup_epochs=10.0,
            b1=0.9,
            b2=0.999,
            weight_decay=0.04,
            grad_clip_norm=3.0,
            weight_decay_rule="rank",
        )

    def validate(self, config: ml_collections.ConfigDict) -> None:
        validate_dino_config(config, self._granularity(config))

    @staticmethod
    def _granularity(config: ml_collections.ConfigDict) -> int:
        """Crop sizes must be multiples of this: the ViT's patch size, a ResNet's total stride 32."""
        if factory.is_resnet(config.model):
            return 32
        return factory.vit_dims(config.model)["patch_size"]

    def setup(self, config: ml_collections.ConfigDict, *, workdir: str, total_steps: int, steps_per_epoch: int) -> None:
        super().setup(config, workdir=workdir, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
        d = config.dino
        self.patch_size = self._granularity(config)
        self.ibot = bool(d.ibot.enabled)
        keys = (
            ["global"] + (["local"] if int(config.multicrop.num_local) > 0 else []) + (["masks"] if self.ibot else [])
        )
        self.batch_keys = tuple(keys)
        self.teacher_temp = dino_schedules.teacher_temperature_schedule(
            d.warmup_teacher_temp, d.teacher_temp, int(round(d.warmup_teacher_temp_epochs * self.steps_per_epoch))
        )
        self.momentum = dino_schedules.teacher_momentum_schedule(
            d.momentum_teacher, self.total_steps, d.final_momentum_teacher
        )
        self.freeze_steps = int(round(d.freeze_last_layer_epochs * self.steps_per_epoch))

    # ─── Model, state, optimiser, input ──────────────────────────────────────────────────────
    def build_model(self, config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> dino_lib.DINOModel:
        # A ResNet trains its BatchNorm in train mode (batch statistics), as DINO's ResNet-50 does.
        encoder = factory.build_backbone(config.model, config.image_size, rngs, train_batch_norm=True)
        d = config.dino
        return dino_lib.DINOModel(
            encoder,
            out_dim=d.out_dim,
            hidden_dim=d.hidden_dim,
            bottleneck_dim=d.bottleneck_dim,
            nlayers=d.nlayers,
            norm_last_layer=d.norm_last_layer,
            ibot=d.ibot.enabled,
            ibot_separate_head=d.ibot.separate_head,
            ibot_out_dim=d.ibot.out_dim,
            ibot_hidden_dim=d.ibot.hidden_dim,
            ibot_bottleneck_dim=d.ibot.bottleneck_dim,
            ibot_nlayers=d.ibot.nlayers,
            dtype=factory.DTYPES[config.model.dtype],
            param_dtype=factory.DTYPES[config.model.param_dtype],
            rngs=rngs,
        )

    def init_extra(self, model: dino_lib.DINOModel) -> dict:
        """The teacher starts as a copy of the student; centres start at zero."""
        params = nnx.state(model, nnx.Param)
        extra = {
            "teacher": jax.tree.map(lambda x: jnp.array(x, copy=True), params),
            "center": jnp.zeros((self.config.dino.out_dim,), jnp.float32),
        }
        stats = nnx.state(model, nnx.BatchStat)
        if jax.tree.leaves(stats):  # the teacher's own BatchNorm running averages (ResNet)
            extra["teacher_stats"] = jax.tree.map(lambda x: jnp.array(x, copy=True), stats)
        if model.ibot:
            head = model.ibot_head if model.ibot_head is not None else model.dino_head
            extra["patch_center"] = jnp.zeros((head.last_layer.weight_v.shape[1],), jnp.float32)
        return extra

    def make_optimizer(
        self, config: ml_collections.ConfigDict, schedule: optax.Schedule, params: Any
    ) -> optax.GradientTransformation:
        return optim.make_dino_optimizer(
            config, schedule, params, total_steps=self.total_steps, freeze_last_layer_steps=self.freeze_steps
        )

    def build_train_iterator(self, config: ml_collections.ConfigDict):
        return multicrop.build_multicrop_iterator(
            config, patch_size=self.patch_size, ibot=config.dino.ibot if self.ibot else None
        )

    def example_batch(self, config: ml_collections.ConfigDict, batch_size: int, seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        mc, s = config.multicrop, config.image_size
        batch = {
            "global": rng.random((batch_size, mc.num_global, s, s, 1), dtype=np.float32),
            "local": rng.random((batch_size, mc.num_local, mc.local_size, mc.local_size, 1), dtype=np.float32),
        }
        if config.dino.ibot.enabled:
            g = s // factory.vit_dims(config.model)["patch_size"]
            spec = multicrop.MaskSpec((g, g), config.dino.ibot.mask_probability, tuple(config.dino.ibot.mask_ratio))
            batch["masks"] = np.stack([[spec.sample(rng) for _ in range(mc.num_global)] for _ in range(batch_size)])
        return {k: batch[k] for k in self.batch_keys}

    # ─── The loss (pure, jitted) ─────────────────────────────────────────────────────────────
    def teacher_of(
        self, model: dino_lib.DINOModel, teacher_params: Any, teacher_stats: Any = None
    ) -> dino_lib.DINOModel:
        """The student's module with the teacher's params (no gradient flows into them) and, when
        given, the teacher's own BatchNorm running averages."""
        graphdef, _, stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
        if teacher_stats is not None:
            stats = teacher_stats
        return nnx.merge(graphdef, jax.lax.stop_gradient(teacher_params), jax.lax.stop_gradient(stats), rest, copy=True)

    def loss(
        self, model: dino_lib.DINOModel, batch: dict, key: jax.Array, extra: dict, step: jax.Array
    ) -> tuple[jax.Array, tuple[dict, dict]]:
        d = self.config.dino
        glob = batch["global"]  # (B, G, S, S, C)
        b, ng = glob.shape[:2]
        crops_first = lambda x: jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])  # (G·B, ...), crop-major
        g_images = crops_first(glob)
        masks = crops_first(batch["masks"]) if self.ibot else None
        key_g, key_l = jax.random.split(key)

        teacher = self.teacher_of(model, extra["teacher"], extra.get("teacher_stats"))
        t_cls, t_patch = teacher.backbone(g_images)
        t_logits = jax.lax.stop_gradient(teacher.dino_head(t_cls)).reshape(ng, b, -1)

        s_cls, s_patch = model.backbone(g_images, masks=masks, rngs=key_g)
        cls_tokens = [s_cls]
        if "local" in batch:
            cls_tokens.append(model.backbone(crops_first(batch["local"]), rngs=key_l)[0])
        # The head once on every view's class token, as DINO's MultiCropWrapper (one weight-norm pass).
        s_logits = model.dino_head(jnp.concatenate(cls_tokens, axis=0)).reshape(-1, b, t_logits.shape[-1])

        temp = self.teacher_temp(step)
        if d.centering == "center":
            t_probs = dino_lib.teacher_softmax(t_logits, extra["center"], temp)
        else:
            k = t_logits.shape[-1]
            t_probs = dino_lib.sinkhorn_knopp(t_logits.reshape(-1, k), temp, d.sinkhorn_iterations).reshape(
                t_logits.shape
            )
        t_probs = jax.lax.stop_gradient(t_probs)
        loss_dino = dino_lib.dino_loss(s_logits, t_probs, d.student_temp)
        teacher_entropy = dino_lib.entropy(t_probs)
        total = d.dino_loss_weight * loss_dino
        metrics = {
            "loss_dino": loss_dino,
            "teacher_entropy": teacher_entropy,
            # every teacher view meets V - 1 student views, so the mean entropy over pairs is this one
            "kl_teacher_student": loss_dino - teacher_entropy,
            "student_entropy": dino_lib.entropy(jax.nn.softmax(s_logits / d.student_temp, axis=-1)),
            "center_norm": jnp.linalg.norm(extra["center"]),
            "teacher_temp": jnp.asarray(temp, jnp.float32),
            "teacher_momentum": self.momentum(step),
        }
        outputs = {"teacher_mean": jnp.mean(t_logits, axis=(0, 1))}
        if "teacher_stats" in extra:  # the teacher's running averages after its train-mode forward
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
        order = jnp.argsort(jnp.logical_not(masks), axis=1, stable=True)[:, :n_max]  # masked patches first
        sel = jnp.take_along_axis(masks, order, axis=1)  # (G·B, n_max)
        gather = lambda x: jnp.take_along_axis(x, order[..., None], axis=1)
        s_logits = model.patch_head(gather(s_patch))
        t_logits = jax.lax.stop_gradient(teacher.patch_head(gather(t_patch)))  # (G·B, n_max, K)
        if d.centering == "center":
            t_probs = dino_lib.teacher_softmax(t_logits, extra["patch_center"], temp)
        else:
            k = t_logits.shape[-1]
            t_probs = dino_lib.sinkhorn_knopp(
                t_logits.reshape(-1, k), temp, d.sinkhorn_iterations, weights=sel.reshape(-1)
            ).reshape(t_logits.shape)
        t_probs = jax.lax.stop_gradient(t_probs)
        loss = dino_lib.ibot_patch_loss(s_logits, t_probs, sel, d.student_temp)
        m = sel.astype(jnp.float32)
        # Means over crops (batch means, as the step's contract asks); their ratio is the masked-patch mean.
        outputs = {
            "patch_logit_sum": jnp.mean(jnp.einsum("cn,cnk->ck", m, t_logits), axis=0),
            "patch_count": jnp.mean(jnp.sum(m, axis=1)),
        }
        metrics = {
            "masked_fraction": jnp.sum(m) / (masks.shape[0] * n),
            "patch_center_norm": jnp.linalg.norm(extra["patch_center"]),
        }
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
        teacher = self.teacher_of(
            model, jax.device_get(extra["teacher"]), None if stats is None else jax.device_get(stats)
        )
        return teacher.encoder

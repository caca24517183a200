"""MAE pretraining (He et al. 2021) as a trainer task: model, loss, reconstruction panels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from afm_jax import configuration
from afm_jax.models import factory
from afm_jax.models.mae import MAE
from afm_jax.train.tasks.base import Task


def default_mae_config() -> ml_collections.ConfigDict:
    """Paper defaults: mask 0.75, norm-pix loss, decoder 512-d × 8 blocks × 16 heads."""
    return ml_collections.ConfigDict(
        dict(mask_ratio=0.75, decoder_dim=512, decoder_depth=8, decoder_heads=16, norm_pix_loss=True)
    )


class MAETask(Task):
    """Masked-autoencoder pretraining of a ViT encoder."""

    name = "mae"

    @classmethod
    def extend_config(cls, config: ml_collections.ConfigDict) -> None:
        config.mae = default_mae_config()

    def validate(self, config: ml_collections.ConfigDict) -> None:
        factory.validate_model_config(config)
        configuration.require(config, "mae.mask_ratio", lambda v: 0.0 < v < 1.0, "a ratio in (0, 1)")
        configuration.require(
            config,
            "mae.decoder_dim",
            lambda v: v > 0 and v % config.mae.decoder_heads == 0,
            "a positive width divisible by mae.decoder_heads",
        )
        configuration.require(config, "mae.decoder_depth", lambda v: int(v) >= 1, "at least 1 block")

    def build_model(self, config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> MAE:
        return factory.build_mae(config, rngs)

    def loss(
        self, model: MAE, batch: dict, key: jax.Array, extra: dict = None, step: jax.Array = None
    ) -> tuple[jax.Array, tuple[dict, dict]]:
        mask_key, drop_key = jax.random.split(key)
        out = model(batch["image"], key=mask_key, rngs=nnx.Rngs(dropout=drop_key))
        return out["loss"], ({}, {})

    def images(self, model: MAE, extra: dict, batch: dict, key: jax.Array) -> dict[str, jax.Array]:
        """One row per image: input | masked input | reconstruction (visible patches pasted back)."""
        images = batch["image"]
        masked, reconstructed = model.reconstruct(images, key=key)
        rows = jnp.concatenate([images, masked, reconstructed], axis=2)  # (n, H, 3W, C)
        panel = rows.reshape(-1, rows.shape[2], rows.shape[3])  # (n·H, 3W, C)
        return {"mae_reconstruction": jnp.clip(panel[..., 0], 0.0, 1.0)}

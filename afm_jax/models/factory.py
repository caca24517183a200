"""Builds models from config sections, so configs name components and code stays declarative.

`model.arch` picks the backbone family: "vit" (default; `VisionTransformer`, every other key of the
section) or "resnet50" (torchvision-layout `ResNet`, for DINO's ResNet-50 recipe and continued
pretraining from RadImageNet; reads `in_chans`, `dtype`, `param_dtype`, `resnet_layers`).
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
from flax import nnx
from ml_collections.config_dict import placeholder

from afm_jax import configuration, errors
from afm_jax.models.mae import MAE
from afm_jax.models.pos_embed import INTERPOLATIONS
from afm_jax.models.resnet import RESNET_LAYERS, ResNet
from afm_jax.models.vit import INIT_SCHEMES, REMAT_POLICIES, VisionTransformer, parse_variant

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ARCHS = ("vit", "resnet50")


def default_model_config(variant: str = "B/16") -> ml_collections.ConfigDict:
    """ViT encoder options (see afm_jax.models.vit.VisionTransformer)."""
    return ml_collections.ConfigDict(
        dict(
            arch="vit",  # vit | resnet50 (see the module docstring)
            variant=variant,
            in_chans=1,
            class_token=True,
            num_reg_tokens=0,
            no_embed_class=False,
            pos_embed="sincos",  # sincos | learned | rope (2-D rotary in attention, DINOv3; no table)
            rope_temperature=100.0,  # pos_embed=rope: period base (DINOv3: 100)
            qkv_bias=True,  # bias on attn.qkv (timm vit_*_dinov3: False; its _qkvb variants: True)
            norm_eps=1e-6,  # LayerNorm epsilon (timm ViT / DINOv2: 1e-6; DINOv3: 1e-5)
            drop_path_rate=0.0,
            dtype="float32",
            param_dtype="float32",
            remat="none",  # activation rematerialisation per block: none | full | dots | dots_no_batch
            layer_scale_init=placeholder(float),  # LayerScale init (DINOv2: 1e-5); None = no LayerScale
            init="mae",  # parameter init: mae (xavier) | dino (trunc-normal 0.02) | dinov2 (+ tokens 1e-6)
            drop_path_uniform=False,  # True: drop_path_rate on every block (DINOv2); False: linear 0 -> rate (timm, DINO)
            pos_embed_interpolation="timm",  # resampling to other grids: timm (antialiased bicubic) | dino (+0.1 offset)
            # Image size the stored position table is built for (None = image_size). Set it to a source's size
            # (518 for DINOv2 hub weights) to keep that table and resample it per input, as the source model does.
            pos_embed_size=placeholder(int),
            # Optional changes to the variant's size (None = the variant's own), e.g. a shallower demo model.
            width=placeholder(int),
            depth=placeholder(int),
            num_heads=placeholder(int),
            mlp_dim=placeholder(int),
            resnet_layers=RESNET_LAYERS["resnet50"],  # arch resnet50: bottleneck blocks per stage (tests: (1, 1, 1, 1))
        )
    )


SIZE_OVERRIDES = ("width", "depth", "num_heads", "mlp_dim")


def size_overrides(model: ml_collections.ConfigDict) -> dict[str, int]:
    """The variant-size changes a model config makes (keys whose value is not None)."""
    return {k: int(model[k]) for k in SIZE_OVERRIDES if model.get(k) is not None}


def vit_dims(model: ml_collections.ConfigDict) -> dict[str, int]:
    """The ViT's real size: its variant's {width, depth, num_heads, mlp_dim, patch_size} with the
    config's overrides applied (the one place that combines them)."""
    return {**parse_variant(model.variant), **size_overrides(model)}


def validate_model_config(config: ml_collections.ConfigDict, prefix: str = "model") -> None:
    model = config[prefix]
    if "arch" in model:
        configuration.require_choice(config, f"{prefix}.arch", ARCHS)
    if is_resnet(model):
        validate_resnet_config(config, prefix)
        return
    configuration.require(
        config,
        f"{prefix}.variant",
        lambda v: parse_variant(v) is not None,
        'a ViT variant such as "S/16", "B/16", "L/16" or "H/14"',
    )
    configuration.require_choice(config, f"{prefix}.pos_embed", ("sincos", "learned", "rope"))
    configuration.require(
        config, f"{prefix}.norm_eps", lambda v: v is None or 0 < float(v) < 1e-2, "a small epsilon > 0"
    )
    configuration.require_choice(config, f"{prefix}.dtype", tuple(DTYPES))
    configuration.require_choice(config, f"{prefix}.param_dtype", tuple(DTYPES))
    configuration.require_choice(config, f"{prefix}.remat", tuple(REMAT_POLICIES))
    if "init" in model:
        configuration.require_choice(config, f"{prefix}.init", INIT_SCHEMES)
    if "pos_embed_interpolation" in model:
        configuration.require_choice(config, f"{prefix}.pos_embed_interpolation", INTERPOLATIONS)
    if "drop_path_uniform" in model:
        configuration.require(config, f"{prefix}.drop_path_uniform", lambda v: isinstance(v, bool), "True or False")
    configuration.require(config, f"{prefix}.in_chans", lambda v: v in (1, 3), "1 (radiographs) or 3")
    configuration.require(config, f"{prefix}.num_reg_tokens", lambda v: int(v) >= 0, "a count >= 0")
    configuration.require(config, f"{prefix}.drop_path_rate", lambda v: 0.0 <= v < 1.0, "a rate in [0, 1)")
    for key in SIZE_OVERRIDES:
        configuration.require(config, f"{prefix}.{key}", lambda v: v is None or int(v) > 0, "None or a positive int")
    size = vit_dims(model)
    configuration.require(
        config,
        f"{prefix}.num_heads",
        lambda _: size["width"] % size["num_heads"] == 0,
        f"a divisor of the width {size['width']}",
    )
    patch = size["patch_size"]
    configuration.require(
        config,
        "image_size",
        lambda v: v % patch == 0,
        f"a multiple of the patch size {patch} of model `{model.variant}`",
    )
    if "pos_embed_size" in model:
        configuration.require(
            config,
            f"{prefix}.pos_embed_size",
            lambda v: v is None or (int(v) > 0 and int(v) % patch == 0),
            f"None (= image_size) or a positive multiple of the patch size {patch}",
        )


# ViT-only options a ResNet cannot honour: refused rather than silently ignored. (class_token,
# pos_embed and no_embed_class describe a ViT's tokens; they are not read for a ResNet.)
_VIT_ONLY_REFUSED = {
    "num_reg_tokens": (lambda v: int(v) == 0, "0 with model.arch=resnet50 (a ResNet has no tokens)"),
    "drop_path_rate": (lambda v: float(v) == 0.0, "0.0 with model.arch=resnet50 (no drop-path in a ResNet)"),
    "remat": (lambda v: v == "none", '"none" with model.arch=resnet50 (per-block remat is ViT-only)'),
    "layer_scale_init": (lambda v: v is None, "None with model.arch=resnet50 (LayerScale is ViT-only)"),
    "drop_path_uniform": (lambda v: not v, "False with model.arch=resnet50 (no drop-path in a ResNet)"),
    "pos_embed_size": (lambda v: v is None, "None with model.arch=resnet50 (a ResNet has no position embedding)"),
}


def validate_resnet_config(config: ml_collections.ConfigDict, prefix: str = "model") -> None:
    """The checks of `validate_model_config` for `model.arch="resnet50"`."""
    configuration.require_choice(config, f"{prefix}.dtype", tuple(DTYPES))
    configuration.require_choice(config, f"{prefix}.param_dtype", tuple(DTYPES))
    configuration.require(config, f"{prefix}.in_chans", lambda v: v in (1, 3), "1 (radiographs) or 3")
    configuration.require(
        config,
        f"{prefix}.resnet_layers",
        lambda v: len(tuple(v)) == 4 and all(int(n) >= 1 for n in v),
        "4 positive block counts, e.g. (3, 4, 6, 3) for ResNet-50",
    )
    for key, (ok, expected) in _VIT_ONLY_REFUSED.items():
        if key in config[prefix]:
            configuration.require(config, f"{prefix}.{key}", ok, expected)
    for key in SIZE_OVERRIDES:
        configuration.require(
            config, f"{prefix}.{key}", lambda v: v is None, "None with model.arch=resnet50 (ViT size override)"
        )
    configuration.require(
        config,
        "image_size",
        lambda v: int(v) >= 32 and int(v) % 32 == 0,
        "a multiple of 32 (a ResNet downsamples by 32)",
    )


def is_resnet(model: ml_collections.ConfigDict) -> bool:
    """Whether a model config section describes a ResNet backbone."""
    return model.get("arch", "vit") == "resnet50"


def build_resnet(model: ml_collections.ConfigDict, rngs: nnx.Rngs, *, train_batch_norm: bool = False) -> ResNet:
    """The ResNet of a `model.arch="resnet50"` section; `train_batch_norm` builds it with batch
    statistics in the forward pass (DINO pretraining) instead of running averages (evaluation)."""
    return ResNet(
        tuple(int(n) for n in model.resnet_layers),
        in_chans=int(model.in_chans),
        use_running_average=not train_batch_norm,
        dtype=DTYPES[model.dtype],
        param_dtype=DTYPES[model.param_dtype],
        rngs=rngs,
    )


def build_backbone(
    model: ml_collections.ConfigDict, image_size: int, rngs: nnx.Rngs, *, train_batch_norm: bool = False
) -> VisionTransformer | ResNet:
    """The backbone `model.arch` names: a ViT (`build_encoder`) or a ResNet (`build_resnet`)."""
    if is_resnet(model):
        return build_resnet(model, rngs, train_batch_norm=train_batch_norm)
    return build_encoder(model, image_size, rngs)


def build_encoder(model: ml_collections.ConfigDict, image_size: int, rngs: nnx.Rngs) -> VisionTransformer:
    if is_resnet(model):  # a task that builds ViTs only (MAE, ...) must not silently ignore model.arch
        raise errors.ConfigError(
            f"Config key `model.arch` = {model.arch!r}: this task builds a ViT; a ResNet backbone is available "
            "for task dino (configs/dino_resnet50_radimagenet.py). Use --config.model.arch=vit."
        )
    table_size = model.get("pos_embed_size") or image_size
    return VisionTransformer(
        model.variant,
        img_size=table_size,
        in_chans=model.in_chans,
        class_token=model.class_token,
        num_reg_tokens=model.num_reg_tokens,
        no_embed_class=model.no_embed_class,
        pos_embed=model.pos_embed,
        drop_path_rate=model.drop_path_rate,
        drop_path_uniform=bool(model.get("drop_path_uniform", False)),
        init=model.get("init", "mae"),
        pos_embed_interpolation=model.get("pos_embed_interpolation", "timm"),
        dtype=DTYPES[model.dtype],
        param_dtype=DTYPES[model.param_dtype],
        remat=model.get("remat", "none"),
        layer_scale_init=model.get("layer_scale_init"),
        rope_temperature=float(model.get("rope_temperature", 100.0)),
        qkv_bias=bool(model.get("qkv_bias", True)),
        norm_eps=float(model.get("norm_eps", 1e-6)),
        rngs=rngs,
        **size_overrides(model),
    )


def build_mae(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> MAE:
    encoder = build_encoder(config.model, config.image_size, rngs)
    m = config.mae
    return MAE(
        encoder,
        mask_ratio=m.mask_ratio,
        decoder_dim=m.decoder_dim,
        decoder_depth=m.decoder_depth,
        decoder_heads=m.decoder_heads,
        norm_pix_loss=m.norm_pix_loss,
        dtype=DTYPES[config.model.dtype],
        param_dtype=DTYPES[config.model.param_dtype],
        rngs=rngs,
    )

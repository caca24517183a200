"""Export of our ViT encoders as timm models: architecture name and kwargs, ``config.json`` with the
pretrained config, ``model.safetensors``, a model card, and the forward-parity check against timm.

Why here: writing an export and proving it equals timm's model are one job; the name mapping itself
lives in :mod:`afm_jax.interop.timm`. torch/timm are imported lazily (an optional extra), only by the
parity helpers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from afm_jax.interop.timm import encoder_state_dict
from afm_jax.models.vit import VisionTransformer
import json
import os
from safetensors.numpy import save_file

# ----------------------------------------------------------------------------------------------
# Export metadata: how timm rebuilds the encoder.
# ----------------------------------------------------------------------------------------------

_TIMM_SIZE = {"Ti": "tiny", "S": "small", "B": "base", "L": "large", "H": "huge"}
_REGISTERED = {
    "vit_tiny_patch16_224", "vit_small_patch16_224", "vit_small_patch32_224", "vit_small_patch8_224",
    "vit_base_patch16_224", "vit_base_patch32_224", "vit_base_patch8_224", "vit_large_patch16_224",
    "vit_large_patch32_224", "vit_huge_patch14_224", "vit_small_patch14_dinov2",
    "vit_base_patch14_dinov2", "vit_large_patch14_dinov2", "vit_small_patch14_reg4_dinov2",
    "vit_base_patch14_reg4_dinov2", "vit_large_patch14_reg4_dinov2",
}


def _has_layer_scale(encoder: VisionTransformer) -> bool:
    return len(encoder.blocks) > 0 and encoder.blocks[0].ls1 is not None


def timm_architecture(encoder: VisionTransformer) -> str:
    """A registered timm model name close to ``encoder`` (every size argument is passed explicitly
    anyway, so the name only picks timm's entry point and default pretrained config)."""
    size = _TIMM_SIZE.get(str(encoder.variant).split("/")[0].strip(), "base")
    p = encoder.patch_size
    names = [f"vit_{size}_patch{p}_224"]
    if p == 14:
        names.insert(0, f"vit_{size}_patch14_{'reg4_' if encoder.num_reg_tokens else ''}dinov2")
    return next((n for n in names if n in _REGISTERED), "vit_base_patch16_224")


def timm_model_args(encoder: VisionTransformer, *, global_pool: str | None = None) -> dict[str, Any]:
    """The ``timm.create_model`` kwargs that rebuild ``encoder`` as a headless timm ViT.

    ``num_classes=0`` (no head: the export is a backbone), ``fc_norm=False`` (so the final ``norm``
    stays the token norm even with ``global_pool='avg'``), ``dynamic_img_size=True`` (any input size
    that is a multiple of the patch, position embeddings resampled as ours are).
    """
    h, w = encoder.img_size
    pool = global_pool or ("token" if encoder.has_class_token else "avg")
    return dict(
        img_size=h if h == w else [h, w],
        patch_size=encoder.patch_size,
        embed_dim=encoder.embed_dim,
        depth=len(encoder.blocks),
        num_heads=encoder.num_heads,
        mlp_ratio=encoder.mlp_dim / encoder.embed_dim,
        in_chans=encoder.in_chans,
        class_token=encoder.has_class_token,
        reg_tokens=encoder.num_reg_tokens,
        no_embed_class=encoder.no_embed_class,
        init_values=1e-5 if _has_layer_scale(encoder) else None,  # only decides that gammas exist
        qkv_bias=True,
        global_pool=pool,
        fc_norm=False,
        num_classes=0,
        dynamic_img_size=True,
    )


def timm_pretrained_cfg(encoder: VisionTransformer) -> dict[str, Any]:
    """timm ``pretrained_cfg`` entries: input size and the normalisation the encoder applies."""
    h, w = encoder.img_size
    return dict(
        input_size=[encoder.in_chans, h, w],
        mean=list(encoder.input_mean),
        std=list(encoder.input_std),
        interpolation="bicubic",
        crop_pct=1.0,
        num_classes=0,
        first_conv="patch_embed.proj",
        classifier="head",
        fixed_input_size=False,
    )


# ----------------------------------------------------------------------------------------------
# Parity (needs torch + timm; imported lazily).
# ----------------------------------------------------------------------------------------------


def create_timm_vit(model_args: Mapping[str, Any], state_dict: Mapping[str, np.ndarray] | None = None):
    """A timm ``VisionTransformer`` (eval mode, random init unless ``state_dict``, loaded strictly)."""
    import torch  # optional extra [torch]
    from timm.models.vision_transformer import VisionTransformer as TimmViT  # optional extra [torch]

    args = dict(model_args)
    img = args.pop("img_size")
    model = TimmViT(img_size=tuple(img) if isinstance(img, (list, tuple)) else img, **args).eval()
    if state_dict is not None:
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()},
                              strict=True)
    return model


def forward_parity(
    encoder: VisionTransformer, timm_model: Any, *, batch: int = 2, size: Sequence[int] | None = None,
    seed: int = 0,
) -> float:
    """Max |ours(x) - timm.forward_features(normalised x)| on a random batch of [0, 1] images."""
    import torch  # optional extra [torch]

    h, w = size or encoder.img_size
    x = np.random.default_rng(seed).random((batch, h, w, encoder.in_chans), dtype=np.float32)
    ours = np.asarray(nnx.jit(lambda m, x: m(x))(encoder, jnp.asarray(x)))
    xn = (x - np.asarray(encoder.input_mean, np.float32)) / np.asarray(encoder.input_std, np.float32)
    with torch.no_grad():
        ref = timm_model.forward_features(torch.from_numpy(xn.transpose(0, 3, 1, 2).copy())).numpy()
    return float(np.max(np.abs(ours - ref)))


# ----------------------------------------------------------------------------------------------
# The export folder: model.safetensors + config.json (timm's local-dir / Hub format) + README.md.
# ----------------------------------------------------------------------------------------------


def export_config(encoder: VisionTransformer, afm_info: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``config.json`` content: timm's ``architecture``/``model_args``/``pretrained_cfg`` (what
    ``timm.create_model("local-dir:OUT")`` reads) plus our own ``afm_jax`` section."""
    args = timm_model_args(encoder)
    return dict(
        architecture=timm_architecture(encoder),
        num_classes=0,
        num_features=encoder.embed_dim,
        global_pool=args["global_pool"],
        model_args=args,
        pretrained_cfg=timm_pretrained_cfg(encoder),
        afm_jax={"variant": str(encoder.variant), "pos_embed": encoder.pos_embed_type,
                 **dict(afm_info or {})},
    )


def write_export(
    out_dir: str, encoder: VisionTransformer, *, afm_info: Mapping[str, Any] | None = None,
    readme: str | None = None,
) -> dict[str, Any]:
    """Writes ``OUT/model.safetensors`` (timm keys, fp32), ``OUT/config.json`` and ``OUT/README.md``.

    Returns the config written. The safetensors file carries ``{"format": "pt"}`` metadata, as
    torch-saved safetensors do.
    """


    os.makedirs(out_dir, exist_ok=True)
    sd = encoder_state_dict(encoder)
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()},
              os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    config = export_config(encoder, afm_info)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if readme is not None:
        with open(os.path.join(out_dir, "README.md"), "w") as f:
            f.write(readme)
    return config


def usage_snippet(out_dir: str, config: Mapping[str, Any]) -> str:
    """Python that loads an export folder in timm (three equivalent ways)."""
    args = ", ".join(f"{k}={v!r}" for k, v in config["model_args"].items())
    pc = config["pretrained_cfg"]
    return (
        "import timm, torch\n"
        f"# 1. timm reads config.json itself\n"
        f"model = timm.create_model('local-dir:{out_dir}', pretrained=True)\n"
        f"# 2. a named architecture + this file\n"
        f"model = timm.create_model('{config['architecture']}', pretrained=True,\n"
        f"    pretrained_cfg_overlay=dict(file='{out_dir}/model.safetensors', mean={pc['mean']}, "
        f"std={pc['std']}, input_size={tuple(pc['input_size'])}),\n    {args})\n"
        f"# 3. plain PyTorch\n"
        f"from safetensors.torch import load_file\n"
        f"model = timm.create_model('{config['architecture']}', pretrained=False, {args})\n"
        f"model.load_state_dict(load_file('{out_dir}/model.safetensors'), strict=True)\n"
        f"# inputs: (B, {pc['input_size'][0]}, H, W) in [0, 1], normalised with mean {pc['mean']} std "
        f"{pc['std']}; features = model.forward_features(x)\n"
    )


PARITY_TOLERANCE = 1e-4   # max abs difference to timm's forward_features accepted by --check (fp32)

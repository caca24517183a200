"""Export of our ViT encoders as timm models: architecture name and kwargs, ``config.json`` with the
pretrained config, ``model.safetensors``, a model card, and the forward-parity check against timm.

Why here: writing an export and proving it equals timm's model are one job; the name mapping itself
lives in :mod:`afm_jax.interop.timm`. torch/timm are imported lazily (an optional extra), only by the
parity helpers.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from afm_jax import io
from afm_jax.errors import InteropError
from afm_jax.interop.timm import encoder_state_dict
from afm_jax.models.vit import VisionTransformer

# ----------------------------------------------------------------------------------------------
# Export metadata: how timm rebuilds the encoder.
# ----------------------------------------------------------------------------------------------

# timm entry points and the size each one stands for: (width, depth, heads, mlp_dim, patch).
_TIMM_SIZES = {
    "tiny": (192, 12, 3, 768),
    "small": (384, 12, 6, 1536),
    "base": (768, 12, 12, 3072),
    "large": (1024, 24, 16, 4096),
    "huge": (1280, 32, 16, 5120),
}
_REGISTERED_PATCHES = {"tiny": (16,), "small": (8, 16, 32), "base": (8, 16, 32), "large": (16, 32), "huge": (14,)}
# The name used when no registered timm ViT has the encoder's size: every size comes from model_args.
GENERIC_ARCHITECTURE = "vit_base_patch16_224"


def _has_layer_scale(encoder: VisionTransformer) -> bool:
    return len(encoder.blocks) > 0 and encoder.blocks[0].ls1 is not None


def timm_architecture(encoder: VisionTransformer) -> str:
    """The registered timm ViT whose width, depth, heads, MLP width and patch are ``encoder``'s
    (``vit_small_patch16_224``, ``vit_large_patch14_reg4_dinov2``, ...), else
    :data:`GENERIC_ARCHITECTURE`; either way every size is also passed in ``model_args``, so the name
    only picks timm's entry point (see :func:`architecture_matches`)."""
    dims = (encoder.embed_dim, len(encoder.blocks), encoder.num_heads, encoder.mlp_dim)
    p = encoder.patch_size
    if encoder.pos_embed_type == "rope":  # DINOv3: timm's Eva entry points (all patch 16)
        size = next((n for n, known in _TIMM_SIZES.items() if known == dims and n in ("small", "base", "large")), None)
        return f"vit_{size or 'base'}_patch16_dinov3{'_qkvb' if encoder.qkv_bias else ''}"
    for size, known in _TIMM_SIZES.items():
        if known != dims:
            continue
        if p == 14 and size in ("small", "base", "large"):
            return f"vit_{size}_patch14_{'reg4_' if encoder.num_reg_tokens == 4 else ''}dinov2"
        if p in _REGISTERED_PATCHES[size]:
            return f"vit_{size}_patch{p}_224"
    return GENERIC_ARCHITECTURE


def architecture_matches(encoder: VisionTransformer) -> bool:
    """Whether :func:`timm_architecture` names the encoder's own size (False: the generic name)."""
    dims = (encoder.embed_dim, len(encoder.blocks), encoder.num_heads, encoder.mlp_dim)
    if encoder.pos_embed_type == "rope":
        return encoder.patch_size == 16 and dims in (_TIMM_SIZES["small"], _TIMM_SIZES["base"], _TIMM_SIZES["large"])
    return timm_architecture(encoder) != GENERIC_ARCHITECTURE or (
        dims == _TIMM_SIZES["base"] and encoder.patch_size == 16
    )


def timm_model_args(encoder: VisionTransformer, *, global_pool: str | None = None) -> dict[str, Any]:
    """The ``timm.create_model`` kwargs that rebuild ``encoder`` as a headless timm ViT.

    ``num_classes=0`` (no head: the export is a backbone), ``fc_norm=False`` (so the final ``norm``
    stays the token norm even with ``global_pool='avg'``), ``dynamic_img_size=True`` (any input size
    that is a multiple of the patch, position embeddings resampled as ours are).
    """
    pool = global_pool or ("token" if encoder.has_class_token else "avg")
    if encoder.pos_embed_type == "rope":
        return _eva_model_args(encoder, pool)
    return dict(
        **_shape_args(encoder),
        reg_tokens=encoder.num_reg_tokens,
        no_embed_class=encoder.no_embed_class,
        init_values=1e-5 if _has_layer_scale(encoder) else None,  # only decides that gammas exist
        qkv_bias=True,
        global_pool=pool,
        fc_norm=False,
        num_classes=0,
        dynamic_img_size=True,
    )


def _shape_args(encoder: VisionTransformer) -> dict[str, Any]:
    """The kwargs that size a timm ViT or Eva as ``encoder`` (the ones both constructors name alike)."""
    h, w = encoder.img_size
    return dict(
        img_size=h if h == w else [h, w],
        patch_size=encoder.patch_size,
        embed_dim=encoder.embed_dim,
        depth=len(encoder.blocks),
        num_heads=encoder.num_heads,
        mlp_ratio=encoder.mlp_dim / encoder.embed_dim,
        in_chans=encoder.in_chans,
        class_token=encoder.has_class_token,
    )


# Our evaluation transform (afm_jax.data.transforms.eval_chain): the whole image resized to a square
# (no crop, aspect ratio not kept), antialiased bilinear. timm's create_transform does the same with
# crop_mode="squash" (Resize((h, w)) then a no-op CenterCrop at crop_pct 1.0) and PIL's bilinear filter,
# which is antialiased when shrinking. tests/test_export_preprocessing.py checks it end to end.
EVAL_PREPROCESSING = dict(interpolation="bilinear", crop_pct=1.0, crop_mode="squash")


# The norm epsilon timm's vit_*_dinov3 entry points fix (eva.py: norm_layer=partial(LayerNorm, eps=1e-5)).
DINOV3_NORM_EPS = 1e-5


def _eva_model_args(encoder: VisionTransformer, pool: str) -> dict[str, Any]:
    """``timm.create_model("vit_*_patch16_dinov3*", **args)`` kwargs for a RoPE encoder. The entry point
    fixes what our encoder shares with DINOv3 (rope_type 'dinov3', rotate-half, no absolute table,
    LayerNorm eps 1e-5); the sizes and options are passed explicitly."""
    if abs(encoder.norm_eps - DINOV3_NORM_EPS) > 1e-12:
        raise InteropError(
            f"A RoPE encoder exports as timm's vit_*_dinov3, whose LayerNorm eps is {DINOV3_NORM_EPS}; "
            f"this one has {encoder.norm_eps}. Train with --config.model.norm_eps={DINOV3_NORM_EPS}."
        )
    return dict(
        **_shape_args(encoder),
        num_reg_tokens=encoder.num_reg_tokens,
        qkv_bias=encoder.qkv_bias,
        init_values=1e-5 if _has_layer_scale(encoder) else None,
        rope_temperature=encoder.rope_temperature,
        global_pool=pool,
        use_fc_norm=False,
        num_classes=0,
        dynamic_img_size=True,
    )


def timm_pretrained_cfg(encoder: VisionTransformer) -> dict[str, Any]:
    """timm ``pretrained_cfg`` entries: input size, the resize of our evaluation (:data:`EVAL_PREPROCESSING`)
    and the normalisation the encoder applies."""
    h, w = encoder.img_size
    return dict(
        input_size=[encoder.in_chans, h, w],
        mean=list(encoder.input_mean),
        std=list(encoder.input_std),
        **EVAL_PREPROCESSING,
        num_classes=0,
        first_conv="patch_embed.proj",
        classifier="head",
        fixed_input_size=False,
    )


# ----------------------------------------------------------------------------------------------
# Parity (needs torch + timm; imported lazily).
# ----------------------------------------------------------------------------------------------


def create_timm_vit(
    model_args: Mapping[str, Any], state_dict: Mapping[str, np.ndarray] | None = None, architecture: str | None = None
):
    """A timm ``VisionTransformer`` (or, for a ``*dinov3*`` architecture, timm's ``Eva`` built by that
    entry point), eval mode, random init unless ``state_dict``, loaded strictly."""
    import timm  # optional extra [torch]
    import torch  # optional extra [torch]
    from timm.models.vision_transformer import VisionTransformer as TimmViT  # optional extra [torch]

    args = dict(model_args)
    img = args.pop("img_size")
    img = tuple(img) if isinstance(img, (list, tuple)) else img
    if architecture and "dinov3" in architecture:
        model = timm.create_model(architecture, pretrained=False, img_size=img, **args).eval()
    else:
        model = TimmViT(img_size=img, **args).eval()
    if state_dict is not None:
        try:
            model.load_state_dict(
                {k: torch.from_numpy(np.array(v, np.float32)) for k, v in state_dict.items()}, strict=True
            )
        except RuntimeError as e:  # missing / unexpected keys, shape mismatches
            first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
            raise InteropError(f"timm does not load the weights strictly: {first[:300]}") from None
    return model


def with_compute_dtype(encoder: nnx.Module, dtype: Any = jnp.float32) -> nnx.Module:
    """A copy of ``encoder`` that computes in ``dtype`` (every submodule's ``dtype``; same weights).

    The parity check compares in fp32: a bf16 run's encoder differs from fp32 timm by ~5e-2 through
    rounding alone, which says nothing about the exported weights.
    """
    copy = nnx.clone(encoder)
    for _, module in nnx.iter_modules(copy):
        if hasattr(module, "dtype"):
            module.dtype = dtype
    return copy


def require_finite_state_dict(sd: Mapping[str, np.ndarray], what: str = "The weights") -> None:
    """Raises InteropError naming the first tensor with a NaN or Inf."""
    bad = [k for k, v in sd.items() if not np.all(np.isfinite(np.asarray(v, np.float32)))]
    if bad:
        v = np.asarray(sd[bad[0]], np.float32)
        raise InteropError(
            f"{what} hold non-finite values: {bad[0]!r} has {int(np.isnan(v).sum())} NaN and "
            f"{int(np.isinf(v).sum())} Inf of {v.size}"
            + (f" ({len(bad)} tensors in all)" if len(bad) > 1 else "")
            + "; the run diverged or the file is corrupt. Export "
            "an earlier step (--step) instead."
        )


def require_tolerance(tolerance: float, flag: str = "tolerance") -> float:
    """A parity tolerance must be a finite number > 0 (a NaN tolerance would let every check pass)."""
    t = float(tolerance)
    if not math.isfinite(t) or t <= 0:
        raise InteropError(f"--{flag} {tolerance} is not a finite number > 0: give e.g. --{flag}={PARITY_TOLERANCE}.")
    return t


def parity_failure(parity: Mapping[str, float], tolerance: float) -> str | None:
    """Why a parity result fails ``tolerance`` (an empty result, NaN or a difference above it), or None."""
    if not parity:
        return "no parity was measured"
    bad = {k: v for k, v in parity.items() if not (math.isfinite(v) and v <= tolerance)}  # NaN fails
    if bad:
        return (
            "max abs difference "
            + ", ".join(f"{v:.3g} at {k}" for k, v in bad.items())
            + f" exceeds the tolerance {tolerance:g} (or is not finite)"
        )
    return None


def check_sizes(encoder: VisionTransformer) -> list[tuple[int, int]]:
    """The resolutions the parity check runs: the training size and about 1.5x it (a multiple of the patch)."""
    h, w = encoder.img_size
    p = encoder.patch_size
    return [(h, w), (max(p, (3 * h // 2) // p * p), max(p, (3 * w // 2) // p * p))]


def forward_parity(
    encoder: VisionTransformer,
    timm_model: Any,
    *,
    batch: int = 2,
    size: Sequence[int] | None = None,
    seed: int = 0,
) -> float:
    """Max |ours(x) - timm.forward_features(normalised x)| on a random batch of [0, 1] images (NaN
    when either output is not finite)."""
    import torch  # optional extra [torch]

    h, w = size or encoder.img_size
    x = np.random.default_rng(seed).random((batch, h, w, encoder.in_chans), dtype=np.float32)
    ours = np.asarray(nnx.jit(lambda m, x: m(x))(encoder, jnp.asarray(x)))
    xn = (x - np.asarray(encoder.input_mean, np.float32)) / np.asarray(encoder.input_std, np.float32)
    with torch.no_grad():
        ref = timm_model.forward_features(torch.from_numpy(xn.transpose(0, 3, 1, 2).copy())).numpy()
    if ours.shape != ref.shape or not (np.all(np.isfinite(ours)) and np.all(np.isfinite(ref))):
        return float("nan")
    return float(np.max(np.abs(ours - ref)))


def export_parity(
    encoder: VisionTransformer,
    state_dict: Mapping[str, np.ndarray],
    model_args: Mapping[str, Any],
    architecture: str | None = None,
) -> dict[str, Any]:
    """Loads ``state_dict`` strictly into a fresh timm model and compares ``forward_features`` with an
    fp32 copy of ``encoder`` at :func:`check_sizes`; returns ``{"fp32": {size: diff}, "compute_dtype":
    name, "compute": {size: diff}}`` (``compute`` only for a non-fp32 encoder: information, not checked)."""
    model = create_timm_vit(model_args, state_dict, architecture or timm_architecture(encoder))
    fp32 = with_compute_dtype(encoder, jnp.float32)
    sizes = check_sizes(encoder)
    out: dict[str, Any] = {
        "fp32": {f"{h}x{w}": forward_parity(fp32, model, size=(h, w), seed=i) for i, (h, w) in enumerate(sizes)}
    }
    dtype = jnp.dtype(encoder.dtype)
    out["compute_dtype"] = dtype.name
    if dtype != jnp.float32:
        out["compute"] = {
            f"{h}x{w}": forward_parity(encoder, model, size=(h, w), seed=i) for i, (h, w) in enumerate(sizes)
        }
    return out


# ----------------------------------------------------------------------------------------------
# The export folder: model.safetensors + config.json (timm's local-dir / Hub format) + README.md.
# ----------------------------------------------------------------------------------------------


def export_config(
    encoder: VisionTransformer, afm_info: Mapping[str, Any] | None = None, *, global_pool: str | None = None
) -> dict[str, Any]:
    """``config.json`` content: timm's ``architecture``/``model_args``/``pretrained_cfg`` (what
    ``timm.create_model("local-dir:OUT")`` reads) plus our own ``afm_jax`` section."""
    args = timm_model_args(encoder, global_pool=global_pool)
    return dict(
        architecture=timm_architecture(encoder),
        architecture_note=(
            "the name picks timm's entry point; model_args set every size"
            + (
                ""
                if architecture_matches(encoder)
                else f" (no registered timm ViT has width {encoder.embed_dim}, depth "
                f"{len(encoder.blocks)}, {encoder.num_heads} heads, patch {encoder.patch_size})"
            )
        ),
        num_classes=0,
        num_features=encoder.embed_dim,
        global_pool=args["global_pool"],
        model_args=args,
        pretrained_cfg=timm_pretrained_cfg(encoder),
        afm_jax={
            "variant": str(encoder.variant),
            "pos_embed": encoder.pos_embed_type,
            "norm_eps": encoder.norm_eps,
            "qkv_bias": encoder.qkv_bias,
            **dict(afm_info or {}),
        },
    )


def write_export(
    out_dir: str,
    encoder: VisionTransformer,
    *,
    afm_info: Mapping[str, Any] | None = None,
    readme: str | None = None,
    global_pool: str | None = None,
) -> dict[str, Any]:
    """Writes ``OUT/model.safetensors`` (timm keys, fp32), ``OUT/config.json`` and ``OUT/README.md``.

    Returns the config written. The safetensors file carries ``{"format": "pt"}`` metadata, as
    torch-saved safetensors do.
    """

    os.makedirs(out_dir, exist_ok=True)
    sd = encoder_state_dict(encoder)
    require_finite_state_dict(sd, "The encoder's weights")
    io.write_with(
        os.path.join(out_dir, "model.safetensors"),
        lambda tmp: save_file(
            {k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()}, str(tmp), metadata={"format": "pt"}
        ),
    )
    config = export_config(encoder, afm_info, global_pool=global_pool)
    io.write_json(os.path.join(out_dir, "config.json"), config)
    if readme is not None:
        io.write_text(os.path.join(out_dir, "README.md"), readme)
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


# ----------------------------------------------------------------------------------------------
# Reading an export folder back (tools/export_timm.py --verify).
# ----------------------------------------------------------------------------------------------


def read_export_config(out_dir: str | os.PathLike) -> dict[str, Any]:
    """``OUT/config.json`` of an export, or an InteropError saying what is wrong with the folder."""
    path = os.path.join(out_dir, "config.json")
    if not os.path.isdir(out_dir):
        raise InteropError(f"{out_dir} is not a folder: give an export folder (config.json + model.safetensors).")
    if os.path.isfile(os.path.join(out_dir, FAILED_WEIGHTS)):
        raise InteropError(f"{out_dir} is an export whose parity check failed ({FAILED_WEIGHTS}); export it again.")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise InteropError(f"{out_dir} has no config.json: not an export folder.") from None
    except (OSError, ValueError) as e:
        raise InteropError(f"{path} is not readable JSON ({e}); export again.") from None
    if not isinstance(cfg, dict) or "model_args" not in cfg:
        raise InteropError(f"{path} has no model_args: not a timm export.")
    return cfg


def encoder_from_export_config(cfg: Mapping[str, Any]) -> VisionTransformer:
    """An (abstract) fp32 encoder of the shape ``config.json``'s ``model_args`` describe."""
    a = cfg["model_args"]
    try:
        img = a["img_size"] if isinstance(a["img_size"], (list, tuple)) else [a["img_size"]] * 2
        d = int(a["embed_dim"])
        kw = dict(
            width=d,
            depth=int(a["depth"]),
            num_heads=int(a["num_heads"]),
            mlp_dim=int(round(float(a.get("mlp_ratio", 4.0)) * d)),
        )
        pc = cfg.get("pretrained_cfg", {})
        rope = "dinov3" in str(cfg.get("architecture", ""))
        if rope:
            kw.update(
                rope_temperature=float(a.get("rope_temperature", 100.0)),
                qkv_bias=bool(a.get("qkv_bias", True)),
                norm_eps=DINOV3_NORM_EPS,
            )
        return nnx.eval_shape(
            lambda: VisionTransformer(
                f"B/{int(a['patch_size'])}",
                img_size=tuple(int(v) for v in img),
                in_chans=int(a.get("in_chans", 3)),
                class_token=bool(a.get("class_token", True)),
                num_reg_tokens=int(a.get("num_reg_tokens" if rope else "reg_tokens", 0) or 0),
                no_embed_class=bool(a.get("no_embed_class", False)),
                pos_embed="rope" if rope else "learned",
                layer_scale_init=1.0 if a.get("init_values") else None,
                input_mean=pc.get("mean"),
                input_std=pc.get("std"),
                rngs=nnx.Rngs(0),
                **kw,
            )
        )
    except (KeyError, TypeError, ValueError) as e:
        raise InteropError(f"config.json's model_args do not describe a ViT we can rebuild ({e}).") from None


FAILED_WEIGHTS = "model.safetensors.FAILED_CHECK"  # where a failed --check moves the weights


def mark_failed_export(out_dir: str, reason: str) -> None:
    """Makes a failed export unloadable and says why: the weights move to :data:`FAILED_WEIGHTS` (timm's
    ``local-dir:`` no longer finds them), ``CHECK_FAILED.txt`` explains, the model card starts with it."""
    weights = os.path.join(out_dir, "model.safetensors")
    if os.path.exists(weights):
        os.replace(weights, os.path.join(out_dir, FAILED_WEIGHTS))
    note = (
        f"THIS EXPORT FAILED ITS PARITY CHECK: {reason}. Do not use it; the weights were moved to "
        f"{FAILED_WEIGHTS}. Export again (with --overwrite) after fixing the cause.\n"
    )
    io.write_text(os.path.join(out_dir, "CHECK_FAILED.txt"), note)
    card = os.path.join(out_dir, "README.md")
    old = open(card).read() if os.path.isfile(card) else ""
    io.write_text(card, "> **" + note.strip() + "**\n\n" + old)


def clear_failed_marks(out_dir: str) -> None:
    """Removes the marks of an earlier failed export in ``out_dir`` (before writing a new one)."""
    for name in (FAILED_WEIGHTS, "CHECK_FAILED.txt"):
        path = os.path.join(out_dir, name)
        if os.path.exists(path):
            os.remove(path)


PARITY_TOLERANCE = 1e-4  # max abs difference to timm's forward_features accepted by --check (fp32)

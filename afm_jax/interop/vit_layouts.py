"""Foreign ViT state-dict layouts -> timm's layout: DINO, DINOv2 (with or without registers), Hugging
Face ``Dinov2Model`` (RAD-DINO), MAE checkpoints, wrapped state dicts (``module.``, ``teacher.``, ...).

What: :func:`normalize_vit_state_dict` finds the backbone inside a state dict, renames it into timm's
keys and reports what it dropped; :func:`describe_vit_state_dict` reads the architecture (width,
depth, patch, prefix tokens, LayerScale) off the shapes. Why separate from :mod:`afm_jax.interop.timm`:
this module knows other projects' layouts, that one knows ours; both are pure numpy.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from afm_jax.errors import InteropError

# Width -> the head count every public ViT of that width uses (timm, DINO, DINOv2, MAE).
USUAL_NUM_HEADS = {192: 3, 384: 6, 512: 8, 768: 12, 1024: 16, 1280: 16, 1536: 24}

# Keys of state dicts that are not part of the backbone: dropped on import, and reported.
_NON_BACKBONE = re.compile(
    r"^(head\b|head_drop|fc_norm_head|mask_token|decoder|attn_pool|pre_logits|dist_token|head_dist)"
)


# ----------------------------------------------------------------------------------------------
# Foreign layouts -> timm layout.
# ----------------------------------------------------------------------------------------------

_HF_BLOCK = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attention.output.dense": "attn.proj",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


def _strip_prefix(sd: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str, list[str]]:
    """Finds the backbone inside a wrapped state dict (``module.``, ``backbone.``, ``teacher.``,
    ``dinov2.``, ``encoder.`` ...) by its patch-embedding key; keys outside it are dropped."""
    anchors = ("patch_embed.proj.weight", "embeddings.patch_embeddings.projection.weight")
    hits = [(k[: -len(a)], a) for k in sd for a in anchors if k.endswith(a)]
    if not hits:
        raise InteropError(
            "No ViT patch embedding found in the file (expected a key ending in "
            "'patch_embed.proj.weight' as timm/DINO/DINOv2 write it, or "
            "'embeddings.patch_embeddings.projection.weight' as Hugging Face Dinov2Model does). "
            "Is this a ViT checkpoint? CNNs (RadImageNet ResNet-50) load with "
            "afm_jax.interop.torchvision_resnet."
        )
    prefix = min((h[0] for h in hits), key=len)
    if prefix and not any(
        k == prefix + "cls_token" or k.startswith(prefix + "blocks.") or k.startswith(prefix + "encoder.layer.")
        for k in sd
    ):
        raise InteropError(f"Found a patch embedding under {prefix!r} but no transformer blocks.")
    kept = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    dropped = sorted(k for k in sd if not k.startswith(prefix))
    return kept, prefix, dropped


def _from_hf_dinov2(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Hugging Face ``Dinov2Model`` keys (RAD-DINO) -> DINOv2 reference keys."""
    out: dict[str, np.ndarray] = {}
    qkv: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for k, v in sd.items():
        m = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)", k)
        if m:
            i, mid, leaf = int(m.group(1)), m.group(2), m.group(3)
            att = re.fullmatch(r"attention\.attention\.(query|key|value)", mid)
            if att:
                qkv.setdefault((i, leaf), {})[att.group(1)] = v
                continue
            name = f"{mid}.{leaf}" if leaf == "lambda1" else mid
            if name not in _HF_BLOCK:
                raise InteropError(
                    f"Unsupported Hugging Face Dinov2 key {k!r} (SwiGLU / giant models are not supported by our ViT)."
                )
            target = _HF_BLOCK[name]
            out[f"blocks.{i}.{target}" + ("" if leaf == "lambda1" else f".{leaf}")] = v
            continue
        simple = {
            "embeddings.cls_token": "cls_token",
            "embeddings.mask_token": "mask_token",
            "embeddings.register_tokens": "register_tokens",
            "embeddings.position_embeddings": "pos_embed",
            "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
            "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
            "layernorm.weight": "norm.weight",
            "layernorm.bias": "norm.bias",
        }
        out[simple.get(k, k)] = v
    for (i, leaf), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise InteropError(f"Layer {i}: attention {leaf} lacks one of query/key/value.")
        out[f"blocks.{i}.attn.qkv.{leaf}"] = np.concatenate([parts["query"], parts["key"], parts["value"]], axis=0)
    return out


def _from_dinov3(sd: dict[str, np.ndarray], dropped: list[str], prefix: str) -> tuple[dict[str, np.ndarray], str]:
    """DINOv3 layouts -> our timm-like RoPE layout (``blocks.i.ls1.gamma``, fused ``attn.qkv.bias``, no
    ``pos_embed``). timm's Eva port: ``gamma_1/2``, ``attn.q_bias``/``attn.v_bias`` (the k bias is a
    fixed zero). The original hub layout (facebookresearch/dinov3): ``storage_tokens``, ``mask_token``,
    ``rope_embed.periods`` (recomputed: fp32, as timm), ``attn.qkv.bias`` times ``attn.qkv.bias_mask``
    (the mask zeroes the k bias, as the original forward does)."""
    hub = "storage_tokens" in sd or any(k.endswith("qkv.bias_mask") for k in sd) or "rope_embed.periods" in sd
    if "cls_norm.weight" in sd:
        raise InteropError(
            "This DINOv3 checkpoint has untied class/patch norms ('cls_norm', the 7B model); "
            "our ViT has one final norm. Use ViT-S/B/L DINOv3 weights."
        )
    out: dict[str, np.ndarray] = {}
    qv: dict[str, dict[str, np.ndarray]] = {}
    for k, v in sd.items():
        if k in ("mask_token", "rope_embed.periods") or k.startswith(("local_cls_norm.", "rope.")):
            dropped.append(prefix + k)
            continue
        if k.endswith(".qkv.bias_mask"):
            continue
        if k.endswith(".qkv.bias") and k + "_mask" in sd:
            out[k] = v * sd[k + "_mask"]
            dropped.append(prefix + k + "_mask")
            continue
        m = re.fullmatch(r"(blocks\.\d+\.attn)\.(q|k|v)_bias", k)
        if m:
            qv.setdefault(m.group(1), {})[m.group(2)] = v
            continue
        k = re.sub(r"^(blocks\.\d+)\.gamma_([12])$", r"\1.ls\2.gamma", k)
        out["reg_token" if k == "storage_tokens" else k] = v
    for attn, parts in qv.items():
        if "q" not in parts or "v" not in parts:
            raise InteropError(f"{attn}: q_bias without v_bias (or the reverse); not a timm DINOv3 state dict.")
        out[f"{attn}.qkv.bias"] = np.concatenate([parts["q"], parts.get("k", np.zeros_like(parts["q"])), parts["v"]])
    return out, "dinov3" if hub else "timm-dinov3"


def is_dinov3_layout(sd: Mapping[str, Any]) -> bool:
    """Whether a (prefix-stripped) state dict is a DINOv3 one (timm's Eva port or the original hub layout)."""
    return (
        "storage_tokens" in sd
        or "rope_embed.periods" in sd
        or "blocks.0.gamma_1" in sd
        or "blocks.0.attn.q_bias" in sd
        or any(k.endswith("qkv.bias_mask") for k in sd)
    )


def normalize_vit_state_dict(sd: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Any supported ViT state dict -> timm's ``VisionTransformer`` layout (fp32 numpy).

    Supported: timm (ImageNet, augreg, DINOv2 timm ports, DINOv3 Eva ports), DINOv3 hub checkpoints, DINO (backbone or full teacher/student
    dicts, ``module.``/``backbone.`` prefixes), DINOv2 reference checkpoints (``register_tokens``,
    ``mask_token``, chunked ``blocks.c.i``), Hugging Face ``Dinov2Model`` (RAD-DINO), MAE
    pretraining checkpoints (decoder dropped) and our own exports.

    Returns:
      ``(state_dict, info)`` where ``info`` has ``layout``, ``prefix``, ``dropped`` (keys that are
      not part of the backbone) and ``no_embed_class`` (True/False when the layout fixes it, None
      when it must be inferred from shapes).
    """
    sd = {str(k): np.asarray(v, dtype=np.float32) for k, v in sd.items()}
    sd, prefix, dropped = _strip_prefix(sd)
    layout = "timm"
    no_embed_class: bool | None = None
    if "embeddings.patch_embeddings.projection.weight" in sd:
        sd = _from_hf_dinov2(sd)
        layout = "huggingface-dinov2"
    elif is_dinov3_layout(sd):
        sd, layout = _from_dinov3(sd, dropped, prefix)
    if any(re.match(r"blocks\.\d+\.\d+\.", k) for k in sd):  # DINOv2 block chunks
        sd = {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in sd.items()}
    if any(re.match(r"blocks\.\d+\.mlp\.w(12|3)\.", k) for k in sd):
        raise InteropError(
            "This checkpoint uses SwiGLU MLPs (DINOv2 giant); our ViT has GELU MLPs "
            "and cannot load it. Use ViT-S/B/L DINOv2 weights."
        )
    if "mask_token" in sd or "register_tokens" in sd:
        layout = "dinov2" if layout == "timm" else layout
        sd.pop("mask_token", None)
        dropped.append(prefix + "mask_token")
        if "register_tokens" in sd:  # as timm's _convert_dinov2: prefix tokens leave the pos table
            sd["reg_token"] = sd.pop("register_tokens")
            sd["cls_token"] = sd["cls_token"] + sd["pos_embed"][:, :1]
            sd["pos_embed"] = sd["pos_embed"][:, 1:]
            no_embed_class = True
            layout += "-registers"
    for k in list(sd):
        if _NON_BACKBONE.match(k):
            dropped.append(prefix + k)
            del sd[k]
    if "norm.weight" not in sd and "fc_norm.weight" in sd:
        raise InteropError(
            "This checkpoint has `fc_norm` (pooled-feature norm) instead of the final "
            "token `norm` (a fine-tuned avg-pool classifier); export its backbone from "
            "the pretraining checkpoint instead."
        )
    return sd, dict(layout=layout, prefix=prefix, dropped=sorted(set(dropped)), no_embed_class=no_embed_class)


def describe_vit_state_dict(sd: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The architecture a timm-layout ViT state dict implies (what shapes can tell).

    Returns ``embed_dim``, ``in_chans``, ``patch_size``, ``depth``, ``mlp_dim``, ``class_token``,
    ``reg_tokens``, ``layer_scale``, ``pos_rows``, ``rope``, ``qkv_bias`` and ``num_heads`` (a guess from the width: the
    head count is not stored in a state dict).
    """
    if "patch_embed.proj.weight" not in sd:
        raise InteropError("State dict lacks 'patch_embed.proj.weight'; not a timm-layout ViT.")
    d, c, ph, pw = sd["patch_embed.proj.weight"].shape
    depth = len({m.group(1) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
    return dict(
        embed_dim=int(d),
        in_chans=int(c),
        patch_size=int(ph) if ph == pw else (int(ph), int(pw)),
        depth=depth,
        mlp_dim=int(sd["blocks.0.mlp.fc1.weight"].shape[0]) if depth else 0,
        class_token="cls_token" in sd,
        reg_tokens=int(sd["reg_token"].shape[1]) if "reg_token" in sd else 0,
        layer_scale="blocks.0.ls1.gamma" in sd,
        pos_rows=int(sd["pos_embed"].shape[1]) if "pos_embed" in sd else 0,
        rope="pos_embed" not in sd,  # no absolute table: positions are rotary (DINOv3)
        qkv_bias="blocks.0.attn.qkv.bias" in sd or depth == 0,
        num_heads=USUAL_NUM_HEADS.get(int(d), max(int(d) // 64, 1)),
    )

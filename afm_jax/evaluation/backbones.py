"""Every backbone a comparison can name, behind one interface: images in, features (and maps) out.

What: `BackboneSpec` says which backbone (a data record a study file or the command line writes);
`load_backbone(spec)` turns it into a `Backbone` with

    features(images) -> (B, D) float32            pooled features for kNN / linear probes
    spatial_features(images) -> (B, h, w, D)      per-location features (CAMs; None if unavailable)
    attention_maps(images) -> (B, h, w) in [0, 1] last-block attention, heads averaged, of the token the
                              backbone pools: the class token (pool="cls") or the mean over patch tokens
                              (pool="avg"), named by `attention_source` (ViTs; else None)

where `images` are float32 (B, H, W, 1) in [0, 1], bone bright (the pipeline's convention). Kinds:

    checkpoint   one of our runs (workdir, checkpoints/ or checkpoints/<step>), in JAX
    timm_vit     a timm / DINO / DINOv2 ViT weights file or export folder, imported into our JAX ViT
    resnet50     the Flax ResNet-50 from a torchvision-layout state dict (RadImageNet), in JAX
    torch_timm   any timm model evaluated in PyTorch from a local checkpoint (`arch` names it)
    random_init  our ViT at initialisation (the architecture of `path`'s run if given, same seed)

Why one interface: the protocols (kNN, linear probe, low-shot) and the report (attention, CAM
overlays) never ask what a backbone is, so adding a kind touches only this module. Only the optional
heavy dependencies (torch, timm) are imported inside the kinds that need them, so a kind whose
packages are not installed fails with a message only when used.
Three channels exist only at the PyTorch/ImageNet boundary: grey images are replicated there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from afm_jax.errors import ConfigError
from afm_jax.interop.torchvision_resnet import resnet50_from_torchvision
from afm_jax.models import factory
from afm_jax.train.checkpoint import is_checkpoint_path, read_encoder_checkpoint, read_meta, resolve_step_dir
from afm_jax.train.init_from import initialize_encoder

KINDS = ("checkpoint", "timm_vit", "resnet50", "torch_timm", "random_init")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """Which backbone to evaluate and how to read its features.

    kind: one of KINDS. path: weights file / folder / workdir (unused for a bare random_init).
    image_size: evaluation input size in pixels (ViT position embeddings are interpolated).
    pool: "avg" (mean of patch tokens) or "cls" for ViTs. variant / model: ViT shape for kinds that
    do not carry a config (timm_vit, bare random_init), e.g. variant="S/16", model={"depth": 6}.
    arch: timm architecture for torch_timm (e.g. "resnet50", "vit_small_patch16_224").
    seed: initialisation seed of a bare random_init (with `path`, the run's own seed is used).
    in_chans: channels of the JAX ViT.
    """

    kind: str
    path: str = ""
    image_size: int = 224
    pool: str = "avg"
    variant: str = "B/16"
    model: tuple[tuple[str, Any], ...] = ()
    arch: str = ""
    seed: int = 0
    in_chans: int = 1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"Backbone kind {self.kind!r} is unknown: expected one of {', '.join(KINDS)}.")
        if isinstance(self.model, dict):
            object.__setattr__(self, "model", tuple(sorted(self.model.items())))
        if self.kind in ("checkpoint", "timm_vit", "resnet50", "torch_timm") and not self.path:
            raise ConfigError(f"Backbone kind {self.kind!r} needs a `path` (weights file, folder or workdir).")
        if self.kind == "torch_timm" and not self.arch:
            raise ConfigError("Backbone kind 'torch_timm' needs `arch`, the timm model name (e.g. 'resnet50').")
        if self.pool not in ("avg", "cls"):
            raise ConfigError(f"Backbone pool {self.pool!r} is invalid: expected 'avg' or 'cls'.")
        if int(self.image_size) <= 0:
            raise ConfigError(f"Backbone image_size {self.image_size!r} must be a positive number of pixels.")
        _check_variant(self.kind, self.variant)  # before any data is built or weights are read

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"] = dict(self.model)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "BackboneSpec":
        return cls(**{**d, "model": tuple(sorted(dict(d.get("model") or {}).items()))})

    def cache_key(self) -> str:
        """A short hash of the spec and of the weights it reads (path, size, mtime): cached features
        are reused only while both are unchanged."""
        payload = {"spec": self.to_json(), "weights": _weights_fingerprint(self.path) if self.path else None}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _weights_fingerprint(path: str) -> list:
    p = pathlib.Path(path).expanduser()
    if not p.exists():
        return [str(p), "missing"]
    if p.is_file():
        st = p.stat()
        return [str(p.resolve()), st.st_size, int(st.st_mtime)]
    try:  # one of our runs: the latest step is what gets loaded
        if is_checkpoint_path(p):
            step_dir, step = resolve_step_dir(p)
            return [str(step_dir.resolve()), step, int(step_dir.stat().st_mtime)]
    except ImportError:
        pass
    files = sorted(f for f in p.rglob("*") if f.is_file())
    return [str(p.resolve()), [(f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in files[:64]]]


class Backbone:
    """A frozen feature extractor; subclasses implement `features` and optionally the maps."""

    name: str = ""
    embed_dim: int = 0
    image_size: int = 224

    def features(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def spatial_features(self, images: np.ndarray) -> np.ndarray | None:
        return None

    # Which token's attention `attention_maps` shows ("class token", "mean of patch tokens"); "" = none.
    attention_source: str = ""

    def attention_maps(self, images: np.ndarray) -> np.ndarray | None:
        return None

    def jax_encoder(self):
        """The trainable JAX ViT behind this backbone (for fine-tuning), or None."""
        return None


def _check_images(images: np.ndarray) -> np.ndarray:
    x = np.asarray(images, np.float32)
    if x.ndim != 4 or x.shape[-1] != 1:
        raise ValueError(f"Backbones take grey images (B, H, W, 1) in [0, 1]; got shape {x.shape}.")
    return x


class JaxViTBackbone(Backbone):
    """Our VisionTransformer (from a checkpoint, an imported timm file, or at initialisation)."""

    def __init__(self, encoder, *, pool: str = "avg", image_size: int = 224, name: str = ""):
        if pool == "cls" and not encoder.has_class_token:
            raise ConfigError("pool='cls' needs a ViT with a class token; use pool='avg'.")
        self.encoder, self.pool, self.image_size, self.name = encoder, pool, int(image_size), name
        self.embed_dim = int(encoder.embed_dim)
        graphdef, state = nnx.split(encoder)
        prefix = int(encoder.num_prefix_tokens)
        patch = int(encoder.patch_size)

        def pooled(state, images):
            return nnx.merge(graphdef, state).pooled_features(images, pool=pool)

        def spatial(state, images):
            tokens = nnx.merge(graphdef, state)(images)[:, prefix:]
            b, h, w = images.shape[0], images.shape[1] // patch, images.shape[2] // patch
            return tokens.reshape(b, h, w, tokens.shape[-1])

        # The attention of the token the backbone pools: the class token's row (pool="cls"), or the mean
        # of the patch tokens' rows (pool="avg", the features are their mean); over the patch keys.
        self.attention_source = "class token" if pool == "cls" else "mean of patch tokens"

        def attention(state, images):
            enc = nnx.merge(graphdef, state)
            attn = enc.attention_maps(images).mean(axis=1)  # (B, T, T), heads averaged
            rows = attn[:, 0, prefix:] if pool == "cls" else attn[:, prefix:, prefix:].mean(axis=1)
            b, h, w = images.shape[0], images.shape[1] // patch, images.shape[2] // patch
            maps = rows.reshape(b, h, w)
            lo = maps.min(axis=(1, 2), keepdims=True)
            hi = maps.max(axis=(1, 2), keepdims=True)
            return (maps - lo) / jnp.maximum(hi - lo, 1e-12)

        self._state = state
        self._pooled, self._spatial, self._attention = jax.jit(pooled), jax.jit(spatial), jax.jit(attention)

    def features(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self._pooled(self._state, _check_images(images)), np.float32)

    def spatial_features(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self._spatial(self._state, _check_images(images)), np.float32)

    def attention_maps(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self._attention(self._state, _check_images(images)), np.float32)

    def jax_encoder(self):
        return self.encoder


class JaxResNetBackbone(Backbone):
    """The Flax ResNet-50 (torchvision layout; afm_jax.models.resnet): global-average-pooled last
    stage as features, that stage's map for CAMs. Grey images go in as they are: the model sums its
    RGB stem to one channel on import and normalises at its input."""

    def __init__(self, model, *, image_size: int = 224, name: str = ""):
        self.model, self.image_size, self.name = model, int(image_size), name
        graphdef, state = nnx.split(model)

        def spatial(state, images):
            return nnx.merge(graphdef, state).feature_map(images)  # (B, h, w, 2048)

        self._state = state
        self._spatial = jax.jit(spatial)
        self.embed_dim = int(getattr(model, "num_features", 2048))

    def spatial_features(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self._spatial(self._state, _check_images(images)), np.float32)

    def features(self, images: np.ndarray) -> np.ndarray:
        return self.spatial_features(images).mean(axis=(1, 2))


class TorchTimmBackbone(Backbone):
    """A timm model in PyTorch (CPU or CUDA), weights from a local file, ImageNet normalisation."""

    def __init__(self, arch: str, path: str, *, image_size: int = 224, name: str = ""):
        import timm  # optional extra [torch]
        import torch  # optional extra [torch]

        self.torch = torch
        self.model = timm.create_model(arch, pretrained=False, num_classes=0)
        state_dict = _read_torch_state_dict(path)
        missing, unexpected = self.model.load_state_dict(state_dict, strict=False)
        missing = [k for k in missing if not k.startswith(("fc.", "head.", "classifier."))]
        if missing:
            raise ConfigError(
                f"{path} does not fit timm model {arch!r}: {len(missing)} weights missing "
                f"(e.g. {missing[:3]}). Check `arch` against the file."
            )
        self.unexpected = [k for k in unexpected if not k.startswith(("fc.", "head.", "classifier."))]
        self.model.eval()
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model.to(self.device)
        cfg = getattr(self.model, "pretrained_cfg", {}) or {}
        self.mean = np.asarray(cfg.get("mean", IMAGENET_MEAN), np.float32)
        self.std = np.asarray(cfg.get("std", IMAGENET_STD), np.float32)
        self.image_size, self.name, self.embed_dim = int(image_size), name, int(self.model.num_features)
        self.num_prefix = int(getattr(self.model, "num_prefix_tokens", 0))

    def _forward_features(self, images: np.ndarray):
        x = (np.repeat(_check_images(images), 3, axis=-1) - self.mean) / self.std
        t = self.torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(self.device)
        with self.torch.no_grad():
            return self.model.forward_features(t)

    def features(self, images: np.ndarray) -> np.ndarray:
        feats = self._forward_features(images)
        with self.torch.no_grad():
            pooled = self.model.forward_head(feats, pre_logits=True)
        return pooled.float().cpu().numpy()

    def spatial_features(self, images: np.ndarray) -> np.ndarray | None:
        feats = self._forward_features(images).float().cpu().numpy()
        if feats.ndim == 4:  # CNN: (B, C, h, w)
            return feats.transpose(0, 2, 3, 1)
        tokens = feats[:, self.num_prefix :]  # ViT: (B, T, D)
        side = int(round(np.sqrt(tokens.shape[1])))
        if side * side != tokens.shape[1]:
            return None
        return tokens.reshape(tokens.shape[0], side, side, tokens.shape[-1])


def _read_torch_state_dict(path: str) -> dict:
    """A state dict from .safetensors (no pickle) or .pth/.pt/.bin (torch.load(weights_only=True))."""
    import torch  # optional extra [torch]

    p = pathlib.Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"Backbone weights file {p} does not exist.")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file  # optional extra [torch]

        return load_file(str(p))
    obj = torch.load(str(p), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "teacher", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    return {k.removeprefix("module.").removeprefix("backbone."): v for k, v in obj.items()}


def _check_variant(kind: str, variant: str) -> None:
    """A ConfigError naming the valid sizes for a variant such as `Z/99` (`random_init:,variant=Z/99`)."""
    try:
        factory.parse_variant(variant)
    except ValueError as e:
        raise ConfigError(f"Backbone {kind}: {e} Give it as variant=<size>/<patch> in --backbone.") from None


def _vit_from_spec(spec: BackboneSpec, model_cfg=None, image_size: int | None = None):
    """A fresh VisionTransformer of `spec`'s shape (or `model_cfg`'s, built for `image_size`),
    initialised with `spec.seed` (the trainer's `nnx.Rngs(config.seed)`: the same draw as a run's start)."""
    if model_cfg is None:
        model_cfg = factory.default_model_config(spec.variant)
        model_cfg.in_chans = spec.in_chans
        model_cfg.update(dict(spec.model))
    _check_variant(spec.kind, model_cfg.variant)
    return factory.build_encoder(model_cfg, image_size or spec.image_size, nnx.Rngs(spec.seed))


def load_backbone(spec: BackboneSpec, name: str = "") -> Backbone:
    """The `Backbone` for `spec` (see the module docstring); user mistakes raise ConfigError."""
    name = name or spec.kind
    if spec.kind == "checkpoint":
        encoder = read_encoder_checkpoint(spec.path).encoder
        return JaxViTBackbone(encoder, pool=spec.pool, image_size=spec.image_size, name=name)
    if spec.kind == "random_init":
        model_cfg, size = None, None
        if spec.path:  # the architecture of that run, at initialisation (what its pretraining started from)
            step_dir, _ = resolve_step_dir(spec.path)
            saved = read_meta(step_dir)["config"]
            model_cfg, size = ml_collections.ConfigDict(saved["model"]), int(saved["image_size"])
            spec = dataclasses.replace(spec, seed=int(saved.get("seed", spec.seed)))  # the run's own draw
        return JaxViTBackbone(
            _vit_from_spec(spec, model_cfg, size), pool=spec.pool, image_size=spec.image_size, name=name
        )
    if spec.kind == "timm_vit":
        encoder = _vit_from_spec(spec)
        initialize_encoder(encoder, spec.path)
        return JaxViTBackbone(encoder, pool=spec.pool, image_size=spec.image_size, name=name)
    if spec.kind == "resnet50":
        return JaxResNetBackbone(
            resnet50_from_torchvision(os.fspath(spec.path), in_chans=1), image_size=spec.image_size, name=name
        )
    if spec.kind == "torch_timm":
        return TorchTimmBackbone(spec.arch, os.fspath(spec.path), image_size=spec.image_size, name=name)
    raise ConfigError(f"Backbone kind {spec.kind!r} is unknown: expected one of {', '.join(KINDS)}.")


def describe_backbone(spec: BackboneSpec) -> dict[str, Any]:
    """`spec.to_json()` with the architecture that is really evaluated, for results and caches.

    A `checkpoint` (or a `random_init` of a run) carries its own model config, so the spec's
    `variant` / `model` fields (defaults, unused for these kinds) are replaced by the run's, read from
    the checkpoint's meta, and `architecture` gives the resolved ViT size (width, depth, heads,
    mlp_dim, patch size), `step` the checkpoint step (the weights read; for random_init the run whose
    initialisation is reproduced) and `checkpoint_code_version` the code that wrote it.
    """
    d = spec.to_json()
    model_cfg = None
    if spec.kind == "checkpoint" or (spec.kind == "random_init" and spec.path):
        step_dir, step = resolve_step_dir(spec.path)
        meta = read_meta(step_dir)
        model_cfg = ml_collections.ConfigDict(dict(meta["config"]["model"]))
        d.update(
            variant=model_cfg.get("variant"),
            model=factory.size_overrides(model_cfg),
            step=int(step),
            checkpoint_code_version=meta.get("code_version"),
        )
    elif spec.kind in ("timm_vit", "random_init"):
        model_cfg = factory.default_model_config(spec.variant)
        model_cfg.update(dict(spec.model))
    if model_cfg is not None and model_cfg.get("arch", "vit") == "vit":
        d["architecture"] = {
            "arch": "vit",
            **factory.vit_dims(model_cfg),
            "class_token": bool(model_cfg.get("class_token", True)),
        }
    elif model_cfg is not None:
        d["architecture"] = {"arch": str(model_cfg.get("arch"))}
    else:
        d["architecture"] = {"arch": spec.arch or spec.kind}
    return d


def parse_backbone_arg(text: str) -> BackboneSpec:
    """`kind:path[,key=value...]` from a command line, e.g. `checkpoint:runs/mae,image_size=128` or
    `torch_timm:rin.pth,arch=resnet50` or `random_init:,variant=S/16`."""
    kind, _, rest = text.partition(":")
    path, *pairs = rest.split(",") if rest else [""]
    kwargs: dict[str, Any] = {}
    model: dict[str, int] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq:
            raise ConfigError(f"Backbone option {pair!r} in {text!r} is not key=value.")
        if key in ("image_size", "seed", "in_chans"):
            kwargs[key] = int(value)
        elif key in ("depth", "width", "num_heads", "mlp_dim"):
            model[key] = int(value)
        elif key in ("pool", "variant", "arch"):
            kwargs[key] = value
        else:
            raise ConfigError(
                f"Backbone option {key!r} is unknown: use image_size, pool, variant, arch, seed, "
                "in_chans, depth, width, num_heads, mlp_dim."
            )
    return BackboneSpec(kind=kind, path=path, model=tuple(sorted(model.items())), **kwargs)

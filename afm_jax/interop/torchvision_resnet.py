"""torchvision-layout ResNet state dicts -> :class:`afm_jax.models.resnet.ResNet` (RadImageNet, ImageNet).

What: :func:`load_torchvision_resnet` overwrites a Flax ResNet in place from a state dict with
torchvision's keys (``conv1.weight``, ``bn1.running_mean``, ``layer3.2.conv2.weight``,
``layer2.0.downsample.0.weight`` ...), as RadImageNet's PyTorch ResNet-50 and every ImageNet
ResNet-50 have them; :func:`resnet_from_file` builds and loads in one call. Also accepted:

* wrapped dicts and prefixes (``model.``, ``module.``, ``backbone.``, DINO's ``teacher``);
* the ``nn.Sequential(*list(resnet.children())[:-1])`` layout some RadImageNet ports use
  (``backbone.0`` = conv1, ``.1`` = bn1, ``.4``-``.7`` = layer1-4).

Why: the mapping is pure renaming/transposing (conv ``(O, I, kh, kw)`` -> ``(kh, kw, I, O)``; BN
``weight/bias/running_mean/running_var`` -> ``scale/bias/mean/var``); RGB stems become grey by
summing the kernel over its input channels (timm's ``adapt_input_conv``). The classifier ``fc``
and ``num_batches_tracked`` are not backbone and are dropped (reported).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from afm_jax.errors import InteropError
from afm_jax.interop.weights_file import read_weights_file
from afm_jax.models.resnet import RESNET_LAYERS, ResNet

__all__ = [
    "normalize_resnet_state_dict",
    "load_torchvision_resnet",
    "resnet_from_file",
    "resnet50_from_torchvision",
    "flax_key",
]

_SEQUENTIAL = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}
_BN_LEAF = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def normalize_resnet_state_dict(sd: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Any supported ResNet layout -> torchvision keys (fp32 numpy); returns (state dict, dropped)."""
    sd = {
        str(k): np.array(v.detach().float().numpy() if hasattr(v, "detach") else v, np.float32, copy=True)
        for k, v in sd.items()
    }
    anchors = [k[: -len("layer1.0.conv1.weight")] for k in sd if k.endswith("layer1.0.conv1.weight")]
    sequential = False
    if not anchors:
        anchors = [k[: -len("4.0.conv1.weight")] for k in sd if re.search(r"(^|\.)4\.0\.conv1\.weight$", k)]
        sequential = bool(anchors)
    if not anchors:
        raise InteropError(
            "No ResNet found in the file (expected torchvision keys such as "
            "'layer1.0.conv1.weight'); ViT weights load with tools/import_timm.py."
        )
    prefix = min(anchors, key=len)
    out, dropped = {}, []
    for k, v in sd.items():
        if not k.startswith(prefix):
            dropped.append(k)
            continue
        rest = k[len(prefix) :]
        if sequential:
            head, _, tail = rest.partition(".")
            if head not in _SEQUENTIAL:
                dropped.append(k)
                continue
            rest = f"{_SEQUENTIAL[head]}.{tail}"
        if rest.startswith("fc.") or rest.endswith("num_batches_tracked"):
            dropped.append(k)
            continue
        out[rest] = v
    return out, sorted(dropped)


def flax_key(path: str) -> tuple[str, str]:
    """(torchvision key, kind) for one of our ResNet paths; kind is "conv" or "bn"."""
    parts = path.split(".")
    leaf, module = parts[-1], ".".join(parts[:-1])
    if leaf == "kernel":
        return f"{module}.weight", "conv"
    torch_leaf = {v: k for k, v in _BN_LEAF.items()}[leaf]
    return f"{module}.{torch_leaf}", "bn"


def load_torchvision_resnet(model: ResNet, state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Overwrites ``model`` in place from a torchvision-layout state dict; returns a report.

    Raises:
      InteropError: naming the key, for missing/unexpected keys and shape mismatches.
    """
    sd, dropped = normalize_resnet_state_dict(state_dict)
    adapted = []
    w = sd.get("conv1.weight")
    if w is not None and w.shape[1] != model.in_chans:
        if model.in_chans == 1:
            sd["conv1.weight"] = w.sum(axis=1, keepdims=True)
            adapted.append(f"conv1.weight: {w.shape[1]} input channels summed into 1 (timm adapt_input_conv)")
        else:
            raise InteropError(f"Key 'conv1.weight' has {w.shape[1]} input channels, the model {model.in_chans}.")
    targets = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model))}
    values = {}
    for path, var in targets.items():
        key, kind = flax_key(path)
        if key not in sd:
            raise InteropError(
                f"Key {key!r} is missing from the file; is it a ResNet-50 (layers {RESNET_LAYERS['resnet50']})?"
            )
        v = sd.pop(key)
        if kind == "conv":
            v = v.transpose(2, 3, 1, 0)
        if v.shape != tuple(var.shape):
            raise InteropError(
                f"Key {key!r} has shape {sd_shape(v, kind)} in the file, the model needs "
                f"{sd_shape(np.zeros(var.shape), kind)}."
            )
        values[path] = v
    if sd:
        extra = sorted(sd)
        raise InteropError(
            f"Key {extra[0]!r} in the file has no place in the model ({len(extra)} such keys); "
            "is it a deeper ResNet (101/152)? Build ResNet with its layers."
        )
    for path, var in targets.items():
        var.set_value(jnp.asarray(values[path], var.dtype))  # works on nnx.eval_shape models too
    return dict(loaded=len(values), adapted=adapted, dropped=dropped)


def sd_shape(v: np.ndarray, kind: str) -> tuple[int, ...]:
    """Shape in torch's layout (for messages)."""
    return tuple(v.transpose(3, 2, 0, 1).shape) if kind == "conv" else tuple(v.shape)


def resnet_from_file(
    path: str | os.PathLike, *, in_chans: int = 1, arch: str = "resnet50", **kwargs: Any
) -> tuple[ResNet, dict[str, Any]]:
    """A ResNet loaded from a ``.safetensors``/``.pth`` file (RadImageNet, ImageNet, DINO ResNet-50)."""
    if arch not in RESNET_LAYERS:
        raise InteropError(f"Unknown ResNet {arch!r}; choose one of {', '.join(RESNET_LAYERS)}.")
    model = nnx.eval_shape(lambda: ResNet(RESNET_LAYERS[arch], in_chans=in_chans, rngs=nnx.Rngs(0), **kwargs))
    report = load_torchvision_resnet(model, read_weights_file(path))
    return model, dict(report, path=str(path))


def resnet50_from_torchvision(path: str, *, in_chans: int = 1, **kwargs: Any) -> ResNet:
    """A ResNet-50 loaded from a torchvision-layout weights file (RadImageNet, ImageNet).

    The model takes grey ``(B, H, W, 1)`` images in [0, 1] and normalises them itself (RGB stem
    summed to one channel); with ``in_chans=3`` pass the grey image replicated to RGB, un-normalised
    (the model applies ImageNet's mean/std). See :func:`resnet_from_file`
    for the load report.
    """
    model, _ = resnet_from_file(path, in_chans=in_chans, **kwargs)
    return model

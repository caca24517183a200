"""``config.init_from``: start an encoder from other weights ("continue from DINO", from ImageNet, ...).

What: :func:`initialize_encoder` overwrites a freshly built :class:`VisionTransformer` in place from

* a timm / PyTorch ViT weights file: ``.safetensors`` (read without torch), or ``.pth``/``.pt``/
  ``.bin`` read with ``torch.load(weights_only=True)`` — plain state dicts or dicts holding one under
  ``teacher`` / ``model`` / ``state_dict`` / ``student`` as DINO, MAE and DeiT checkpoints do;
  timm, DINO, DINOv2 (with or without registers) and Hugging Face ``Dinov2Model`` (RAD-DINO) layouts;
* a folder with ``config.json`` + ``model.safetensors``: our exports (``tools/export_timm.py``,
  ``tools/import_timm.py``), timm Hub snapshots, Hugging Face Dinov2 snapshots (RAD-DINO);
* one of our runs: a workdir, its ``checkpoints/`` folder or a ``checkpoints/<step>`` folder.

A :class:`~afm_jax.models.resnet.ResNet` encoder (``model.arch="resnet50"``, e.g. DINO continued from
RadImageNet) is loaded from a torchvision-layout ``.pth``/``.safetensors`` file instead, through
:mod:`afm_jax.interop.torchvision_resnet` (RGB stem summed to one channel, BatchNorm running
statistics included, ``fc`` dropped).

:func:`initialize_encoder` returns a report of what was loaded, adapted (channels, position grid, prefix slots,
LayerScale) and left at init. Mismatches raise :class:`~afm_jax.interop.timm.InteropError` naming
the key.

Why one function: the trainer calls it once after building the model, whatever the source; all
adaptation lives in :mod:`afm_jax.interop.timm`, so a checkpoint of ours, an export of it and the
timm model made from it give the same encoder.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import numpy as np
from flax import nnx

from afm_jax.errors import InteropError
from afm_jax.interop import timm as timm_interop
from afm_jax.interop.torchvision_resnet import flax_key, load_torchvision_resnet
from afm_jax.interop.weights_file import read_weights_file
from afm_jax.models.resnet import ResNet
from afm_jax.models.vit import VisionTransformer
from afm_jax.train.checkpoint import is_checkpoint_path, read_encoder_checkpoint

__all__ = ["initialize_encoder", "initialize_resnet", "read_vit_source", "normalisation_mismatch"]


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    """A JSON object file, or an InteropError in one sentence."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InteropError(
            f"{path} is not readable JSON ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "restore the folder's config.json or pass the weights file itself."
        ) from None
    if not isinstance(obj, dict):
        raise InteropError(f"{path} holds a JSON {type(obj).__name__}, not an object; not an export's config.json.")
    return obj


def read_vit_source(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, Any]]:
    """(state dict, :func:`load_timm_state_dict` kwargs, description) of a weights file or of an
    export / Hub snapshot folder (``config.json`` tells the grid, prefix layout, heads, mean/std)."""
    folder = pathlib.Path(path).expanduser()
    if not folder.exists():
        raise InteropError(f"{folder} does not exist: give a .safetensors/.pth file or an export folder.")
    if not folder.is_dir():
        return read_weights_file(folder), {}, {"file": str(folder)}
    cfg = _read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    files = [folder / n for n in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")]
    weights = next((f for f in files if f.is_file()), None)
    if weights is None:
        raise InteropError(
            f"{folder} has no model.safetensors (or pytorch_model.bin): not an export "
            "folder. Pass the weights file itself or a run's workdir."
        )
    kwargs: dict[str, Any] = {}
    info: dict[str, Any] = {"file": str(weights)}
    if "model_args" in cfg:  # timm format (ours, timm Hub)
        a = cfg["model_args"]
        if "img_size" in a and "patch_size" in a:
            size = a["img_size"] if isinstance(a["img_size"], (list, tuple)) else [a["img_size"]] * 2
            kwargs["source_grid"] = (size[0] // a["patch_size"], size[1] // a["patch_size"])
        if "no_embed_class" in a:
            kwargs["source_no_embed_class"] = bool(a["no_embed_class"])
        if "num_heads" in a:
            kwargs["source_num_heads"] = int(a["num_heads"])
        pc = cfg.get("pretrained_cfg", {})
        if "mean" in pc and "std" in pc:
            info["source_mean"], info["source_std"] = list(pc["mean"]), list(pc["std"])
    elif cfg.get("model_type") == "dinov2":  # Hugging Face transformers (RAD-DINO)
        kwargs["source_num_heads"] = int(cfg["num_attention_heads"])
        g = int(cfg["image_size"]) // int(cfg["patch_size"])
        kwargs["source_grid"] = (g, g)
        pre = folder / "preprocessor_config.json"
        if pre.is_file():
            pp = _read_json(pre)
            if "image_mean" in pp and "image_std" in pp:
                info["source_mean"], info["source_std"] = list(pp["image_mean"]), list(pp["image_std"])
    return read_weights_file(weights), kwargs, info


def initialize_encoder(encoder: VisionTransformer | ResNet, path: str | os.PathLike) -> dict[str, Any]:
    """Overwrites ``encoder``'s weights in place from ``path`` (see the module docstring).

    Returns:
      ``{"source": "checkpoint" | "export" | "file", "path", "layout", "loaded": [timm keys],
      "adapted": [...], "left_at_init": [...], "dropped": [...], "warnings": [...], "summary": str}``
      (plus ``step``/``weights`` for checkpoints).

    Raises:
      InteropError: the path does not exist, is not a supported format, or does not fit the model.
    """
    p = pathlib.Path(path).expanduser()
    if not p.exists():
        raise InteropError(
            f"init_from path {p} does not exist: give a .safetensors/.pth file, an export "
            "folder (config.json + model.safetensors) or a run's workdir."
        )
    if isinstance(encoder, ResNet):
        return initialize_resnet(encoder, p)
    extra: dict[str, Any] = {}
    if p.is_dir() and is_checkpoint_path(p):
        src = read_encoder_checkpoint(p)
        sd = timm_interop.encoder_state_dict(src.encoder)
        kwargs = dict(
            source_grid=src.encoder.grid_size,
            source_no_embed_class=src.encoder.no_embed_class,
            source_num_heads=src.encoder.num_heads,
        )
        extra = dict(
            source="checkpoint",
            step=src.step,
            weights=src.weights,
            source_mean=list(src.encoder.input_mean),
            source_std=list(src.encoder.input_std),
        )
    elif p.is_dir():
        sd, kwargs, info = read_vit_source(p)
        extra = dict(source="export", **info)
    else:
        sd, kwargs = read_weights_file(p), {}
        extra = dict(source="file")
    report = timm_interop.load_timm_state_dict(encoder, sd, **kwargs)
    report = dict(extra, path=str(p), **report)
    report["summary"] = (
        f"{len(report['loaded'])} tensors from a {report['layout']} {report['source']}"
        + (f"; adapted: {'; '.join(report['adapted'])}" if report["adapted"] else "")
        + (f"; left at init: {', '.join(report['left_at_init'])}" if report["left_at_init"] else "")
    )
    if "source_mean" in report:
        note = normalisation_mismatch(report["source_mean"], report["source_std"], encoder)
        if note:
            report["warnings"].append(note)
    return report


def initialize_resnet(encoder: ResNet, path: pathlib.Path) -> dict[str, Any]:
    """Overwrites a ResNet in place from a torchvision-layout weights file (RadImageNet, ImageNet,
    DINO's ResNet-50); the report has the keys of :func:`initialize_encoder`'s.

    Raises:
      InteropError: a folder or run directory (only weights files hold a ResNet here), or keys and
        shapes that do not fit (named by :func:`load_torchvision_resnet`).
    """
    if path.is_dir():
        raise InteropError(
            f"init_from {path} is a folder; a ResNet starts from a torchvision-layout weights "
            "file (.pth/.pt/.safetensors, e.g. RadImageNet's ResNet50.pt)."
        )
    loaded = load_torchvision_resnet(encoder, read_weights_file(path))
    keys = [flax_key(".".join(map(str, k)))[0] for k, _ in nnx.to_flat_state(nnx.state(encoder))]
    report: dict[str, Any] = dict(
        source="file",
        path=str(path),
        layout="torchvision ResNet",
        loaded=keys,
        adapted=loaded["adapted"],
        left_at_init=[],
        dropped=loaded["dropped"],
        warnings=[],
    )
    report["summary"] = (
        f"{loaded['loaded']} tensors from a torchvision ResNet file"
        + (f"; adapted: {'; '.join(loaded['adapted'])}" if loaded["adapted"] else "")
        + _dropped_note(loaded["dropped"])
    )
    return report


def _dropped_note(dropped: list[str]) -> str:
    """ "; dropped: fc.weight, fc.bias (+ 17 num_batches_tracked)" — the counters are not worth listing."""
    counters = [k for k in dropped if k.endswith("num_batches_tracked")]
    named = [k for k in dropped if not k.endswith("num_batches_tracked")]
    if not dropped:
        return ""
    return "; dropped: " + ", ".join(named + ([f"{len(counters)} num_batches_tracked"] if counters else []))


def normalisation_mismatch(source_mean: list[float], source_std: list[float], encoder: VisionTransformer) -> str | None:
    """A note when the source normalised its inputs differently from ``encoder`` (per channel, or
    channel-averaged when the channel count was adapted), else None."""
    sm, ss = np.asarray(source_mean, np.float64), np.asarray(source_std, np.float64)
    if len(sm) != encoder.in_chans:
        sm, ss = sm.mean(keepdims=True), ss.mean(keepdims=True)
    if np.allclose(sm, encoder.input_mean, atol=1e-3) and np.allclose(ss, encoder.input_std, atol=1e-3):
        return None
    return (
        f"the source normalised inputs with mean {list(source_mean)} std {list(source_std)}, the model "
        f"uses mean {list(encoder.input_mean)} std {list(encoder.input_std)}: features shift until "
        "training adapts (the patch embedding is linear, so fine-tuning absorbs it quickly)"
    )

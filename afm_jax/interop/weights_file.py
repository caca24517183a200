"""Reading a weights file from disk into numpy: ``.safetensors`` without torch, ``.pth``/``.pt``/``.bin``/
``.ckpt`` with ``torch.load(weights_only=True)`` (which executes nothing from the file).

What: :func:`read_weights_file` returns ``{key: float32 array}`` of the state dict inside the file
(:func:`unwrap_state_dict` finds it under DINO's ``teacher``, MAE's ``model`` and the like). Why a leaf
of interop: every importer (timm ViTs, torchvision ResNets, init_from) reads files the same way.
"""

from __future__ import annotations

import argparse
import os
import pathlib
from typing import Any

import numpy as np
from safetensors import numpy as safetensors_numpy

from afm_jax.errors import InteropError

__all__ = ["read_weights_file", "unwrap_state_dict", "TORCH_SUFFIXES"]

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
_WRAPPER_KEYS = ("teacher", "model", "state_dict", "student", "module", "model_ema")


def unwrap_state_dict(obj: Any, *, prefer: tuple[str, ...] = _WRAPPER_KEYS) -> dict[str, Any]:
    """The state dict inside a checkpoint dict (DINO: ``teacher``; MAE/DeiT: ``model``; ...)."""
    if not isinstance(obj, dict):
        raise InteropError(f"The weights file holds a {type(obj).__name__}, not a state dict.")
    for key in prefer:
        if isinstance(obj.get(key), dict) and obj[key]:
            return unwrap_state_dict(obj[key], prefer=prefer)
    return {k: v for k, v in obj.items() if hasattr(v, "shape")}


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensor (bf16/fp16 included)
        return np.array(value.detach().float().cpu().numpy(), np.float32, copy=True)  # never share torch memory
    return np.asarray(value, dtype=np.float32)


def _unreadable(p: pathlib.Path, error: BaseException, reader: str) -> str:
    """One sentence saying why ``p`` could not be read: the first line of the reader's error, shortened."""
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    if len(first) > 200:
        first = first[:200] + " ..."
    size = p.stat().st_size if p.exists() else 0
    return (
        f"{p} ({size} bytes) cannot be read with {reader}: {type(error).__name__}: {first.rstrip('.')}. "
        "It is truncated, corrupt, or not a weights file of this kind."
    )


def read_weights_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A weights file as ``{key: float32 array}``; safetensors without torch, torch files safely.

    ``torch.load(weights_only=True)`` executes nothing from the file; ``argparse.Namespace`` (the
    ``args`` entry of DINO's training checkpoints) is the one extra class it may build.
    """
    p = pathlib.Path(path)
    if p.suffix in (".safetensors", *TORCH_SUFFIXES) and not p.is_file():
        raise InteropError(
            f"{p} is not a readable file ({'a folder' if p.is_dir() else 'it does not exist'}): "
            "give the weights file itself."
        )
    if p.suffix == ".safetensors":
        try:
            raw: Any = safetensors_numpy.load_file(str(p))
        except Exception as e:  # SafetensorError (truncated, not safetensors), OSError, bad dtypes
            raise InteropError(_unreadable(p, e, "safetensors") + " Re-download or re-export the file.") from None
    elif p.suffix in TORCH_SUFFIXES:
        try:
            import torch  # optional extra: only .pth/.pt files need it
        except ImportError as e:
            raise InteropError(
                f"Reading {p.name} needs PyTorch (pip install -e '.[torch]'), or convert it to .safetensors first."
            ) from e
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:
                raw = torch.load(str(p), map_location="cpu", weights_only=True)
            except Exception as e:  # garbage, truncated zip, or a pickle with objects weights_only refuses
                raise InteropError(
                    _unreadable(p, e, "torch.load(weights_only=True)") + " If the file is "
                    "complete, save its state_dict alone (or as .safetensors) and retry."
                ) from None
    else:
        raise InteropError(f"Unsupported weights file {p.name}: use .safetensors or {'/'.join(TORCH_SUFFIXES)}.")
    return {k: _to_numpy(v) for k, v in unwrap_state_dict(raw).items()}

"""ResNet-50 (Flax NNX) with torchvision's layout, for RadImageNet / ImageNet CNN baselines.

What: RadImageNet publishes CNNs (ResNet-50, DenseNet-121, InceptionV3), not ViTs; its PyTorch
ResNet-50 and every ImageNet ResNet-50 use torchvision's ``resnet50`` layout. This module rebuilds
that network (v1.5: the stride sits on the 3x3 conv of a bottleneck) so that
:mod:`afm_jax.interop.torchvision_resnet` can load those weights and the evaluation code can use it
as a frozen backbone (:meth:`ResNet.forward_features` gives the pooled 2048-d feature, as
torchvision's model with ``fc = Identity``).

Why it looks like this:

* **Same tree as torchvision**: ``conv1``, ``bn1``, ``layer1..4`` (lists of ``Bottleneck`` with
  ``conv1..3``, ``bn1..3``, ``downsample = [conv, bn]``), so the weight mapping is renaming and
  transposing only (``conv.weight (O, I, kh, kw)`` -> ``kernel (kh, kw, I, O)``; BN
  ``weight/bias/running_mean/running_var`` -> ``scale/bias/mean/var``).
* **Eval-mode BatchNorm** by default (running statistics, eps 1e-5 as torch): a pretrained CNN is
  used frozen or fine-tuned with frozen statistics here. ``use_running_average=False`` builds the
  train-mode network DINO pretrains (batch statistics in the forward pass, running averages
  updated with torch's momentum 0.1; the trainer's step writes them back into the train state, and
  under SPMD ``jit`` the batch mean is over the global batch, i.e. SyncBatchNorm). One difference
  from torch: flax updates the running variance with the biased batch variance (torch: unbiased,
  a factor n/(n-1) that is ~1 for the batch sizes trained here).
  :meth:`ResNet.pooled_features` (probes, kNN) always uses the running averages.
* **Images** follow the design contract: ``(B, H, W, C)`` floats in [0, 1], normalised at the
  model's input. Defaults are ImageNet's statistics for 3 channels and their channel mean
  (0.449 / 0.226) for one grey channel (RGB kernels summed on import).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["Bottleneck", "ResNet", "resnet50", "RESNET_LAYERS"]

RESNET_LAYERS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3), "resnet152": (3, 8, 36, 3)}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _conv(cin: int, cout: int, k: int, stride: int, dtype: Any, param_dtype: Any, rngs: nnx.Rngs) -> nnx.Conv:
    pad = k // 2
    return nnx.Conv(
        cin,
        cout,
        kernel_size=(k, k),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.initializers.variance_scaling(2.0, "fan_out", "normal"),
        rngs=rngs,
    )


def _bn(c: int, use_running_average: bool, param_dtype: Any, rngs: nnx.Rngs, zero: bool = False) -> nnx.BatchNorm:
    return nnx.BatchNorm(
        c,
        use_running_average=use_running_average,
        momentum=0.9,
        epsilon=1e-5,
        dtype=jnp.float32,
        param_dtype=param_dtype,
        scale_init=nnx.initializers.zeros_init() if zero else nnx.initializers.ones_init(),
        rngs=rngs,
    )


class Bottleneck(nnx.Module):
    """1x1 -> 3x3 (stride) -> 1x1 (x4 channels) with a residual; torchvision ``Bottleneck``."""

    expansion = 4

    def __init__(
        self,
        cin: int,
        width: int,
        stride: int,
        *,
        use_running_average: bool = True,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        cout = width * self.expansion
        self.conv1 = _conv(cin, width, 1, 1, dtype, param_dtype, rngs)
        self.bn1 = _bn(width, use_running_average, param_dtype, rngs)
        self.conv2 = _conv(width, width, 3, stride, dtype, param_dtype, rngs)
        self.bn2 = _bn(width, use_running_average, param_dtype, rngs)
        self.conv3 = _conv(width, cout, 1, 1, dtype, param_dtype, rngs)
        self.bn3 = _bn(cout, use_running_average, param_dtype, rngs, zero=True)
        self.downsample = (
            nnx.List(
                [
                    _conv(cin, cout, 1, stride, dtype, param_dtype, rngs),
                    _bn(cout, use_running_average, param_dtype, rngs),
                ]
            )
            if stride != 1 or cin != cout
            else None
        )

    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        ura = use_running_average
        y = jax.nn.relu(self.bn1(self.conv1(x), ura))
        y = jax.nn.relu(self.bn2(self.conv2(y), ura))
        y = self.bn3(self.conv3(y), ura)
        shortcut = x if self.downsample is None else self.downsample[1](self.downsample[0](x), ura)
        return jax.nn.relu(y + shortcut)


class ResNet(nnx.Module):
    """torchvision-layout bottleneck ResNet without the classifier (``fc``).

    Args:
      layers: blocks per stage, e.g. ``(3, 4, 6, 3)`` for ResNet-50.
      in_chans: input channels (1 for radiographs; 3 for RGB).
      use_running_average: eval-mode BatchNorm (default; see the module docstring).
      input_mean / input_std: normalisation of [0, 1] images applied first.
    """

    def __init__(
        self,
        layers: Sequence[int] = (3, 4, 6, 3),
        *,
        in_chans: int = 1,
        use_running_average: bool = True,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        input_mean: Sequence[float] | None = None,
        input_std: Sequence[float] | None = None,
        rngs: nnx.Rngs,
    ):
        if len(layers) != 4:
            raise ValueError(f"A ResNet has 4 stages; got layers={tuple(layers)}.")
        self.in_chans = in_chans
        mean = IMAGENET_MEAN if in_chans == 3 else (float(np.mean(IMAGENET_MEAN)),) * in_chans
        std = IMAGENET_STD if in_chans == 3 else (float(np.mean(IMAGENET_STD)),) * in_chans
        self.input_mean = tuple(float(v) for v in (input_mean if input_mean is not None else mean))
        self.input_std = tuple(float(v) for v in (input_std if input_std is not None else std))
        if len(self.input_mean) != in_chans or len(self.input_std) != in_chans:
            raise ValueError(f"input_mean/input_std need {in_chans} values.")
        self.conv1 = nnx.Conv(
            in_chans,
            64,
            kernel_size=(7, 7),
            strides=(2, 2),
            padding=((3, 3), (3, 3)),
            use_bias=False,
            dtype=dtype,
            param_dtype=param_dtype,
            kernel_init=nnx.initializers.variance_scaling(2.0, "fan_out", "normal"),
            rngs=rngs,
        )
        self.bn1 = _bn(64, use_running_average, param_dtype, rngs)
        cin = 64
        stages = []
        for i, n in enumerate(layers):
            width = 64 * 2**i
            blocks = []
            for j in range(n):
                blocks.append(
                    Bottleneck(
                        cin,
                        width,
                        2 if (j == 0 and i > 0) else 1,
                        use_running_average=use_running_average,
                        dtype=dtype,
                        param_dtype=param_dtype,
                        rngs=rngs,
                    )
                )
                cin = width * Bottleneck.expansion
            stages.append(nnx.List(blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.num_features = cin
        self.embed_dim = cin  # the pooled feature width, under the ViT's name (heads, probes)

    def normalize(self, images: jax.Array) -> jax.Array:
        x = jnp.asarray(images, jnp.float32)
        if x.ndim != 4 or x.shape[-1] != self.in_chans:
            raise ValueError(f"Expected images of shape (B, H, W, {self.in_chans}) (NHWC), got {x.shape}.")
        return (x - jnp.asarray(self.input_mean)) / jnp.asarray(self.input_std)

    def feature_map(self, images: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        """``(B, H, W, C)`` in [0, 1] -> last-stage map ``(B, H/32, W/32, 2048)`` float32.

        ``use_running_average`` overrides the BatchNorm mode the model was built with (None = keep)."""
        ura = use_running_average
        x = jax.nn.relu(self.bn1(self.conv1(self.normalize(images)), ura))
        x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                x = block(x, ura)
        return x.astype(jnp.float32)

    def forward_features(self, images: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        """Global-average-pooled features ``(B, num_features)`` (torchvision with ``fc = Identity``)."""
        return self.feature_map(images, use_running_average).mean(axis=(1, 2))

    def pooled_features(self, images: jax.Array, *, pool: str = "avg") -> jax.Array:
        """Eval-mode :meth:`forward_features` (running BN statistics, whatever mode the model was
        built in); the ViT's probe interface (only ``pool="avg"``)."""
        if pool != "avg":
            raise ValueError(f"A ResNet has no class token; use pool='avg', got {pool!r}.")
        return self.forward_features(images, use_running_average=True)

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.forward_features(images)


def resnet50(*, in_chans: int = 1, rngs: nnx.Rngs, **kwargs: Any) -> ResNet:
    """torchvision ``resnet50`` without ``fc`` (2048-d pooled features)."""
    return ResNet(RESNET_LAYERS["resnet50"], in_chans=in_chans, rngs=rngs, **kwargs)

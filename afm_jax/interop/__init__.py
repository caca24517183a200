"""PyTorch/timm interop: our ViT and ResNet encoders <-> timm / torchvision / DINO / DINOv2 / RadImageNet weights.

Modules:
  timm.py               the one place that knows the ViT parameter-name mapping, both ways, and the
                        adaptations on import (RGB -> grey kernel sum, position-embedding resampling,
                        prefix-slot folding, LayerScale folding); no torch needed.
  vit_layouts.py        other projects' ViT state-dict layouts (DINO, DINOv2, Hugging Face, MAE) -> timm's.
  timm_export.py        export folders (config.json, model.safetensors, model card) and the timm parity check.
  weights_file.py       reading .safetensors / .pth files into numpy, safely.
  torchvision_resnet.py torchvision-layout ResNet-50 state dict -> Flax ResNet-50 (RadImageNet, ImageNet).

Starting a training run from such weights (`config.init_from`) is the trainer's job:
:mod:`afm_jax.train.init_from`; reading our own checkpoints: :mod:`afm_jax.train.checkpoint`.
"""

"""PyTorch/timm interop: export our encoders as timm ViTs, start from timm/DINO/DINOv2/RadImageNet weights.

Modules:
  timm.py               the one place that knows the ViT parameter-name mapping, both ways, and the
                        adaptations on import (RGB -> grey kernel sum, position-embedding resampling,
                        prefix-slot folding, LayerScale folding); no torch needed.
  checkpoints.py        reads our orbax checkpoints (encoder weights + run config) for export and init.
  init_from.py          `initialize_encoder(encoder, path)`: the trainer's `config.init_from`.
  torchvision_resnet.py torchvision-layout ResNet-50 state dict -> Flax ResNet-50 (RadImageNet, ImageNet).
"""

"""DINO multi-crop augmentation for radiographs, as grain transforms, and its training iterator.

What: each training image becomes `num_global` large crops (DINO: 2 × 224 px, area 0.4–1; DINOv2
0.32–1) and `num_local` small crops (DINO: 8 × 96 px, area 0.05–0.4; DINOv2 0.05–0.32), plus — for DINOv2's iBOT loss — one
block mask per global crop. A batch holds one array per crop size, so the train step runs each
size as one batched forward pass (no Python loop over images or crops):

    {"global": float32 (B, num_global, G, G, 1), "local": float32 (B, num_local, L, L, 1),
     "masks": bool (B, num_global, N) (only with iBOT), "label": int32 (B,)}

The batch dimension comes first so the trainer shards it like any other batch.

Why these ops: DINO's recipe (Caron et al. 2021, `main_dino.py` `DataAugmentationDINO`) without its
colour ops — radiographs are one channel, so colour jitter becomes the intensity jitter of
`transforms.py` (brightness, contrast, gamma; applied with p 0.8 as DINO's RandomApply) and
grayscale conversion is dropped. Blur probabilities are DINO's: 1.0 on the first global crop, 0.1 on
the second, 0.5 on local crops; solarisation (p 0.2) only on the second global crop.

Block masks follow iBOT/DINOv2 (`MaskingGenerator` and `collate_data_and_cast`): with probability
`mask_probability` a global crop is masked, with a mask ratio ~ U(mask_ratio) of its patches, built
from random rectangles of at least 4 patches and aspect ratio in (0.3, 1/0.3). DINOv2 spreads the
ratios over a batch (stratified); here each crop draws its own — the same distribution per crop,
drawn per example so augmentation stays a pure function of (seed, example index).

The iterator is `pipeline.TrainIterator` over `pipeline.build_train_dataset` with this transform, so
epochs, host slicing, determinism and checkpointable state are exactly those of every other run.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from afm_jax import configuration
from afm_jax.data import pipeline, transforms


def default_multicrop_config() -> ml_collections.ConfigDict:
    """`config.multicrop`: DINO's crop recipe; the global crop size is `config.image_size`."""
    return ml_collections.ConfigDict(
        dict(
            num_global=2,
            global_scale=(0.4, 1.0),  # DINO main_dino.py (DINOv2: 0.32, 1)
            num_local=8,
            local_size=96,
            local_scale=(0.05, 0.4),  # DINO main_dino.py (DINOv2: 0.05, 0.32)
            ratio=(3 / 4, 4 / 3),
            flip=True,
            jitter_p=0.8,  # DINO's RandomApply(ColorJitter, p=0.8)
            brightness=0.4,
            contrast=0.4,
            gamma=0.2,
            blur_p=(1.0, 0.1, 0.5),  # first global, second global, local crops
            blur_sigma=(0.1, 2.0),  # in output pixels (PIL radius in DINO)
            solarize_p=0.2,  # second global crop only
        )
    )


def validate_multicrop_config(config: ml_collections.ConfigDict, patch_size: int) -> None:
    """Raises ConfigError naming the key for a bad value of `config.multicrop`."""
    req = configuration.require
    req(config, "multicrop.num_global", lambda v: int(v) in (1, 2), "1 or 2 global crops")
    req(config, "multicrop.num_local", lambda v: int(v) >= 0, "a count >= 0")
    req(
        config,
        "multicrop.local_size",
        lambda v: int(v) > 0 and int(v) % patch_size == 0,
        f"a positive multiple of the patch size {patch_size}",
    )
    for key in ("global_scale", "local_scale"):
        req(config, f"multicrop.{key}", lambda v: 0 < float(v[0]) <= float(v[1]) <= 1, "a pair 0 < min <= max <= 1")
    req(config, "multicrop.ratio", lambda v: 0 < float(v[0]) <= float(v[1]), "a pair 0 < min <= max")
    for key in ("brightness", "contrast", "gamma"):
        req(config, f"multicrop.{key}", lambda v: 0 <= float(v) < 1, "a strength in [0, 1)")
    req(config, "multicrop.jitter_p", lambda v: 0 <= float(v) <= 1, "a probability")
    req(config, "multicrop.solarize_p", lambda v: 0 <= float(v) <= 1, "a probability")
    req(
        config,
        "multicrop.blur_p",
        lambda v: len(v) == 3 and all(0 <= float(p) <= 1 for p in v),
        "three probabilities (first global, second global, local)",
    )
    req(config, "multicrop.blur_sigma", lambda v: 0 < float(v[0]) <= float(v[1]), "a pair 0 < min <= max")


# ─── Op chains ───────────────────────────────────────────────────────────────────────────────────


def crop_chain(
    cfg: Mapping[str, Any], *, size: int, scale: Sequence[float], blur_p: float, solarize_p: float = 0.0
) -> transforms.Chain:
    """One view's op chain: random resized crop, flip, to_float, jitter, blur, solarize."""
    chain: list[tuple[str, dict[str, Any]]] = [
        (
            "random_resized_crop",
            dict(size=int(size), scale=tuple(map(float, scale)), ratio=tuple(map(float, cfg["ratio"]))),
        )
    ]
    if cfg["flip"]:
        chain.append(("flip_lr", dict(p=0.5)))
    chain.append(("to_float", {}))
    jitter = {k: float(cfg[k]) for k in ("brightness", "contrast", "gamma") if float(cfg[k]) > 0}
    if jitter and float(cfg["jitter_p"]) > 0:
        chain.append(("intensity_jitter", dict(jitter, p=float(cfg["jitter_p"]))))
    if blur_p > 0:
        chain.append(("gaussian_blur", dict(p=float(blur_p), sigma=tuple(map(float, cfg["blur_sigma"])))))
    if solarize_p > 0:
        chain.append(("solarize", dict(p=float(solarize_p), threshold=0.5)))
    return tuple(chain)


def multicrop_chains(cfg: Mapping[str, Any], global_size: int) -> tuple[tuple[transforms.Chain, ...], transforms.Chain]:
    """(one chain per global crop, the local-crop chain) from a `multicrop` config."""
    blur = tuple(float(p) for p in cfg["blur_p"])
    globals_ = [crop_chain(cfg, size=global_size, scale=cfg["global_scale"], blur_p=blur[0])]
    if int(cfg["num_global"]) == 2:
        globals_.append(
            crop_chain(
                cfg, size=global_size, scale=cfg["global_scale"], blur_p=blur[1], solarize_p=float(cfg["solarize_p"])
            )
        )
    local = crop_chain(cfg, size=int(cfg["local_size"]), scale=cfg["local_scale"], blur_p=blur[2])
    return tuple(globals_), local


# ─── Block masks (iBOT / DINOv2) ─────────────────────────────────────────────────────────────────


def block_mask(
    grid: tuple[int, int],
    num_masked: int,
    rng: np.random.Generator,
    *,
    min_block: int = 4,
    max_block: int | None = None,
    min_aspect: float = 0.3,
) -> np.ndarray:
    """A (gh, gw) bool mask of about `num_masked` patches made of random rectangles.

    A port of iBOT/DINOv2's `MaskingGenerator`: rectangles of area ~ U(min_block, remaining) and
    log-uniform aspect ratio in (min_aspect, 1/min_aspect) are added while they mask new patches
    without overshooting the target; stops when the target is reached or 10 tries add nothing.
    """
    gh, gw = int(grid[0]), int(grid[1])
    mask = np.zeros((gh, gw), bool)
    max_block = num_masked if max_block is None else max_block
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    count = 0
    while count < num_masked:
        limit = min(num_masked - count, max_block)
        delta = 0
        for _ in range(10):
            area = min_block + (limit - min_block) * rng.random()  # Python's random.uniform: works for limit < min
            aspect = math.exp(rng.uniform(*log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if w < gw and h < gh:
                top, left = int(rng.integers(0, gh - h + 1)), int(rng.integers(0, gw - w + 1))
                window = mask[top : top + h, left : left + w]
                new = h * w - int(window.sum())
                if 0 < new <= limit:
                    window[...] = True
                    delta += new
            if delta > 0:
                break
        if delta == 0:
            break
        count += delta
    return mask


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Which global crops get iBOT masks, and how many patches (ratios of the `grid`)."""

    grid: tuple[int, int]
    probability: float = 0.5
    ratio: tuple[float, float] = (0.1, 0.5)

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        """A flat (gh·gw,) bool mask: empty with probability 1 - p, else a block mask."""
        n = self.grid[0] * self.grid[1]
        if rng.random() >= self.probability:
            return np.zeros((n,), bool)
        ratio = rng.uniform(self.ratio[0], self.ratio[1])
        return block_mask(self.grid, int(n * ratio), rng, max_block=max(int(0.5 * n), 1)).reshape(n)


# ─── grain transform and iterator ────────────────────────────────────────────────────────────────


@dataclasses.dataclass(frozen=True)
class MultiCropTransform(grain.transforms.RandomMap):
    """Record -> {'global', 'local', ['masks'], 'label'}: decode once, then every view's chain."""

    global_chains: tuple[transforms.Chain, ...]
    local_chain: transforms.Chain
    num_local: int
    local_size: int
    masks: MaskSpec | None = None

    def random_map(self, element: Mapping[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        pixels = transforms.decode_png(element["image"])
        views = [transforms.apply_chain(pixels, chain, rng) for chain in self.global_chains]
        out = {"global": np.ascontiguousarray(np.stack(views), np.float32)}
        s = self.local_size
        local = np.empty((self.num_local, s, s, 1), np.float32)
        for i in range(self.num_local):
            local[i] = transforms.apply_chain(pixels, self.local_chain, rng)
        out["local"] = local
        if self.masks is not None:
            out["masks"] = np.stack([self.masks.sample(rng) for _ in self.global_chains])
        out["label"] = np.int32(element["label"])
        return out


def build_multicrop_transform(
    config: ml_collections.ConfigDict, *, patch_size: int, ibot: ml_collections.ConfigDict | None = None
) -> MultiCropTransform:
    """The transform of `config.multicrop` at global size `config.image_size`; `ibot` (with
    `mask_probability`, `mask_ratio`) adds one block mask per global crop."""
    cfg = config.multicrop
    globals_, local = multicrop_chains(cfg, int(config.image_size))
    masks = None
    if ibot is not None:
        g = int(config.image_size) // patch_size
        masks = MaskSpec(
            grid=(g, g), probability=float(ibot.mask_probability), ratio=tuple(float(r) for r in ibot.mask_ratio)
        )
    return MultiCropTransform(
        global_chains=globals_,
        local_chain=local,
        num_local=int(cfg.num_local),
        local_size=int(cfg.local_size),
        masks=masks,
    )


def build_multicrop_iterator(
    config: ml_collections.ConfigDict,
    *,
    patch_size: int,
    ibot: ml_collections.ConfigDict | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> pipeline.TrainIterator:
    """This host's infinite, checkpointable iterator of multi-crop batches (see the module doc)."""
    transform = build_multicrop_transform(config, patch_size=patch_size, ibot=ibot)
    dataset, facts = pipeline.build_train_dataset(
        config.data,
        global_batch_size=config.batch_size,
        seed=config.seed,
        image_size=config.image_size,
        process_index=process_index,
        process_count=process_count,
        transform=transform,
    )
    return pipeline.TrainIterator(dataset, facts, config.data)

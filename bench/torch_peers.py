"""PyTorch peers of our MAE and DINO train steps, written for `bench/train_step.py --compare-torch`.

No reference repository is available here, so these are compact re-implementations of what the
reference code does (facebookresearch/mae `models_mae.py` + `main_pretrain.py`, facebookresearch/dino
`main_dino.py` + `vision_transformer.py` + `utils.py`), on timm's ViT (`timm.models.vision_transformer`):

* **MAE** (`TorchMAE`): timm ViT encoder (fixed sin-cos position table when the config says so, as
  the reference freezes it), per-sample random masking by argsort of uniform noise, decoder
  `decoder_embed` -> mask tokens + unshuffle -> fixed sin-cos table -> `decoder_depth` timm `Block`s
  -> `decoder_norm` -> `decoder_pred`, norm-pix loss (unbiased variance, eps 1e-6) on the removed
  patches. Module names equal our parameter paths (so `afm_jax.interop.timm.flat_to_timm_state_dict`
  of our MAE's state loads into it: the parity test in tests/test_bench_peers.py).
* **DINO** (`TorchDINO`): student and teacher `MultiCropWrapper`s (one backbone pass per run of equal
  crop resolutions, the head once on the concatenated class tokens), `DINOHead` (nlayers-MLP with
  GELU -> bottleneck -> L2 normalise -> weight-normalised last layer with g fixed to 1),
  `DINOLoss` (centred, sharpened teacher softmax, cross-entropy over every pair of different views,
  centre EMA), per-parameter gradient clipping as DINO's `clip_gradients`, AdamW with DINO's two
  parameter groups (no decay on biases and 1-d parameters), teacher EMA after the update. The student
  gets drop-path, the teacher none; local crops use timm's `dynamic_img_size` (position table
  resampled to the 6x6 grid, as DINO's `interpolate_pos_encoding`).

Both take NCHW float32 images in [0, 1] with one channel and normalise them at the input with the
same mean/std as our encoder (0.5, 0.25), so the maths is the same as our steps'. Each `*Step` class
times one call of forward + backward + optimiser (+ EMA) with `time.perf_counter` and process CPU
time, like `train_step.JaxStep`.

torch and timm are optional: import this module only where they are installed.
"""

from __future__ import annotations

import os
import time
from typing import Callable

import jax
import numpy as np
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from afm_jax.models import factory

NORM_PIX_EPS = 1e-6  # models_mae.py forward_loss: (target - mean) / (var + 1.e-6) ** .5


# ------------------------------------------------------------------------------------------------
# Models.
# ------------------------------------------------------------------------------------------------


def sincos_pos_embed(dim: int, grid: int, cls_token: bool) -> np.ndarray:
    """MAE's `get_2d_sincos_pos_embed` (util/pos_embed.py): (grid², dim) [+ a zero class row first]."""

    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    emb = np.concatenate([one_d(dim // 2, gw), one_d(dim // 2, gh)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
    return emb.astype(np.float32)


def timm_vit(
    dims: dict,
    image_size: int,
    *,
    in_chans: int = 1,
    drop_path_rate: float = 0.0,
    dynamic_img_size: bool = False,
    fixed_sincos: bool = False,
) -> VisionTransformer:
    """timm's `VisionTransformer` of our variant's size (`afm_jax.models.factory.vit_dims`), no head."""
    vit = VisionTransformer(
        img_size=image_size,
        patch_size=dims["patch_size"],
        in_chans=in_chans,
        num_classes=0,
        embed_dim=dims["width"],
        depth=dims["depth"],
        num_heads=dims["num_heads"],
        mlp_ratio=dims["mlp_dim"] / dims["width"],
        qkv_bias=True,
        drop_path_rate=drop_path_rate,
        dynamic_img_size=dynamic_img_size,
    )
    if fixed_sincos:  # the MAE reference: a frozen sin-cos table with a zero class slot
        grid = image_size // dims["patch_size"]
        vit.pos_embed.data.copy_(torch.from_numpy(sincos_pos_embed(dims["width"], grid, True))[None])
        vit.pos_embed.requires_grad_(False)
    return vit


class InputNorm(nn.Module):
    """(x - mean) / std at the model's input (our encoder's `normalize`; one channel: 0.5, 0.25)."""

    def __init__(self, mean: float = 0.5, std: float = 0.25):
        super().__init__()
        self.mean, self.std = float(mean), float(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class TorchMAE(nn.Module):
    """MAE with the reference's structure around a timm ViT encoder (names = our parameter paths)."""

    def __init__(
        self,
        encoder: VisionTransformer,
        *,
        mask_ratio: float = 0.75,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        norm_pix_loss: bool = True,
        input_norm: InputNorm | None = None,
    ):
        super().__init__()
        self.encoder = encoder
        self.input_norm = input_norm or InputNorm()
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        d, p = encoder.embed_dim, encoder.patch_embed.patch_size[0]
        self.patch, self.in_chans = p, encoder.patch_embed.proj.in_channels
        grid = encoder.patch_embed.grid_size[0]
        self.decoder_embed = nn.Linear(d, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.register_buffer(
            "decoder_pos_embed", torch.from_numpy(sincos_pos_embed(decoder_dim, grid, True))[None], persistent=True
        )
        self.decoder_blocks = nn.ModuleList(
            [Block(decoder_dim, decoder_heads, 4.0, qkv_bias=True) for _ in range(decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, p * p * self.in_chans)
        for m in [self.decoder_embed, self.decoder_pred]:
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, L, p·p·C), patches row-major, pixels (p, p, C) as the reference."""
        b, c, h, w = x.shape
        p = self.patch
        x = x.reshape(b, c, h // p, p, w // p, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)

    def forward(self, images: torch.Tensor, noise: torch.Tensor | None = None):
        """images (B, C, H, W) in [0, 1]; noise (B, L) (default: uniform) -> (loss, pred, mask)."""
        enc = self.encoder
        x = self.input_norm(images)
        target = self.patchify(x)
        tokens = enc.patch_embed(x) + enc.pos_embed[:, 1:]
        b, length, d = tokens.shape
        keep = int(length * (1 - self.mask_ratio))
        if noise is None:
            noise = torch.rand(b, length, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        kept = torch.gather(tokens, 1, ids_shuffle[:, :keep, None].expand(-1, -1, d))
        mask = torch.ones(b, length, device=x.device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(b, -1, -1)
        latent = enc.norm(enc.blocks(torch.cat([cls, kept], dim=1)))

        y = self.decoder_embed(latent)
        dd = y.shape[-1]
        y_ = torch.cat([y[:, 1:], self.mask_token.expand(b, length - keep, -1)], dim=1)
        y_ = torch.gather(y_, 1, ids_restore[:, :, None].expand(-1, -1, dd))
        y = torch.cat([y[:, :1], y_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            y = blk(y)
        pred = self.decoder_pred(self.decoder_norm(y))[:, 1:]

        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased, as the reference
            target = (target - mean) / (var + NORM_PIX_EPS) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)
        loss = (loss * mask).sum() / mask.sum()
        return loss, pred, mask


class DINOHead(nn.Module):
    """DINO's head (vision_transformer.py `DINOHead`): MLP -> bottleneck -> L2 norm -> weight-norm layer."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        norm_last_layer: bool = True,
    ):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < nlayers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        g = self.last_layer.parametrizations.weight.original0
        g.data.fill_(1.0)
        if norm_last_layer:
            g.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


class MultiCropWrapper(nn.Module):
    """DINO's `utils.MultiCropWrapper`: one backbone pass per run of consecutive crops of equal
    resolution, then the head once on all class tokens (crop-major: crop 0 of every image first)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, input_norm: InputNorm | None = None):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.input_norm = input_norm or InputNorm()

    def forward(self, crops: list[torch.Tensor]) -> torch.Tensor:
        sizes = torch.tensor([c.shape[-1] for c in crops])
        ends = torch.cumsum(torch.unique_consecutive(sizes, return_counts=True)[1], 0).tolist()
        start, feats = 0, []
        for end in ends:
            feats.append(self.backbone(self.input_norm(torch.cat(crops[start:end]))))
            start = end
        return self.head(torch.cat(feats))


class DINOLoss(nn.Module):
    """DINO's `DINOLoss` (main_dino.py) for one process: centred teacher softmax at temperature
    `teacher_temp`, cross-entropy with every student view other than the teacher's own, centre EMA."""

    def __init__(self, out_dim: int, ncrops: int, *, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.ncrops, self.student_temp, self.center_momentum = ncrops, student_temp, center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        student_out = (student_output / self.student_temp).chunk(self.ncrops)
        teacher_out = F.softmax((teacher_output - self.center) / teacher_temp, dim=-1).detach().chunk(2)
        total, n_terms = 0.0, 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v == iq:
                    continue
                total = total + torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1).mean()
                n_terms += 1
        self.update_center(teacher_output)
        return total / n_terms

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True) / len(teacher_output)
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


def weight_decay_groups(model: nn.Module) -> list[dict]:
    """DINO's `utils.get_params_groups` (and MAE's timm `param_groups_weight_decay`): no weight decay on
    biases and 1-d parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def clip_gradients_per_tensor(model: nn.Module, clip: float) -> None:
    """DINO's `utils.clip_gradients`: each parameter's gradient scaled to norm <= clip (+1e-6)."""
    for p in model.parameters():
        if p.grad is not None:
            norm = p.grad.norm(2)
            coef = clip / (norm + 1e-6)
            if coef < 1:
                p.grad.mul_(coef)


class TorchDINO(nn.Module):
    """Student + teacher + loss of one DINO step (`main_dino.py` `train_one_epoch`, one process)."""

    def __init__(
        self,
        dims: dict,
        *,
        image_size: int,
        local_size: int,
        num_global: int,
        num_local: int,
        out_dim: int,
        hidden_dim: int,
        bottleneck_dim: int,
        nlayers: int,
        norm_last_layer: bool,
        drop_path_rate: float,
        student_temp: float,
        center_momentum: float,
        in_chans: int = 1,
        fixed_sincos: bool = False,
    ):
        super().__init__()
        head = dict(
            hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim, nlayers=nlayers, norm_last_layer=norm_last_layer
        )
        vit = dict(in_chans=in_chans, dynamic_img_size=True, fixed_sincos=fixed_sincos)
        self.student = MultiCropWrapper(
            timm_vit(dims, image_size, drop_path_rate=drop_path_rate, **vit), DINOHead(dims["width"], out_dim, **head)
        )
        self.teacher = MultiCropWrapper(
            timm_vit(dims, image_size, drop_path_rate=0.0, **vit), DINOHead(dims["width"], out_dim, **head)
        )
        self.teacher.load_state_dict(self.student.state_dict())  # the reference starts the teacher as a copy
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.num_global = num_global
        self.loss = DINOLoss(
            out_dim, num_global + num_local, student_temp=student_temp, center_momentum=center_momentum
        )
        self.image_size, self.local_size, self.num_local = image_size, local_size, num_local

    def forward(self, crops: list[torch.Tensor], teacher_temp: float) -> torch.Tensor:
        teacher_output = self.teacher(crops[: self.num_global])  # only the global views through the teacher
        student_output = self.student(crops)
        return self.loss(student_output, teacher_output, teacher_temp)

    @torch.no_grad()
    def ema_teacher(self, momentum: float) -> None:
        s = [p.detach() for p in self.student.parameters()]
        t = list(self.teacher.parameters())
        torch._foreach_mul_(t, momentum)
        torch._foreach_add_(t, s, alpha=1 - momentum)


# ------------------------------------------------------------------------------------------------
# Timed steps (bench/train_step.py calls these in its interleaved rounds).
# ------------------------------------------------------------------------------------------------


class TorchPeerStep:
    """A timed torch train step: `run(n)` times n calls of `self.step()` (wall and process CPU)."""

    name = "torch"

    def __init__(self, config, timer, threads: int | None, seed: int):
        torch.manual_seed(seed)
        torch.set_num_threads(threads or os.cpu_count() or 1)
        self.threads = torch.get_num_threads()
        self.torch = torch
        self.timer = timer
        self.last_loss = float("nan")
        self.step: Callable[[], torch.Tensor]
        # On a GPU box (jax on GPU and CUDA torch) the peer runs on the GPU too, under autocast when
        # the config computes in bf16/fp16 (as our step); on a CPU in fp32.
        self.device = torch.device("cuda" if _jax_platform() == "gpu" and torch.cuda.is_available() else "cpu")
        dtype = config.model.dtype
        self.autocast_dtype = None if dtype == "float32" else getattr(torch, dtype)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def count_matmul_flops(self) -> float:
        """Matmul/conv FLOPs of one step (`torch.utils.flop_counter.FlopCounterMode`, 2 per
        multiply-add). On a CPU the fused attention kernel is invisible to the counter, so timm's
        attention runs unfused (the same maths) while counting. The counted step is a real one (it
        updates the weights); call it before timing."""
        from torch.utils.flop_counter import FlopCounterMode

        attention = [m for m in self.model.modules() if hasattr(m, "fused_attn")]
        fused = [m.fused_attn for m in attention]
        for m in attention:
            m.fused_attn = False
        try:
            with FlopCounterMode(display=False) as counter:
                self.step()
        finally:
            for m, f in zip(attention, fused):
                m.fused_attn = f
        return float(counter.get_total_flops())

    def run(self, n: int, record: bool = True) -> None:
        if n <= 0:  # e.g. --warmup 0
            return
        for _ in range(n):
            self._sync()
            c0, t0 = time.process_time(), time.perf_counter()
            loss = self.step()
            self._sync()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if record:
                self.timer.add(dt, dc)
        self.last_loss = float(loss)


def _jax_platform() -> str:
    return jax.devices()[0].platform  # where our step runs


def _dims(config) -> dict:
    return factory.vit_dims(config.model)  # the variant's real size, as our step builds it


class TorchMAEStep(TorchPeerStep):
    """The MAE peer's step: forward (random mask), norm-pix loss, backward, AdamW(b1, b2, wd) as
    `main_pretrain.py` (no decay on biases and norms, its `param_groups_weight_decay`)."""

    name = "torch_mae"

    def __init__(self, config, timer, *, threads: int | None = None, seed: int = 0):
        super().__init__(config, timer, threads, seed)
        m, o = config.mae, config.optim
        encoder = timm_vit(
            _dims(config),
            config.image_size,
            in_chans=config.model.in_chans,
            drop_path_rate=config.model.drop_path_rate,
            fixed_sincos=config.model.pos_embed == "sincos",
        )
        self.model = (
            TorchMAE(
                encoder,
                mask_ratio=m.mask_ratio,
                decoder_dim=m.decoder_dim,
                decoder_depth=m.decoder_depth,
                decoder_heads=m.decoder_heads,
                norm_pix_loss=m.norm_pix_loss,
            )
            .to(self.device)
            .train()
        )
        self.opt = torch.optim.AdamW(
            weight_decay_groups(self.model), lr=1e-4, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay
        )
        rng = np.random.default_rng(seed)
        b, s, c = config.batch_size, config.image_size, config.model.in_chans
        self.x = torch.from_numpy(rng.random((b, c, s, s), dtype=np.float32)).to(self.device)

    def step(self) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        with self.autocast():
            loss, _, _ = self.model(self.x)
        loss.backward()
        self.opt.step()
        return loss.detach()


class TorchDINOStep(TorchPeerStep):
    """The DINO peer's step (`train_one_epoch`): teacher on the global crops, student on all crops via
    the multi-crop wrapper, DINO loss + centre update, backward, per-tensor clipping, AdamW, EMA."""

    name = "torch_dino"

    def __init__(self, config, timer, *, threads: int | None = None, seed: int = 0):
        super().__init__(config, timer, threads, seed)
        d, mc, o = config.dino, config.multicrop, config.optim
        self.model = (
            TorchDINO(
                _dims(config),
                image_size=config.image_size,
                local_size=mc.local_size,
                num_global=mc.num_global,
                num_local=mc.num_local,
                out_dim=d.out_dim,
                hidden_dim=d.hidden_dim,
                bottleneck_dim=d.bottleneck_dim,
                nlayers=d.nlayers,
                norm_last_layer=d.norm_last_layer,
                drop_path_rate=config.model.drop_path_rate,
                student_temp=d.student_temp,
                center_momentum=d.center_momentum,
                in_chans=config.model.in_chans,
                fixed_sincos=config.model.pos_embed == "sincos",
            )
            .to(self.device)
            .train()
        )
        self.opt = torch.optim.AdamW(
            weight_decay_groups(self.model.student), lr=1e-4, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay
        )
        self.clip = float(o.grad_clip_norm or 0.0)
        self.teacher_temp = float(d.warmup_teacher_temp)
        self.momentum = float(d.momentum_teacher)
        rng = np.random.default_rng(seed)
        b, c = config.batch_size, config.model.in_chans
        sizes = [config.image_size] * mc.num_global + [mc.local_size] * mc.num_local
        self.crops = [torch.from_numpy(rng.random((b, c, s, s), dtype=np.float32)).to(self.device) for s in sizes]

    def step(self) -> torch.Tensor:
        with self.autocast():
            loss = self.model(self.crops, self.teacher_temp)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip:
            clip_gradients_per_tensor(self.model.student, self.clip)
        self.opt.step()
        self.model.ema_teacher(self.momentum)
        return loss.detach()


PEERS = {"mae": TorchMAEStep, "dino": TorchDINOStep}


def peer_for(config, timer, *, threads: int | None = None, seed: int = 0) -> TorchPeerStep:
    """The torch peer of `config.task` ("mae" or "dino")."""
    if config.task not in PEERS:
        raise ValueError(f"No torch peer for task {config.task!r} (have: {sorted(PEERS)})")
    return PEERS[config.task](config, timer, threads=threads, seed=seed)

"""Continuing DINO pretraining from DINOv2 weights: at step 0 the student and the teacher compute the
reference model's own features, at the training resolution and for a local crop.

The reference is a small PyTorch port of DINOv2's `DinoVisionTransformer.forward_features`
(facebookresearch/dinov2 dinov2/models/vision_transformer.py: `prepare_tokens_with_masks` — patch
embed, class token, `interpolate_pos_encoding` with `interpolate_offset=0.1`,
`interpolate_antialias=False`, register tokens inserted after the class token without a position
embedding — then the blocks and the final norm), with timm's `Block` (the same pre-norm block with
LayerScale as DINOv2's `NestedTensorBlock`). The weights are random, saved in DINOv2's hub layout
(`cls_token`, `pos_embed` with the class slot, `register_tokens`, `mask_token`, `blocks.i.*`).
"""

import math

import jax
import numpy as np
import pytest

from afm_jax.train import assembly, sharding
from afm_jax.train import state as state_lib
from afm_jax.train.defaults import default_config
from afm_jax.train.tasks import get_task

torch = pytest.importorskip("torch")
timm_vit = pytest.importorskip("timm.models.vision_transformer")

D, DEPTH, HEADS, PATCH, REG, SRC_GRID = 64, 2, 2, 14, 4, 5  # source table 5x5 (70 px)
TRAIN, LOCAL = 42, 28  # 3x3 and 2x2 patch grids


def _hub_state_dict(seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=0.2):
        return torch.randn(*shape, generator=g) * s

    sd = {
        "cls_token": r(1, 1, D),
        "pos_embed": r(1, 1 + SRC_GRID**2, D),
        "register_tokens": r(1, REG, D),
        "mask_token": r(1, D),
        "patch_embed.proj.weight": r(D, 3, PATCH, PATCH, s=0.05),
        "patch_embed.proj.bias": r(D),
        "norm.weight": 1 + r(D),
        "norm.bias": r(D),
    }
    for i in range(DEPTH):
        b = f"blocks.{i}."
        sd.update(
            {
                b + "norm1.weight": 1 + r(D),
                b + "norm1.bias": r(D),
                b + "attn.qkv.weight": r(3 * D, D),
                b + "attn.qkv.bias": r(3 * D),
                b + "attn.proj.weight": r(D, D),
                b + "attn.proj.bias": r(D),
                b + "ls1.gamma": 0.5 + r(D),
                b + "norm2.weight": 1 + r(D),
                b + "norm2.bias": r(D),
                b + "mlp.fc1.weight": r(4 * D, D),
                b + "mlp.fc1.bias": r(4 * D),
                b + "mlp.fc2.weight": r(D, 4 * D),
                b + "mlp.fc2.bias": r(D),
                b + "ls2.gamma": 0.5 + r(D),
            }
        )
    return sd


def _interpolate_pos_encoding(pos_embed, h, w):
    """DINOv2's `interpolate_pos_encoding` (offset 0.1, no antialias), for an (h, w) input."""
    n = pos_embed.shape[1] - 1
    m = int(math.sqrt(n))
    h0, w0 = h // PATCH, w // PATCH
    if h0 * w0 == n and h == w:
        return pos_embed
    cls_pos, grid = pos_embed[:, :1], pos_embed[:, 1:]
    grid = torch.nn.functional.interpolate(
        grid.reshape(1, m, m, D).permute(0, 3, 1, 2),
        mode="bicubic",
        antialias=False,
        scale_factor=((h0 + 0.1) / m, (w0 + 0.1) / m),
    )
    assert grid.shape[-2:] == (h0, w0)
    return torch.cat([cls_pos, grid.permute(0, 2, 3, 1).reshape(1, -1, D)], dim=1)


def _reference_forward_features(sd, images_nchw):
    blocks = []
    for i in range(DEPTH):
        blk = timm_vit.Block(
            D,
            HEADS,
            mlp_ratio=4.0,
            qkv_bias=True,
            init_values=1e-5,
            norm_layer=lambda d, **kw: torch.nn.LayerNorm(d, eps=1e-6, **kw),
        )
        blk.load_state_dict({k[len(f"blocks.{i}.") :]: v for k, v in sd.items() if k.startswith(f"blocks.{i}.")})
        blocks.append(blk.eval())
    norm = torch.nn.LayerNorm(D, eps=1e-6)
    norm.load_state_dict({"weight": sd["norm.weight"], "bias": sd["norm.bias"]})
    with torch.no_grad():
        b, _, h, w = images_nchw.shape
        x = (
            torch.nn.functional.conv2d(
                images_nchw, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=PATCH
            )
            .flatten(2)
            .transpose(1, 2)
        )
        x = torch.cat([sd["cls_token"].expand(b, -1, -1), x], dim=1)
        x = x + _interpolate_pos_encoding(sd["pos_embed"], h, w)
        x = torch.cat([x[:, :1], sd["register_tokens"].expand(b, -1, -1), x[:, 1:]], dim=1)
        for blk in blocks:
            x = blk(x)
        x = norm(x)
    return x[:, 0].numpy(), x[:, 1 + REG :].numpy()


def _config(path, pos_embed_size):
    config = default_config("dino", "mu/14")
    config.data.path = "unused"
    config.model.update(
        width=D,
        depth=DEPTH,
        num_heads=HEADS,
        in_chans=3,
        num_reg_tokens=REG,
        no_embed_class=True,
        layer_scale_init=1e-5,
        init="dinov2",
        pos_embed_interpolation="dino",
        pos_embed_size=pos_embed_size,
        drop_path_rate=0.0,
    )
    config.image_size = TRAIN
    config.batch_size = 2
    config.multicrop.update(num_local=2, local_size=LOCAL)
    config.dino.update(out_dim=16, hidden_dim=16, bottleneck_dim=8)
    config.init_from = str(path)
    return config


@pytest.mark.parametrize("pos_embed_size", [SRC_GRID * PATCH, None])
def test_student_and_teacher_at_step_0_equal_dinov2_forward_features(tmp_path, pos_embed_size):
    """pos_embed_size = the source's 70 px keeps DINOv2's 5x5 table and resamples it per input, so both
    crop sizes match; without it the table is resampled once at load (DINOv2's way) to the training
    grid, which matches at the training resolution."""
    sd = _hub_state_dict()
    path = tmp_path / "dinov2_hub.pth"
    torch.save(sd, path)
    config = _config(path, pos_embed_size)
    task = get_task("dino")
    task.validate(config)
    task.setup(config, workdir=str(tmp_path), total_steps=10, steps_per_epoch=5)
    parts = assembly.assemble(config, task, sharding.make_mesh(config.mesh), total_steps=10, warmup_steps=1)
    state = parts.initial_state()
    assert "dinov2-registers" in parts.init_report["layout"], parts.init_report
    student = state_lib.merge_model(parts.graphdef, state)
    teacher = state_lib.merge_model(parts.graphdef, state, params=state.extra["teacher"])
    enc = student.encoder
    mean, std = np.asarray(enc.input_mean, np.float32), np.asarray(enc.input_std, np.float32)
    rng = np.random.default_rng(0)
    sizes = [TRAIN, LOCAL] if pos_embed_size else [TRAIN]
    for size in sizes:
        images = rng.random((2, size, size, 3), dtype=np.float32)
        nchw = torch.from_numpy(((images - mean) / std).transpose(0, 3, 1, 2).copy())
        want_cls, want_patch = _reference_forward_features(sd, nchw)
        for name, model in (("student", student), ("teacher", teacher)):
            cls, patch = jax.device_get(model.backbone(images))
            np.testing.assert_allclose(cls, want_cls, atol=1e-4, rtol=1e-4, err_msg=f"{name} cls @ {size}px")
            np.testing.assert_allclose(patch, want_patch, atol=1e-4, rtol=1e-4, err_msg=f"{name} patches @ {size}px")


def test_timm_style_resampling_would_not_match_the_reference(tmp_path):
    """The same continuation with timm's antialiased resampling differs from DINOv2 at the local crop
    (so the test above can tell the two interpolations apart)."""
    sd = _hub_state_dict()
    path = tmp_path / "dinov2_hub.pth"
    torch.save(sd, path)
    config = _config(path, SRC_GRID * PATCH)
    config.model.pos_embed_interpolation = "timm"
    task = get_task("dino")
    task.validate(config)
    task.setup(config, workdir=str(tmp_path), total_steps=10, steps_per_epoch=5)
    parts = assembly.assemble(config, task, sharding.make_mesh(config.mesh), total_steps=10, warmup_steps=1)
    student = state_lib.merge_model(parts.graphdef, parts.initial_state())
    enc = student.encoder
    images = np.random.default_rng(0).random((2, LOCAL, LOCAL, 3), dtype=np.float32)
    nchw = torch.from_numpy(
        ((images - np.asarray(enc.input_mean)) / np.asarray(enc.input_std))
        .astype(np.float32)
        .transpose(0, 3, 1, 2)
        .copy()
    )
    want_cls, _ = _reference_forward_features(sd, nchw)
    cls, _ = jax.device_get(student.backbone(images))
    assert np.abs(cls - want_cls).max() > 1e-3

"""ViT recipe options against their references: the init schemes' empirical statistics (torch's
trunc_normal_ / default inits), the uniform drop-path schedule, and DINO's position-embedding
interpolation against torch's F.interpolate."""

import jax
import numpy as np
import pytest
from flax import nnx

from afm_jax.models.vit import VisionTransformer, trunc_normal

torch = pytest.importorskip("torch")


def _vit(**kw):
    return VisionTransformer("S/16", img_size=64, depth=2, rngs=nnx.Rngs(0), **kw)


def test_trunc_normal_has_the_real_std_of_timms_trunc_normal():
    """timm/DINO `trunc_normal_(w, std=.02)` cuts at +-2 *absolute*: its empirical std is 0.02. jax's
    truncated_normal(0.02) cuts at 2 std (real std ~0.0176): our initialiser must match torch's."""
    shape = (384, 1536)
    ours = np.asarray(trunc_normal(0.02)(jax.random.key(0), shape))
    ref = torch.nn.init.trunc_normal_(torch.empty(shape), std=0.02).numpy()
    jaxs = np.asarray(jax.nn.initializers.truncated_normal(0.02)(jax.random.key(0), shape))
    assert abs(ref.std() - 0.02) < 2e-4 and abs(ours.std() - ref.std()) < 2e-4
    assert abs(jaxs.std() - ref.std()) > 1e-3  # the initialiser the issue found wanting


def test_dino_init_scheme_statistics():
    """DINO vision_transformer.py `_init_weights`: Linear trunc_normal_(std=.02), bias 0; the patch conv
    keeps torch's default (U(+-1/sqrt(fan_in)), as nn.Conv2d); cls token and pos embed trunc-normal .02."""
    m = _vit(init="dino", pos_embed="learned")
    qkv = np.asarray(m.blocks[0].attn.qkv.kernel[...])
    fc2 = np.asarray(m.blocks[1].mlp.fc2.kernel[...])
    for w in (qkv, fc2):
        assert abs(w.std() - 0.02) < 4e-4
    assert not np.asarray(m.blocks[0].attn.qkv.bias[...]).any()
    conv = torch.nn.Conv2d(1, 384, 16, 16)  # the reference's own default init
    ours = np.asarray(m.patch_embed.proj.kernel[...])
    bound = 1 / 16.0
    assert np.abs(ours).max() <= bound and abs(ours.std() - conv.weight.detach().numpy().std()) < 5e-4
    assert abs(np.asarray(m.pos_embed[...]).std() - 0.02) < 1e-3
    mae = _vit(init="mae")  # xavier: sqrt(2 / (384 + 1152)) ~ 0.036
    assert abs(np.asarray(mae.blocks[0].attn.qkv.kernel[...]).std() - np.sqrt(2 / (384 + 1152))) < 5e-4


def test_dinov2_init_puts_class_and_register_tokens_at_std_1e_6():
    """DINOv2 `init_weights`: nn.init.normal_(self.cls_token, std=1e-6), register_tokens likewise."""
    m = VisionTransformer("S/16", img_size=64, depth=1, num_reg_tokens=4, init="dinov2", rngs=nnx.Rngs(0))
    for tok in (m.cls_token, m.reg_token):
        t = np.asarray(tok[...])
        assert 1e-7 < t.std() < 2e-6
    assert abs(np.asarray(m.blocks[0].mlp.fc1.kernel[...]).std() - 0.02) < 4e-4


def test_uniform_drop_path_uses_the_rate_on_every_block():
    """DINOv2 `drop_path_uniform: true` (ssl_default_config.yaml L76): dpr = [rate] * depth; otherwise
    DINO/timm's torch.linspace(0, rate, depth)."""

    def rates(**kw):
        vit = VisionTransformer("mu/8", img_size=16, depth=4, drop_path_rate=0.4, rngs=nnx.Rngs(0), **kw)
        return [b.drop_path_rate for b in vit.blocks]

    assert rates(drop_path_uniform=True) == pytest.approx([0.4] * 4)
    assert rates() == pytest.approx(torch.linspace(0, 0.4, 4).tolist())


@pytest.mark.parametrize("grid,new", [(14, 6), (16, 7), (4, 9)])
def test_dino_pos_embed_interpolation_equals_torch_with_the_offset(grid, new):
    """`pos_embed_interpolation="dino"`: DINO `interpolate_pos_encoding` = F.interpolate(scale_factor=
    (new + 0.1) / old, mode="bicubic") (no antialias), on the model's own table."""
    m = VisionTransformer(
        "mu/8", img_size=8 * grid, pos_embed="learned", pos_embed_interpolation="dino", rngs=nnx.Rngs(0)
    )
    table = np.asarray(m.pos_embed[...])[:, 1:]
    d = table.shape[-1]
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(table).reshape(1, grid, grid, d).permute(0, 3, 1, 2),
        scale_factor=((new + 0.1) / grid,) * 2,
        mode="bicubic",
        antialias=False,
    )
    ref = ref.permute(0, 2, 3, 1).reshape(1, -1, d).numpy()
    np.testing.assert_allclose(np.asarray(m.patch_pos_embed((new, new))), ref, atol=1e-5)
    timm_way = VisionTransformer("mu/8", img_size=8 * grid, pos_embed="learned", rngs=nnx.Rngs(0))
    assert np.abs(np.asarray(timm_way.patch_pos_embed((new, new))) - ref).max() > 1e-4

"""DINOv3 as a starting point (issue 16): our ViT with ``pos_embed="rope"`` against timm's own
``vit_*_patch16_dinov3`` (EVA-style blocks: 2-D RoPE, 4 storage tokens, LayerScale, optional qkv bias,
LayerNorm eps 1e-5), the original DINOv3 hub layout, the round trip timm -> ours -> timm, and DINO /
MAE runs continued from DINOv3 weights with ``config.init_from``.

The reference is timm itself (its RoPE in ``timm/layers/pos_embed_sincos.py`` RotaryEmbeddingDinoV3,
its ``eva.checkpoint_filter_fn`` for the hub layout), built with random weights (``pretrained=False``).
"""

import importlib.util
import json
import os
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
from safetensors.numpy import save_file  # noqa: E402

from afm_jax import errors  # noqa: E402
from afm_jax.interop import timm as ti  # noqa: E402
from afm_jax.models.vit import VisionTransformer, rope_sincos  # noqa: E402
from afm_jax.train.checkpoint import read_encoder_checkpoint  # noqa: E402
from afm_jax.train.init_from import initialize_encoder  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
IMAGENET = dict(input_mean=(0.485, 0.456, 0.406), input_std=(0.229, 0.224, 0.225))


def run_tool(name, argv, capsys):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        rc = module.main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def dinov3(name="vit_small_patch16_dinov3", seed=0, **kw):
    """timm's DINOv3 with every parameter random (LayerScale at 1e-5 would hide the blocks)."""
    tm = timm.create_model(name, pretrained=False, num_classes=0, **kw).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in tm.named_parameters():
            base = 1.0 if n.endswith(("norm1.weight", "norm2.weight")) or n == "norm.weight" else 0.0
            p.copy_(torch.randn(p.shape, generator=g) * 0.05 + base)
    return tm


def ours_like(tm, img=224, in_chans=3, **kw):
    kw = {**(IMAGENET if in_chans == 3 else {}), "qkv_bias": tm.blocks[0].attn.q_bias is not None, **kw}
    return VisionTransformer(
        "S/16",
        img_size=img,
        depth=len(tm.blocks),
        in_chans=in_chans,
        num_reg_tokens=4,
        pos_embed="rope",
        layer_scale_init=1.0,
        norm_eps=1e-5,
        rngs=nnx.Rngs(0),
        **kw,
    )


def forward(model, x):
    return np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(x)))


def timm_forward(tm, x, mean=IMAGENET["input_mean"], std=IMAGENET["input_std"]):
    xn = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    with torch.no_grad():
        return tm.forward_features(torch.from_numpy(xn.transpose(0, 3, 1, 2).copy())).numpy()


def images(h, w, c=3, n=2, seed=0):
    return np.random.default_rng(seed).random((n, h, w, c), dtype=np.float32)


def to_hub_layout(sd, seed=0):
    """timm's Eva port -> the original facebookresearch/dinov3 keys (what the hub .pth files hold):
    storage_tokens, mask_token, rope_embed.periods (bf16 there), ls*.gamma, fused qkv.bias with a k part
    that bias_mask zeroes (mask_k_bias=True)."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, v in sd.items():
        v = v.numpy().copy() if hasattr(v, "numpy") else v
        if k.endswith("attn.q_bias"):
            base = k[: -len("q_bias")]
            q, vb = v, sd[base + "v_bias"].numpy()
            out[base + "qkv.bias"] = np.concatenate([q, rng.normal(size=q.shape).astype(np.float32), vb])
            out[base + "qkv.bias_mask"] = np.concatenate([np.ones_like(q), np.zeros_like(q), np.ones_like(q)])
            continue
        if k.endswith("attn.v_bias"):
            continue
        k = k.replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma").replace("reg_token", "storage_tokens")
        out[k] = v
    out["mask_token"] = np.zeros((1, sd["cls_token"].shape[-1]), np.float32)
    out["rope_embed.periods"] = (100.0 ** (2 * np.arange(16) / 32)).astype(np.float32)
    return out


# -- RoPE maths ---------------------------------------------------------------------------------------


def test_rope_sincos_equals_timms_rotary_embedding_dinov3():
    from timm.layers.pos_embed_sincos import RotaryEmbeddingDinoV3

    for grid in [(14, 14), (10, 16)]:
        ref = RotaryEmbeddingDinoV3(64, temperature=100.0, rotate_half=True).get_embed(shape=list(grid)).numpy()
        sin, cos = rope_sincos(grid, 64, 100.0)
        np.testing.assert_allclose(np.concatenate([sin, cos], -1), ref, atol=2e-6)


# -- timm layout -> ours --------------------------------------------------------------------------------


def test_timm_dinov3_small_imports_with_parity_at_two_resolutions():
    tm = dinov3()  # full ViT-S/16: 12 blocks, 6 heads, 4 storage tokens, no qkv bias
    ours = ours_like(tm)
    report = ti.load_timm_state_dict(ours, {k: v.numpy() for k, v in tm.state_dict().items()}, source_num_heads=6)
    assert report["layout"] == "timm-dinov3" and report["adapted"] == []
    for size in [(224, 224), (160, 288)]:
        x = images(*size, seed=size[1])
        diff = np.abs(forward(ours, x) - timm_forward(tm, x)).max()
        print(f"DINOv3 S/16 timm layout {size}: {diff:.2e}")
        assert diff <= 1e-4, (size, diff)


def test_timm_dinov3_qkvb_and_errors():
    tm = dinov3("vit_small_patch16_dinov3_qkvb", depth=2)
    sd = {k: v.numpy() for k, v in tm.state_dict().items()}
    ours = ours_like(tm)
    ti.load_timm_state_dict(ours, sd, source_num_heads=6)
    x = images(96, 128)
    assert np.abs(forward(ours, x) - timm_forward(tm, x)).max() <= 1e-4
    # round trip of the names: the Eva keys come back exactly
    back = ti.encoder_state_dict(ours)
    assert back.keys() == sd.keys() and all(np.array_equal(back[k], sd[k]) for k in sd)
    # a model without RoPE, or without qkv bias for non-zero biases, is refused with the config change
    plain = VisionTransformer("S/16", img_size=224, depth=2, num_reg_tokens=4, in_chans=3, rngs=nnx.Rngs(0))
    with pytest.raises(errors.InteropError, match="pos_embed=rope"):
        ti.load_timm_state_dict(plain, sd)
    with pytest.raises(errors.InteropError, match="qkv_bias=True"):
        ti.load_timm_state_dict(ours_like(tm, qkv_bias=False), sd)


# -- the original hub layout -> ours --------------------------------------------------------------------


def test_dinov3_hub_layout_imports_like_timms_own_converter(tmp_path, capsys):
    tm = dinov3("vit_small_patch16_dinov3_qkvb", depth=2, seed=1)
    hub = to_hub_layout(tm.state_dict())
    path = tmp_path / "dinov3_vits16_pretrain.pth"
    torch.save({k: torch.from_numpy(v) for k, v in hub.items()}, path)
    ours = ours_like(tm, img=224)
    report = initialize_encoder(ours, path)
    assert report["layout"] == "dinov3"
    assert {"mask_token", "rope_embed.periods"} <= set(report["dropped"])
    # the reference: timm's eva.checkpoint_filter_fn reading the hub keys itself
    from timm.models.eva import checkpoint_filter_fn

    ref = timm.create_model("vit_small_patch16_dinov3_qkvb", pretrained=False, num_classes=0, depth=2).eval()
    ref.load_state_dict(checkpoint_filter_fn({k: torch.from_numpy(v) for k, v in hub.items()}, ref), strict=True)
    for size in [(224, 224), (128, 192)]:
        x = images(*size, seed=3)
        diff = np.abs(forward(ours, x) - timm_forward(ref, x)).max()
        assert diff <= 1e-4, (size, diff)
    # the import tool: grey (RGB kernel summed), its parity reference built by timm from the hub file
    out = tmp_path / "imported"
    rc, stdout, err = run_tool("import_timm", ["--input", path, "--out", out, "--image_size", "96", "--check"], capsys)
    assert rc == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["layout"] == "dinov3" and summary["max_abs_diff"] < 1e-4
    assert {"--config.model.pos_embed=rope", "--config.model.norm_eps=1e-05", "--config.model.qkv_bias=True"} <= set(
        summary["config_overrides"]
    )
    cfg = json.loads((out / "config.json").read_text())  # depth 2: no registered size, the generic entry point
    assert cfg["architecture"] == "vit_base_patch16_dinov3_qkvb" and "no registered" in cfg["architecture_note"]


# -- round trip timm -> ours -> timm ---------------------------------------------------------------------


def test_round_trip_timm_ours_timm_is_exact_for_dinov3_small(tmp_path, capsys):
    tm = dinov3(seed=2)
    src = tmp_path / "vit_small_patch16_dinov3.safetensors"
    save_file({k: v.numpy().copy() for k, v in tm.state_dict().items()}, str(src))
    out = tmp_path / "ours"
    rc, stdout, err = run_tool(
        "import_timm", ["--input", src, "--out", out, "--image_size", "224", "--in_chans", "3", "--check"], capsys
    )
    assert rc == 0, err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "vit_small_patch16_dinov3" and cfg["model_args"]["qkv_bias"] is False
    back = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert type(back).__name__ == "Eva"
    a, b = tm.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    worst = 0.0
    for size in [(224, 224), (176, 240)]:
        x = images(*size, seed=7)
        worst = max(worst, np.abs(timm_forward(back, x) - timm_forward(tm, x)).max())
    assert worst <= 1e-5, worst
    rc, _, err = run_tool("export_timm", ["--verify", out], capsys)  # and the folder verifies as an export
    assert rc == 0, err


# -- continue DINO / MAE pretraining from DINOv3, export back ---------------------------------------------


@pytest.fixture(scope="module")
def dinov3_file(tmp_path_factory):
    tm = dinov3(depth=2, seed=4)
    path = tmp_path_factory.mktemp("dinov3") / "dinov3_s16_depth2.safetensors"
    save_file({k: v.numpy().copy() for k, v in tm.state_dict().items()}, str(path))
    return path


def _dinov3_model(config):
    config.model.update(
        variant="S/16",
        depth=2,
        num_reg_tokens=4,
        pos_embed="rope",
        norm_eps=1e-5,
        qkv_bias=False,
        layer_scale_init=1e-5,
    )


@pytest.mark.parametrize("task", ["dino", "mae"])
def test_pretraining_continues_from_dinov3_and_exports_back(task, dinov3_file, synthetic_dataset, tmp_path, capsys):
    from afm_jax.train import loop
    from afm_jax.train.defaults import default_config
    from afm_jax.train.tasks import get_task

    config = default_config(task, "S/16")
    _dinov3_model(config)
    config.data.path, config.data.num_workers = os.fspath(synthetic_dataset), 0
    config.image_size, config.batch_size, config.total_steps = 32, 8, 3
    config.optim.update(warmup_epochs=0.5, base_lr=1e-3)
    config.log_every, config.checkpoint_every = 1, 100
    if task == "dino":  # DINOv2-style: iBOT masked-patch loss and KoLeo on top of DINO
        config.multicrop.update(num_local=2, local_size=16)
        config.dino.update(out_dim=64, hidden_dim=64, bottleneck_dim=32, koleo_weight=0.1)
        config.dino.ibot.enabled = True
        config.dino.knn.random_init_baseline = False
    else:
        config.image_every = 0
        config.mae.update(decoder_dim=32, decoder_depth=1, decoder_heads=2)
    config.init_from = os.fspath(dinov3_file)
    workdir = tmp_path / "run"
    result = loop.train(config, os.fspath(workdir), get_task(task))
    assert result.finished and result.step == 3
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [line["loss"] for line in logged if "loss" in line]
    assert len(losses) >= 2 and all(np.isfinite(losses))
    # the start really was DINOv3: step 0's student equals the file (checked via a fresh load)
    start = ours_like(dinov3(depth=2, seed=4), img=32, in_chans=1)
    initialize_encoder(start, dinov3_file)
    trained = {
        k: np.asarray(v[...])
        for k, v in ti.encoder_flat_state(read_encoder_checkpoint(workdir, weights="student").encoder).items()
    }
    first = {k: np.asarray(v[...]) for k, v in ti.encoder_flat_state(start).items()}
    assert trained.keys() == first.keys()
    moved = max(float(np.abs(trained[k] - first[k]).max()) for k in first)
    assert 0 < moved < 0.05  # 3 small Adam steps from the DINOv3 weights (a random init differs by ~0.2)
    out = tmp_path / "export"
    rc, stdout, err = run_tool("export_timm", ["--workdir", workdir, "--out", out, "--check"], capsys)
    assert rc == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    # depth 2 is no registered size: the generic DINOv3 entry point with explicit kwargs (full S/16 exports as
    # vit_small_patch16_dinov3, see the round-trip test); same Eva keys as the source, grey patch kernel
    assert summary["architecture"] == "vit_base_patch16_dinov3" and summary["max_abs_diff"] < 1e-4
    back = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    src = dinov3(depth=2, seed=4).state_dict()
    assert back.state_dict().keys() == src.keys() and back.patch_embed.proj.weight.shape[1] == 1

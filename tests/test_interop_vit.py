"""ViT interop with timm, both ways: export parity, import parity (timm, DINO, DINOv2, HF/RAD-DINO
layouts, RGB -> grey against timm's own adaptation), round trip, checkpoints, init_from, errors.

timm models are built with random weights (``pretrained=False`` or the class directly); nothing is
downloaded. Sizes: the real widths/heads/patches of S/16, B/16 and a /14 register model, with the
depth cut to 2 blocks (every block uses the same mapping) to keep the file fast on a CPU.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
from safetensors.numpy import save_file  # noqa: E402
from safetensors.torch import load_file as torch_load_file  # noqa: E402

from afm_jax import errors  # noqa: E402
from afm_jax.interop import timm as ti  # noqa: E402
from afm_jax.interop import timm_export  # noqa: E402
from afm_jax.models.vit import VisionTransformer  # noqa: E402
from afm_jax.train.checkpoint import read_encoder_checkpoint  # noqa: E402
from afm_jax.train.init_from import initialize_encoder  # noqa: E402

TOL = 1e-4


def randomise(model: nnx.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Every variable random (LayerNorm scales around 1): a naming or transpose mix-up cannot hide."""
    rng = np.random.default_rng(seed)  # numpy, not jax.random: no per-shape compiles
    for path, var in nnx.to_flat_state(nnx.state(model)):
        offset = 1.0 if path[-1] == "scale" else 0.0
        var.set_value(jnp.asarray(rng.normal(size=var.shape).astype(np.float32) * scale + offset))


def randomise_timm(model, seed: int = 0, scale: float = 0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = (
                1.0 if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight" else 0.0
            )
            p.copy_(torch.randn(p.shape, generator=g) * scale + base)
    return model


def ours_forward(model, x):
    return np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(x)))


def timm_forward(model, x, mean, std):
    xn = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    with torch.no_grad():
        return model.forward_features(torch.from_numpy(xn.transpose(0, 3, 1, 2).copy())).numpy()


def images(n, h, w, c=1, seed=0):
    return np.random.default_rng(seed).random((n, h, w, c), dtype=np.float32)


# -- export: ours -> timm -------------------------------------------------------------------------

EXPORT_CASES = {
    "S/16": dict(variant="S/16", img_size=224, other=(160, 192)),
    "B/16": dict(variant="B/16", img_size=224, other=(288, 288)),
    "S/14-reg4": dict(
        variant="S/14",
        img_size=224,
        other=(126, 154),
        num_reg_tokens=4,
        no_embed_class=True,
        pos_embed="learned",
        layer_scale_init=1e-5,
    ),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_loads_strictly_in_timm_and_matches_forward_features(case, tmp_path):
    kw = dict(EXPORT_CASES[case])
    variant, img, other = kw.pop("variant"), kw.pop("img_size"), kw.pop("other")
    # abstract build + random values: skips the eager initialisation of a B/16-wide model
    ours = nnx.eval_shape(lambda: VisionTransformer(variant, img_size=img, depth=2, rngs=nnx.Rngs(1), **kw))
    randomise(ours, seed=1)
    cfg = timm_export.write_export(str(tmp_path), ours)
    assert json.loads((tmp_path / "config.json").read_text()) == json.loads(json.dumps(cfg))
    tm = timm.create_model(cfg["architecture"], pretrained=False, **cfg["model_args"]).eval()
    result = tm.load_state_dict(torch_load_file(str(tmp_path / "model.safetensors")), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    if kw.get("num_reg_tokens"):
        assert "reg_token" in tm.state_dict()
    for size in [(img, img), other]:
        x = images(2, *size, seed=size[0])
        diff = np.abs(ours_forward(ours, x) - timm_forward(tm, x, ours.input_mean, ours.input_std)).max()
        assert diff < TOL, (case, size, diff)


def test_export_folder_loads_with_timm_local_dir_and_overlay(tmp_path):
    ours = VisionTransformer("mu/8", img_size=(32, 40), num_reg_tokens=1, rngs=nnx.Rngs(0))
    randomise(ours, seed=2)
    cfg = timm_export.write_export(str(tmp_path), ours)
    x = images(2, 32, 40)
    ref = ours_forward(ours, x)
    by_dir = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    by_overlay = timm.create_model(
        cfg["architecture"],
        pretrained=True,
        pretrained_cfg_overlay=dict(
            file=str(tmp_path / "model.safetensors"), input_size=tuple(cfg["pretrained_cfg"]["input_size"])
        ),
        **cfg["model_args"],
    ).eval()
    for tm in (by_dir, by_overlay):
        assert np.abs(timm_forward(tm, x, (0.5,), (0.25,)) - ref).max() < TOL
    data_cfg = timm.data.resolve_data_config({}, model=by_dir)
    assert tuple(data_cfg["mean"]) == (0.5,) and tuple(data_cfg["std"]) == (0.25,)
    assert data_cfg["input_size"] == (1, 32, 40)


# -- round trip -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        dict(),  # sin-cos FixedPosEmbed
        dict(num_reg_tokens=2, no_embed_class=True, layer_scale_init=0.5, pos_embed="learned"),
        dict(class_token=False, num_reg_tokens=1, img_size=(32, 48)),
        dict(in_chans=3),
    ],
)
def test_round_trip_jax_timm_jax_is_identity_on_parameters(kw):
    kw = dict(kw)
    img = kw.pop("img_size", 32)
    a = VisionTransformer("mu/8", img_size=img, depth=2, rngs=nnx.Rngs(0), **kw)
    randomise(a, seed=3)
    b = VisionTransformer("mu/8", img_size=img, depth=2, rngs=nnx.Rngs(7), **kw)
    sd = ti.encoder_state_dict(a)
    report = ti.load_timm_state_dict(b, sd, source_grid=a.grid_size, source_num_heads=2)
    assert report["adapted"] == [] and report["left_at_init"] == []
    flat_a = {k: np.asarray(v[...]) for k, v in ti.encoder_flat_state(a).items()}
    flat_b = {k: np.asarray(v[...]) for k, v in ti.encoder_flat_state(b).items()}
    assert flat_a.keys() == flat_b.keys()
    for k in flat_a:
        np.testing.assert_array_equal(flat_a[k], flat_b[k], err_msg=k)
    # and back again: timm -> ours -> timm gives the same state dict
    sd2 = ti.encoder_state_dict(b)
    assert sd.keys() == sd2.keys() and all(np.array_equal(sd[k], sd2[k]) for k in sd)


# -- import: timm / DINO / DINOv2 / HF -> ours --------------------------------------------------------


def timm_vit(img=32, patch=8, dim=48, depth=2, heads=3, in_chans=1, **kw):
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    m = TimmViT(
        img_size=img,
        patch_size=patch,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        in_chans=in_chans,
        num_classes=kw.pop("num_classes", 0),
        **kw,
    ).eval()
    return randomise_timm(m, seed=dim + depth)


def to_dinov2_layout(sd, seed=0):
    """timm's DINOv2-with-registers layout -> the DINOv2 reference layout (what Meta's files hold)."""
    sd = {k: v.clone() for k, v in sd.items()}
    p0 = torch.randn((1, 1, sd["cls_token"].shape[-1]), generator=torch.Generator().manual_seed(seed)) * 0.1
    sd["register_tokens"] = sd.pop("reg_token")
    sd["cls_token"] = sd["cls_token"] - p0
    sd["pos_embed"] = torch.cat([p0, sd["pos_embed"]], 1)
    sd["mask_token"] = torch.zeros(1, sd["cls_token"].shape[-1])
    return sd


def to_hf_dinov2_layout(sd):
    """DINOv2 reference keys -> Hugging Face Dinov2Model keys (RAD-DINO's format)."""
    out = {
        "embeddings.cls_token": sd["cls_token"],
        "embeddings.mask_token": sd["mask_token"],
        "embeddings.position_embeddings": sd["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "layernorm.weight": sd["norm.weight"],
        "layernorm.bias": sd["norm.bias"],
    }
    if "register_tokens" in sd:
        out["embeddings.register_tokens"] = sd["register_tokens"]
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        b, L = f"blocks.{i}.", f"encoder.layer.{i}."
        for leaf in ("weight", "bias"):
            q, k, v = sd[b + f"attn.qkv.{leaf}"].chunk(3, dim=0)
            out[L + f"attention.attention.query.{leaf}"] = q
            out[L + f"attention.attention.key.{leaf}"] = k
            out[L + f"attention.attention.value.{leaf}"] = v
            out[L + f"attention.output.dense.{leaf}"] = sd[b + f"attn.proj.{leaf}"]
            for n in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                out[L + f"{n}.{leaf}"] = sd[b + f"{n}.{leaf}"]
        out[L + "layer_scale1.lambda1"] = sd[b + "ls1.gamma"]
        out[L + "layer_scale2.lambda1"] = sd[b + "ls2.gamma"]
        i += 1
    return {"dinov2." + k: v for k, v in out.items()}  # as Dinov2ForImageClassification nests it


def test_timm_vit_imports_exactly():
    tm = timm_vit(class_token=True, global_pool="token", fc_norm=False)
    ours = VisionTransformer("mu/8", img_size=32, width=48, depth=2, num_heads=3, pos_embed="learned", rngs=nnx.Rngs(0))
    report = ti.load_timm_state_dict(ours, {k: v.numpy() for k, v in tm.state_dict().items()})
    assert report["layout"] == "timm" and report["adapted"] == []
    x = images(2, 32, 32)
    assert np.abs(ours_forward(ours, x) - timm_forward(tm, x, ours.input_mean, ours.input_std)).max() < TOL


@pytest.mark.parametrize("layout", ["dinov2", "huggingface"])
def test_dinov2_with_registers_imports_exactly(layout, tmp_path):
    """DINOv2-reg (reference or HF/RAD-DINO keys, /14, LayerScale) -> our no_embed_class ViT."""
    tm = timm_vit(
        img=42,
        patch=14,
        dim=48,
        heads=3,
        reg_tokens=4,
        no_embed_class=True,
        init_values=0.5,
        global_pool="token",
        fc_norm=False,
        dynamic_img_size=True,
    )
    sd = to_dinov2_layout(tm.state_dict())
    if layout == "huggingface":
        sd = to_hf_dinov2_layout(sd)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.numpy().copy() for k, v in sd.items()}, str(path))
    # LayerScale loaded as is (two resolutions), and folded into the projections (HF: folded only)
    runs = {"dinov2": [(0.1, [(42, 42), (56, 70)]), (None, [(56, 70)])], "huggingface": [(None, [(42, 42)])]}[layout]
    for layer_scale, sizes in runs:
        ours = VisionTransformer(
            "mu/14",
            img_size=42,
            width=48,
            depth=2,
            num_heads=3,
            num_reg_tokens=4,
            no_embed_class=True,
            pos_embed="learned",
            layer_scale_init=layer_scale,
            rngs=nnx.Rngs(0),
        )
        report = initialize_encoder(ours, path)
        assert report["layout"].startswith({"dinov2": "dinov2", "huggingface": "huggingface-dinov2"}[layout])
        assert any("mask_token" in k for k in report["dropped"])
        for size in sizes:
            x = images(2, *size, seed=size[1])
            diff = np.abs(ours_forward(ours, x) - timm_forward(tm, x, ours.input_mean, ours.input_std)).max()
            assert diff < TOL, (layer_scale, size, diff)


def test_rgb_to_grey_and_resampling_match_timms_own_adaptation(tmp_path):
    """A 3-channel ViT at 48 px loaded into 1 channel at 64 px: ours vs timm's in_chans=1 loader."""
    tm3 = timm_vit(img=48, in_chans=3, num_classes=10, global_pool="token", fc_norm=False)
    path = tmp_path / "rgb.safetensors"
    save_file({k: v.numpy().copy() for k, v in tm3.state_dict().items()}, str(path))
    kwargs = dict(
        img_size=64, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=0, global_pool="token", fc_norm=False
    )
    ref = timm.create_model(
        "vit_base_patch16_224", pretrained=True, in_chans=1, pretrained_cfg_overlay=dict(file=str(path)), **kwargs
    ).eval()
    ours = VisionTransformer("mu/8", img_size=64, width=48, depth=2, num_heads=3, pos_embed="learned", rngs=nnx.Rngs(0))
    report = initialize_encoder(ours, path)
    assert any("summed" in a for a in report["adapted"]) and any("6x6 -> 8x8" in a for a in report["adapted"])
    assert "head.weight" in report["dropped"]
    x = images(2, 64, 64, seed=5)
    assert np.abs(ours_forward(ours, x) - timm_forward(ref, x, ours.input_mean, ours.input_std)).max() < TOL


def test_dino_teacher_pth_with_prefixes_and_args(tmp_path):
    """DINO's training checkpoint: {'teacher': {'backbone.*', 'head.*'}, 'args': Namespace, ...}."""
    import argparse

    tm = timm_vit(class_token=True, global_pool="token", fc_norm=False)
    teacher = {"module.backbone." + k: v for k, v in tm.state_dict().items()}
    teacher["module.head.mlp.0.weight"] = torch.zeros(4, 48)
    student = {k: torch.zeros_like(v) for k, v in teacher.items()}
    path = tmp_path / "checkpoint.pth"
    torch.save({"teacher": teacher, "student": student, "epoch": 3, "args": argparse.Namespace(lr=0.1)}, path)
    ours = VisionTransformer("mu/8", img_size=32, width=48, depth=2, num_heads=3, rngs=nnx.Rngs(0))
    report = initialize_encoder(ours, path)
    assert report["source"] == "file" and "module.head.mlp.0.weight" in report["dropped"]
    assert report["summary"].startswith(f"{len(report['loaded'])} tensors from a timm file")
    x = images(2, 32, 32)
    assert np.abs(ours_forward(ours, x) - timm_forward(tm, x, ours.input_mean, ours.input_std)).max() < TOL


def test_registers_added_to_a_source_without_them_are_left_at_init():
    tm = timm_vit(class_token=True, global_pool="token", fc_norm=False)
    ours = VisionTransformer("mu/8", img_size=32, width=48, depth=2, num_heads=3, num_reg_tokens=2, rngs=nnx.Rngs(0))
    init_reg = np.asarray(ours.reg_token[...])
    report = ti.load_timm_state_dict(ours, {k: v.numpy() for k, v in tm.state_dict().items()})
    assert report["left_at_init"] == ["reg_token"]
    np.testing.assert_array_equal(np.asarray(ours.reg_token[...]), init_reg)
    np.testing.assert_array_equal(np.asarray(ours.pos_embed[...])[0, 1:3], 0.0)


# -- our own checkpoints ------------------------------------------------------------------------------


def test_teacher_is_exported_by_default_student_on_request(tmp_path):
    """A DINO-like checkpoint (extra['teacher'] with the params' tree), written by our Checkpointer."""
    from afm_jax.configuration import to_json
    from afm_jax.train.checkpoint import Checkpointer
    from afm_jax.train.defaults import default_config

    config = default_config("mae", "mu/8")
    config.image_size = 32
    student = VisionTransformer("mu/8", img_size=32, rngs=nnx.Rngs(1))
    teacher = VisionTransformer("mu/8", img_size=32, rngs=nnx.Rngs(2))
    _, s_params, frozen = nnx.split(student, nnx.Param, ...)
    _, t_params, _ = nnx.split(teacher, nnx.Param, ...)
    state = {
        "step": jnp.asarray(3),
        "params": {"encoder": s_params, "head": {"w": jnp.ones(3)}},
        "frozen": {"encoder": frozen},
        "opt_state": {},
        "rng": jnp.zeros(2, jnp.uint32),
        "extra": {"teacher": {"encoder": t_params, "head": {"w": jnp.ones(3)}}},
    }
    ckpt = Checkpointer(tmp_path, async_save=False)
    ckpt.save(3, state, None, {"config": to_json(config), "code_version": "test", "step": 3})
    ckpt.close()
    auto = read_encoder_checkpoint(tmp_path)
    stu = read_encoder_checkpoint(tmp_path, weights="student")
    assert auto.weights == "teacher" and stu.weights == "student" and auto.step == 3
    for got, want in ((auto.encoder, teacher), (stu.encoder, student)):
        sd_got, sd_want = ti.encoder_state_dict(got), ti.encoder_state_dict(want)
        assert sd_got.keys() == sd_want.keys()
        for k in sd_want:
            np.testing.assert_array_equal(sd_got[k], sd_want[k], err_msg=k)


# -- errors that tell the user what to do --------------------------------------------------------------


def test_mismatches_raise_errors_naming_the_key(tmp_path):
    tm = timm_vit(class_token=True, global_pool="token", fc_norm=False)
    sd = {k: v.numpy() for k, v in tm.state_dict().items()}

    def model(**kw):
        base = dict(img_size=32, width=48, depth=2, num_heads=3)
        base.update(kw)
        return VisionTransformer(
            kw.pop("variant", "mu/8"), rngs=nnx.Rngs(0), **{k: v for k, v in base.items() if k != "variant"}
        )

    with pytest.raises(errors.InteropError, match=r"'blocks.0.mlp.fc1.(weight|bias)' has shape"):
        ti.load_timm_state_dict(model(mlp_dim=64), sd)
    with pytest.raises(errors.InteropError, match=r"'blocks.2.attn.proj.bias' is missing.*depth 2"):
        ti.load_timm_state_dict(model(depth=3), sd)
    with pytest.raises(errors.InteropError, match=r"'blocks.1.[a-z0-9.]+' in the file has no place"):
        ti.load_timm_state_dict(model(depth=1), sd)
    with pytest.raises(errors.InteropError, match=r"patch size 8.*variant"):
        ti.load_timm_state_dict(model(variant="mu/16"), sd)
    with pytest.raises(errors.InteropError, match="num_heads=3"):
        ti.load_timm_state_dict(model(num_heads=2), sd, source_num_heads=3)
    with pytest.raises(errors.InteropError, match="class_token"):
        ti.load_timm_state_dict(model(class_token=False), sd)
    m = model()
    before = np.asarray(m.blocks[0].attn.qkv.kernel[...])
    bad = dict(sd, **{"norm.weight": np.zeros(7, np.float32)})
    with pytest.raises(errors.InteropError, match="'norm.weight'"):
        ti.load_timm_state_dict(m, bad)
    np.testing.assert_array_equal(np.asarray(m.blocks[0].attn.qkv.kernel[...]), before)  # untouched
    with pytest.raises(errors.InteropError, match="does not exist"):
        initialize_encoder(m, tmp_path / "nope.pth")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(errors.InteropError, match="Unsupported weights file"):
        initialize_encoder(m, tmp_path / "w.npz")
    torch.save(tm, tmp_path / "pickled.pth")  # a whole pickled module: refused, nothing executed
    with pytest.raises(errors.InteropError, match="weights_only"):
        initialize_encoder(m, tmp_path / "pickled.pth")
    save_file({"conv1.weight": np.zeros((64, 3, 7, 7), np.float32)}, str(tmp_path / "cnn.safetensors"))
    with pytest.raises(errors.InteropError, match="No ViT patch embedding"):
        initialize_encoder(m, tmp_path / "cnn.safetensors")
    assert issubclass(errors.InteropError, __import__("afm_jax.configuration", fromlist=["x"]).ConfigError)

"""Issue 16: PyTorch interop without surprises — one test (or more) per defect found by using the
tools as a PyTorch user would.

1. ``export_timm --check`` on a bf16 run compares in fp32 (the bf16 difference is information).
2. timm's own ``vit_small_patch14_reg4_dinov2`` state dict imports (and ``--check`` passes).
3. Tolerances are finite and > 0; NaN/Inf weights or parity fail; ``--verify OUT`` re-checks an export;
   a failed check marks the export.
4. Every unreadable weights file is one ``error:`` paragraph, exit 2, no traceback.
5. ``config.json`` reproduces our evaluation preprocessing in timm (end to end on a real-size,
   non-square image); the model card states resize, normalisation, pooling; the architecture name
   matches the size.

Random weights only (``pretrained=False``); nothing is downloaded.
"""

import importlib.util
import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
from safetensors.numpy import load_file, save_file  # noqa: E402

from afm_jax import errors  # noqa: E402
from afm_jax.configuration import to_json  # noqa: E402
from afm_jax.interop import timm_export  # noqa: E402
from afm_jax.interop.weights_file import read_weights_file  # noqa: E402
from afm_jax.models.vit import VisionTransformer  # noqa: E402
from afm_jax.train.checkpoint import Checkpointer  # noqa: E402
from afm_jax.train.defaults import default_config  # noqa: E402
from afm_jax.train.init_from import initialize_encoder  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


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


def assert_one_paragraph_error(rc, err):
    assert rc == 2, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    assert "\n" not in err.strip(), err  # one paragraph


def randomise(model, seed=0, scale=0.3):
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model)):
        offset = 1.0 if path[-1] == "scale" else 0.0
        var.set_value(jnp.asarray(rng.normal(size=var.shape).astype(np.float32) * scale + offset))


def write_checkpoint(workdir, *, dtype="float32", poison=False, task="mae", **model_kw):
    """A checkpoint as the trainer writes it, of a randomised mu/8 encoder computing in `dtype`."""
    config = default_config(task, "mu/8")
    config.image_size = 32
    config.model.dtype = dtype
    for k, v in model_kw.items():
        config.model[k] = v
    enc = VisionTransformer("mu/8", img_size=32, rngs=nnx.Rngs(1), **model_kw)
    randomise(enc)
    if poison:
        k = enc.blocks[0].mlp.fc1.kernel
        k.set_value(k[...].at[0, 0].set(jnp.nan))
    _, params, frozen = nnx.split(enc, nnx.Param, ...)
    state = {
        "step": jnp.asarray(3),
        "params": {"encoder": params},
        "frozen": {"encoder": frozen},
        "opt_state": {},
        "rng": jnp.zeros(2, jnp.uint32),
        "extra": {},
    }
    ck = Checkpointer(workdir, async_save=False)
    ck.save(3, state, None, {"config": to_json(config), "code_version": "test", "step": 3})
    ck.close()
    return workdir


# -- 1. bf16 runs: the check compares in fp32 --------------------------------------------------------


def test_export_check_passes_on_a_bf16_run_and_reports_the_bf16_difference(tmp_path, capsys):
    run = write_checkpoint(tmp_path / "run", dtype="bfloat16")
    rc, out, err = run_tool("export_timm", ["--workdir", run, "--out", tmp_path / "out", "--check"], capsys)
    assert rc == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["compute_dtype"] == "bfloat16"
    assert max(summary["parity"].values()) < 1e-4  # fp32: the weights are exact
    # the bf16 forward differs by far more than the tolerance: comparing it would have failed the check
    assert max(summary["compute_parity"].values()) > 1e-3
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["afm_jax"]["parity_passed"] is True


# -- 2. timm's own DINOv2-with-registers files ---------------------------------------------------------


def test_timm_vit_small_patch14_reg4_dinov2_state_dict_imports_with_check(tmp_path, capsys):
    tm = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # LayerScale gammas at 1e-5 would hide the blocks: randomise everything
        for name, p in tm.named_parameters():
            base = 1.0 if name.endswith(("norm1.weight", "norm2.weight")) or name == "norm.weight" else 0.0
            p.copy_(torch.randn(p.shape, generator=g) * 0.05 + base)
    sd = {k: v.numpy().copy() for k, v in tm.state_dict().items()}
    assert sd["pos_embed"].shape == (1, 37 * 37, 384)  # timm: no prefix slots (no_embed_class)
    src = tmp_path / "vit_small_patch14_reg4_dinov2.safetensors"
    save_file(sd, str(src))
    out = tmp_path / "imported"
    rc, stdout, err = run_tool("import_timm", ["--input", src, "--out", out, "--image_size", "98", "--check"], capsys)
    assert rc == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["max_abs_diff"] < 1e-4 and "--config.model.no_embed_class=True" in summary["config_overrides"]
    # and our encoder equals timm's own model at timm's resolution (no resampling involved)
    ours = VisionTransformer(
        "S/14",
        img_size=518,
        in_chans=3,
        num_reg_tokens=4,
        no_embed_class=True,
        pos_embed="learned",
        layer_scale_init=1.0,
        input_mean=(0.485, 0.456, 0.406),
        input_std=(0.229, 0.224, 0.225),
        rngs=nnx.Rngs(0),
    )
    initialize_encoder(ours, src)
    x = np.random.default_rng(0).random((1, 126, 140, 3), dtype=np.float32)
    mine = np.asarray(nnx.jit(lambda m, x: m(x))(ours, jnp.asarray(x)))
    xn = (x - np.array(ours.input_mean, np.float32)) / np.array(ours.input_std, np.float32)
    tm_dyn = timm.create_model(
        "vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0, dynamic_img_size=True
    ).eval()
    tm_dyn.load_state_dict(tm.state_dict())
    with torch.no_grad():
        ref = tm_dyn.forward_features(torch.from_numpy(xn.transpose(0, 3, 1, 2).copy())).numpy()
    print(
        f"reg4 dinov2: import tool parity {summary['max_abs_diff']:.2e} (98 px), "
        f"vs timm at 126x140 {np.abs(mine - ref).max():.2e}"
    )
    assert np.abs(mine - ref).max() < 1e-4


# -- 3. NaN, tolerances, --verify, failed checks ------------------------------------------------------


@pytest.mark.parametrize("tolerance", ["nan", "inf", "0", "-1e-4"])
def test_tolerance_must_be_finite_and_positive(tolerance, tmp_path, capsys):
    run = write_checkpoint(tmp_path / "run")
    rc, _, err = run_tool(
        "export_timm", ["--workdir", run, "--out", tmp_path / "o", "--check", f"--tolerance={tolerance}"], capsys
    )
    assert_one_paragraph_error(rc, err)
    assert "finite number > 0" in err and not (tmp_path / "o").exists()
    rc, _, err = run_tool(
        "import_timm",
        ["--input", tmp_path / "x.safetensors", "--out", tmp_path / "o2", f"--tolerance={tolerance}"],
        capsys,
    )
    assert_one_paragraph_error(rc, err)
    assert "finite number > 0" in err


def test_parity_failure_treats_nan_as_failure():
    assert timm_export.parity_failure({"32x32": 1e-6}, 1e-4) is None
    assert timm_export.parity_failure({"32x32": float("nan")}, 1e-4) is not None
    assert timm_export.parity_failure({"32x32": 2e-4}, 1e-4) is not None
    assert timm_export.parity_failure({}, 1e-4) is not None


def test_nan_weight_is_never_exported(tmp_path, capsys):
    run = write_checkpoint(tmp_path / "run", poison=True)
    rc, _, err = run_tool("export_timm", ["--workdir", run, "--out", tmp_path / "out", "--check"], capsys)
    assert_one_paragraph_error(rc, err)
    assert "blocks.0.mlp.fc1.weight" in err and "1 NaN" in err
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_verify_rechecks_an_existing_export(tmp_path, capsys):
    run = write_checkpoint(tmp_path / "run", num_reg_tokens=2)
    out = tmp_path / "out"
    rc, _, err = run_tool("export_timm", ["--workdir", run, "--out", out, "--no_parity"], capsys)
    assert rc == 0, err
    rc, stdout, err = run_tool("export_timm", ["--verify", out], capsys)
    assert rc == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["max_abs_diff"] < 1e-4 and set(summary["parity"]["fp32"]) == {"32x32", "48x48"}
    # a NaN written into the file afterwards is found
    sd = load_file(str(out / "model.safetensors"))
    sd["blocks.0.attn.qkv.weight"][3, 4] = np.nan
    save_file(sd, str(out / "model.safetensors"))
    rc, _, err = run_tool("export_timm", ["--verify", out], capsys)
    assert_one_paragraph_error(rc, err)
    assert "blocks.0.attn.qkv.weight" in err and "NaN" in err
    # a tensor of the wrong shape: timm does not load it strictly
    sd["blocks.0.attn.qkv.weight"] = np.zeros((3, 3), np.float32)
    save_file(sd, str(out / "model.safetensors"))
    rc, _, err = run_tool("export_timm", ["--verify", out], capsys)
    assert_one_paragraph_error(rc, err)
    assert "blocks.0.attn.qkv.weight" in err
    rc, _, err = run_tool("export_timm", ["--verify", tmp_path / "nothing"], capsys)
    assert_one_paragraph_error(rc, err)


def test_failed_check_marks_the_export(tmp_path, capsys):
    run = write_checkpoint(tmp_path / "run")
    out = tmp_path / "out"
    rc, _, err = run_tool("export_timm", ["--workdir", run, "--out", out, "--check", "--tolerance=1e-15"], capsys)
    assert_one_paragraph_error(rc, err)
    assert "Parity check failed" in err
    assert not (out / "model.safetensors").exists()  # timm's local-dir: finds no weights
    assert (out / timm_export.FAILED_WEIGHTS).is_file() and (out / "CHECK_FAILED.txt").is_file()
    assert (out / "README.md").read_text().startswith("> **THIS EXPORT FAILED ITS PARITY CHECK")
    rc, _, err = run_tool("export_timm", ["--verify", out], capsys)
    assert_one_paragraph_error(rc, err)
    # a passing re-export clears the marks
    rc, _, err = run_tool("export_timm", ["--workdir", run, "--out", out, "--check"], capsys)
    assert rc == 0, err
    assert (out / "model.safetensors").is_file() and not (out / "CHECK_FAILED.txt").exists()
    assert not (out / timm_export.FAILED_WEIGHTS).exists()


# -- 4. unreadable weights files -----------------------------------------------------------------------


def _unreadable_files(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"patch_embed.proj.weight": np.ones((8, 1, 4, 4), np.float32)}, str(good))
    data = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    text = tmp_path / "text.safetensors"
    text.write_text("this is not a weights file\n")
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    torch.save({"w": torch.ones(3)}, tmp_path / "whole.pth")
    cut = tmp_path / "cut.pth"
    cut.write_bytes((tmp_path / "whole.pth").read_bytes()[:200])
    return [truncated, text, empty, garbage, cut]


def test_unreadable_weights_files_give_one_paragraph_errors(tmp_path, capsys):
    files = _unreadable_files(tmp_path)
    enc = VisionTransformer("mu/8", img_size=32, rngs=nnx.Rngs(0))
    for f in files:
        with pytest.raises(errors.InteropError, match="cannot be read"):
            read_weights_file(f)
        with pytest.raises(errors.InteropError, match="cannot be read"):  # config.init_from reads the same way
            initialize_encoder(enc, f)
        rc, _, err = run_tool("import_timm", ["--input", f, "--out", tmp_path / f"o_{f.stem}"], capsys)
        assert_one_paragraph_error(rc, err)
        assert f.name in err and "cannot be read" in err
    # an export folder whose weights are truncated, or whose config.json is not JSON
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(files[0].read_bytes())
    (folder / "config.json").write_text("{}")
    rc, _, err = run_tool("import_timm", ["--input", folder, "--out", tmp_path / "o_folder"], capsys)
    assert_one_paragraph_error(rc, err)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(errors.InteropError, match="not readable JSON"):
        initialize_encoder(enc, folder)


# -- 5. preprocessing, model card, architecture name -----------------------------------------------------


def _real_size_radiograph():
    """A 1024 x 768 (H x W) 8-bit synthetic femur radiograph as a PIL image: real size, not square."""
    from PIL import Image

    from afm_jax.data import synthetic

    pixels = synthetic.render_femur(
        np.random.default_rng(3),
        label_name="aff",
        fracture_type="transverse",
        size=1024,
        view="AP",
        laterality="L",
        fracture_position=0.4,
    )
    img8 = (pixels[:, 128:896].astype(np.float64) / 65535 * 255).round().astype(np.uint8)
    return Image.fromarray(img8, mode="L"), img8


def _cosine(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("pool", ["cls", "avg"])
def test_exported_preprocessing_reproduces_our_evaluation_in_timm(pool, tmp_path, capsys):
    from timm.data import create_transform, resolve_data_config

    from afm_jax.data.transforms import apply_chain, eval_chain

    size = 64
    run = tmp_path / "run"  # a run whose own evaluation (probe) pools as `pool`
    cfg = default_config("mae", "mu/8")
    cfg.image_size = size
    cfg.probe.pool = pool
    enc = VisionTransformer("mu/8", img_size=size, depth=2, rngs=nnx.Rngs(1))
    randomise(enc, scale=0.1)
    cfg.model.depth = 2
    _, params, frozen = nnx.split(enc, nnx.Param, ...)
    ck = Checkpointer(run, async_save=False)
    ck.save(
        1,
        {
            "step": jnp.asarray(1),
            "params": {"encoder": params},
            "frozen": {"encoder": frozen},
            "opt_state": {},
            "rng": jnp.zeros(2, jnp.uint32),
            "extra": {},
        },
        None,
        {"config": to_json(cfg), "code_version": "test", "step": 1},
    )
    ck.close()
    out = tmp_path / "out"
    rc, _, err = run_tool("export_timm", ["--workdir", run, "--out", out, "--check"], capsys)
    assert rc == 0, err

    pil, img8 = _real_size_radiograph()
    ours_x = apply_chain(img8[..., None], eval_chain(size), None)
    ours = np.asarray(enc.pooled_features(jnp.asarray(ours_x[None]), pool=pool))[0]

    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    data_cfg = resolve_data_config({}, model=model)
    assert data_cfg["crop_mode"] == "squash" and data_cfg["crop_pct"] == 1.0
    x = create_transform(**data_cfg)(pil)
    assert tuple(x.shape) == (1, size, size)
    with torch.no_grad():
        theirs = model.forward_head(model.forward_features(x[None]), pre_logits=True)[0].numpy()
    cos = _cosine(ours, theirs)
    assert cos >= 0.999, cos
    # what the export said before (bicubic, short side resized then centre-cropped) is measurably not ours
    old = dict(data_cfg, interpolation="bicubic", crop_mode="center")
    with torch.no_grad():
        old_feats = model.forward_head(model.forward_features(create_transform(**old)(pil)[None]), pre_logits=True)[
            0
        ].numpy()
    print(
        f"pool={pool}: cosine ours vs timm transform {cos:.6f}, vs the old bicubic centre crop "
        f"{_cosine(ours, old_feats):.6f}, max abs diff {np.abs(ours - theirs).max():.3g}"
    )
    assert _cosine(ours, old_feats) < cos

    card = (out / "README.md").read_text()
    assert "squash" in card and f"squashed to {size} x {size}" in card
    assert "(x - [0.5]) / [0.25]" in card
    assert ('pool=\\"cls\\"' if pool == "cls" else 'pool=\\"avg\\"') in card.replace('"', '\\"')
    cfg_json = json.loads((out / "config.json").read_text())
    assert cfg_json["model_args"]["global_pool"] == ("token" if pool == "cls" else "avg")


def test_architecture_name_matches_the_real_size():
    def arch(variant, **kw):
        return timm_export.timm_architecture(
            nnx.eval_shape(lambda: VisionTransformer(variant, img_size=224, rngs=nnx.Rngs(0), **kw))
        )

    assert arch("S/16") == "vit_small_patch16_224"
    assert arch("B/16") == "vit_base_patch16_224"
    assert arch("L/16") == "vit_large_patch16_224"
    assert arch("B/8") == "vit_base_patch8_224"
    assert arch("S/14", num_reg_tokens=4) == "vit_small_patch14_reg4_dinov2"
    assert arch("L/14") == "vit_large_patch14_dinov2"
    # sizes no registered timm ViT has: the generic entry point (model_args carry every size) + a note
    for variant, kw in (("mu/8", {}), ("S/16", dict(depth=6)), ("B/16", dict(width=512, num_heads=8))):
        enc = nnx.eval_shape(lambda: VisionTransformer(variant, img_size=224, rngs=nnx.Rngs(0), **kw))
        assert timm_export.timm_architecture(enc) == timm_export.GENERIC_ARCHITECTURE
        cfg = timm_export.export_config(enc)
        assert "no registered timm ViT" in cfg["architecture_note"]
    # and each name's own timm defaults really are that size (built on the meta device: no memory)
    for variant, kw in (("S/16", {}), ("B/8", {}), ("L/16", {}), ("S/14", dict(num_reg_tokens=4)), ("L/14", {})):
        enc = nnx.eval_shape(lambda: VisionTransformer(variant, img_size=224, rngs=nnx.Rngs(0), **kw))
        with torch.device("meta"):
            tm = timm.create_model(timm_export.timm_architecture(enc), pretrained=False)
        assert (
            tm.embed_dim,
            len(tm.blocks),
            tm.blocks[0].attn.num_heads,
            tm.patch_embed.patch_size[0],
            tm.blocks[0].mlp.fc1.out_features,
            getattr(tm, "num_reg_tokens", 0),
        ) == (enc.embed_dim, len(enc.blocks), enc.num_heads, enc.patch_size, enc.mlp_dim, enc.num_reg_tokens)

"""tools/export_timm.py and tools/import_timm.py end to end: a real MAE checkpoint out to timm, a
DINOv2-layout file in, the built-in parity checks, `error: ...` + exit 2 on user mistakes, and
reading / init_from a checkpoint the trainer wrote."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_tool(name, argv, capsys):
    try:
        rc = load_tool(name).main([str(a) for a in argv])
    except SystemExit as e:  # a user error exits with status 2
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory, synthetic_dataset):
    """A real MAE run (2 steps of a mu/8 model): (workdir, the encoder params the trainer returned)."""
    from afm_jax.train import loop
    from afm_jax.train.defaults import default_config
    from afm_jax.train.tasks import get_task

    config = default_config("mae", "mu/8")
    config.data.path = str(synthetic_dataset)
    config.data.num_workers = 0
    config.image_size, config.batch_size, config.total_steps = 32, 8, 2
    config.mae.update(decoder_dim=32, decoder_depth=1, decoder_heads=2)
    config.log_every, config.image_every = 1, 0
    workdir = tmp_path_factory.mktemp("mae_export")
    result = loop.train(config, str(workdir), get_task("mae"))
    return workdir, jax.device_get(nnx.to_pure_dict(result.state.params))["encoder"]


def test_checkpoint_encoder_and_init_from_workdir_equal_the_trained_encoder(mae_run):
    from afm_jax.models.vit import VisionTransformer
    from afm_jax.train.checkpoint import read_encoder_checkpoint
    from afm_jax.train.init_from import initialize_encoder

    mae_workdir, trained_encoder = mae_run
    ck = read_encoder_checkpoint(mae_workdir)
    assert ck.step == 2 and ck.weights == "student"
    got = nnx.to_pure_dict(nnx.state(ck.encoder, nnx.Param))
    for (path, a), (_, b) in zip(
        jax.tree_util.tree_flatten_with_path(trained_encoder)[0],
        jax.tree_util.tree_flatten_with_path(got)[0],
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))
    # init_from the workdir into an encoder at another resolution (pos-embed resampled on import)
    target = VisionTransformer("mu/8", img_size=48, rngs=nnx.Rngs(5))
    report = initialize_encoder(target, mae_workdir)
    assert report["source"] == "checkpoint" and report["step"] == 2
    assert any("4x4 -> 6x6" in a for a in report["adapted"])
    np.testing.assert_array_equal(
        np.asarray(target.blocks[0].mlp.fc1.kernel[...]), np.asarray(ck.encoder.blocks[0].mlp.fc1.kernel[...])
    )
    x = np.random.default_rng(0).random((2, 48, 48, 1), dtype=np.float32)
    forward = nnx.jit(lambda m, x: m(x))
    np.testing.assert_allclose(np.asarray(forward(target, x)), np.asarray(forward(ck.encoder, x)), atol=1e-5)


def test_export_tool_writes_a_checked_timm_model_and_card(mae_run, synthetic_dataset, tmp_path, capsys):
    mae_workdir, _ = mae_run
    out = tmp_path / "export"
    rc, stdout, err = run_tool("export_timm", ["--workdir", mae_workdir, "--out", out, "--check"], capsys)
    assert rc == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["step"] == 2 and summary["weights"] == "student"
    assert set(summary["parity"]) == {"32x32", "48x48"} and summary["max_abs_diff"] < 1e-4
    config = json.loads((out / "config.json").read_text())
    assert config["model_args"]["in_chans"] == 1 and config["model_args"]["num_classes"] == 0
    assert config["pretrained_cfg"]["mean"] == [0.5] and config["afm_jax"]["method"] == "mae"
    assert config["afm_jax"]["preprocessing"]  # the synthetic set's generation parameters
    card = (out / "README.md").read_text()
    assert "Steps**: 2" in card and "load_state_dict" in card and "local-dir:" in card
    for f in out.iterdir():  # the data location never leaves the machine
        assert str(synthetic_dataset) not in f.read_bytes().decode("latin-1"), f.name
    # an existing export is replaced only with --overwrite
    before = (out / "model.safetensors").stat().st_mtime_ns
    rc, _, err = run_tool("export_timm", ["--workdir", mae_workdir, "--out", out, "--no_parity"], capsys)
    assert rc == 2 and err.startswith("error:") and "--overwrite" in err and "Traceback" not in err
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    rc, _, err = run_tool("export_timm", ["--workdir", mae_workdir, "--out", out, "--no_parity", "--overwrite"], capsys)
    assert rc == 0, err
    # --step picks a step; a step that does not exist is a user error
    rc, _, err = run_tool("export_timm", ["--workdir", mae_workdir, "--out", tmp_path / "x", "--step", "7"], capsys)
    assert rc == 2 and err.startswith("error: No checkpoint of step 7") and "[2]" in err


def test_export_tool_user_errors(mae_run, tmp_path, capsys):
    mae_workdir, _ = mae_run
    rc, _, err = run_tool("export_timm", ["--workdir", tmp_path / "missing", "--out", tmp_path / "out"], capsys)
    assert rc == 2 and err.startswith("error:") and "does not exist" in err
    rc, _, err = run_tool(
        "export_timm", ["--workdir", mae_workdir, "--out", tmp_path / "out", "--weights", "teacher"], capsys
    )
    assert rc == 2 and "no teacher" in err and "--weights student" in err
    (tmp_path / "a_file").write_text("x")
    rc, _, err = run_tool("export_timm", ["--workdir", mae_workdir, "--out", tmp_path / "a_file"], capsys)
    assert rc == 2 and "is a file" in err
    rc, _, err = run_tool("export_timm", ["--workdir", mae_workdir], capsys)
    assert rc == 2 and err.startswith("error:") and "--out" in err


def test_import_tool_converts_dinov2_and_init_from_its_output(tmp_path, capsys):
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    from afm_jax.models.vit import VisionTransformer
    from afm_jax.train.init_from import initialize_encoder

    torch.manual_seed(0)
    tm = TimmViT(
        img_size=70,
        patch_size=14,
        embed_dim=48,
        depth=2,
        num_heads=3,
        reg_tokens=4,
        no_embed_class=True,
        init_values=0.3,
        num_classes=5,
        in_chans=3,
    ).eval()
    with torch.no_grad():
        for p in tm.parameters():
            p.normal_(std=0.1)
    sd = dict(tm.state_dict())
    p0 = torch.randn(1, 1, 48) * 0.1  # the DINOv2 reference layout (what Meta's .pth files hold)
    sd["register_tokens"], sd["mask_token"] = sd.pop("reg_token"), torch.zeros(1, 48)
    sd["cls_token"], sd["pos_embed"] = sd["cls_token"] - p0, torch.cat([p0, sd["pos_embed"]], 1)
    src = tmp_path / "dinov2_reg.pth"
    torch.save({"teacher": {"backbone." + k: v for k, v in sd.items()}, "epoch": 1}, src)

    out = tmp_path / "imported"
    rc, stdout, err = run_tool(
        "import_timm", ["--input", src, "--out", out, "--image_size", "56", "--num_heads", "3", "--check"], capsys
    )
    assert rc == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["layout"] == "dinov2-registers" and summary["max_abs_diff"] < 1e-4
    assert any("summed" in a for a in summary["adapted"]) and any("5x5 -> 4x4" in a for a in summary["adapted"])
    assert "--config.model.no_embed_class=True" in summary["config_overrides"]

    # the printed config overrides build an encoder that init_from fills from the output folder
    kw = dict(width=48, depth=2, num_heads=3, mlp_dim=192)
    a = VisionTransformer("B/14", img_size=56, num_reg_tokens=4, no_embed_class=True, rngs=nnx.Rngs(1), **kw)
    b = VisionTransformer("B/14", img_size=56, num_reg_tokens=4, no_embed_class=True, rngs=nnx.Rngs(2), **kw)
    report = initialize_encoder(a, out)
    assert report["source"] == "export" and not report["adapted"]
    initialize_encoder(b, src)  # straight from the .pth: the same encoder
    x = np.random.default_rng(0).random((2, 56, 56, 1), dtype=np.float32)
    np.testing.assert_allclose(np.asarray(a(x)), np.asarray(b(x)), atol=1e-6)

    rc, _, err = run_tool("import_timm", ["--input", src, "--out", tmp_path / "o2", "--image_size", "50"], capsys)
    assert rc == 2 and "multiple of the source's patch size 14" in err
    # an existing output is replaced only with --overwrite; the source's own folder never
    before = (out / "model.safetensors").stat().st_mtime_ns
    rc, _, err = run_tool(
        "import_timm", ["--input", src, "--out", out, "--image_size", "56", "--num_heads", "3", "--no_parity"], capsys
    )
    assert rc == 2 and "--overwrite" in err and (out / "model.safetensors").stat().st_mtime_ns == before
    rc, _, err = run_tool(
        "import_timm",
        ["--input", src, "--out", out, "--image_size", "56", "--num_heads", "3", "--no_parity", "--overwrite"],
        capsys,
    )
    assert rc == 0, err
    rc, _, err = run_tool(
        "import_timm", ["--input", out, "--out", out, "--image_size", "56", "--no_parity", "--overwrite"], capsys
    )
    assert rc == 2 and "holds the source" in err and (out / "model.safetensors").is_file()
    rc, _, err = run_tool(
        "import_timm", ["--input", src, "--out", tmp_path, "--image_size", "56", "--no_parity"], capsys
    )
    assert rc == 2 and "holds the source" in err and src.is_file()


def test_tools_run_as_scripts():
    for tool in ("export_timm", "import_timm"):
        done = subprocess.run(
            [sys.executable, str(ROOT / "tools" / f"{tool}.py"), "--help"], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0 and "--check" in done.stdout, done.stderr


def test_export_check_passes_on_a_bf16_run_of_configs_mae_vits(synthetic_dataset, tmp_path, capsys):
    """Issue 16's "done means": a (tiny, 2-step, 32 px) bf16 run of configs/mae_vits.py exports with --check."""
    workdir = tmp_path / "mae_vits"
    cmd = [
        sys.executable,
        "-m",
        "afm_jax.main",
        "--config",
        str(ROOT / "configs" / "mae_vits.py"),
        "--workdir",
        str(workdir),
        f"--config.data.path={synthetic_dataset}",
        "--config.data.num_workers=0",
        "--config.image_size=32",
        "--config.batch_size=8",
        "--config.total_steps=2",
        "--config.log_every=1",
        "--config.image_every=0",
    ]
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=900, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rc, stdout, err = run_tool("export_timm", ["--workdir", workdir, "--out", tmp_path / "export", "--check"], capsys)
    assert rc == 0, err
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["compute_dtype"] == "bfloat16" and summary["architecture"] == "vit_small_patch16_224"
    assert summary["max_abs_diff"] < 1e-4
    print(f"mae_vits bf16: fp32 parity {summary['parity']}, bf16 compute {summary['compute_parity']}")

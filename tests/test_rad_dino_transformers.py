"""The RAD-DINO layout (Hugging Face ``transformers.Dinov2Model``) against the real transformers model
class with random weights: a ``save_pretrained`` folder loads with ``config.init_from`` and through
``tools/import_timm.py``, and our encoder's tokens equal ``Dinov2Model``'s ``last_hidden_state``."""

import importlib.util
import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

from afm_jax.models.vit import VisionTransformer  # noqa: E402
from afm_jax.train.init_from import initialize_encoder  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def hf_dinov2(tmp_path):
    config = transformers.Dinov2Config(
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=192,
        image_size=42,
        patch_size=14,
        num_channels=3,
        layerscale_value=0.5,
        layer_norm_eps=1e-6,
    )
    model = transformers.Dinov2Model(config).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # every parameter random: a swapped query/key/value cannot hide
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith(("norm1.weight", "norm2.weight", "layernorm.weight")) else 0.0
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + base)
    folder = tmp_path / "rad-dino"
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5307, 0.5307, 0.5307], "image_std": [0.2583, 0.2583, 0.2583]})
    )
    return model, folder


def test_hf_dinov2_model_folder_matches_transformers(tmp_path, capsys):
    model, folder = hf_dinov2(tmp_path)
    assert (folder / "model.safetensors").is_file() and json.loads((folder / "config.json").read_text())[
        "model_type"
    ] == "dinov2"
    ours = VisionTransformer(
        "mu/14",
        img_size=42,
        width=48,
        depth=2,
        num_heads=3,
        in_chans=3,
        pos_embed="learned",
        layer_scale_init=1.0,
        rngs=nnx.Rngs(0),
    )
    report = initialize_encoder(ours, folder)
    assert report["layout"] == "huggingface-dinov2" and report["source"] == "export"
    assert any("normalised inputs" in w for w in report["warnings"])  # RAD-DINO's mean/std differ from ours
    x = np.random.default_rng(1).random((2, 42, 42, 3), dtype=np.float32)
    mine = np.asarray(nnx.jit(lambda m, x: m(x))(ours, jnp.asarray(x)))
    xn = (x - np.asarray(ours.input_mean, np.float32)) / np.asarray(ours.input_std, np.float32)
    with torch.no_grad():
        ref = model(pixel_values=torch.from_numpy(xn.transpose(0, 3, 1, 2).copy())).last_hidden_state.numpy()
    diff = np.abs(mine - ref).max()
    assert diff < 1e-4, diff

    spec = importlib.util.spec_from_file_location("import_timm", ROOT / "tools" / "import_timm.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    rc = tool.main([f"--input={folder}", f"--out={tmp_path / 'out'}", "--image_size=42", "--check"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["layout"] == "huggingface-dinov2" and summary["num_heads"] == 3 and summary["max_abs_diff"] < 1e-4
    print(f"RAD-DINO layout vs transformers.Dinov2Model: {diff:.2e}; import tool parity {summary['max_abs_diff']:.2e}")

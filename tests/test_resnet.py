"""Flax ResNet-50 vs torchvision's resnet50 (eval mode): same pooled features from the same weights.

Weights are random (``weights=None``) with randomised BatchNorm statistics and affine parameters,
so a mix-up of mean/var/scale/bias or of a conv transpose cannot hide; nothing is downloaded.
"""

import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
from safetensors.torch import save_file  # noqa: E402

from afm_jax.errors import InteropError  # noqa: E402
from afm_jax.interop.torchvision_resnet import (  # noqa: E402
    load_torchvision_resnet,
    resnet50_from_torchvision,  # noqa: E402
    resnet_from_file,
)
from afm_jax.models.resnet import ResNet, resnet50  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope="module")
def torch_resnet50():
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn_like(b) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand_like(b) + 0.5)
        for name, p in model.named_parameters():
            if ".bn" in name or name.startswith("bn") or "downsample.1" in name:
                p.copy_(torch.rand_like(p) * 0.3 + 0.2 if name.endswith("weight") else torch.randn_like(p) * 0.1)
    return model


def torch_features(model, x_normalised_nhwc):
    head, model.fc = model.fc, torch.nn.Identity()
    try:
        with torch.no_grad():
            return model(torch.from_numpy(x_normalised_nhwc.transpose(0, 3, 1, 2).copy())).numpy()
    finally:
        model.fc = head


def ours_features(model, x):
    return np.asarray(nnx.jit(lambda m, x: m.forward_features(x))(model, x))


def abstract_resnet50(**kw):
    return nnx.eval_shape(lambda: resnet50(rngs=nnx.Rngs(0), **kw))


def test_torchvision_resnet50_matches_torch_eval_mode(torch_resnet50, tmp_path):
    ours = abstract_resnet50(in_chans=3)
    report = load_torchvision_resnet(ours, torch_resnet50.state_dict())
    assert report["loaded"] == 265 and "fc.weight" in report["dropped"] and not report["adapted"]
    x = np.random.default_rng(0).random((2, 64, 64, 3), dtype=np.float32)
    xn = (x - np.asarray(ours.input_mean, np.float32)) / np.asarray(ours.input_std, np.float32)
    ref = torch_features(torch_resnet50, xn)
    got = ours_features(ours, x)
    assert got.shape == (2, 2048) and ref.std() > 0.05
    assert np.abs(got - ref).max() < TOL


def test_grey_stem_sequential_layout_and_files(torch_resnet50, tmp_path):
    """RGB stem summed to one channel == torch on the grey image replicated to RGB; the
    ``Sequential(children)`` layout of RadImageNet ports and .pth/.safetensors files load the same."""
    sd = torch_resnet50.state_dict()
    seq_names = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}
    seq = {}
    for k, v in sd.items():
        head, _, tail = k.partition(".")
        if head in seq_names:
            seq[f"backbone.{seq_names[head]}.{tail}"] = v
    torch.save({"state_dict": seq}, tmp_path / "radimagenet_resnet50.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "imagenet_resnet50.safetensors"))

    x = np.random.default_rng(1).random((2, 64, 64, 1), dtype=np.float32)
    model, report = resnet_from_file(tmp_path / "radimagenet_resnet50.pth", in_chans=1)
    assert any("summed" in a for a in report["adapted"]) and "fc.weight" not in report["dropped"]
    outs = [
        ours_features(model, x),
        ours_features(resnet50_from_torchvision(str(tmp_path / "imagenet_resnet50.safetensors")), x),
    ]
    np.testing.assert_array_equal(outs[0], outs[1])
    xn = (x - model.input_mean[0]) / model.input_std[0]
    ref = torch_features(torch_resnet50, np.repeat(xn, 3, axis=-1))
    assert np.abs(outs[0] - ref).max() < TOL


def test_resnet_errors_name_the_key(torch_resnet50, tmp_path):
    sd = {k: v for k, v in torch_resnet50.state_dict().items() if k != "layer3.1.bn2.running_var"}
    with pytest.raises(InteropError, match="'layer3.1.bn2.running_var' is missing"):
        load_torchvision_resnet(abstract_resnet50(in_chans=3), sd)
    with pytest.raises(InteropError, match="No ResNet found"):
        load_torchvision_resnet(abstract_resnet50(), {"patch_embed.proj.weight": np.zeros((4, 3, 16, 16))})
    small = nnx.eval_shape(lambda: ResNet((1, 1, 1, 1), in_chans=3, rngs=nnx.Rngs(0)))
    with pytest.raises(InteropError, match="no place in the model"):
        load_torchvision_resnet(small, torch_resnet50.state_dict())
    with pytest.raises(ValueError, match="class token"):
        small.pooled_features(np.zeros((1, 32, 32, 3), np.float32), pool="cls")

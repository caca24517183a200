"""The PyTorch peers of bench/torch_peers.py do the same maths as our steps (so `vs_torch` compares
like with like): the torch MAE loss equals our MAE loss with the same weights and mask noise; the
torch DINO loss and centre update equal a numpy port of DINO's `DINOLoss` (main_dino.py); the
multi-crop wrapper runs one backbone pass per resolution."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

REPO = Path(__file__).resolve().parents[1]


def _peers():
    spec = importlib.util.spec_from_file_location("_torch_peers", REPO / "bench" / "torch_peers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


peers = _peers()


def _tiny_mae_config():
    from afm_jax.train.defaults import default_config

    config = default_config("mae", "mu/8")
    config.image_size = 32
    config.mae.update(decoder_dim=32, decoder_depth=2, decoder_heads=2)
    return config


def test_torch_mae_loss_equals_ours_with_copied_weights():
    import jax
    from flax import nnx

    from afm_jax.interop.timm import encoder_state_dict, flat_to_timm_state_dict
    from afm_jax.models import factory
    from afm_jax.train.tasks import get_task

    config = _tiny_mae_config()
    ours = get_task("mae").build_model(config, nnx.Rngs(3))
    flat = {
        ".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(ours)) if p[0] != "encoder"
    }
    state = {f"encoder.{k}": v for k, v in encoder_state_dict(ours.encoder).items()}
    state.update(flat_to_timm_state_dict(flat))

    m = config.mae
    theirs = peers.TorchMAE(
        peers.timm_vit(factory.vit_dims(config.model), 32, fixed_sincos=True),
        mask_ratio=m.mask_ratio,
        decoder_dim=m.decoder_dim,
        decoder_depth=m.decoder_depth,
        decoder_heads=m.decoder_heads,
        norm_pix_loss=True,
    )
    # The peer's own fixed tables (used in the benchmark) are the same sin-cos tables as ours.
    np.testing.assert_allclose(theirs.decoder_pos_embed.numpy(), state["decoder_pos_embed"], atol=1e-6)
    np.testing.assert_allclose(theirs.encoder.pos_embed.detach().numpy(), state["encoder.pos_embed"], atol=1e-6)
    theirs.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=True)

    images = np.random.default_rng(0).random((3, 32, 32, 1), dtype=np.float32)
    key = jax.random.key(7)
    out = ours(jax.numpy.asarray(images), key=key)
    noise = np.asarray(jax.random.uniform(key, (3, 16)))  # our random_masking's noise
    with torch.no_grad():
        loss, pred, mask = theirs(torch.from_numpy(images.transpose(0, 3, 1, 2)), noise=torch.from_numpy(noise))
    np.testing.assert_array_equal(mask.numpy(), np.asarray(out["mask"]))
    np.testing.assert_allclose(pred.numpy(), np.asarray(out["pred"]), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(float(loss), float(out["loss"]), rtol=1e-5)


def _numpy_dino_loss(student, teacher, center, ncrops, student_temp, teacher_temp, momentum):
    """DINOLoss.forward + update_center of facebookresearch/dino main_dino.py, in numpy."""

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    s = np.split(student / student_temp, ncrops)
    t = np.exp(log_softmax((teacher - center) / teacher_temp))
    t = np.split(t, 2)
    terms = [
        np.mean(np.sum(-q * log_softmax(s[v]), axis=-1)) for iq, q in enumerate(t) for v in range(ncrops) if v != iq
    ]
    new_center = center * momentum + teacher.mean(0, keepdims=True) * (1 - momentum)
    return np.mean(terms), new_center


def test_torch_dino_loss_and_centre_equal_numpy_port():
    rng = np.random.default_rng(1)
    b, k, ncrops = 3, 50, 5
    student = rng.normal(size=(ncrops * b, k)).astype(np.float64)
    teacher = rng.normal(size=(2 * b, k)).astype(np.float64)
    center = rng.normal(size=(1, k)) * 0.1
    loss_fn = peers.DINOLoss(k, ncrops, student_temp=0.1, center_momentum=0.9).double()
    loss_fn.center = torch.from_numpy(center.copy())
    got = loss_fn(torch.from_numpy(student), torch.from_numpy(teacher), teacher_temp=0.04)
    want, want_center = _numpy_dino_loss(student, teacher, center, ncrops, 0.1, 0.04, 0.9)
    np.testing.assert_allclose(float(got), want, rtol=1e-10)
    np.testing.assert_allclose(loss_fn.center.numpy(), want_center, rtol=1e-10)


def test_multicrop_wrapper_one_backbone_pass_per_resolution_and_weight_norm_head():
    from afm_jax.models.vit import parse_variant

    vit = peers.timm_vit(parse_variant("mu/8"), 32, dynamic_img_size=True)
    head = peers.DINOHead(32, 40, hidden_dim=16, bottleneck_dim=8, nlayers=3)
    wrapper = peers.MultiCropWrapper(vit, head).eval()
    calls = []
    vit.register_forward_hook(lambda mod, inp, out: calls.append(tuple(inp[0].shape)))
    rng = np.random.default_rng(2)
    crops = [torch.from_numpy(rng.random((2, 1, s, s), dtype=np.float32)) for s in (32, 32, 16, 16, 16)]
    with torch.no_grad():
        out = wrapper(crops)
        one_by_one = torch.cat([head(vit(wrapper.input_norm(c))) for c in crops])
    assert calls[:2] == [(4, 1, 32, 32), (6, 1, 16, 16)]
    np.testing.assert_allclose(out.numpy(), one_by_one.numpy(), rtol=1e-5, atol=1e-6)
    # norm_last_layer: every prototype has unit norm and its gain does not train (DINO vision_transformer.py).
    w = head.last_layer.weight.detach().numpy()
    np.testing.assert_allclose(np.linalg.norm(w, axis=1), 1.0, rtol=1e-5)
    assert not head.last_layer.parametrizations.weight.original0.requires_grad


@pytest.mark.parametrize("task", ["mae", "dino"])
def test_our_step_and_the_torch_peer_do_the_same_matmul_work(task):
    """`torch_mfu` in the bench divides XLA's FLOPs of our step by the peer's time: that holds only if
    the peer multiplies as much as we do. Our whole train step (forward, backward; jaxpr count) and
    the peer's (FlopCounterMode) agree to the FLOP, once two tiny products that only we write as matmuls
    are added to the peer's count; e.g. a peer whose teacher also saw the local crops, or our step
    running the head twice on the globals, would fail here."""
    import types

    from afm_jax.train import assembly, sharding, throughput
    from afm_jax.train.defaults import default_config
    from afm_jax.train.tasks import get_task

    config = default_config(task, "mu/8")
    config.image_size, config.batch_size = 32, 2
    if task == "mae":
        config.mae.update(decoder_dim=32, decoder_depth=2, decoder_heads=2)
    else:
        config.multicrop.update(local_size=16, num_local=3)
        config.dino.update(out_dim=96, hidden_dim=48, bottleneck_dim=16)
    t = get_task(task)
    t.setup(config, workdir="", total_steps=10, steps_per_epoch=1)
    mesh = sharding.make_mesh(config.mesh)
    parts = assembly.assemble(config, t, mesh, total_steps=10, warmup_steps=1)
    batch = sharding.global_batch(mesh, t.example_batch(config, config.batch_size, seed=1))
    ours = throughput.matmul_flops(parts.jit_step, parts.initial_state(), batch)

    timer = types.SimpleNamespace(add=lambda *a: None)
    theirs = peers.peer_for(config, timer, threads=1).count_matmul_flops()
    extra = 0  # products we compute as matmuls where the peer uses ops FlopCounterMode does not count
    if task == "dino":
        b, views, k, d = config.batch_size, 2 + 3, 96, 32
        # the cross-entropy of every (teacher view, student view) pair as one einsum over the K
        # prototypes, forward and its gradient for the student (the peer: sum(-q * log_softmax))
        extra += 2 * (2 * 2 * views * b * k)
        # the student's local crops resample the 4x4 position table to 2x2 separably (rows: 2x4 on
        # 4·D, then columns: 2x4 on 2·D), forward and backward (the peer: F.interpolate)
        extra += 2 * (2 * 2 * 4 * 4 * d + 2 * 2 * 4 * 2 * d)
    assert theirs > 0 and ours == theirs + extra, (ours, theirs, extra)

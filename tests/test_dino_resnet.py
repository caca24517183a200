"""DINO with a ResNet backbone (`model.arch="resnet50"`): train-mode BatchNorm against torch, the step
writing non-Param state back, LARS against DINO's formula, init_from a torchvision file, exact resume.

ResNets here are `resnet_layers=(1, 1, 1, 1)` (a ResNet-50 with one block per stage) except where a
torchvision ``resnet50`` file is loaded; images are 32-64 px; nothing is downloaded.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from dino_helpers import flat_state, setup_dino_task
from flax import nnx

from afm_jax.errors import ConfigError
from afm_jax.train import assembly, loop, sharding
from afm_jax.train import state as state_lib
from afm_jax.train import step as step_lib
from afm_jax.train.defaults import default_config
from afm_jax.train.tasks import get_task

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")


def _resnet_config(path="", **dino):
    config = default_config("dino", "mu/8")
    config.data.path = os.fspath(path)
    config.data.num_workers = 0
    config.model.update(arch="resnet50", resnet_layers=(1, 1, 1, 1), drop_path_rate=0.0)
    config.image_size = 64
    config.batch_size = 4
    config.total_steps = 4
    config.multicrop.update(num_local=2, local_size=32)
    config.dino.update(**{**dict(out_dim=64, hidden_dim=64, bottleneck_dim=32, koleo_weight=0.1), **dino})
    config.dino.knn.pool = "avg"
    config.optim.update(warmup_epochs=0.5, base_lr=1e-3)
    config.log_every = 1
    config.checkpoint_every = 100
    return config


def _crops_first(x):
    return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


# ─── BatchNorm in train mode vs torch ───────────────────────────────────────────────────────────


def test_train_mode_batchnorm_matches_torch_train_mode():
    """Batch statistics in the forward pass and running averages after it, as torch's train mode
    (flax's running variance uses the biased batch variance: torch's times (n-1)/n); probes and kNN
    (`pooled_features`) read eval-mode features whatever mode the model was built in."""
    from afm_jax.interop.torchvision_resnet import load_torchvision_resnet
    from afm_jax.models.resnet import ResNet

    torch.manual_seed(0)
    ref = torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, [1, 1, 1, 1])
    ref.fc = torch.nn.Identity()
    ours = nnx.eval_shape(lambda: ResNet((1, 1, 1, 1), in_chans=3, use_running_average=False, rngs=nnx.Rngs(0)))
    # clones: numpy views of torch tensors can end up aliased by jax arrays on CPU, and torch's
    # forward below updates its running statistics in place
    load_torchvision_resnet(ours, {k: v.clone() for k, v in ref.state_dict().items()})
    graphdef, variables = nnx.split(ours)

    @jax.jit
    def forward(variables, x):
        model = nnx.merge(graphdef, variables, copy=True)
        eval_features = model.pooled_features(x)  # running averages: unchanged by this
        train_features = model.forward_features(x)  # batch statistics: updates them
        return eval_features, train_features, nnx.state(model, nnx.BatchStat)

    x = np.random.default_rng(0).random((2, 64, 64, 3), dtype=np.float32)
    xn = (x - np.asarray(ours.input_mean, np.float32)) / np.asarray(ours.input_std, np.float32)
    xt = torch.from_numpy(xn.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        want_eval = ref.eval()(xt).numpy()
        want_train = ref.train()(xt).numpy()
    got_eval, got_train, stats = forward(variables, x)
    assert want_train.std() > 0.05 and np.abs(np.asarray(got_train) - want_train).max() < 1e-4
    assert np.abs(np.asarray(got_eval) - want_eval).max() < 1e-4
    assert np.abs(want_eval - want_train).max() > 1e-2  # the two modes do differ
    stats = flat_state(stats)
    # stem BN sees 2 × 32 × 32 values per channel; layer4's last BN 2 × 2 × 2
    for name, n in (("bn1", 2 * 32 * 32), ("layer4.0.bn3", 2 * 2 * 2)):
        t_bn, key = ref.get_submodule(name), name.replace(".", "/")
        np.testing.assert_allclose(stats[f"{key}/mean"], t_bn.running_mean.numpy(), rtol=1e-4, atol=1e-5)
        unbiased = (t_bn.running_var.numpy() - 0.9) / 0.1
        np.testing.assert_allclose(stats[f"{key}/var"], 0.9 + 0.1 * unbiased * (n - 1) / n, rtol=1e-4, atol=1e-5)
        assert np.abs(t_bn.running_mean.numpy()).max() > 1e-3  # the statistics did move


# ─── The step writes non-Param state back ───────────────────────────────────────────────────────


def _state_and_step(config, task, accum_steps):
    """A fresh train state (initialised under jit: eager init compiles every op) and the jitted step."""
    abstract = nnx.eval_shape(lambda: task.build_model(config, nnx.Rngs(0)))
    tx = task.make_optimizer(config, optax.constant_schedule(1e-3), nnx.state(abstract, nnx.Param))

    def create():
        model = task.build_model(config, nnx.Rngs(0))
        return state_lib.create_train_state(model, tx, 1, task.init_extra(model))[1]

    graphdef = nnx.graphdef(abstract)
    state = jax.jit(create)()
    train_step = step_lib.make_train_step(
        graphdef, task.loss, tx, optax.constant_schedule(1e-3), update_extra=task.update_extra, accum_steps=accum_steps
    )
    return graphdef, state, jax.jit(train_step)


def test_step_carries_batchnorm_statistics_of_student_and_teacher():
    """Accumulation over 2 micro-batches: the student's running averages are those of its two
    train-mode forwards in order; the teacher's are the mean of its per-micro-batch updates."""
    config = _resnet_config(koleo_weight=0.0)
    config.image_size = 32
    config.multicrop.num_local = 0
    task = setup_dino_task(config)
    graphdef, state, train_step = _state_and_step(config, task, accum_steps=2)
    batch = {k: jnp.asarray(v) for k, v in task.example_batch(config, 4, seed=0).items()}
    new, metrics = train_step(state, batch)
    assert np.isfinite(float(metrics["loss"]))

    @jax.jit
    def forward(variables, images):  # one train-mode backbone pass -> its BatchNorm state
        model = nnx.merge(graphdef, variables, copy=True)
        model.backbone(images)
        return nnx.state(model)

    student = nnx.state(nnx.merge(graphdef, state.params, state.frozen))
    teacher = nnx.state(
        task.teacher_of(
            nnx.merge(graphdef, state.params, state.frozen), state.extra["teacher"], state.extra["teacher_stats"]
        )
    )
    teacher_updates = []
    for i in range(2):  # micro-batch i = examples i, i+2 (step.split_micro_batches)
        images = _crops_first(batch["global"][i::2])
        teacher_updates.append(nnx.state(nnx.merge(graphdef, forward(teacher, images)), nnx.BatchStat))
        student = forward(student, images)
    want_student = flat_state(nnx.state(nnx.merge(graphdef, student), nnx.BatchStat))
    got_student = flat_state(nnx.state(nnx.merge(graphdef, new.params, new.frozen), nnx.BatchStat))
    assert want_student.keys() == got_student.keys() and len(want_student) == 2 * 17  # mean + var of 17 BNs
    before = flat_state(nnx.state(nnx.merge(graphdef, state.params, state.frozen), nnx.BatchStat))
    for k in want_student:
        np.testing.assert_allclose(got_student[k], want_student[k], rtol=1e-4, atol=1e-5, err_msg=k)
        assert not np.allclose(got_student[k], before[k]), k
    want_teacher = flat_state(jax.tree.map(lambda a, b: (a + b) / 2, *teacher_updates))
    got_teacher = flat_state(new.extra["teacher_stats"])
    for k in want_teacher:
        np.testing.assert_allclose(got_teacher[k], want_teacher[k], rtol=1e-4, atol=1e-5, err_msg=k)
    # the teacher's statistics are its own: they differ from the student's
    assert not np.allclose(got_teacher["encoder/bn1/mean"], got_student["encoder/bn1/mean"])


def test_step_keeps_fixed_position_embeddings_bit_identical():
    config = default_config("dino", "mu/8")
    config.model.update(pos_embed="sincos", drop_path_rate=0.0)
    config.image_size = 32
    config.multicrop.num_local = 0
    config.dino.update(out_dim=32, hidden_dim=32, bottleneck_dim=16)
    task = setup_dino_task(config)
    _, state, train_step = _state_and_step(config, task, accum_steps=3)
    before = flat_state(jax.device_get(state.frozen))
    assert "encoder/pos_embed" in before
    batch = {k: jnp.asarray(v) for k, v in task.example_batch(config, 6, seed=0).items()}
    new, metrics = train_step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    after = flat_state(jax.device_get(new.frozen))
    assert after.keys() == before.keys()
    for k in before:
        assert after[k].dtype == before[k].dtype and np.array_equal(after[k], before[k]), k
    assert not np.array_equal(
        flat_state(new.params)["encoder/patch_embed/proj/kernel"],
        flat_state(state.params)["encoder/patch_embed/proj/kernel"],
    )


# ─── LARS ───────────────────────────────────────────────────────────────────────────────────────


def test_lars_matches_dinos_update_rule():
    """DINO utils.LARS: 2-D+ tensors get g + wd·p scaled by eta·||p||/||g + wd·p||; 1-D tensors
    neither; then momentum 0.9 and p -= lr·mu."""
    config = _resnet_config(optimizer="lars", weight_decay_end=0.1, freeze_last_layer_epochs=0.0)
    config.optim.update(weight_decay=0.1, grad_clip_norm=0.0)
    task = setup_dino_task(config)
    rng = np.random.default_rng(0)
    params = {
        "conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)},
        "bn": {"scale": jnp.asarray(rng.normal(size=(4,)), jnp.float32)},
    }
    lr, eta, wd = 0.5, 0.001, 0.1
    tx = task.make_optimizer(config, optax.constant_schedule(lr), params)
    opt_state = tx.init(params)
    ref = {k: {n: np.asarray(v, np.float64) for n, v in d.items()} for k, d in params.items()}
    mu = {k: {n: np.zeros_like(v) for n, v in d.items()} for k, d in ref.items()}
    for _ in range(3):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        for k, d in ref.items():
            for n, p in d.items():
                g = np.asarray(grads[k][n], np.float64)
                if p.ndim != 1:
                    g = g + wd * p
                    g = g * (eta * np.linalg.norm(p) / np.linalg.norm(g))
                mu[k][n] = 0.9 * mu[k][n] + g
                d[n] = p - lr * mu[k][n]
    for k, d in ref.items():
        for n, p in d.items():
            np.testing.assert_allclose(np.asarray(params[k][n]), p, rtol=1e-5, atol=1e-6, err_msg=f"{k}/{n}")


# ─── init_from a torchvision file ───────────────────────────────────────────────────────────────


def test_init_from_torchvision_resnet50_gives_torch_features(tmp_path):
    """A torchvision resnet50 state dict saved with torch.save: the student and the teacher of the
    initial train state give torch's eval-mode features (RGB stem summed to one grey channel)."""
    torch.manual_seed(0)
    ref = torchvision.models.resnet50(weights=None).eval()
    with torch.no_grad():  # random BN statistics and affine parameters, so no mix-up can hide
        for name, b in ref.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn_like(b) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand_like(b) + 0.5)
        for name, p in ref.named_parameters():
            if ".bn" in name or name.startswith("bn") or "downsample.1" in name:
                p.copy_(torch.rand_like(p) * 0.3 + 0.2 if name.endswith("weight") else torch.randn_like(p) * 0.1)
    path = tmp_path / "resnet50.pth"
    torch.save(ref.state_dict(), path)
    config = _resnet_config(koleo_weight=0.0)
    config.model.resnet_layers = (3, 4, 6, 3)
    config.init_from = str(path)
    task = setup_dino_task(config)
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    parts = assembly.assemble(config, task, mesh, total_steps=10, warmup_steps=0)
    state = jax.device_get(parts.initial_state())
    assert "summed into 1" in parts.init_report["summary"] and len(parts.init_report["loaded"]) == 265
    assert "fc.weight" in parts.init_report["dropped"] and "53 num_batches_tracked" in parts.init_report["summary"]

    x = np.random.default_rng(0).random((2, 64, 64, 1), dtype=np.float32)
    grey = (x - 0.449) / 0.226  # our grey normalisation, replicated to RGB for torch
    ref.fc = torch.nn.Identity()
    with torch.no_grad():
        want = ref(torch.from_numpy(np.repeat(grey, 3, axis=-1).transpose(0, 3, 1, 2).copy())).numpy()
    model = state_lib.merge_model(parts.graphdef, state)
    teacher = task.teacher_of(model, state.extra["teacher"], state.extra["teacher_stats"])
    gd_s, st_s = nnx.split(model.encoder)
    gd_t, st_t = nnx.split(teacher.encoder)
    features = jax.jit(lambda s, t, x: (nnx.merge(gd_s, s).pooled_features(x), nnx.merge(gd_t, t).pooled_features(x)))
    got_student, got_teacher = features(st_s, st_t, x)
    assert want.std() > 0.05
    assert np.abs(np.asarray(got_student) - want).max() < 1e-4
    assert np.abs(np.asarray(got_teacher) - want).max() < 1e-4


def test_init_from_a_folder_is_refused_for_a_resnet(tmp_path):
    from afm_jax.errors import InteropError
    from afm_jax.models.resnet import ResNet
    from afm_jax.train.init_from import initialize_encoder

    encoder = nnx.eval_shape(lambda: ResNet((1, 1, 1, 1), rngs=nnx.Rngs(0)))
    with pytest.raises(InteropError, match="torchvision-layout weights file"):
        initialize_encoder(encoder, tmp_path)


# ─── Config ─────────────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    "key,value",
    [
        ("dino.ibot.enabled", True),
        ("model.num_reg_tokens", 4),
        ("dino.knn.pool", "cls"),
        ("model.arch", "resnet18"),
        ("model.drop_path_rate", 0.1),
        ("image_size", 48),
        ("model.resnet_layers", (1, 1, 1)),
        ("dino.layer_decay", 0.9),
        ("dino.optimizer", "sgd"),
        ("multicrop.local_size", 48),
    ],
)
def test_options_a_resnet_cannot_honour_are_refused_naming_the_key(key, value):
    config = _resnet_config()
    section, _, leaf = key.rpartition(".")
    node = config
    for part in filter(None, section.split(".")):
        node = node[part]
    node[leaf] = value
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        get_task("dino").validate(config)


def test_the_radimagenet_config_validates():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "cfg", os.path.join(os.path.dirname(__file__), "..", "configs", "dino_resnet50_radimagenet.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    assert config.model.arch == "resnet50" and config.dino.optimizer == "lars"
    get_task("dino").validate(config)


# ─── Checkpoint and resume ──────────────────────────────────────────────────────────────────────


@pytest.mark.slow
def test_resnet_dino_resume_reproduces_the_uninterrupted_run(synthetic_dataset, tmp_path, compilation_cache):
    config = _resnet_config(synthetic_dataset)
    full = loop.train(config, str(tmp_path / "a"), get_task("dino"))
    part = loop.train(config, str(tmp_path / "b"), get_task("dino"), stop_at_step=2)
    assert not part.finished and part.step == 2
    resumed = loop.train(config, str(tmp_path / "b"), get_task("dino"))
    assert resumed.finished and resumed.step == 4
    pick = lambda s: jax.device_get((s.params, s.frozen, s.extra))
    diffs = jax.tree.leaves(
        jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), pick(full.state), pick(resumed.state))
    )
    assert max(diffs) <= 1e-6
    # BatchNorm running averages (student in `frozen`, teacher in `extra`) kept moving after the resume
    for a, b in (
        (part.state.frozen, resumed.state.frozen),
        (part.state.extra["teacher_stats"], resumed.state.extra["teacher_stats"]),
    ):
        fa, fb = flat_state(jax.device_get(a)), flat_state(jax.device_get(b))
        assert np.abs(fa["encoder/bn1/mean"] - fb["encoder/bn1/mean"]).max() > 0
    lines = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    logged = [l for l in lines if "loss" in l]
    assert len(logged) == 4
    for key in ("loss", "loss_dino", "loss_koleo", "teacher_entropy"):
        assert all(np.isfinite(l[key]) for l in logged), key


# ─── Batch statistics under data parallelism ────────────────────────────────────────────────────

_SHARDED_BN = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from afm_jax.models.resnet import ResNet

model = ResNet((1, 1, 1, 1), use_running_average=False, rngs=nnx.Rngs(0))
graphdef, state = nnx.split(model)
x = np.random.default_rng(0).random((16, 32, 32, 1), dtype=np.float32)

def forward(state, x):
    m = nnx.merge(graphdef, state, copy=True)
    y = m.forward_features(x)
    return y, nnx.state(m, nnx.BatchStat)

out = {}
for name, devices in (("one", jax.devices()[:1]), ("eight", jax.devices())):
    mesh = Mesh(np.array(devices), ("data",))
    fn = jax.jit(forward, in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))))
    y, stats = fn(state, x)
    out[name] = (np.asarray(y), {"/".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(stats)})
    out[name + "_devices"] = len(y.sharding.device_set)
_, local = jax.jit(forward)(state, x[:2])          # what one device's share alone would give
local = {"/".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(local)}
print(json.dumps({
    "devices": out["eight_devices"],
    "features": float(np.abs(out["one"][0] - out["eight"][0]).max()),
    "stats": max(float(np.abs(out["one"][1][k] - out["eight"][1][k]).max()) for k in out["one"][1]),
    "local_vs_global": float(np.abs(local["bn1/mean"] - out["one"][1]["bn1/mean"]).max())}))
"""


@pytest.mark.slow
def test_batch_statistics_over_8_devices_are_the_global_batch_statistics():
    """SPMD jit over a batch sharded on 8 devices: BatchNorm's batch mean is the all-device mean
    (SyncBatchNorm), not each device's share: the same features and running averages as one device."""
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [sys.executable, "-c", _SHARDED_BN],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=os.path.join(os.path.dirname(__file__), ".."),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["devices"] == 8
    assert result["features"] < 1e-4 and result["stats"] < 1e-5
    assert result["local_vs_global"] > 1e-3  # one device's share alone would give other statistics

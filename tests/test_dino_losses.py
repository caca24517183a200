"""DINO/DINOv2 maths against independent numpy (and torch) ports of the papers' reference code."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from dino_helpers import log_softmax, reference_sinkhorn, softmax
from flax import nnx

from afm_jax.models import dino
from afm_jax.train import dino_schedules


def _reference_dino_loss(student_views, teacher_views, center, student_temp, teacher_temp):
    """DINO `DINOLoss.forward`, written as its loop over (teacher view iq, student view v)."""
    student_out = [s / student_temp for s in student_views]
    teacher_out = [softmax((t - center) / teacher_temp) for t in teacher_views]
    total, n_terms = 0.0, 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue
            loss = np.sum(-q * log_softmax(student_out[v]), axis=-1)
            total += loss.mean()
            n_terms += 1
    return total / n_terms


def _reference_center(center, teacher_views, momentum):
    """DINO `update_center`: batch_center = sum over all teacher outputs / their number."""
    out = np.concatenate(teacher_views)
    return center * momentum + out.sum(0) / len(out) * (1 - momentum)


@pytest.mark.parametrize("num_global,num_local", [(2, 0), (2, 2), (2, 8), (1, 3)])
def test_dino_loss_and_center_match_the_reference(num_global, num_local):
    rng = np.random.default_rng(num_global * 10 + num_local)
    b, k = 5, 17
    student = rng.normal(size=(num_global + num_local, b, k)) * 3
    teacher = rng.normal(size=(num_global, b, k)) * 3
    center = rng.normal(size=(k,))
    tau_s, tau_t = 0.1, 0.04
    probs = dino.teacher_softmax(jnp.asarray(teacher, jnp.float32), jnp.asarray(center, jnp.float32), tau_t)
    got = float(dino.dino_loss(jnp.asarray(student, jnp.float32), probs, tau_s))
    want = _reference_dino_loss(list(student), list(teacher), center, tau_s, tau_t)
    np.testing.assert_allclose(got, want, rtol=2e-5)

    batch_center = jnp.mean(jnp.asarray(teacher, jnp.float32), axis=(0, 1))
    new_center = dino.update_center(jnp.asarray(center, jnp.float32), batch_center, 0.9)
    np.testing.assert_allclose(
        np.asarray(new_center), _reference_center(center, list(teacher), 0.9), rtol=1e-5, atol=1e-6
    )


def test_sinkhorn_knopp_matches_reference_and_has_the_right_marginals():
    rng = np.random.default_rng(0)
    n, k = 24, 10
    logits = rng.normal(size=(n, k))
    q = np.asarray(dino.sinkhorn_knopp(jnp.asarray(logits, jnp.float32), 0.5, 3))
    np.testing.assert_allclose(q, reference_sinkhorn(logits.astype(np.float64), 0.5), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(q.sum(axis=1), 1.0, rtol=1e-5)  # each sample: a distribution
    np.testing.assert_allclose(q.sum(axis=0), n / k, rtol=0.05)  # prototypes: equal mass
    # Far more balanced than a plain softmax of the same logits.
    plain = softmax(logits / 0.5).sum(axis=0)
    assert np.std(q.sum(axis=0)) < 0.2 * np.std(plain)


def test_sinkhorn_knopp_with_row_weights_ignores_the_dropped_rows():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(12, 6)).astype(np.float32)
    weights = np.array([1, 0] * 6, np.float32)
    q = np.asarray(dino.sinkhorn_knopp(jnp.asarray(logits), 0.3, 3, weights=jnp.asarray(weights)))
    kept = np.asarray(dino.sinkhorn_knopp(jnp.asarray(logits[weights > 0]), 0.3, 3))
    np.testing.assert_allclose(q[weights > 0], kept, rtol=1e-5, atol=1e-7)
    assert np.all(q[weights == 0] == 0)


def test_koleo_equals_its_formula():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(9, 7))
    got = float(dino.koleo_loss(jnp.asarray(x, jnp.float32)))
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = np.linalg.norm(xn[:, None] - xn[None], axis=-1) + np.diag([np.inf] * len(x))
    nearest = d.min(axis=1)  # Euclidean nearest neighbour on the sphere
    want = -np.mean(np.log(nearest + 1e-8))
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_ibot_loss_counts_only_masked_patches():
    rng = np.random.default_rng(3)
    b, n, k = 3, 8, 5
    student = rng.normal(size=(b, n, k)).astype(np.float32)
    teacher = softmax(rng.normal(size=(b, n, k))).astype(np.float32)
    masks = rng.random((b, n)) < 0.4
    masks[2] = False  # an image without masks contributes 0
    got = float(dino.ibot_patch_loss(jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(masks), 0.1))
    ce = -np.sum(teacher * log_softmax(student / 0.1), axis=-1)
    want = np.mean([ce[i][masks[i]].mean() if masks[i].any() else 0.0 for i in range(b)])
    np.testing.assert_allclose(got, want, rtol=1e-5)
    changed = student.copy()
    changed[~masks] = rng.normal(size=changed[~masks].shape) * 10  # unmasked patches don't matter
    again = float(dino.ibot_patch_loss(jnp.asarray(changed), jnp.asarray(teacher), jnp.asarray(masks), 0.1))
    np.testing.assert_allclose(again, got, rtol=1e-6)


def test_dino_head_matches_a_torch_weight_normed_head():
    torch = pytest.importorskip("torch")
    head = dino.DINOHead(6, 11, hidden_dim=8, bottleneck_dim=4, nlayers=3, norm_last_layer=False, rngs=nnx.Rngs(0))
    head.last_layer.weight_g[...] = jnp.linspace(0.5, 2.0, 11)
    x = np.random.default_rng(4).normal(size=(3, 6)).astype(np.float32)
    layers = []
    for i, lin in enumerate(head.mlp):
        t = torch.nn.Linear(lin.in_features, lin.out_features)
        t.weight.data = torch.tensor(np.asarray(lin.kernel[...]).T)
        t.bias.data = torch.tensor(np.asarray(lin.bias[...]))
        layers += [t] + ([torch.nn.GELU()] if i < len(head.mlp) - 1 else [])
    mlp = torch.nn.Sequential(*layers)
    last = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(4, 11, bias=False))
    last.parametrizations.weight.original1.data = torch.tensor(np.asarray(head.last_layer.weight_v[...]).T)
    last.parametrizations.weight.original0.data = torch.tensor(np.asarray(head.last_layer.weight_g[...]))[:, None]
    with torch.no_grad():
        want = last(torch.nn.functional.normalize(mlp(torch.tensor(x)), dim=-1, p=2)).numpy()
    np.testing.assert_allclose(np.asarray(head(jnp.asarray(x))), want, rtol=1e-4, atol=1e-5)


def test_norm_last_layer_keeps_the_gains_out_of_the_trained_params():
    frozen = dino.DINOHead(4, 7, hidden_dim=8, bottleneck_dim=4, norm_last_layer=True, rngs=nnx.Rngs(0))
    trained = dino.DINOHead(4, 7, hidden_dim=8, bottleneck_dim=4, norm_last_layer=False, rngs=nnx.Rngs(0))
    names = lambda m: {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(m, nnx.Param))}
    assert "last_layer/weight_g" not in names(frozen) and "last_layer/weight_g" in names(trained)
    w = np.asarray(frozen.last_layer.kernel())
    np.testing.assert_allclose(np.linalg.norm(w, axis=0), 1.0, rtol=1e-5)  # unit-norm prototypes


# ─── Schedules and EMA ───────────────────────────────────────────────────────────────────────────


def _reference_cosine(base, final, steps):
    """DINO `cosine_scheduler` without warm-up, as an array over iterations."""
    iters = np.arange(steps)
    return final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))


def test_momentum_and_weight_decay_schedules_follow_dino():
    steps = 40
    momentum = dino_schedules.teacher_momentum_schedule(0.996, steps)
    wd = dino_schedules.weight_decay_schedule(0.04, 0.4, steps)
    ref_m, ref_wd = _reference_cosine(0.996, 1.0, steps), _reference_cosine(0.04, 0.4, steps)
    for t in (0, 1, 13, 20, 39):
        np.testing.assert_allclose(float(momentum(t)), ref_m[t], rtol=1e-6)
        np.testing.assert_allclose(float(wd(t)), ref_wd[t], rtol=1e-5)
    assert float(momentum(steps)) == pytest.approx(1.0) and float(wd(10 * steps)) == pytest.approx(0.4)


def test_teacher_temperature_warms_up_linearly_then_stays():
    temp = dino_schedules.teacher_temperature_schedule(0.04, 0.07, 30)
    assert float(temp(0)) == pytest.approx(0.04)
    assert float(temp(15)) == pytest.approx(0.055)
    assert float(temp(30)) == pytest.approx(0.07) and float(temp(1000)) == pytest.approx(0.07)
    assert float(dino_schedules.teacher_temperature_schedule(0.04, 0.07, 0)(0)) == pytest.approx(0.07)


def test_ema_update_formula():
    teacher = {"a": jnp.array([1.0, 2.0]), "b": {"c": jnp.array(3.0)}}
    student = {"a": jnp.array([3.0, -2.0]), "b": {"c": jnp.array(5.0)}}
    out = dino_schedules.ema_update(teacher, student, 0.9)
    np.testing.assert_allclose(np.asarray(out["a"]), [0.9 * 1 + 0.1 * 3, 0.9 * 2 - 0.1 * 2], rtol=1e-6)
    np.testing.assert_allclose(float(out["b"]["c"]), 0.9 * 3 + 0.1 * 5, rtol=1e-6)
    same = dino_schedules.ema_update(teacher, student, 1.0)
    np.testing.assert_array_equal(np.asarray(same["a"]), np.asarray(teacher["a"]))


def test_per_tensor_clipping_matches_dino():
    tx = dino_schedules.clip_per_tensor(3.0)
    grads = {"big": jnp.full((4,), 10.0), "small": jnp.array([0.1, 0.2])}
    out, _ = tx.update(grads, tx.init(grads))
    np.testing.assert_allclose(np.asarray(out["big"]), 10.0 * 3.0 / (20.0 + 1e-6), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(out["small"]), np.asarray(grads["small"]))


def test_freeze_for_steps_zeroes_masked_updates_only_at_first():
    tx = dino_schedules.freeze_for_steps({"last": True, "other": False}, 2)
    grads = {"last": jnp.ones(3), "other": jnp.ones(3)}
    state = tx.init(grads)
    seen = []
    for _ in range(3):
        out, state = tx.update(grads, state)
        seen.append((float(out["last"].sum()), float(out["other"].sum())))
    assert seen == [(0.0, 3.0), (0.0, 3.0), (3.0, 3.0)]


def test_entropy_is_zero_for_one_hot_and_log_k_for_uniform():
    assert float(dino.entropy(jnp.eye(4))) == pytest.approx(0.0, abs=1e-6)
    assert float(dino.entropy(jnp.full((2, 8), 1 / 8))) == pytest.approx(math.log(8), rel=1e-6)

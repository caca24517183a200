"""DINO's per-step schedules and the optimiser pieces that read them.

What: teacher momentum (cosine 0.996 -> 1), teacher temperature (linear warm-up 0.04 -> 0.07, then
constant), weight decay (cosine 0.04 -> 0.4), the EMA update, and two optax transformations DINO
needs beyond AdamW: freezing the last head layer for the first epoch (with an Adam whose frozen
leaves start fresh at the unfreeze, `scale_by_adam_from`), per-tensor gradient clipping (DINO v1's
`clip_gradients`) and per-module clipping (DINOv2).

Why per step: DINO indexes its numpy schedules by iteration (`cosine_scheduler(base, final, epochs,
niter_per_ep)`), except the teacher temperature, which it indexes by epoch; DINOv2 indexes all of
them by iteration. We use iterations throughout (the temperature ramps smoothly instead of in
epoch-sized stairs) so that a resumed run, which only knows its step, gets the same values.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


def cosine_schedule(base: float, final: float, total_steps: int):
    """f(t) = final + (base - final)·(1 + cos(π t / T)) / 2, constant `final` after T (DINO
    `cosine_scheduler` without warm-up)."""
    total = max(int(total_steps), 1)

    def schedule(step):
        t = jnp.minimum(jnp.asarray(step, jnp.float32), total)
        return final + 0.5 * (base - final) * (1.0 + jnp.cos(jnp.pi * t / total))

    return schedule


def teacher_momentum_schedule(base: float, total_steps: int, final: float = 1.0):
    """EMA momentum of the teacher: cosine from `base` (0.996) to `final` (1) over the run."""
    return cosine_schedule(base, final, total_steps)


def teacher_temperature_schedule(warmup_temp: float, temp: float, warmup_steps: int):
    """Linear from `warmup_temp` at step 0 to `temp` at `warmup_steps`, then constant."""
    warmup = int(warmup_steps)

    def schedule(step):
        if warmup <= 0:
            return jnp.asarray(temp, jnp.float32)
        frac = jnp.clip(jnp.asarray(step, jnp.float32) / warmup, 0.0, 1.0)
        return warmup_temp + (temp - warmup_temp) * frac

    return schedule


def weight_decay_schedule(base: float, final: float, total_steps: int):
    """Weight decay: cosine from `base` (0.04) to `final` (0.4) over the run."""
    return cosine_schedule(base, final, total_steps)


def ema_update(teacher: Any, student: Any, momentum: jax.Array | float) -> Any:
    """teacher <- m·teacher + (1 - m)·student, leaf by leaf (DINO's momentum update)."""
    return jax.tree.map(
        lambda t, s: (t * momentum + s.astype(t.dtype) * (1.0 - momentum)).astype(t.dtype), teacher, student
    )


def freeze_for_steps(mask: Any, num_steps: int) -> optax.GradientTransformation:
    """Zeroes the updates of leaves where `mask` is True during the first `num_steps` updates.

    `make_dino_optimizer` puts it last (no update, hence no weight decay, during the freeze: the
    last layer's lr is 0) and, with LARS in "fresh_adam" mode, before the momentum as well."""

    def init_fn(params):
        del params
        return {"count": jnp.zeros([], jnp.int32)}

    def update_fn(updates, state, params=None):
        del params
        frozen = state["count"] < num_steps
        updates = jax.tree.map(lambda u, m: jnp.where(frozen, jnp.zeros_like(u), u) if m else u, updates, mask)
        return updates, {"count": optax.safe_increment(state["count"])}

    return optax.GradientTransformation(init_fn, update_fn)


def clip_per_tensor(max_norm: float) -> optax.GradientTransformation:
    """Scales each gradient tensor with norm > max_norm down to max_norm (DINO `clip_gradients`:
    `clip_coef = clip / (norm + 1e-6)`, applied where < 1)."""

    def update_fn(updates, state, params=None):
        del params

        def clip(g):
            norm = jnp.linalg.norm(g.astype(jnp.float32).ravel())
            coef = max_norm / (norm + 1e-6)
            return jnp.where(coef < 1.0, g * coef.astype(g.dtype), g)

        return jax.tree.map(clip, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def clip_per_module(max_norm: float, module_of: Any) -> optax.GradientTransformation:
    """DINOv2's clipping: each student module (backbone, DINO head, iBOT head) clipped by its own global
    norm, `for v in model.student.values(): v.clip_grad_norm_(clip)` (torch's formula:
    g · max_norm / (norm + 1e-6) where that factor is < 1). `module_of` is a pytree like the
    gradients holding each leaf's module name (static strings)."""

    def update_fn(updates, state, params=None):
        del params
        leaves, treedef = jax.tree.flatten(updates)
        names = jax.tree.leaves(module_of)
        sq: dict[str, jax.Array] = {}
        for g, name in zip(leaves, names, strict=True):
            sq[name] = sq.get(name, 0.0) + jnp.sum(jnp.square(g.astype(jnp.float32)))
        coef = {name: jnp.minimum(max_norm / (jnp.sqrt(s) + 1e-6), 1.0) for name, s in sq.items()}
        clipped = [g * coef[name].astype(g.dtype) for g, name in zip(leaves, names)]
        return jax.tree.unflatten(treedef, clipped), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


class DelayedAdamState(NamedTuple):
    count: jax.Array
    mu: Any
    nu: Any


def scale_by_adam_from(b1: float, b2: float, eps: float, start: Any) -> optax.GradientTransformation:
    """Adam whose leaves may start late: a leaf with `start` = s > 0 ignores its gradients for the first
    s updates (zero update, moments untouched) and then runs as a fresh Adam, its bias correction
    counting from its own first step. That is PyTorch's AdamW for DINO's frozen last layer (its
    gradients are set to None for the first epoch, so AdamW skips it and creates its state at the
    unfreeze). Leaves with start 0 are exactly `optax.scale_by_adam`. `start` is a pytree like the
    params of static ints."""

    def init_fn(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return DelayedAdamState(jnp.zeros([], jnp.int32), zeros, jax.tree.map(jnp.zeros_like, params))

    def update_fn(updates, state, params=None):
        del params
        step = state.count  # updates made so far
        count = optax.safe_increment(step)

        def one(g, m, v, s):
            m_new = b1 * m + (1 - b1) * g
            v_new = b2 * v + (1 - b2) * jnp.square(g)
            if s == 0:
                t = count.astype(jnp.float32)
                u = (m_new / (1 - b1**t)) / (jnp.sqrt(v_new / (1 - b2**t)) + eps)
                return u, m_new, v_new
            active = step >= s
            t = jnp.maximum(count - s, 1).astype(jnp.float32)
            u = (m_new / (1 - b1**t)) / (jnp.sqrt(v_new / (1 - b2**t)) + eps)
            return (jnp.where(active, u, jnp.zeros_like(u)), jnp.where(active, m_new, m), jnp.where(active, v_new, v))

        out = jax.tree.map(one, updates, state.mu, state.nu, start)

        def pick(i):
            return jax.tree.map(lambda x: x[i], out, is_leaf=lambda x: isinstance(x, tuple) and len(x) == 3)

        u, mu, nu = pick(0), pick(1), pick(2)
        return u, DelayedAdamState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)

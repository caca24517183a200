"""DINO's per-step schedules and the optimiser pieces that read them.

What: teacher momentum (cosine 0.996 -> 1), teacher temperature (linear warm-up 0.04 -> 0.07, then
constant), weight decay (cosine 0.04 -> 0.4), the EMA update, and two optax transformations DINO
needs beyond AdamW: freezing the last head layer for the first epoch and per-tensor gradient
clipping (DINO v1's `clip_gradients`).

Why per step: DINO indexes its numpy schedules by iteration (`cosine_scheduler(base, final, epochs,
niter_per_ep)`), except the teacher temperature, which it indexes by epoch; DINOv2 indexes all of
them by iteration. We use iterations throughout (the temperature ramps smoothly instead of in
epoch-sized stairs) so that a resumed run, which only knows its step, gets the same values.
"""

from __future__ import annotations

from typing import Any

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
    return jax.tree.map(lambda t, s: (t * momentum + s.astype(t.dtype) * (1.0 - momentum)).astype(t.dtype),
                        teacher, student)


def freeze_for_steps(mask: Any, num_steps: int) -> optax.GradientTransformation:
    """Zeroes the updates of leaves where `mask` is True during the first `num_steps` updates.

    Put it first (gradients: no Adam moments build up) *and* last (updates: no weight decay moves
    them) to match DINO's `cancel_gradients_last_layer`, which leaves the last layer untouched for
    the first epoch(s)."""
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

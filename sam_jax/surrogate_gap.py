"""GSAM: the surrogate-gap guided descent direction (Zhuang et al., ICLR 2022).

GSAM minimises the perturbed loss f_p(w) = f(w + ε) and, at the same time, the
surrogate gap h(w) = f_p(w) − f(w), without letting the second objective undo
the first. With the clean gradient ∇f split into its part along ∇f_p and the
part ∇f_⊥ orthogonal to it, the descent direction is (the paper's Algorithm 1)::

  d = ∇f_p − α ∇f_⊥,   ∇f_⊥ = ∇f − (∇f · ∇f_p / ‖∇f_p‖²) ∇f_p

d · ∇f_p = ‖∇f_p‖², so the step decreases f_p as SAM's does, and the α term
decreases h. α = 0 is SAM. In `sam_gradient`, ∇f is the ascent gradient g (the
clean gradient on the ascent micro-batch) and ∇f_p the descent gradient.

The paper also lets ρ follow the learning rate, between ρ_min and ρ_max
(`gsam_rho_schedule`).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class SurrogateGap(NamedTuple):
    """GSAM's setting, passed as `sam(..., surrogate_gap=sam_jax.gsam(alpha))`.

    Attributes:
      alpha: α ≥ 0, the weight of the surrogate gap's descent direction −∇f_⊥.
    """

    alpha: float


def gsam(alpha: float = 0.3) -> SurrogateGap:
    """GSAM's descent direction ∇f_p − α ∇f_⊥ (Zhuang et al. 2022, Algorithm 1).

    Example::

      tx = sam_jax.sam(optax.adamw(1e-4),
                       rho=sam_jax.gsam_rho_schedule(schedule, 0.1, 0.01, 1e-4, 0.0),
                       surrogate_gap=sam_jax.gsam(alpha=0.3))

    Args:
      alpha: α ≥ 0 (the paper searches 0.01 … 0.3 for ViTs; big_vision's
        ImageNet config uses 0.6). 0 is SAM.

    Returns:
      A `SurrogateGap` to pass as `sam(..., surrogate_gap=...)`.
    """
    if not isinstance(alpha, (int, float)) or not alpha >= 0:
        raise ValueError(f"gsam's alpha must be a number ≥ 0, got {alpha!r}.")
    return SurrogateGap(float(alpha))


def _vdot(a, b) -> jax.Array:
    """Σ over all leaves of a ⊙ b, in float32."""
    products = jax.tree.map(
        lambda x, y: jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32)), a, b
    )
    return sum(jax.tree.leaves(products), jnp.float32(0.0))


def descent_direction(perturbed_grads, clean_grads, alpha) -> optax.Params:
    """d = ∇f_p − α (∇f − (∇f · ∇f_p / ‖∇f_p‖²) ∇f_p), in float32, cast to ∇f_p's dtypes.

    A zero ∇f_p has no direction to be orthogonal to: ∇f_⊥ is then ∇f itself.

    Args:
      perturbed_grads: ∇f_p, the gradient at w + ε.
      clean_grads: ∇f, the gradient at w (a tree like ∇f_p).
      alpha: α.
    """
    squared_norm = _vdot(perturbed_grads, perturbed_grads)
    positive = squared_norm > 0
    along = jnp.where(
        positive, _vdot(clean_grads, perturbed_grads) / jnp.where(positive, squared_norm, 1.0), 0.0
    )

    def combine(p, c):
        p32, c32 = p.astype(jnp.float32), c.astype(jnp.float32)
        return (p32 - alpha * (c32 - along * p32)).astype(p.dtype)

    return jax.tree.map(combine, perturbed_grads, clean_grads)


def gsam_rho_schedule(
    learning_rate: float | optax.Schedule,
    rho_max: float,
    rho_min: float,
    lr_max: float | None = None,
    lr_min: float | None = None,
) -> optax.Schedule:
    """ρ_t that follows the learning rate, as in GSAM (Zhuang et al. 2022, §5.1).

    ρ_t = ρ_min + (ρ_max − ρ_min) · (lr_t − lr_min) / (lr_max − lr_min), the rule
    of the authors' `ProportionScheduler` and of big_vision's `gsam_gradient`.
    Pass it as `sam(..., rho=...)`; it is evaluated at the step count, like the
    learning-rate schedule.

    Example::

      lr = optax.warmup_cosine_decay_schedule(0.0, 1e-4, 1_000, 100_000)
      rho = sam_jax.gsam_rho_schedule(lr, rho_max=0.1, rho_min=0.01, lr_max=1e-4, lr_min=0.0)

    Args:
      learning_rate: the optimizer's learning rate: a float (then ρ_t = ρ_max,
        which must equal ρ_min) or an Optax schedule.
      rho_max: ρ at the largest learning rate.
      rho_min: ρ at the smallest learning rate, 0 ≤ ρ_min ≤ ρ_max.
      lr_max: the schedule's largest learning rate (required with a schedule).
      lr_min: the schedule's smallest learning rate (required with a schedule).

    Returns:
      An Optax schedule of ρ.
    """
    if not 0 <= rho_min <= rho_max:
        raise ValueError(
            f"gsam_rho_schedule needs 0 ≤ rho_min ≤ rho_max, got {rho_min}, {rho_max}."
        )
    if not callable(learning_rate):
        lr_max = learning_rate if lr_max is None else lr_max
        lr_min = learning_rate if lr_min is None else lr_min
    if lr_max is None or lr_min is None:
        raise ValueError(
            "gsam_rho_schedule with a learning-rate schedule needs lr_max and lr_min, the "
            "schedule's largest and smallest values."
        )
    if lr_max < lr_min:
        raise ValueError(f"gsam_rho_schedule needs lr_max ≥ lr_min, got {lr_max}, {lr_min}.")
    if lr_max == lr_min:
        if rho_min != rho_max:
            raise ValueError(
                f"gsam_rho_schedule: the learning rate is constant ({lr_max}), so ρ cannot move "
                f"between rho_min={rho_min} and rho_max={rho_max}: set them equal."
            )
        return optax.constant_schedule(rho_max)

    def schedule(count):
        lr = learning_rate(count) if callable(learning_rate) else learning_rate
        return rho_min + (rho_max - rho_min) * (lr - lr_min) / (lr_max - lr_min)

    return schedule

"""Weight perturbations: the SAM/ASAM ascent step and random directions.

Everything here is computed in float32, whatever the parameters' dtype, and
never modifies the parameters: `perturbed(params, epsilon)` returns a new tree,
so the original w is kept exactly (never recovered as w + ε − ε).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

Params = optax.Params


class Perturbation(NamedTuple):
    """An ascent perturbation ε and the norms a trainer logs.

    Attributes:
      epsilon: tree like the parameters, float32.
      grad_norm: ‖g‖₂ of the ascent gradient, over all parameters.
      norm: ‖ε‖₂ (ρ, or less under a mask; 0 for a zero gradient).
    """

    epsilon: Params
    grad_norm: jax.Array
    norm: jax.Array


def _safe_scale(rho, norm):
    """ρ / norm, and 0 where norm is 0 (a zero gradient gives ε = 0, not NaN)."""
    positive = norm > 0
    return jnp.where(positive, rho / jnp.where(positive, norm, 1.0), 0.0)


def ascent_perturbation(
    grads: Params,
    params: Params,
    rho,
    *,
    mask: Params | None = None,
    adaptive_eta: float | None = None,
) -> Perturbation:
    """ε = ρ · T ⊙ m ⊙ (T g) / ‖T g‖₂, the one-step solution of SAM's inner maximum.

    * SAM (Foret et al. 2021): T = 1, m = 1, so ε = ρ g / ‖g‖.
    * ASAM (Kwon et al. 2021): T = |w| + η elementwise, so ε = ρ T² g / ‖T g‖.
    * FSAM (Zhong et al. 2022, Eq. 6): a binary mask m on the perturbation,
      normalised by the *unmasked* norm, so ‖ε‖ ≤ ρ.

    The norm is global over all parameters (one all-reduce under sharding).

    Args:
      grads: the ascent gradient g.
      params: the weights w (used by ASAM only).
      rho: the neighbourhood radius ρ ≥ 0 (a scalar, possibly traced).
      mask: optional tree of booleans like `params`; ε is zero where False.
      adaptive_eta: η of ASAM; None for plain SAM.

    Returns:
      A `Perturbation` with ε in float32.
    """
    grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
    grad_norm = optax.tree.norm(grads)
    if adaptive_eta is None:
        direction, norm = grads, grad_norm
    else:
        scales = jax.tree.map(lambda w: jnp.abs(w.astype(jnp.float32)) + adaptive_eta, params)
        direction = jax.tree.map(lambda t, g: t * t * g, scales, grads)
        norm = optax.tree.norm(jax.tree.map(lambda t, g: t * g, scales, grads))
    scale = _safe_scale(rho, norm)
    epsilon = jax.tree.map(lambda d: d * scale, direction)
    if mask is not None:
        epsilon = jax.tree.map(lambda e, m: jnp.where(m, e, 0.0), epsilon, mask)
    return Perturbation(epsilon, grad_norm, optax.tree.norm(epsilon))


def random_perturbation(key: jax.Array, params: Params, rho) -> Params:
    """r ~ N(0, I) over all parameters, rescaled to ‖r‖₂ = ρ (float32).

    The δ-SAM papers draw r with σ = 1 and rescale it to the radius ρ
    (Zhou et al. 2022, §5.2).
    """
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    noise = [
        jax.random.normal(k, leaf.shape, jnp.float32) for k, leaf in zip(keys, leaves, strict=True)
    ]
    noise = jax.tree.unflatten(treedef, noise)
    scale = _safe_scale(rho, optax.tree.norm(noise))
    return jax.tree.map(lambda r: r * scale, noise)


def perturbed(params: Params, epsilon: Params, sign: float = 1.0) -> Params:
    """w + sign·ε, added in float32 and cast back to each parameter's dtype."""
    return jax.tree.map(
        lambda w, e: (w.astype(jnp.float32) + sign * e).astype(w.dtype), params, epsilon
    )

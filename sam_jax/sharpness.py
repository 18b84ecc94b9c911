"""Sharpness measures of Zhou et al. (2022, δ-SAM, §4.1 and §5.5).

All three use the one-step (first-order) solution of the inner maximum, as the
paper does: ε = ρ ∇l / ‖∇l‖ for the batch loss, ε_i = ρ ∇l_i / ‖∇l_i‖ per
example. `loss_fn(params, batch, key)` returns per-example losses [N].

Example::

  risk = sam_jax.sharpness.adversarial_risk(loss_fn, params, batch, rho=0.05)
"""

import jax
import jax.numpy as jnp

from sam_jax import batching
from sam_jax import perturbation


def _example_loss_fn(loss_fn, example, key):
    """l_i(·) for one example: `loss_fn` on a batch of one, as a scalar function."""

    def loss(params):
        one = batching.single_example(example)
        return batching.per_example_losses(loss_fn, params, one, key)[0]

    return loss


def _instance_losses(loss_fn, params, batch, rho, key):
    """(l_i(w), l_i(w + ε_i)) for every example i, with its own ε_i (vmap)."""

    def example_losses(example):
        loss = _example_loss_fn(loss_fn, example, key)
        clean, grads = jax.value_and_grad(loss)(params)
        eps = perturbation.ascent_perturbation(grads, params, rho)
        return clean, loss(perturbation.perturbed(params, eps.epsilon))

    return jax.vmap(example_losses)(batch)


def adversarial_risk(loss_fn, params, batch, rho: float, key=None) -> jax.Array:
    """L_adv = 1/N Σ_i max_{‖ε_i‖≤ρ} l_i(w + ε_i) (paper §5.5; ρ = 0.05 there)."""
    _, adversarial = _instance_losses(loss_fn, params, batch, rho, key)
    return jnp.mean(adversarial.astype(jnp.float32))


def instance_sharpness(loss_fn, params, batch, rho: float, key=None) -> jax.Array:
    """R_inst = 1/N Σ_i max_{‖ε_i‖≤ρ} (l_i(w + ε_i) − l_i(w)) (paper §4.1)."""
    clean, adversarial = _instance_losses(loss_fn, params, batch, rho, key)
    return jnp.mean((adversarial - clean).astype(jnp.float32))


def batch_sharpness(loss_fn, params, batch, rho: float, key=None) -> jax.Array:
    """R_batch = max_{‖ε‖≤ρ} 1/N Σ_i (l_i(w + ε) − l_i(w)) (paper §4.1)."""

    def mean_loss(p):
        return jnp.mean(batching.per_example_losses(loss_fn, p, batch, key))

    clean, grads = jax.value_and_grad(mean_loss)(params)
    eps = perturbation.ascent_perturbation(grads, params, rho)
    return (mean_loss(perturbation.perturbed(params, eps.epsilon)) - clean).astype(jnp.float32)

"""Per-instance SAM: a separate perturbation for every example (the costly reference).

δ-SAM (Zhou et al. 2022, Eq. 2) and m-sharpness with m = N both approximate
or equal it; it is the baseline they are measured against.
"""

import jax
import jax.numpy as jnp
import optax

from sam_jax import batching
from sam_jax import perturbation
from sam_jax import reweighting
from sam_jax import transform


def example_loss_fn(loss_fn, example, key):
    """l_i(·) for one example: `loss_fn` on a batch of one, as a scalar function."""

    def loss(params):
        return batching.per_example_losses(loss_fn, params, batching.single_example(example), key)[
            0
        ]

    return loss


def per_instance_sam(
    optimizer: optax.GradientTransformation, rho: transform.ScalarOrSchedule = 0.05
) -> optax.GradientTransformationExtraArgs:
    """Per-instance SAM (Zhou et al. 2022, Eq. 2), vectorised over examples with vmap.

    For each example i: ε_i = ρ ∇l_i(w) / ‖∇l_i(w)‖, and the descent gradient is
    mean_i ∇l_i(w + ε_i). Memory grows with N copies of the gradient, so use
    small batches. Same update signature and state as `sam`.

    Example::

      tx = sam_jax.per_instance_sam(optax.adamw(1e-4), rho=0.05)
      updates, state = tx.update(None, state, params, loss_fn=loss_fn, batch=batch)

    Args:
      optimizer: the descent optimizer.
      rho: radius ρ ≥ 0, a float or an Optax schedule.

    Returns:
      An `optax.GradientTransformationExtraArgs`; its state is a `SamState`.
    """
    transform.check_rho(rho)
    optimizer = optax.with_extra_args_support(optimizer)

    def init_fn(params):
        return transform.init_state(optimizer, params)

    def update_fn(updates, state, params=None, *, loss_fn=None, batch=None, key=None, **extra):
        transform.check_update_arguments("per_instance_sam", updates, params, loss_fn, batch)
        step_rho = transform.rho_at(rho, state.count)

        def example_step(example):
            loss = example_loss_fn(loss_fn, example, key)
            clean_loss, grads = jax.value_and_grad(loss)(params)
            eps = perturbation.ascent_perturbation(grads, params, step_rho)
            perturbed_loss, descent = jax.value_and_grad(loss)(
                perturbation.perturbed(params, eps.epsilon)
            )
            return descent, (clean_loss, perturbed_loss, eps.grad_norm, eps.norm)

        grads, (clean, perturbed_losses, grad_norms, eps_norms) = jax.vmap(example_step)(batch)
        grads = jax.tree.map(lambda g: jnp.mean(g, 0), grads)
        spread = reweighting.statistics(reweighting.uniform(batching.batch_size(batch)))
        metrics = transform.SamMetrics(
            clean_loss=jnp.mean(clean.astype(jnp.float32)),
            perturbed_loss=jnp.mean(perturbed_losses.astype(jnp.float32)),
            grad_norm=jnp.mean(grad_norms),
            perturbation_norm=jnp.mean(eps_norms),
            rho=step_rho,
            weight_min=spread.min,
            weight_max=spread.max,
            weight_entropy=spread.entropy,
            mask_density=jnp.float32(1.0),
        )
        updates, inner_state = optimizer.update(grads, state.inner_state, params, **extra)
        return updates, transform.SamState(
            count=optax.safe_increment(state.count),
            inner_state=inner_state,
            mask_state=state.mask_state,
            metrics=metrics,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)

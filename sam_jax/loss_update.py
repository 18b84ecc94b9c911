"""`update_from_loss`: one optimizer step from a loss function, plain or SAM alike.

A plain Optax optimizer takes a gradient; `sam` computes its own from the
loss. `update_from_loss` gives both one call signature, so a training loop
can switch between them by configuration::

  tx = sam_jax.sam(optax.adamw(1e-4), rho=0.05) if use_sam else optax.adamw(1e-4)
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, opt_state, batch, key):
      step = sam_jax.update_from_loss(tx, opt_state, params, loss_fn, batch, key)
      return optax.apply_updates(params, step.updates), step.opt_state, step.loss

For a plain optimizer it is one `jax.value_and_grad` of the mean loss and
`tx.update`; `sam(optimizer, rho=0.0)` costs the same (see `sam_jax.core`).
"""

from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_jax import batching
from sam_jax import core
from sam_jax import pending
from sam_jax import transform


class LossUpdate(NamedTuple):
    """What `update_from_loss` returns.

    Attributes:
      updates: the optimizer's updates, for `optax.apply_updates`.
      opt_state: the optimizer's next state.
      loss: the mean loss whose gradient was used: at w (plain), or at w + ε
        (SAM's descent pass, `metrics.perturbed_loss`).
      aux: `loss_fn`'s auxiliary output with `has_aux` (from SAM's descent pass,
        with the leading [m, k] axes described in `sam_jax.core`), else None.
      metrics: the step's `SamMetrics` with SAM, None for a plain optimizer.
    """

    updates: optax.Updates
    opt_state: optax.OptState
    loss: jax.Array
    aux: Any
    metrics: core.SamMetrics | None


def uses_sam(opt_state) -> bool:
    """Whether `opt_state` belongs to a `sam` transformation (also wrapped or chained)."""
    is_sam = lambda node: isinstance(node, transform.SamState)  # noqa: E731
    return any(is_sam(node) for node in jax.tree.leaves(opt_state, is_leaf=is_sam))


def _plain_update(tx, opt_state, params, loss_fn, batch, key, has_aux) -> LossUpdate:
    def mean_loss(p):
        out = loss_fn(p, batch, key)
        losses, aux = out if has_aux else (out, None)
        batching.check_losses(losses, batch, slots=True)
        return jnp.mean(losses), aux

    (loss, aux), grads = jax.value_and_grad(mean_loss, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return LossUpdate(updates, opt_state, loss, aux, None)


def update_from_loss(
    tx: optax.GradientTransformation,
    opt_state: optax.OptState,
    params: optax.Params,
    loss_fn,
    batch,
    key: jax.Array | None = None,
    *,
    has_aux: bool = False,
) -> LossUpdate:
    """One step of `tx` on the gradient of `loss_fn`: plain Optax or `sam`, one signature.

    With a `sam` state anywhere in `opt_state` (`sam(...)`, `per_instance_sam`,
    `optax.inject_hyperparams(sam)`, `optax.chain(sam(...), ...)`) this is
    `tx.update(pending_gradient(params), opt_state, params, loss_fn=loss_fn,
    batch=batch, key=key)`; otherwise the gradient of the mean loss is given to
    `tx.update`.

    Example::

      step = sam_jax.update_from_loss(tx, opt_state, params, loss_fn, batch, key)
      params = optax.apply_updates(params, step.updates)
      opt_state = step.opt_state

    Args:
      tx: any Optax transformation, with or without `sam`.
      opt_state: its state.
      params: the parameters w.
      loss_fn: `loss_fn(params, batch, key) -> losses` per example [N] (or
        [N, S] packed), or `(losses, aux)` with `has_aux`.
      batch: a pytree of arrays [N, ...].
      key: the step's PRNG key (dropout, δ-SAM's r), or None.
      has_aux: whether `loss_fn` returns `(losses, aux)`.

    Returns:
      A `LossUpdate`.
    """
    if not uses_sam(opt_state):
        return _plain_update(tx, opt_state, params, loss_fn, batch, key, has_aux)
    request = pending.pending_gradient(params, has_aux)
    updates, opt_state = tx.update(
        request, opt_state, params, loss_fn=loss_fn, batch=batch, key=key
    )
    result = pending.requested("update_from_loss", request).result
    return LossUpdate(updates, opt_state, result.metrics.perturbed_loss, result.aux, result.metrics)

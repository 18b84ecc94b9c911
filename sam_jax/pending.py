"""`PendingGradient`: what a loop passes to `sam` where Optax expects a gradient.

`sam` computes its gradient from `loss_fn` inside its own `update`, so the
loop has no gradient to give it. It gives `pending_gradient(params)` instead:
the parameters' tree with one `PendingGradient` at every leaf. `sam` writes
what it computed (a `sam_jax.SamGradient`: the gradient, metrics and the
descent pass's aux) into that object, for `sam_jax.update_from_loss` to
return.

A transformation placed before or around `sam` (`optax.chain(clip, sam(...))`,
`optax.apply_if_finite(sam(...), n)`, `optax.MultiSteps(sam(...), k)`) would
receive the placeholder instead of a gradient. Any arithmetic on it raises
an error that says where such a transformation belongs, so it cannot be
silently skipped.
"""

import jax
import jax.numpy as jnp

MISPLACED = (
    "sam computes the gradient from loss_fn inside its own update, so a transformation "
    "placed before sam in optax.chain, or wrapped around sam, sees this placeholder "
    "instead of a gradient. Put it inside sam, on the optimizer that receives sam's "
    "gradient: sam(optax.chain(optax.clip_by_global_norm(1.0), optimizer)), "
    "sam(optax.apply_if_finite(optimizer, 3)), sam(optax.MultiSteps(optimizer, k)) or "
    "sam(optimizer, num_microbatches=k). Transformations after sam in a chain, and "
    "optax.inject_hyperparams(sam), work as they are."
)


class PendingGradient:
    """The gradient `sam` will compute: a placeholder that refuses arithmetic.

    Attributes:
      has_aux: whether `loss_fn` returns `(losses, aux)`.
      result: the `SamGradient` that `sam` computed, once it has run (None before).
    """

    __slots__ = ("has_aux", "result", "dtype")

    def __init__(self, has_aux: bool = False, dtype=None):
        self.has_aux = has_aux
        self.result = None
        self.dtype = dtype  # the parameters' widest dtype, for Optax's dtype probes

    def __repr__(self):
        return f"<PendingGradient: {MISPLACED}>"

    def _misplaced(self, *args, **kwargs):
        del args, kwargs
        raise TypeError(MISPLACED)

    def __getattr__(self, name):  # array attributes (`.real`, `.dtype`, `.shape`)
        if name.startswith("__"):
            raise AttributeError(name)
        # An AttributeError, so that `getattr(x, "dtype", None)` probes still work.
        raise AttributeError(f"{name}: {MISPLACED}")

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _misplaced
    __truediv__ = __rtruediv__ = __pow__ = __rpow__ = __matmul__ = __rmatmul__ = _misplaced
    __neg__ = __pos__ = __abs__ = __bool__ = __float__ = __int__ = __index__ = _misplaced
    __lt__ = __le__ = __gt__ = __ge__ = __array__ = __len__ = __iter__ = _misplaced


def pending_gradient(params, has_aux: bool = False):
    """The parameters' tree with one `PendingGradient` at every leaf.

    Example::

      updates, opt_state = tx.update(sam_jax.pending_gradient(params), opt_state,
                                     params, loss_fn=loss_fn, batch=batch, key=key)

    Args:
      params: the parameters the gradient is for.
      has_aux: whether `loss_fn` returns `(losses, aux)`.

    Returns:
      A tree shaped like `params`, every leaf the same `PendingGradient`.
    """
    dtypes = [leaf.dtype for leaf in jax.tree.leaves(params) if hasattr(leaf, "dtype")]
    placeholder = PendingGradient(has_aux, jnp.result_type(*dtypes) if dtypes else None)
    return jax.tree.map(lambda _: placeholder, params)


def requested(name: str, updates) -> PendingGradient:
    """The `PendingGradient` of `updates`, or an error that says what to pass instead."""
    leaves = jax.tree.leaves(updates)
    if leaves and isinstance(leaves[0], PendingGradient):
        if all(leaf is leaves[0] for leaf in leaves):
            return leaves[0]
    raise ValueError(
        f"{name} computes its gradient from loss_fn, so it takes "
        "sam_jax.pending_gradient(params) in place of a gradient, got "
        f"{'None' if updates is None else type(leaves[0] if leaves else updates).__name__}. "
        "Call sam_jax.update_from_loss(tx, opt_state, params, loss_fn, batch, key), or "
        f"tx.update(sam_jax.pending_gradient(params), opt_state, params, loss_fn=..., "
        "batch=..., key=...); with Flax, sam_jax.flax_linen.TrainState.apply_loss or "
        "sam_jax.flax_nnx.update."
    )

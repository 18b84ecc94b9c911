"""Flax NNX: one optimizer step from a loss function, for plain Optax and `sam` alike.

`nnx.Optimizer.update(model, grads)` takes a gradient, which `sam` computes
itself from the loss (it fails with a `sam` tx). `update(optimizer, model,
loss_fn, batch, key)` is the step for both: it splits the model into the
optimizer's `wrt` parameters and the rest, runs `sam_jax.update_from_loss`
on a functional `loss_fn`, and writes the new parameters, optimizer state and
step count back, as `nnx.Optimizer.update` does::

  from sam_jax import flax_nnx

  class MLP(nnx.Module):
      def __init__(self, rngs):
          self.hidden = nnx.Linear(32, 256, rngs=rngs)
          self.dropout = nnx.Dropout(0.1)
          self.out = nnx.Linear(256, 4, rngs=rngs)

      def __call__(self, x, *, rngs=None):
          return self.out(self.dropout(nnx.gelu(self.hidden(x)), rngs=rngs))

  def loss_fn(model, batch, key):
      logits = model(batch["x"], rngs=nnx.Rngs(dropout=key))
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])

  model = MLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, sam_jax.sam(optax.adamw(1e-3), rho=0.05), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, batch, key):
      return flax_nnx.update(optimizer, model, loss_fn, batch, key).loss

Dropout keys: SAM evaluates `loss_fn` several times per step (ascent and
descent passes, per group and microbatch) on copies of the model, and gives
each pass its key (see `sam_jax.core`). Pass that key to the dropout layers,
as above (`nnx.Dropout.__call__` takes `rngs=` an `nnx.Rngs`, `RngStream` or
key). A `Dropout` that draws from an `nnx.Rngs` stored in the model would
advance only the copy's counter, which is discarded, and so would draw the
same mask at every step.

Model state: only the `wrt` parameters are written back. Anything else that
`loss_fn` changes on the model inside the SAM passes (BatchNorm statistics,
RNG counters, `sow`n values) is not kept; return it as aux and write it back::

  def loss_fn(model, batch, key):
      logits = model(batch["x"], rngs=nnx.Rngs(dropout=key))
      losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
      return losses, nnx.state(model, nnx.BatchStat)

  out = flax_nnx.update(optimizer, model, loss_fn, batch, key, has_aux=True)
  nnx.update(model, out.aux)

With SAM, aux comes from the descent pass at w + ε on the whole batch (see
`sam_jax.flax_linen` on BatchNorm), with leading [m] and [k] axes for
`sharpness_m` > 1 and `num_microbatches` > 1.
"""

from typing import Any
from typing import NamedTuple

import jax
import optax
from flax import nnx

from sam_jax import core
from sam_jax import loss_update


class StepOutput(NamedTuple):
    """What `update` returns.

    Attributes:
      loss: the mean loss whose gradient was used (at w + ε with SAM).
      aux: `loss_fn`'s auxiliary output with `has_aux` (SAM's descent pass), else None.
      metrics: the step's `SamMetrics` with SAM, None for a plain optimizer.
    """

    loss: jax.Array
    aux: Any
    metrics: core.SamMetrics | None


def functional_loss(graphdef: nnx.GraphDef, rest, loss_fn):
    """`loss_fn(model, batch, key)` as `f(params, batch, key)`, the model rebuilt from params.

    Args:
      graphdef: the model's `GraphDef`.
      rest: the model's state other than the parameters (plain arrays).
      loss_fn: `loss_fn(model, batch, key) -> losses` or `(losses, aux)`.

    Returns:
      The loss as a function of the parameters' plain arrays.
    """

    def loss_of_params(params, batch, key):
        return loss_fn(nnx.merge(graphdef, params, rest), batch, key)

    return loss_of_params


def update(
    optimizer: nnx.Optimizer,
    model: nnx.Module,
    loss_fn,
    batch,
    key: jax.Array | None = None,
    *,
    has_aux: bool = False,
) -> StepOutput:
    """One step of `optimizer` on `model` from `loss_fn`, in place: plain Optax or `sam`.

    Example::

      out = flax_nnx.update(optimizer, model, loss_fn, batch, key)
      print(out.loss, out.metrics)  # metrics: SamMetrics with SAM, None if plain

    Args:
      optimizer: an `nnx.Optimizer` of `model`, with any Optax tx.
      model: the model; its `optimizer.wrt` parameters are updated in place.
      loss_fn: `loss_fn(model, batch, key) -> losses` per example [N], or
        `(losses, aux)` with `has_aux`.
      batch: a pytree of arrays [N, ...].
      key: the step's PRNG key (dropout; δ-SAM's random direction), or None.
      has_aux: whether `loss_fn` returns `(losses, aux)`.

    Returns:
      A `StepOutput`; `optimizer.step` is incremented.
    """
    graphdef, params, rest = nnx.split(model, optimizer.wrt, ..., graph=optimizer.graph)
    param_arrays = nnx.as_pure(params)
    step = loss_update.update_from_loss(
        optimizer.tx,
        nnx.as_pure(optimizer.opt_state),
        param_arrays,
        functional_loss(graphdef, nnx.as_pure(rest), loss_fn),
        batch,
        key,
        has_aux=has_aux,
    )
    nnx.update(model, optax.apply_updates(param_arrays, step.updates))
    nnx.update(optimizer.opt_state, nnx.state(step.opt_state, graph=optimizer.graph))
    optimizer.step[...] += 1
    return StepOutput(step.loss, step.aux, step.metrics)

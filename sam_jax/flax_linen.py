"""A Flax Linen `TrainState` that steps plain Optax optimizers and `sam` alike.

`TrainState.apply_loss(loss_fn, batch, key)` is `sam_jax.update_from_loss`
followed by `optax.apply_updates`: one call for any `tx`, so a loop switches
between plain training and SAM by configuration. `loss_fn(params, batch, key)`
returns per-example losses [N], or `(losses, aux)` with `has_aux=True`.

Mutable collections (BatchNorm's `batch_stats`) travel through `aux`: the
loss function applies the model with `mutable=["batch_stats"]` and returns the
new statistics as aux, and the loop stores them in its state. With SAM, `aux`
comes from the descent pass, at w + ε on the whole batch, so these are the
statistics of the perturbed pass. google-research/sam (Foret et al.) keeps
the clean pass's BatchNorm state instead; here the clean (ascent) pass sees
only the ascent micro-batch when `ascent_fraction` < 1, so the descent pass,
which sees every example, is the one whose statistics are kept. (With
`rho=0` only that pass runs, at w.) With `sharpness_m` > 1 or
`num_microbatches` > 1 the leaves of `aux` gain leading [m] and [k] axes (see
`sam_jax.core`): average them over those axes.

Example::

  from sam_jax import flax_linen

  class State(flax_linen.TrainState):
      batch_stats: Any

  state = State.create(apply_fn=model.apply, params=variables["params"],
                       batch_stats=variables["batch_stats"],
                       tx=sam_jax.sam(optax.adamw(1e-3), rho=0.05))

  @jax.jit
  def train_step(state, batch, key):
      def loss_fn(params, batch, key):
          variables = {"params": params, "batch_stats": state.batch_stats}
          logits, updates = state.apply_fn(variables, batch["x"], train=True,
                                           rngs={"dropout": key}, mutable=["batch_stats"])
          losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
          return losses, updates["batch_stats"]

      state, step = state.apply_loss(loss_fn, batch, key, has_aux=True)
      return state.replace(batch_stats=step.aux), step.loss
"""

import optax
from flax.training import train_state

from sam_jax import loss_update

SAM_NEEDS_LOSS = (
    "This TrainState's tx is sam_jax.sam, which computes its gradient from the loss: call "
    "`state.apply_loss(loss_fn, batch, key)` instead of `state.apply_gradients(grads=...)`."
)


class TrainState(train_state.TrainState):
    """`flax.training.train_state.TrainState` with `apply_loss`, for plain and SAM `tx`.

    Subclass it to add fields (`batch_stats`), as with Flax's own `TrainState`.
    """

    def apply_loss(
        self, loss_fn, batch, key=None, *, has_aux: bool = False
    ) -> tuple["TrainState", loss_update.LossUpdate]:
        """One step of `tx` on the gradient of `loss_fn`: `step` + 1, new params and opt_state.

        Example::

          state, step = state.apply_loss(loss_fn, batch, key)
          print(step.loss, step.metrics)  # metrics: SamMetrics with SAM, None if plain

        Args:
          loss_fn: `loss_fn(params, batch, key) -> losses` per example [N], or
            `(losses, aux)` with `has_aux`.
          batch: a pytree of arrays [N, ...].
          key: the step's PRNG key (dropout; δ-SAM's random direction), or None.
          has_aux: whether `loss_fn` returns `(losses, aux)`.

        Returns:
          The new state and the `sam_jax.LossUpdate` (loss, aux, metrics).
        """
        step = loss_update.update_from_loss(
            self.tx, self.opt_state, self.params, loss_fn, batch, key, has_aux=has_aux
        )
        new_state = self.replace(
            step=self.step + 1,
            params=optax.apply_updates(self.params, step.updates),
            opt_state=step.opt_state,
        )
        return new_state, step

    def apply_gradients(self, *, grads, **kwargs):
        """Flax's `apply_gradients`; with a `sam` tx, an error pointing to `apply_loss`."""
        if loss_update.uses_sam(self.opt_state):
            raise ValueError(SAM_NEEDS_LOSS)
        return super().apply_gradients(grads=grads, **kwargs)

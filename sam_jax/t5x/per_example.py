"""Per-example losses of a T5X model, packed or not, from one pass of its own `loss_fn`.

T5X's `BaseTransformerModel.loss_fn` returns one scalar, the sum over target
tokens of w_t·ℓ_t (divided by the model's `loss_normalizing_factor` Z when it
is a number), and its metrics. That sum is linear in the float
`decoder_loss_weights` w, so its gradient with respect to w is ℓ_t / Z, and
w_t·∂L/∂w_t is token t's share of the loss. Summing the shares over an
example's tokens gives the example's loss l_i, and Σ_i l_i = L: the
per-example losses of the model's own loss (label smoothing, z-loss and all),
from a single forward pass.

A packed row holds several examples, told apart by `decoder_segment_ids`
(1, 2, … and 0 for padding). Each row then has one slot per possible segment
(the decoder length); a slot whose example is absent has no weighted token, a
zero loss and a zero token count.
"""

import contextlib

import jax
import jax.numpy as jnp
from t5x import losses as t5x_losses

Batch = dict[str, jax.Array]

SEGMENT_IDS = "decoder_segment_ids"
LOSS_WEIGHTS = "decoder_loss_weights"


def check_linear_in_weights(model) -> None:
    """Rejects a model whose loss normalizer depends on the loss weights.

    The special normalizers ("NUM_REAL_TARGET_TOKENS", "AVERAGE_PER_SEQUENCE",
    …) make L non-linear in `decoder_loss_weights` (AVERAGE_PER_SEQUENCE even
    cancels any per-example scaling), so neither per-example losses nor
    per-example weights can go through the weights.
    """
    normalizer = getattr(model, "_loss_normalizing_factor", None)
    if isinstance(normalizer, (str, t5x_losses.SpecialLossNormalizingFactor)):
        raise ValueError(
            f"The model's loss_normalizing_factor={normalizer!r} depends on the loss "
            "weights, so per-example losses (what every SAM variant differentiates) "
            "cannot be read from them. Use None (T5.1.1's default) or a number."
        )


@contextlib.contextmanager
def forward_differentiable_cross_entropy():
    """Traces T5X's cross-entropy without its `jax.custom_vjp`, so jvp can go through it.

    `t5x.losses.cross_entropy_with_logits` is a custom_vjp function (for a
    stable gradient), and JAX cannot take forward-mode derivatives of one. δ-SAM's
    default probe needs them; inside this context T5X's losses call the same
    function's plain definition (`.fun`), whose autodiff gives the same values.
    """
    custom = t5x_losses.cross_entropy_with_logits
    t5x_losses.cross_entropy_with_logits = getattr(custom, "fun", custom)
    try:
        yield
    finally:
        t5x_losses.cross_entropy_with_logits = custom


def token_losses(model, params, batch: Batch, dropout_rng):
    """Each target token's share w_t·ℓ_t/Z of the model's loss, and the model's metrics.

    Args:
      model: a T5X `BaseTransformerModel` (encoder–decoder or decoder-only).
      params: the parameters to evaluate at.
      batch: a T5X batch with `decoder_loss_weights`.
      dropout_rng: the dropout key, or None for a deterministic pass.

    Returns:
      `(shares [rows, length] float32, metrics)`, the metrics those of
      `model.loss_fn` on the batch.
    """
    if LOSS_WEIGHTS not in batch:
        raise ValueError(
            f"The batch has no '{LOSS_WEIGHTS}'; T5X's feature converters always add it."
        )
    weights = jnp.asarray(batch[LOSS_WEIGHTS], jnp.float32)

    def loss(w):
        return model.loss_fn(params, {**batch, LOSS_WEIGHTS: w}, dropout_rng)

    gradient, metrics = jax.grad(loss, has_aux=True)(weights)
    return weights * gradient, metrics


def _per_example_sum(values: jax.Array, batch: Batch) -> jax.Array:
    """Sums [rows, length] token values per example: [rows], or [rows, length] slots if packed."""
    if SEGMENT_IDS not in batch:
        return jnp.sum(values, axis=-1)
    rows, length = values.shape
    segments = jnp.maximum(batch[SEGMENT_IDS] - 1, 0)  # padding (0) carries no weight
    slots = jnp.arange(rows)[:, None] * length + segments
    sums = jax.ops.segment_sum(values.reshape(-1), slots.reshape(-1), num_segments=rows * length)
    return sums.reshape(rows, length)


def example_losses(model, params, batch: Batch, dropout_rng):
    """Per-example losses l_i with Σ_i l_i = the model's loss on `batch`, and its metrics.

    The `loss_fn` of `sam_jax.sam_gradient` (with `has_aux=True`) for a T5X model.

    Example::

      losses, metrics = example_losses(model, train_state.params, batch, dropout_rng)
      # losses: [rows] for padded batches, [rows, decoder length] slots for packed ones

    Returns:
      `(losses, metrics)`: float32 losses, one per row, or one per segment slot
      of each packed row; the model's metrics on the batch.
    """
    shares, metrics = token_losses(model, params, batch, dropout_rng)
    return _per_example_sum(shares, batch), metrics


def example_token_counts(batch: Batch) -> jax.Array:
    """Σ of each example's loss weights, shaped like `example_losses` (0: an empty slot)."""
    return _per_example_sum(jnp.asarray(batch[LOSS_WEIGHTS], jnp.float32), batch)


def present_examples(batch: Batch) -> jax.Array:
    """Which entries of `example_losses` are examples: False on a packed row's empty slots."""
    return example_token_counts(batch) > 0

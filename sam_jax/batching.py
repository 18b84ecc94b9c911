"""How the SAM transforms cut a batch: ascent micro-batches, groups, examples.

A batch is any pytree of arrays whose leading axis is the example axis. All
functions here work on static shapes, so their checks run once, at trace time.
"""

from typing import Any

import jax
import jax.numpy as jnp

Batch = Any


def batch_size(batch: Batch) -> int:
    """The number of examples N: the common leading dimension of every leaf."""
    sizes = {leaf.shape[0] if leaf.ndim else None for leaf in jax.tree.leaves(batch)}
    if not sizes:
        raise ValueError("`batch` has no arrays: it must be a pytree of arrays [N, ...].")
    if None in sizes or len(sizes) != 1:
        shapes = [leaf.shape for leaf in jax.tree.leaves(batch)]
        raise ValueError(
            "Every array in `batch` must share its leading (example) dimension N; "
            f"got shapes {shapes}."
        )
    return sizes.pop()


def ascent_size(num_examples: int, ascent_fraction: float, num_data_shards: int) -> int:
    """Size a of the ascent micro-batch (Bahri et al. 2022, Algorithm 1).

    a is `ascent_fraction * num_examples` rounded to the nearest multiple of
    `num_data_shards`, and at least one example per data shard, so that the slice
    keeps every shard equally loaded.

    Args:
        num_examples: examples N in the (group of the) batch.
        ascent_fraction: f in (0, 1].
        num_data_shards: number of shards of the example axis.

    Returns:
        The ascent micro-batch size, a multiple of `num_data_shards` and ≤ N.
    """
    if num_examples % num_data_shards:
        raise ValueError(
            f"The batch of {num_examples} examples is not divisible by "
            f"num_data_shards={num_data_shards}; the batch size must be a multiple of "
            "the number of data shards."
        )
    per_shard = num_examples // num_data_shards
    ascent_per_shard = max(1, int(ascent_fraction * per_shard + 0.5))
    return min(ascent_per_shard, per_shard) * num_data_shards


def ascent_slice(batch: Batch, size: int, num_data_shards: int = 1) -> Batch:
    """The ascent micro-batch: the first `size / num_data_shards` examples of each shard.

    With one shard this is `batch[:size]`. With D shards the example axis is
    viewed as [D, N / D] (how a batch sharded over D devices is laid out), and
    each shard contributes its first size / D examples, so the slice is local to
    every device and needs no communication.

    Args:
        batch: pytree of arrays [N, ...].
        size: ascent micro-batch size, a multiple of `num_data_shards`.
        num_data_shards: number of shards of the example axis.

    Returns:
        A pytree of arrays [size, ...].
    """
    num_examples = batch_size(batch)
    if size == num_examples:
        return batch
    per_shard = size // num_data_shards

    def take(x):
        by_shard = x.reshape((num_data_shards, num_examples // num_data_shards) + x.shape[1:])
        return by_shard[:, :per_shard].reshape((size,) + x.shape[1:])

    return jax.tree.map(take, batch)


def split_groups(batch: Batch, num_groups: int) -> Batch:
    """Reshapes [N, ...] leaves to [num_groups, N / num_groups, ...] (contiguous groups)."""
    num_examples = batch_size(batch)
    if num_groups < 1 or num_examples % num_groups:
        raise ValueError(
            f"sharpness_m={num_groups} must be ≥ 1 and divide the batch size {num_examples}."
        )
    return jax.tree.map(
        lambda x: x.reshape((num_groups, num_examples // num_groups) + x.shape[1:]), batch
    )


def single_example(example: Batch) -> Batch:
    """Adds a leading example axis of size 1 to every leaf (for per-example vmaps)."""
    return jax.tree.map(lambda x: jnp.expand_dims(x, 0), example)


def per_example_losses(loss_fn, params, batch: Batch, key) -> jax.Array:
    """Calls `loss_fn` and checks that it returned one loss per example.

    Args:
        loss_fn: `loss_fn(params, batch, key) -> losses [N]`.
        params: the parameters to evaluate at.
        batch: pytree of arrays [N, ...].
        key: the PRNG key for dropout (or None), passed through.

    Returns:
        The per-example losses, shape [N].
    """
    losses = loss_fn(params, batch, key)
    num_examples = batch_size(batch)
    if getattr(losses, "shape", None) != (num_examples,):
        raise ValueError(
            "`loss_fn(params, batch, key)` must return per-example losses of shape "
            f"[N] = ({num_examples},), got shape {getattr(losses, 'shape', type(losses))}. "
            "Return the unreduced losses (e.g. drop the final mean)."
        )
    return losses


def microbatches(batch: Batch, num_microbatches: int, num_data_shards: int = 1) -> Batch:
    """Reshapes [N, ...] leaves to [k, N / k, ...]: microbatch j is the j-th k-th of every shard.

    With D data shards the example axis is viewed as [D, k, N / (D k)], so every
    microbatch takes the same number of examples from each shard and stays
    evenly sharded (no communication). With one shard, microbatches are
    contiguous.

    Args:
      batch: pytree of arrays [N, ...].
      num_microbatches: k ≥ 1; k · D must divide N.
      num_data_shards: D, shards of the example axis.

    Returns:
      A pytree of arrays [k, N / k, ...].
    """
    num_examples = batch_size(batch)
    if num_microbatches < 1 or num_examples % (num_microbatches * num_data_shards):
        raise ValueError(
            f"num_microbatches={num_microbatches} must be ≥ 1 and, times "
            f"num_data_shards={num_data_shards}, divide the batch size {num_examples}."
        )
    per_piece = num_examples // (num_microbatches * num_data_shards)

    def split(x):
        pieces = x.reshape((num_data_shards, num_microbatches, per_piece) + x.shape[1:])
        return jnp.swapaxes(pieces, 0, 1).reshape(
            (num_microbatches, num_data_shards * per_piece) + x.shape[1:]
        )

    return jax.tree.map(split, batch)


def microbatch_key(key, index, num_microbatches: int):
    """The dropout key of microbatch `index`: `key` itself when there is one microbatch."""
    if key is None or num_microbatches == 1:
        return key
    return jax.random.fold_in(key, index)


def sum_over_microbatches(fn, batch: Batch, num_microbatches: int, num_data_shards: int = 1):
    """Σ_j fn(microbatch_j, j), accumulated with `lax.scan` (memory of one output).

    Args:
      fn: `fn(microbatch, index) -> pytree`, the same structure for every j.
      batch: pytree of arrays [N, ...].
      num_microbatches: k; with k = 1, simply `fn(batch, 0)`.
      num_data_shards: D, see `microbatches`.

    Returns:
      The sum of the outputs over the k microbatches.
    """
    if num_microbatches == 1:
        return fn(batch, 0)
    pieces = microbatches(batch, num_microbatches, num_data_shards)
    first = jax.tree.map(lambda x: x[0], pieces)
    total = jax.tree.map(
        lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, first, jnp.int32(0))
    )

    def accumulate(running, indexed):
        index, piece = indexed
        return jax.tree.map(jnp.add, running, fn(piece, index)), None

    total, _ = jax.lax.scan(accumulate, total, (jnp.arange(num_microbatches), pieces))
    return total


def ascent_microbatch_count(ascent_examples: int, microbatch_examples: int, num_data_shards: int):
    """Microbatches for an ascent slice: the fewest, each no larger than a descent microbatch.

    The count divides the per-shard ascent size, so each ascent microbatch takes
    the same number of examples from every shard.
    """
    per_shard = ascent_examples // num_data_shards
    count = max(1, -(-ascent_examples // microbatch_examples))
    while per_shard % count:
        count += 1
    return count

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


def single_example(example: Batch) -> Batch:
    """Adds a leading example axis of size 1 to every leaf (for per-example vmaps)."""
    return jax.tree.map(lambda x: jnp.expand_dims(x, 0), example)


def check_losses(losses, batch: Batch, slots: bool = False, whole_batch: int | None = None) -> None:
    """Checks that `losses` has one loss per example of `batch`.

    Args:
      losses: what `loss_fn` returned.
      batch: the pytree of arrays [N, ...] it was computed on.
      slots: also accept [N, S], S example slots per row (a packed batch).
      whole_batch: the size of the user's batch when `batch` is a piece of it
        (the ascent micro-batch, a group, a microbatch), named in the error.
    """
    num_examples = batch_size(batch)
    shape = getattr(losses, "shape", None)
    if shape == (num_examples,) or (
        slots and shape is not None and len(shape) == 2 and shape[0] == num_examples
    ):
        return
    allowed = f"[N] = ({num_examples},)" + (" or [N, S]" if slots else "")
    piece = ""
    if whole_batch is not None and whole_batch != num_examples:
        piece = (
            f" (here N = {num_examples}: `loss_fn` was called on a piece of your batch of "
            f"{whole_batch}, the ascent micro-batch, a group or a microbatch)"
        )
    raise ValueError(
        f"`loss_fn(params, batch, key)` must return per-example losses of shape {allowed}"
        f"{piece}, got shape {shape if shape is not None else type(losses)}. Return the "
        "unreduced losses (e.g. drop the final mean)."
    )


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
    check_losses(losses, batch)
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


def piece_key(key, index, count: int):
    """The dropout key of piece `index` of `count` (a group, or a microbatch of one).

    `fold_in(key, index)`, and `key` itself when there is one piece, so that
    splitting nothing changes nothing. m-sharpness group g gets
    `piece_key(step_key, g, m)`, and microbatch j of that group
    `piece_key(group_key, j, k)`: every group and microbatch draws its own
    dropout masks, in every SAM path (`sam`, `per_instance_sam`, T5X).
    """
    if key is None or count == 1:
        return key
    return jax.random.fold_in(key, index)


def _accumulator(value):
    """Zeros like `value`, float32 for floating leaves (sums never round in bf16)."""
    dtype = jnp.float32 if jnp.issubdtype(value.dtype, jnp.floating) else value.dtype
    return jnp.zeros(value.shape, dtype)


def accumulate_microbatches(fn, batch: Batch, num_microbatches: int, num_data_shards: int = 1):
    """Σ_j of `fn`'s first output over microbatches, and its second output stacked.

    Sums are accumulated in float32 with `lax.scan` (memory of one output) and
    cast back to each leaf's dtype.

    Args:
      fn: `fn(microbatch, index) -> (to_sum, to_stack)`, the same structure for
        every j.
      batch: pytree of arrays [N, ...].
      num_microbatches: k; with k = 1, simply `fn(batch, 0)` (nothing stacked).
      num_data_shards: D, see `microbatches`.

    Returns:
      `(sum, stacked)`, the leaves of `stacked` with a leading [k] axis when k > 1.
    """
    if num_microbatches == 1:
        return fn(batch, 0)
    pieces = microbatches(batch, num_microbatches, num_data_shards)
    first = jax.tree.map(lambda x: x[0], pieces)
    sum_shapes, _ = jax.eval_shape(fn, first, jnp.int32(0))
    total = jax.tree.map(_accumulator, sum_shapes)

    def accumulate(running, indexed):
        index, piece = indexed
        to_sum, to_stack = fn(piece, index)
        running = jax.tree.map(lambda r, x: r + x.astype(r.dtype), running, to_sum)
        return running, to_stack

    total, stacked = jax.lax.scan(accumulate, total, (jnp.arange(num_microbatches), pieces))
    total = jax.tree.map(lambda t, s: t.astype(s.dtype), total, sum_shapes)
    return total, stacked


def sum_over_microbatches(fn, batch: Batch, num_microbatches: int, num_data_shards: int = 1):
    """Σ_j fn(microbatch_j, j), accumulated in float32 (see `accumulate_microbatches`)."""
    total, _ = accumulate_microbatches(
        lambda piece, index: (fn(piece, index), None), batch, num_microbatches, num_data_shards
    )
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

"""FSAM's Fisher mask on the perturbation (Zhong et al. 2022, EMNLP Findings).

Only the (1 − s)·|w| coordinates with the largest empirical Fisher information
are perturbed. The mask is a global top-k over all parameters, recomputed every
`interval` steps (including step 0), and lives in the optimizer state so that
it is checkpointed with it.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_jax import batching

FISHER_ESTIMATORS = ("empirical", "squared_batch_gradient")


class FisherMaskState(NamedTuple):
    """State of a Fisher mask.

    Attributes:
      mask: tree of booleans like the parameters; True where ε is kept.
      density: fraction of True entries, (1 − s) up to rounding.
    """

    mask: optax.Params
    density: jax.Array


class FisherMask(NamedTuple):
    """A perturbation mask, passed as `sam(..., mask=...)`.

    Attributes:
      init: `init(params) -> FisherMaskState`, an all-True mask.
      update: `update(state, count, params, loss_fn, batch, key, num_data_shards=1)
        -> FisherMaskState`, the refreshed mask on steps where
        `count % interval == 0`, else `state`.
    """

    init: Callable[..., FisherMaskState]
    update: Callable[..., FisherMaskState]


def empirical_fisher(
    loss_fn, params, examples, key, chunk_size: int, num_data_shards: int = 1
) -> optax.Params:
    """F̂ = mean_i (∇ l_i(w))², from per-example gradients (paper Eq. 9).

    Per-example gradients are computed `chunk_size` at a time with `vmap` and
    their squares accumulated in float32, so memory grows with `chunk_size`,
    not with the number of examples. Each chunk takes the same number of
    examples from every data shard (`batching.microbatches`), so under sharding
    every device holds chunk_size / num_data_shards per-example gradients.
    """
    num_examples = batching.batch_size(examples)

    def example_gradient(example):
        def loss(p):
            return batching.per_example_losses(loss_fn, p, batching.single_example(example), key)[0]

        return jax.grad(loss)(params)

    def accumulate(total, chunk):
        grads = jax.vmap(example_gradient)(chunk)
        squared = jax.tree.map(lambda g: jnp.sum(jnp.square(g.astype(jnp.float32)), 0), grads)
        return jax.tree.map(jnp.add, total, squared), None

    zeros = jax.tree.map(lambda w: jnp.zeros(w.shape, jnp.float32), params)
    chunks = batching.microbatches(examples, num_examples // chunk_size, num_data_shards)
    total, _ = jax.lax.scan(accumulate, zeros, chunks)
    return jax.tree.map(lambda t: t / num_examples, total)


def squared_batch_gradient(loss_fn, params, examples, key) -> optax.Params:
    """F̂ = (∇ mean_i l_i(w))², the estimator of the FSAM authors' code."""

    def loss(p):
        return jnp.mean(batching.per_example_losses(loss_fn, p, examples, key))

    return jax.tree.map(lambda g: jnp.square(g.astype(jnp.float32)), jax.grad(loss)(params))


# Entries counted at once: backends that do not fuse a comparison into its sum
# (XLA:CPU) store one int32 per entry counted, so large leaves are counted by
# row blocks of about this many entries.
COUNT_BLOCK = 1 << 20
# Leaves this small are counted at once.
SMALL_LEAF = 1 << 16


def _rows_per_block(num_rows: int, width: int) -> int:
    """The most rows, dividing `num_rows`, whose entries fit in `COUNT_BLOCK`, at most half.

    At least two blocks, so that XLA keeps the loop (and its temporaries inside it).
    """
    most = max(1, min(COUNT_BLOCK // width, num_rows // 2))
    return max(d for d in range(1, most + 1) if num_rows % d == 0)


def _as_rows(score: jax.Array) -> jax.Array:
    """A leaf viewed as a matrix [rows, width] (row-major order kept)."""
    return score.reshape((score.shape[0] if score.ndim >= 2 else 1, -1))


def _before(row_ids: jax.Array, width: int):
    """`before(cut)`: whether each entry's row-major position is < cut.

    Built from a column of row ids and a row of column ids, which broadcast
    inside the comparison: no position array is ever stored.
    """
    columns = jnp.arange(width, dtype=jnp.int32)[None, :]

    def before(cut):
        cut_row, cut_column = cut // width, cut % width
        return (row_ids < cut_row) | ((row_ids == cut_row) & (columns < cut_column))

    return before


def _count(predicate, score: jax.Array) -> jax.Array:
    """Σ predicate(values, before) over a leaf, int32 (see `_before`).

    Memory: at most about `COUNT_BLOCK` int32 temporaries, whatever the leaf's
    size (blocks of rows are sliced in place, in a loop).
    """
    rows = _as_rows(score)
    num_rows, width = rows.shape
    if num_rows < 2 or rows.size <= SMALL_LEAF:
        before = _before(jnp.arange(num_rows, dtype=jnp.int32)[:, None], width)
        return jnp.sum(predicate(rows, before), dtype=jnp.int32)
    block = _rows_per_block(num_rows, width)

    def count_block(index, total):
        start = index * block
        values = jax.lax.dynamic_slice_in_dim(rows, start, block)
        before = _before(start + jnp.arange(block, dtype=jnp.int32)[:, None], width)
        return total + jnp.sum(predicate(values, before), dtype=jnp.int32)

    return jax.lax.fori_loop(0, num_rows // block, count_block, jnp.int32(0))


def _float_of_bits(bits: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def top_k_mask(scores: optax.Params, k: int) -> optax.Params:
    """Boolean tree with True on exactly the k largest scores across all leaves.

    Works without concatenating, sorting or copying the parameters: every pass
    is a fused count over the scores, compared as they are. A bisection over
    the float32 bit patterns (monotone in the value of non-negative floats)
    finds the k-th largest value t in 32 counting passes; entries above t are
    kept, and ties at t are broken by position (leaf order, then row-major):
    each leaf keeps its share of the ties, its first ones, found by a second
    32-step bisection on the position. So exactly k entries are True, and
    memory beyond the mask itself stays O(number of leaves).

    Args:
      scores: tree of non-negative float32 arrays (other floats are cast).
      k: how many entries to keep, 0 ≤ k ≤ total size.

    Returns:
      A tree of booleans like `scores`.
    """
    leaves, treedef = jax.tree.flatten(scores)
    leaves = [s if s.dtype == jnp.float32 else s.astype(jnp.float32) for s in leaves]

    def leaf_counts(predicate_of):
        """[Σ predicate_of(l)(values, before) over leaf l] for every leaf l."""
        return jnp.stack([_count(predicate_of(index), s) for index, s in enumerate(leaves)])

    def count(predicate):
        return jnp.sum(leaf_counts(lambda _: predicate))

    def bisect_value(_, bounds):
        low, high = bounds  # count(≥ low) ≥ k > count(≥ high), as bit patterns
        middle = low + (high - low) // 2
        enough = count(lambda s, _: s >= _float_of_bits(middle)) >= k
        return jnp.where(enough, middle, low), jnp.where(enough, high, middle)

    inf_bits = jnp.int32(0x7F800001)  # a NaN above +inf: no score is ≥ it
    threshold_bits, _ = jax.lax.fori_loop(0, 32, bisect_value, (jnp.int32(0), inf_bits))
    threshold = _float_of_bits(threshold_bits)
    ties = leaf_counts(lambda _: lambda v, before: v == threshold)
    ties_to_keep = k - count(lambda s, _: s > threshold)
    keep = jnp.clip(ties_to_keep - (jnp.cumsum(ties) - ties), 0, ties)  # per leaf, in order

    def ties_before(cuts):  # per leaf: ties at a position < cut
        return leaf_counts(lambda leaf: lambda v, before: (v == threshold) & before(cuts[leaf]))

    def bisect_position(_, bounds):
        low, high = bounds  # the first cut with ties_before(cut) ≥ keep is in [low, high]
        middle = low + (high - low) // 2
        enough = ties_before(middle) >= keep
        return jnp.where(enough, low, middle + 1), jnp.where(enough, middle, high)

    sizes = jnp.asarray([s.size for s in leaves], jnp.int32)
    _, cuts = jax.lax.fori_loop(0, 32, bisect_position, (jnp.zeros_like(sizes), sizes))
    masks = []
    for s, cut in zip(leaves, cuts, strict=True):
        rows = _as_rows(s)
        before = _before(jnp.arange(rows.shape[0], dtype=jnp.int32)[:, None], rows.shape[1])
        mask = (rows > threshold) | ((rows == threshold) & before(cut))
        masks.append(mask.reshape(s.shape))
    return jax.tree.unflatten(treedef, masks)


def after_refresh(tree, state: FisherMaskState):
    """`tree`, bit for bit, as a value that exists only once `state` does.

    A data dependency that orders what reads `tree` after the mask's refresh.
    `jax.lax.optimization_barrier` does not do it on XLA:CPU: the barrier is
    expanded away (replaced by its operands) before scheduling, and the
    scheduler then starts what needs only the parameters, such as the SAM
    passes' bf16 casts of the weights (on CPU a float32 copy of them, about
    one parameter copy), before the refresh, so they are live during it. The
    dependency is an elementwise select on a never-true predicate of the
    refreshed density (≥ 0), which XLA fuses into the readers.
    """
    never = state.density < 0
    return jax.tree.map(lambda x: jnp.where(never, jnp.zeros_like(x), x), tree)


def fisher_samples(batch, num_samples: int, num_data_shards: int = 1):
    """The examples of a Fisher estimate: the first num_samples / D of every data shard.

    The count is `num_samples`, at most the batch, rounded down to a multiple of
    the D = `num_data_shards` shards (at least one example per shard), so the
    samples come evenly from every shard and stay where they are
    (`batching.ascent_slice`).
    """
    num_examples = batching.batch_size(batch)
    per_shard = max(1, min(num_samples, num_examples) // num_data_shards)
    return batching.ascent_slice(batch, per_shard * num_data_shards, num_data_shards)


def _check_mask_arguments(sparsity, interval, num_samples, fisher, chunk_size) -> None:
    if not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}.")
    if not isinstance(interval, int) or interval < 1:
        raise ValueError(f"interval must be an integer ≥ 1, got {interval!r}.")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer ≥ 1, got {num_samples!r}.")
    if fisher not in FISHER_ESTIMATORS:
        raise ValueError(f"fisher must be one of {FISHER_ESTIMATORS}, got {fisher!r}.")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an integer ≥ 1, got {chunk_size!r}.")


def _fisher_scores(fisher, loss_fn, params, examples, key, chunk_size, num_data_shards):
    """F̂ on `examples` by the named estimator (see `fisher_mask`)."""
    if fisher != "empirical":
        return squared_batch_gradient(loss_fn, params, examples, key)
    used = batching.batch_size(examples)
    chunk = num_data_shards if chunk_size is None else chunk_size
    if used % chunk or chunk % num_data_shards:
        raise ValueError(
            f"chunk_size={chunk} must be a multiple of num_data_shards="
            f"{num_data_shards} and divide the {used} examples used for the Fisher "
            "information (num_samples, at most the batch size)."
        )
    return empirical_fisher(loss_fn, params, examples, key, chunk, num_data_shards)


def fisher_mask(
    sparsity: float = 0.9,
    interval: int = 100,
    num_samples: int = 16,
    fisher: str = "empirical",
    chunk_size: int | None = None,
) -> FisherMask:
    """The Fisher mask of FSAM (Zhong et al. 2022, Eq. 6–10).

    Every `interval` steps (and at step 0) the diagonal Fisher information F̂
    is estimated on `num_samples` examples of the current batch, and the mask
    keeps the k = round((1 − s)·|w|) coordinates with the largest F̂, a global
    top-k over all parameters. `sam` then perturbs ε ⊙ m, normalised by the
    unmasked ‖g‖. Sparsity 0 keeps everything and is exactly SAM.

    Where the samples come from: the paper draws N_Fisher examples from the
    training set; here they are the first num_samples / D examples of each of
    the D data shards of the step's batch (`fisher_samples`), i.e. a sample of
    the shuffled training stream, spread evenly over the devices.

    Two estimators:

    * ``"empirical"`` (default): mean of squared per-example gradients of the
      per-example loss (the negative log-likelihood), the paper's Eq. 9. This is
      the quantity the paper defines. Its per-example gradients are accumulated
      a chunk at a time, by default one example per data shard, so a refresh
      needs about one more float32 copy of the parameters than an ordinary
      step; amortised over `interval` steps its time is small.
    * ``"squared_batch_gradient"``: the square of the mean gradient over the same
      examples, as in the authors' released code. Cheaper, but it measures the
      squared mean rather than the mean square, so coordinates whose per-example
      gradients cancel look unimportant.

    Example::

      tx = sam_jax.sam(optax.adamw(1e-4), rho=0.05,
                       mask=sam_jax.fisher_mask(sparsity=0.9, interval=100))

    Args:
      sparsity: s in [0, 1), the fraction of coordinates *not* perturbed.
      interval: refresh the mask every `interval` ≥ 1 steps.
      num_samples: N_Fisher ≥ 1, examples used per refresh (see
        `fisher_samples`).
      fisher: ``"empirical"`` or ``"squared_batch_gradient"``.
      chunk_size: per-example gradients computed at once (memory: chunk_size / D
        gradients per device); None is one per data shard. Must be a multiple of
        the data shards and divide the number of examples used.

    Returns:
      A `FisherMask` to pass as `sam(..., mask=...)`.
    """
    _check_mask_arguments(sparsity, interval, num_samples, fisher, chunk_size)

    def init(params):
        mask = jax.tree.map(lambda w: jnp.ones(w.shape, jnp.bool_), params)
        return FisherMaskState(mask, jnp.float32(1.0))

    def refresh(params, loss_fn, batch, key, num_data_shards):
        examples = fisher_samples(batch, num_samples, num_data_shards)
        scores = _fisher_scores(fisher, loss_fn, params, examples, key, chunk_size, num_data_shards)
        total = sum(w.size for w in jax.tree.leaves(params))
        keep = round((1.0 - sparsity) * total)
        return FisherMaskState(top_k_mask(scores, keep), jnp.float32(keep / total))

    def update(state, count, params, loss_fn, batch, key, num_data_shards=1):
        return jax.lax.cond(
            count % interval == 0,
            lambda: refresh(params, loss_fn, batch, key, num_data_shards),
            lambda: state,
        )

    return FisherMask(init, update)

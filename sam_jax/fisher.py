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
      update: `update(state, count, params, loss_fn, batch, key) -> FisherMaskState`,
        the refreshed mask on steps where `count % interval == 0`, else `state`.
    """

    init: Callable[..., FisherMaskState]
    update: Callable[..., FisherMaskState]


def empirical_fisher(loss_fn, params, examples, key, chunk_size: int) -> optax.Params:
    """F̂ = mean_i (∇ l_i(w))², from per-example gradients (paper Eq. 9).

    Per-example gradients are computed `chunk_size` at a time with `vmap` and
    their squares accumulated in float32, so memory grows with `chunk_size`,
    not with the number of examples.
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
    chunks = batching.split_groups(examples, num_examples // chunk_size)
    total, _ = jax.lax.scan(accumulate, zeros, chunks)
    return jax.tree.map(lambda t: t / num_examples, total)


def squared_batch_gradient(loss_fn, params, examples, key) -> optax.Params:
    """F̂ = (∇ mean_i l_i(w))², the estimator of the FSAM authors' code."""

    def loss(p):
        return jnp.mean(batching.per_example_losses(loss_fn, p, examples, key))

    return jax.tree.map(lambda g: jnp.square(g.astype(jnp.float32)), jax.grad(loss)(params))


def top_k_mask(scores: optax.Params, k: int) -> optax.Params:
    """Boolean tree with True on exactly the k largest scores across all leaves.

    Works without concatenating the parameters (so it stays sharded and needs
    no |w|-sized sort): a bisection over the bit patterns of the non-negative
    float32 scores (monotone in their value) finds the k-th largest value t in
    32 counting passes; entries above t are kept, and ties at t are broken by
    position (leaf order, then row-major), so exactly k entries are True.

    Args:
      scores: tree of non-negative float arrays.
      k: how many entries to keep, 0 ≤ k ≤ total size.

    Returns:
      A tree of booleans like `scores`.
    """
    bits = jax.tree.map(
        lambda s: jax.lax.bitcast_convert_type(jnp.abs(s).astype(jnp.float32), jnp.int32),
        scores,
    )

    def count_at_least(threshold):
        return sum(jnp.sum(b >= threshold, dtype=jnp.int32) for b in jax.tree.leaves(bits))

    def bisect(_, bounds):
        low, high = bounds  # count(≥ low) ≥ k > count(≥ high)
        middle = low + (high - low) // 2
        enough = count_at_least(middle) >= k
        return jnp.where(enough, middle, low), jnp.where(enough, high, middle)

    inf_bits = jnp.int32(0x7F800001)  # above +inf: nothing is at least this
    threshold, _ = jax.lax.fori_loop(0, 32, bisect, (jnp.int32(0), inf_bits))
    ties_to_keep = k - sum(jnp.sum(b > threshold, dtype=jnp.int32) for b in jax.tree.leaves(bits))

    leaves, treedef = jax.tree.flatten(bits)
    masks, ties_before = [], jnp.int32(0)
    for b in leaves:
        tie = (b == threshold).reshape(-1)
        tie_rank = jnp.cumsum(tie, dtype=jnp.int32) + ties_before
        keep_tie = tie & (tie_rank <= ties_to_keep)
        masks.append((b > threshold) | keep_tie.reshape(b.shape))
        ties_before = ties_before + jnp.sum(tie, dtype=jnp.int32)
    return jax.tree.unflatten(treedef, masks)


def fisher_mask(
    sparsity: float = 0.9,
    interval: int = 100,
    num_samples: int = 16,
    fisher: str = "empirical",
    chunk_size: int | None = None,
) -> FisherMask:
    """The Fisher mask of FSAM (Zhong et al. 2022, Eq. 6–10).

    Every `interval` steps (and at step 0) the diagonal Fisher information F̂
    is estimated on the first `num_samples` examples of the batch, and the mask
    keeps the k = round((1 − s)·|w|) coordinates with the largest F̂, a global
    top-k over all parameters. `sam` then perturbs ε ⊙ m, normalised by the
    unmasked ‖g‖. Sparsity 0 keeps everything and is exactly SAM.

    Two estimators:

    * ``"empirical"`` (default): mean of squared per-example gradients of the
      per-example loss (the negative log-likelihood), the paper's Eq. 9. This is
      the quantity the paper defines; its cost, `num_samples` per-example
      gradients once per `interval` steps, is negligible when amortised.
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
      num_samples: N_Fisher ≥ 1, examples used per refresh (at most the batch).
      fisher: ``"empirical"`` or ``"squared_batch_gradient"``.
      chunk_size: per-example gradients computed at once (memory: chunk_size
        copies of the gradient); None computes all `num_samples` at once. Must
        divide the number of examples used.

    Returns:
      A `FisherMask` to pass as `sam(..., mask=...)`.
    """
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

    def init(params):
        mask = jax.tree.map(lambda w: jnp.ones(w.shape, jnp.bool_), params)
        return FisherMaskState(mask, jnp.float32(1.0))

    def refresh(params, loss_fn, batch, key):
        used = min(num_samples, batching.batch_size(batch))
        examples = jax.tree.map(lambda x: x[:used], batch)
        if fisher == "empirical":
            chunk = used if chunk_size is None else chunk_size
            if used % chunk:
                raise ValueError(
                    f"chunk_size={chunk} must divide the {used} examples used for the Fisher "
                    "information (num_samples, at most the batch size)."
                )
            scores = empirical_fisher(loss_fn, params, examples, key, chunk)
        else:
            scores = squared_batch_gradient(loss_fn, params, examples, key)
        total = sum(w.size for w in jax.tree.leaves(params))
        keep = round((1.0 - sparsity) * total)
        return FisherMaskState(top_k_mask(scores, keep), jnp.float32(keep / total))

    def update(state, count, params, loss_fn, batch, key):
        return jax.lax.cond(
            count % interval == 0,
            lambda: refresh(params, loss_fn, batch, key),
            lambda: state,
        )

    return FisherMask(init, update)

"""ESAM: stochastic weight perturbation and sharpness-sensitive data selection.

Du et al., "Efficient Sharpness-aware Minimization for Improved Training of
Neural Networks" (ICLR 2022) make SAM cheaper in two independent ways:

* Stochastic weight perturbation (SWP): every coordinate is perturbed with
  probability β, and the kept ones by ε/β, so that E[ε̂] = ε:
  ε̂ = m ⊙ ε / β, m_j ~ Bernoulli(β) (one mask per step, from the step's key).
* Sharpness-sensitive data selection (SDS): the descent gradient uses only the
  fraction γ of the examples whose loss rises most under ε,
  l_i(w + ε) − l_i(w); the others are left out of the backward pass.

Where this follows the paper and not the authors' code (dydjw9/Efficient_SAM,
`utils/Esam.py`, commit 1e06840):

* SWP: the code draws the mask per parameter *tensor* (Python's `random`),
  at the end of the previous step, and leaves the dropped tensors out of the
  ascent's backward pass; ε is normalised by the kept gradient's norm, so
  ‖ε̂‖ = ρ/β. Here the mask is per coordinate, drawn at the step from the step's
  key, and ε̂ = m ⊙ ε/β with ε normalised by the whole gradient (as FSAM's mask
  is), so E[ε̂] = ε.
* SDS: the code keeps the examples whose increase is *strictly* above the
  int(γN)-th largest, i.e. γN − 1 of them without ties; here exactly the γN
  largest (rounded as `selected_per_shard` says).

In XLA the masked ascent gradient is computed in full, so SWP saves nothing
here; SDS replaces the descent's forward and backward pass on N examples by a
forward pass on N (the scores) and a forward and backward pass on γN.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class Esam(NamedTuple):
    """ESAM's settings, passed as `sam(..., esam=sam_jax.esam(beta, gamma))`.

    Attributes:
      beta: β in (0, 1], the probability that a coordinate is perturbed (SWP).
      gamma: γ in (0, 1], the fraction of examples the descent uses (SDS).
    """

    beta: float
    gamma: float

    @property
    def perturbs_all(self) -> bool:
        """Whether every coordinate is perturbed (β = 1: no SWP)."""
        return self.beta == 1.0

    @property
    def selects_all(self) -> bool:
        """Whether the descent uses every example (γ = 1: no SDS)."""
        return self.gamma == 1.0


def esam(beta: float = 0.6, gamma: float = 0.5) -> Esam:
    """ESAM's SWP (β) and SDS (γ) on a SAM step (Du et al. 2022, Algorithm 1).

    β = γ = 1 is SAM. The defaults are the authors' CIFAR setting (their run.sh:
    β = 0.6, γ = 0.5 for ResNet-18; 0.5, 0.5 for WideResNet).

    Example::

      tx = sam_jax.sam(optax.adamw(1e-4), rho=0.05, esam=sam_jax.esam(beta=0.6, gamma=0.5))

    Args:
      beta: β in (0, 1], the probability that a coordinate is perturbed.
      gamma: γ in (0, 1], the fraction of each group's examples (of every data
        shard) whose gradient at w + ε is the descent gradient.

    Returns:
      An `Esam` to pass as `sam(..., esam=...)`.
    """
    for name, value in (("beta", beta), ("gamma", gamma)):
        if not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
            raise ValueError(f"esam's {name} must be in (0, 1], got {value!r}.")
    return Esam(float(beta), float(gamma))


def key_of(key: jax.Array) -> jax.Array:
    """The key of a step's SWP mask, folded out of the step's key (as δ-SAM's r is)."""
    return jax.random.fold_in(key, 0xE5A)


def weight_mask(key: jax.Array, params: optax.Params, beta: float) -> optax.Params:
    """m: a boolean tree like `params`, each entry True with probability β, independently."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    masks = [jax.random.bernoulli(k, beta, w.shape) for k, w in zip(keys, leaves, strict=True)]
    return jax.tree.unflatten(treedef, masks)


def density(mask: optax.Params) -> jax.Array:
    """The fraction of True entries of a boolean tree (float32)."""
    leaves = jax.tree.leaves(mask)
    kept = sum(jnp.sum(m, dtype=jnp.float32) for m in leaves)
    return kept / sum(m.size for m in leaves)


def selected_per_shard(num_examples: int, gamma: float, num_data_shards: int, count: int) -> int:
    """Examples SDS keeps from each data shard: γ·N/D rounded to a multiple of `count`.

    The nearest multiple of `count` (the descent's microbatches), at least
    `count`, so that every microbatch of the selection takes the same number
    of examples from every shard.
    """
    per_shard = num_examples // num_data_shards
    kept = int(round(gamma * per_shard / count)) * count
    return min(max(count, kept), per_shard)


def select(batch, scores: jax.Array, per_shard: int, num_data_shards: int):
    """The `per_shard` examples with the largest scores of every data shard, as a batch.

    Args:
      batch: a pytree of arrays [N, ...], shard d its rows d·N/D … (d+1)·N/D − 1.
      scores: [N] float32, in the batch's order.
      per_shard: how many to keep from each shard.
      num_data_shards: D.

    Returns:
      A pytree of arrays [D·per_shard, ...], shard d's selected examples in
      shard d's rows (in the order of their scores), so the examples stay on
      their devices; XLA gathers only the scores (one float per row) for the
      top-k.
    """
    by_shard = scores.reshape(num_data_shards, -1)
    _, indices = jax.lax.top_k(by_shard, per_shard)  # [D, per_shard]

    def take(x):
        rows = x.reshape((num_data_shards, by_shard.shape[1]) + x.shape[1:])
        index = indices.reshape(indices.shape + (1,) * (x.ndim - 1))
        return jnp.take_along_axis(rows, index, axis=1).reshape((-1,) + x.shape[1:])

    return jax.tree.map(take, batch)


def batch_order(values: jax.Array, num_microbatches: int, num_data_shards: int) -> jax.Array:
    """Per-row values in microbatch order ([k, N/k] flattened) back in the batch's order.

    The inverse of `batching.microbatches` on a vector [N].
    """
    if num_microbatches == 1:
        return values
    pieces = values.reshape(num_microbatches, num_data_shards, -1)
    return jnp.swapaxes(pieces, 0, 1).reshape(-1)

"""Deterministic `train_fraction` subsampling of a seqio source's training split.

The data-limited setting of Bahri et al. (2022) trains on 2 % to 80 % of each
training split. `with_train_fraction(source, fraction, seed)` wraps *any* seqio
`DataSource` (a `FunctionDataSource`, a `TfdsDataSource`, ...) in a
`TrainFractionSource` that keeps exactly `num_train_examples(N, fraction)`
examples of its training split; every other split passes through untouched.
`train_fraction_indices(N, fraction, seed)` is the same selection as plain
numpy, for tests and offline inspection.

The selection rule: every example index i gets a key `splitmix.mix64(seed, i)`
(identical on every platform and numpy version); the examples with the
`k = max(1, floor(fraction * N + 1/2))` smallest keys are kept. Hence the same
(fraction, seed) always selects the same examples, the subsets are nested for
increasing fractions (a 5 % subset is inside the 20 % subset of the same seed),
the count is exact, and a different seed gives a different subset.

Example:
  >>> train_fraction_indices(10, 0.3, seed=0).tolist()
  [1, 4, 5]
  >>> source = with_train_fraction(source, 0.05, seed=1)  # a TrainFractionSource
  >>> "demo_nli" + train_fraction_suffix(0.05, seed=1)
  'demo_nli_frac0.05_seed1'
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import seqio
import tensorflow as tf

from sam_jax.tasks import splitmix


def validate_train_fraction(train_fraction: Any) -> float:
    """Returns `train_fraction` as a float; ValueError unless it is in (0, 1]."""
    ok = isinstance(train_fraction, (int, float, np.integer, np.floating))
    ok = ok and not isinstance(train_fraction, bool)
    if ok:
        value = float(train_fraction)
        if math.isfinite(value) and 0.0 < value <= 1.0:
            return value
    raise ValueError(
        "train_fraction must be a number in the range (0, 1] (0 excluded, 1 "
        f"included), got {train_fraction!r}"
    )


def num_train_examples(num_examples: int, train_fraction: float) -> int:
    """The exact size of a `train_fraction` subset of `num_examples` examples."""
    fraction = validate_train_fraction(train_fraction)
    if num_examples <= 0:
        return 0
    return max(1, min(num_examples, math.floor(fraction * num_examples + 0.5)))


def train_fraction_indices(num_examples: int, train_fraction: float, seed: int = 0) -> np.ndarray:
    """Sorted indices of the examples kept by a `train_fraction` subsample."""
    k = num_train_examples(num_examples, train_fraction)
    keys = splitmix.mix64_array(seed, np.arange(num_examples, dtype=np.uint64))
    order = np.argsort(keys, kind="stable")
    return np.sort(order[:k]).astype(np.int64)


def train_fraction_suffix(train_fraction: float = 1.0, seed: int = 0) -> str:
    """The task-name suffix for a subsampled variant: '', '_frac0.05', ...

    seqio allows '.' in names. The seed only appears when it is not 0, and not
    at all for fraction 1 (which keeps every example whatever the seed).
    """
    fraction = validate_train_fraction(train_fraction)
    if fraction == 1.0:
        return ""
    suffix = f"_frac{fraction:g}"
    return suffix if seed == 0 else f"{suffix}_seed{seed}"


def without_train_fraction_suffix(name: str) -> str:
    """'demo_nli_frac0.05_seed1' -> 'demo_nli': undoes `train_fraction_suffix`."""
    return _SUFFIX.sub("", name)


_SUFFIX = re.compile(r"_frac[0-9.e+-]+(_seed[0-9]+)?$")


class TrainFractionSource(seqio.DataSource):
    """Keeps a deterministic `train_fraction` subset of one split of a source.

    Args:
      source: any seqio DataSource. It must know the size of the split
        (`num_input_examples`, as FunctionDataSource with `num_input_examples`
        and TfdsDataSource do) unless `num_examples` is given.
      train_fraction: in (0, 1]; 1 returns the source's data unchanged.
      seed: selects which examples; subsets of one seed are nested.
      split: the split to subsample (the others pass through).
      index_key: None to number examples in the source's unshuffled order (the
        source is then read with shuffle=False; the Task shuffles afterwards),
        or the name of an integer feature holding a stable index in [0, N),
        e.g. 'idx' for the TFDS GLUE datasets, which makes the choice
        independent of file order and shuffling.
      num_examples: the split's size, if the source does not report it.
    """

    def __init__(
        self,
        source: seqio.DataSource,
        train_fraction: float,
        seed: int = 0,
        split: str = "train",
        index_key: str | None = None,
        num_examples: int | None = None,
    ):
        self._fraction = validate_train_fraction(train_fraction)
        if split not in source.splits:
            raise ValueError(f"split {split!r} is not one of the source's splits {source.splits}")
        self._source = source
        self._seed = int(seed)
        self._split = split
        self._index_key = index_key
        if num_examples is None:
            num_examples = source.num_input_examples(split)
        if num_examples is None:
            raise ValueError(
                "train_fraction needs the size of the split: the source reports "
                "no num_input_examples, pass num_examples="
            )
        self._mask = np.zeros(int(num_examples), dtype=bool)
        self._mask[train_fraction_indices(len(self._mask), self._fraction, self._seed)] = True
        counts = {s: source.num_input_examples(s) for s in source.splits}
        counts[split] = int(self._mask.sum())
        super().__init__(
            splits=source.splits,
            num_input_examples=counts,
            caching_permitted=source.caching_permitted,
        )

    @property
    def train_fraction(self) -> float:
        return self._fraction

    @property
    def seed(self) -> int:
        return self._seed

    @property
    def source(self) -> seqio.DataSource:
        return self._source

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return False

    def list_shards(self, split: str) -> Sequence[str]:
        if split == self._split and self._fraction < 1.0:
            return [split]  # the Task shards at the (already filtered) examples
        return self._source.list_shards(split)

    def __repr__(self):
        return (
            f"TrainFractionSource({self._source!r}, train_fraction="
            f"{self._fraction}, seed={self._seed}, split={self._split!r})"
        )

    def get_dataset(
        self,
        split: str = "train",
        shuffle: bool = True,
        seed: int | None = None,
        shard_info: seqio.ShardInfo | None = None,
        *,
        sequence_length=None,  # Unused
        use_cached: bool = False,  # Unused
        num_epochs: int | None = 1,  # Unused
    ) -> tf.data.Dataset:
        del sequence_length, use_cached, num_epochs
        if split != self._split or self._fraction == 1.0:
            return self._source.get_dataset(
                split=split, shuffle=shuffle, seed=seed, shard_info=shard_info
            )
        mask = tf.constant(self._mask)
        if self._index_key is None:
            ds = self._source.get_dataset(split=split, shuffle=False, seed=seed)
            ds = ds.enumerate()
            ds = ds.filter(lambda i, ex: tf.gather(mask, i))
            ds = ds.map(lambda i, ex: ex)
        else:
            key = self._index_key
            ds = self._source.get_dataset(split=split, shuffle=shuffle, seed=seed)
            ds = ds.filter(lambda ex: tf.gather(mask, tf.cast(ex[key], tf.int64)))
        if shard_info is not None and shard_info.num_shards > 1:
            ds = ds.shard(shard_info.num_shards, shard_info.index)
        return ds


def with_train_fraction(
    source: seqio.DataSource, train_fraction: float = 1.0, seed: int = 0, **kwargs
) -> seqio.DataSource:
    """`source` itself for fraction 1 (any seed), else a `TrainFractionSource`.

    Example:
      >>> with_train_fraction(source, 1.0, seed=5) is source
      True
    """
    fraction = validate_train_fraction(train_fraction)
    if fraction == 1.0:
        return source
    return TrainFractionSource(source, fraction, seed=seed, **kwargs)

"""splitmix64 hashing and a platform-independent PRNG for the generated tasks.

The same seed gives the same numbers on every platform and Python/numpy
version: `mix64(seed, index)` keys the `train_fraction` subsampling
(`tasks.subsampling`) and `Rng` generates the demo tasks' text
(`tasks.demo`). Only numpy is needed.

Example:
  >>> rng = Rng("demo_cbqa/facts", 0)
  >>> rng.below(6) in range(6)
  True
  >>> mix64(0, 3) == int(mix64_array(0, np.array([3]))[0])
  True
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def splitmix64(x: int) -> int:
    """The splitmix64 finaliser of `x + golden` (a bijection on 64-bit ints)."""
    z = (int(x) + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _splitmix64_np(x: np.ndarray) -> np.ndarray:
    """Vectorised `splitmix64` on a uint64 array (wrap-around arithmetic)."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(_GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def mix64(seed: int, index: int) -> int:
    """64-bit hash of (seed, index); `mix64_array` is its vectorised twin."""
    return splitmix64(splitmix64(int(seed) & _MASK64) ^ (int(index) & _MASK64))


def mix64_array(seed: int, indices: np.ndarray) -> np.ndarray:
    """`mix64(seed, i)` for every i of `indices`, as a uint64 array."""
    key = np.uint64(splitmix64(int(seed) & _MASK64))
    return _splitmix64_np(np.asarray(indices).astype(np.uint64) ^ key)


def stable_seed(*parts: Any) -> int:
    """A 64-bit seed from any printable parts (stable across runs and hosts)."""
    text = "/".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little")


class Rng:
    """A splitmix64 generator.

    Python's `random` only guarantees `random()` across versions (`choice`,
    `shuffle`, `randrange` have changed before), and numpy's `Generator` methods
    may change for bug fixes, so the generated data sets use this instead: the
    same seed gives the same data on every Python/numpy version.

    Example:
      >>> Rng("names", 0).sample(["a", "b", "c"], 2) == Rng("names", 0).sample(["a", "b", "c"], 2)
      True
    """

    def __init__(self, *seed_parts: Any):
        self._state = stable_seed(*seed_parts)

    def next64(self) -> int:
        x = self._state
        self._state = (x + _GOLDEN) & _MASK64
        return splitmix64(x)

    def below(self, n: int) -> int:
        """Uniform integer in [0, n) (rejection sampling, no modulo bias)."""
        if n <= 0:
            raise ValueError(f"n must be positive, got {n}")
        limit = (1 << 64) - ((1 << 64) % n)
        while True:
            x = self.next64()
            if x < limit:
                return x % n

    def choice(self, seq: Sequence[Any]) -> Any:
        return seq[self.below(len(seq))]

    def shuffle(self, items: list) -> None:
        for i in range(len(items) - 1, 0, -1):
            j = self.below(i + 1)
            items[i], items[j] = items[j], items[i]

    def sample(self, seq: Sequence[Any], k: int) -> list:
        items = list(seq)
        if not 0 <= k <= len(items):
            raise ValueError(f"cannot sample {k} of {len(items)} items")
        for i in range(k):  # partial Fisher-Yates
            j = i + self.below(len(items) - i)
            items[i], items[j] = items[j], items[i]
        return items[:k]

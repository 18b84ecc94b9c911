"""Assertions on pytrees of arrays, shared by the tests."""

import jax
import numpy as np


def _leaf_pairs(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    return zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)


def assert_equal(a, b):
    """The trees have the same structure and bit-identical leaves."""
    for x, y in _leaf_pairs(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def assert_close(a, b, rtol=1e-5, atol=1e-7):
    """The trees have the same structure and leaves within `rtol`/`atol`."""
    for x, y in _leaf_pairs(a, b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def leaf_changes(a, b) -> list[float]:
    """The largest absolute difference of every leaf of `a` from its leaf in `b`."""
    return [float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in _leaf_pairs(a, b)]

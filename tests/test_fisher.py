"""Tests for sam_jax.fisher: global top-k, the Fisher estimators, refresh schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference

import sam_jax
from sam_jax import fisher


def _flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


@pytest.mark.parametrize("k", [0, 1, 5, 9, 17, 20])
def test_top_k_mask_is_the_global_top_k(k):
    rng = np.random.default_rng(k)
    scores = {"a": jnp.asarray(rng.random((3, 4)), jnp.float32), "b": jnp.asarray(rng.random(8))}
    mask = _flat(fisher.top_k_mask(scores, k))
    flat = _flat(scores)
    expected = np.zeros_like(mask)
    expected[np.argsort(-flat, kind="stable")[:k]] = True
    np.testing.assert_array_equal(mask, expected)


def test_top_k_mask_breaks_ties_by_position_and_keeps_exactly_k():
    scores = {"a": jnp.array([1.0, 2.0, 2.0, 0.0]), "b": jnp.array([2.0, 0.0, 5.0])}
    mask = fisher.top_k_mask(scores, 3)
    # 5.0 first, then the first two of the three 2.0 entries in leaf order.
    np.testing.assert_array_equal(mask["a"], [False, True, True, False])
    np.testing.assert_array_equal(mask["b"], [False, False, True])
    zeros = fisher.top_k_mask({"a": jnp.zeros(6)}, 2)
    np.testing.assert_array_equal(zeros["a"], [True, True, False, False, False, False])


def test_empirical_fisher_is_the_mean_of_squared_example_gradients():
    params, batch = reference.make_problem(num_examples=6)
    w, b = reference.to_np(params)
    x, y = reference.batch_np(batch)
    gw, gb = reference.np_example_grads(w, b, x, y)
    for chunk in (1, 2, 6):
        scores = fisher.empirical_fisher(reference.loss_fn, params, batch, None, chunk)
        np.testing.assert_allclose(scores["w"], np.mean(gw**2, 0), rtol=1e-5)
        np.testing.assert_allclose(scores["b"], np.mean(gb**2), rtol=1e-5)


def test_squared_batch_gradient_is_the_square_of_the_mean_gradient():
    params, batch = reference.make_problem(num_examples=6)
    w, b = reference.to_np(params)
    x, y = reference.batch_np(batch)
    gw, gb = reference.np_example_grads(w, b, x, y)
    scores = fisher.squared_batch_gradient(reference.loss_fn, params, batch, None)
    np.testing.assert_allclose(scores["w"], np.mean(gw, 0) ** 2, rtol=1e-5)
    np.testing.assert_allclose(scores["b"], np.mean(gb) ** 2, rtol=1e-5)


@pytest.mark.parametrize("estimator", fisher.FISHER_ESTIMATORS)
def test_mask_keeps_the_top_fisher_coordinates(estimator):
    params, batch = reference.make_problem(num_examples=8, dim=9)
    mask = sam_jax.fisher_mask(sparsity=0.6, interval=10, num_samples=4, fisher=estimator)
    state = mask.update(mask.init(params), jnp.int32(0), params, reference.loss_fn, batch, None)
    examples = jax.tree.map(lambda v: v[:4], batch)
    if estimator == "empirical":
        scores = fisher.empirical_fisher(reference.loss_fn, params, examples, None, 4)
    else:
        scores = fisher.squared_batch_gradient(reference.loss_fn, params, examples, None)
    keep = round(0.4 * 10)
    np.testing.assert_array_equal(_flat(state.mask), _flat(fisher.top_k_mask(scores, keep)))
    assert _flat(state.mask).sum() == keep
    np.testing.assert_allclose(state.density, 0.4)


def test_mask_refreshes_at_step_zero_and_every_interval_only():
    params, batch = reference.make_problem(num_examples=8, dim=9)
    mask = sam_jax.fisher_mask(sparsity=0.5, interval=3, num_samples=8)
    update = jax.jit(lambda s, c, p: mask.update(s, c, p, reference.loss_fn, batch, None))
    state = mask.init(params)
    assert _flat(state.mask).all()
    rng = np.random.default_rng(0)
    for count in range(7):
        moved = jax.tree.map(lambda v: v + jnp.asarray(rng.normal(size=v.shape), v.dtype), params)
        new_state = update(state, jnp.int32(count), moved)
        if count % 3 == 0:
            expected = mask.update(state, jnp.int32(0), moved, reference.loss_fn, batch, None)
            np.testing.assert_array_equal(_flat(new_state.mask), _flat(expected.mask))
        else:
            np.testing.assert_array_equal(_flat(new_state.mask), _flat(state.mask))
        state = new_state


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sparsity=1.0), "sparsity must be in"),
        (dict(sparsity=-0.1), "sparsity must be in"),
        (dict(interval=0), "interval must be an integer"),
        (dict(num_samples=0), "num_samples must be an integer"),
        (dict(fisher="diagonal"), "fisher must be one of"),
        (dict(chunk_size=0), "chunk_size must be None"),
    ],
)
def test_fisher_mask_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sam_jax.fisher_mask(**kwargs)


def test_chunk_size_must_divide_the_examples():
    params, batch = reference.make_problem(num_examples=8)
    mask = sam_jax.fisher_mask(num_samples=8, chunk_size=3)
    with pytest.raises(ValueError, match="chunk_size=3 must divide"):
        mask.update(mask.init(params), jnp.int32(0), params, reference.loss_fn, batch, None)

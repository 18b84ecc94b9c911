"""Tests for sam_jax.perturbation: SAM, ASAM and masked ε in closed form."""

import jax
import jax.numpy as jnp
import numpy as np

from sam_jax import perturbation


def _tree(a, b):
    return {"a": jnp.asarray(a, jnp.float32), "b": jnp.asarray(b, jnp.float32)}


def test_sam_epsilon_is_rho_times_unit_gradient():
    grads = _tree([3.0, 0.0], [4.0])
    eps = perturbation.ascent_perturbation(grads, grads, 0.5)
    np.testing.assert_allclose(eps.epsilon["a"], [0.3, 0.0], rtol=1e-6)
    np.testing.assert_allclose(eps.epsilon["b"], [0.4], rtol=1e-6)
    np.testing.assert_allclose(eps.grad_norm, 5.0, rtol=1e-6)
    np.testing.assert_allclose(eps.norm, 0.5, rtol=1e-6)


def test_asam_epsilon_closed_form():
    grads = _tree([1.0, -2.0], [0.5])
    params = _tree([2.0, -0.5], [0.0])
    eta, rho = 0.01, 0.1
    t = np.abs(np.array([2.0, -0.5, 0.0])) + eta
    g = np.array([1.0, -2.0, 0.5])
    expected = rho * t**2 * g / np.linalg.norm(t * g)
    eps = perturbation.ascent_perturbation(grads, params, rho, adaptive_eta=eta)
    got = np.concatenate([eps.epsilon["a"], eps.epsilon["b"]])
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_masked_epsilon_uses_the_unmasked_norm():
    grads = _tree([3.0, 0.0], [4.0])
    mask = {"a": jnp.array([True, True]), "b": jnp.array([False])}
    eps = perturbation.ascent_perturbation(grads, grads, 1.0, mask=mask)
    np.testing.assert_allclose(eps.epsilon["a"], [0.6, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(eps.epsilon["b"], [0.0])
    np.testing.assert_allclose(eps.norm, 0.6, rtol=1e-6)  # ‖ε‖ ≤ ρ


def test_zero_gradient_gives_zero_epsilon_not_nan():
    zeros = _tree([0.0, 0.0], [0.0])
    for eta in (None, 0.01):
        eps = perturbation.ascent_perturbation(zeros, zeros, 0.05, adaptive_eta=eta)
        for leaf in jax.tree.leaves(eps):
            assert np.all(np.isfinite(leaf))
        np.testing.assert_array_equal(eps.epsilon["a"], [0.0, 0.0])
        assert float(eps.norm) == 0.0


def test_epsilon_is_float32_for_bfloat16_gradients():
    grads = {"a": jnp.array([1e-3, 3.0], jnp.bfloat16)}
    eps = perturbation.ascent_perturbation(grads, grads, 0.05)
    assert eps.epsilon["a"].dtype == jnp.float32
    g = np.asarray(grads["a"], np.float32)
    np.testing.assert_allclose(eps.epsilon["a"], 0.05 * g / np.linalg.norm(g), rtol=1e-6)


def test_perturbed_adds_in_float32_and_keeps_dtype():
    params = {"a": jnp.array([1.0, 256.0], jnp.bfloat16)}
    eps = {"a": jnp.array([0.75, 1.0], jnp.float32)}
    moved = perturbation.perturbed(params, eps)
    assert moved["a"].dtype == jnp.bfloat16
    expected = (np.array([1.0, 256.0], np.float32) + np.array([0.75, 1.0], np.float32)).astype(
        jnp.bfloat16
    )
    np.testing.assert_array_equal(np.asarray(moved["a"]), expected)
    back = perturbation.perturbed(params, eps, -1.0)
    np.testing.assert_array_equal(np.asarray(back["a"], np.float32), [0.25, 255.0])


def test_random_perturbation_has_norm_rho_and_depends_on_key():
    params = {"a": jnp.zeros((10, 3)), "b": jnp.zeros((7,))}
    r1 = perturbation.random_perturbation(jax.random.key(0), params, 0.02)
    r2 = perturbation.random_perturbation(jax.random.key(1), params, 0.02)
    norm = np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(r1)))
    np.testing.assert_allclose(norm, 0.02, rtol=1e-5)
    assert not np.allclose(r1["a"], r2["a"])

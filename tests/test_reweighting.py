"""Tests for sam_jax.reweighting: δ-SAM weights against the papers' equations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sam_jax
from sam_jax import perturbation
from sam_jax import reweighting


def _losses_at_quadratic(curvatures, slopes):
    """l_i(w) = slope_i · w_0 + ½ curvature_i · ‖w‖² on a 1-leaf parameter tree."""

    def losses_at(params):
        w = params["w"]
        return slopes * w[0] + 0.5 * curvatures * jnp.sum(w**2)

    return losses_at


def test_delta_sam_weights_follow_eq5():
    params = {"w": jnp.array([0.3, -0.2, 0.1])}
    curvatures = jnp.array([1.0, 4.0, 0.5, 2.0])
    slopes = jnp.array([0.5, -1.0, 0.0, 2.0])
    losses_at = _losses_at_quadratic(curvatures, slopes)
    key, rho, eta = jax.random.key(3), 0.05, 1e-4
    weights = sam_jax.delta_sam(eta=eta).weights(losses_at, params, losses_at(params), key, rho)

    r = np.asarray(perturbation.random_perturbation(key, params, rho)["w"], np.float64)
    w = np.asarray(params["w"], np.float64)
    c, s = np.asarray(curvatures, np.float64), np.asarray(slopes, np.float64)

    def loss(v):
        return s * v[0] + 0.5 * c * np.sum(v**2)

    g = np.abs(loss(w + r) + loss(w - r) - 2 * loss(w)) / np.maximum(
        np.abs(loss(w + r) - loss(w - r)), eta
    )
    np.testing.assert_allclose(weights, g / g.sum(), rtol=2e-3)


def test_delta_sam_draft_weights_follow_eq3_to_6():
    params = {"w": jnp.array([0.3, -0.2, 0.1])}
    curvatures = jnp.array([1.0, 4.0, 0.5, 2.0])
    slopes = jnp.array([0.5, -1.0, 0.3, 2.0])
    losses_at = _losses_at_quadratic(curvatures, slopes)
    key, rho, beta = jax.random.key(5), 0.05, 3.0
    rule = sam_jax.delta_sam_draft(beta=beta)
    weights = rule.weights(losses_at, params, losses_at(params), key, rho)

    r = np.asarray(perturbation.random_perturbation(key, params, rho)["w"], np.float64)
    w = np.asarray(params["w"], np.float64)
    c, s = np.asarray(curvatures, np.float64), np.asarray(slopes, np.float64)

    def loss(v):
        return s * v[0] + 0.5 * c * np.sum(v**2)

    a = loss(w + r) - loss(w)
    g = np.abs(a) / np.abs(a).sum()
    scale = beta * abs(a.mean()) / abs(np.sum(g * a))
    expected = (g - 1 / 4) * scale + 1 / 4
    np.testing.assert_allclose(weights, expected, rtol=2e-3, atol=1e-6)
    np.testing.assert_allclose(np.sum(weights), 1.0, rtol=1e-5)


@pytest.mark.parametrize("rule", [sam_jax.delta_sam(), sam_jax.delta_sam_draft()])
def test_identical_examples_get_uniform_weights(rule):
    params = {"w": jnp.array([0.3, -0.2])}
    losses_at = _losses_at_quadratic(jnp.full((5,), 2.0), jnp.full((5,), 0.7))
    weights = rule.weights(losses_at, params, losses_at(params), jax.random.key(0), 0.05)
    np.testing.assert_allclose(weights, np.full(5, 0.2), rtol=1e-6)


@pytest.mark.parametrize("rule", [sam_jax.delta_sam(), sam_jax.delta_sam_draft()])
def test_flat_losses_fall_back_to_uniform_weights(rule):
    params = {"w": jnp.array([0.3, -0.2])}

    def losses_at(p):
        del p
        return jnp.ones((4,))

    weights = rule.weights(losses_at, params, losses_at(params), jax.random.key(0), 0.05)
    np.testing.assert_array_equal(weights, np.full(4, 0.25))


def test_statistics_of_uniform_and_peaked_weights():
    uniform = reweighting.statistics(reweighting.uniform(4))
    np.testing.assert_allclose(uniform.entropy, np.log(4), rtol=1e-6)
    np.testing.assert_allclose([uniform.min, uniform.max], [0.25, 0.25])
    peaked = reweighting.statistics(jnp.array([1.0, 0.0, 0.0]))
    np.testing.assert_allclose(peaked.entropy, 0.0, atol=1e-7)
    assert float(peaked.max) == 1.0 and float(peaked.min) == 0.0


@pytest.mark.parametrize("eta", [0.0, -1e-4, "1e-4"])
def test_delta_sam_rejects_bad_eta(eta):
    with pytest.raises(ValueError, match="eta must be a number > 0"):
        sam_jax.delta_sam(eta=eta)


@pytest.mark.parametrize("beta", [0.0, -3.0])
def test_delta_sam_draft_rejects_bad_beta(beta):
    with pytest.raises(ValueError, match="beta must be a number > 0"):
        sam_jax.delta_sam_draft(beta=beta)

"""Tiny models with hand-written (numpy) gradients, shared by the transform tests.

The model is linear regression with per-example squared error,
l_i(w, b) = (x_i · w + b − y_i)², whose per-example gradients are written out
by hand below, so that the references do not use JAX's autodiff.
"""

import jax
import jax.numpy as jnp
import numpy as np


def make_problem(num_examples=8, dim=5, seed=0):
    """Random (params, batch) for the linear model, float32."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_examples, dim)).astype(np.float32)
    y = rng.normal(size=(num_examples,)).astype(np.float32)
    params = {
        "w": rng.normal(size=(dim,)).astype(np.float32) * 0.5,
        "b": np.float32(0.1),
    }
    return jax.tree.map(jnp.asarray, params), (jnp.asarray(x), jnp.asarray(y))


def loss_fn(params, batch, key):
    """Per-example squared error [N]; `key` is unused (a deterministic model)."""
    del key
    x, y = batch
    return (x @ params["w"] + params["b"] - y) ** 2


def np_losses(w, b, x, y):
    return (x @ w + b - y) ** 2


def np_example_grads(w, b, x, y):
    """Per-example gradients (∂w [N, d], ∂b [N]) of the squared error, by hand."""
    residual = x @ w + b - y
    return 2.0 * residual[:, None] * x, 2.0 * residual


def np_weighted_grad(w, b, x, y, weights):
    """∇ Σ_i p_i l_i for instance weights p."""
    gw, gb = np_example_grads(w, b, x, y)
    return weights @ gw, weights @ gb


def np_sam_gradient(w, b, x, y, rho, ascent_x=None, ascent_y=None, weights=None, mask=None):
    """SAM's descent gradient by hand: ε from the (weighted) ascent batch, unweighted descent."""
    ascent_x = x if ascent_x is None else ascent_x
    ascent_y = y if ascent_y is None else ascent_y
    if weights is None:
        weights = np.full(len(ascent_y), 1.0 / len(ascent_y))
    gw, gb = np_weighted_grad(w, b, ascent_x, ascent_y, weights)
    norm = np.sqrt(np.sum(gw**2) + gb**2)
    ew, eb = rho * gw / norm, rho * gb / norm
    if mask is not None:
        ew, eb = ew * mask[0], eb * mask[1]
    uniform = np.full(len(y), 1.0 / len(y))
    return np_weighted_grad(w + ew, b + eb, x, y, uniform)


def to_np(params):
    return np.asarray(params["w"], np.float64), np.float64(params["b"])


def batch_np(batch):
    return np.asarray(batch[0], np.float64), np.asarray(batch[1], np.float64)

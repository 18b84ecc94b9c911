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


# --- FSAM's Fisher mask, by hand ---------------------------------------------------------
# Leaf order of the linear model's parameters {"w", "b"}: JAX flattens dicts by sorted
# key, so "b" (one entry) comes before "w" (d entries).


def np_empirical_fisher(w, b, x, y):
    """F̂ = mean_i (∇ l_i)² over the given examples: (F̂_w [d], F̂_b)."""
    gw, gb = np_example_grads(w, b, x, y)
    return np.mean(gw**2, 0), np.mean(gb**2)


def np_squared_batch_gradient(w, b, x, y):
    """F̂ = (∇ mean_i l_i)² over the given examples: (F̂_w [d], F̂_b)."""
    gw, gb = np_example_grads(w, b, x, y)
    return np.mean(gw, 0) ** 2, np.mean(gb) ** 2


def np_top_k_mask(leaves, k):
    """Boolean masks like `leaves` (listed in leaf order), True on the k largest entries of
    their concatenation; ties broken by position (earlier leaf, then earlier flat index)."""
    flat = np.concatenate([np.ravel(np.asarray(leaf, np.float64)) for leaf in leaves])
    keep = np.zeros(flat.size, bool)
    keep[np.argsort(-flat, kind="stable")[:k]] = True
    masks, start = [], 0
    for leaf in leaves:
        size = np.size(leaf)
        masks.append(keep[start : start + size].reshape(np.shape(leaf)))
        start += size
    return masks


def np_top_k_gap(leaves, k):
    """Relative gap between the k-th and (k+1)-th largest entries: how far the top-k set is
    from a tie (a float32 computation picks the same set when this is well above 1e-6)."""
    flat = np.sort(np.concatenate([np.ravel(np.asarray(leaf, np.float64)) for leaf in leaves]))
    top = flat[::-1]
    return (top[k - 1] - top[k]) / top[k - 1]


def np_fisher_mask(w, b, x, y, sparsity, num_samples, fisher="empirical"):
    """The Fisher mask (mask_w [d], mask_b) on the first `num_samples` examples, by hand.

    k = round((1 − s)·(d + 1)); asserts the top-k set is not within float32 noise of a tie.
    """
    estimate = np_empirical_fisher if fisher == "empirical" else np_squared_batch_gradient
    score_w, score_b = estimate(w, b, x[:num_samples], y[:num_samples])
    k = round((1.0 - sparsity) * (w.size + 1))
    assert 0 < k <= w.size
    assert np_top_k_gap([score_b, score_w], k) > 1e-4, "test data too close to a tie"
    mask_b, mask_w = np_top_k_mask([score_b, score_w], k)
    return mask_w, mask_b

"""Tests for sam_jax.efficient_sam: ESAM's weight perturbation and data selection (Du et al.)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import packed_slots
import pytest
import reference
import trees

import sam_jax
from sam_jax import batching
from sam_jax import core
from sam_jax import efficient_sam


def _step(tx, params, batch, key, loss_fn=reference.loss_fn):
    result = sam_jax.update_from_loss(tx, tx.init(params), params, loss_fn, batch, key)
    return optax.apply_updates(params, result.updates), result.opt_state


def _np_mask(params, key, beta):
    """The step's weight mask m, as numpy (w [d], b): drawn from the step's key."""
    mask = efficient_sam.weight_mask(efficient_sam.key_of(key), params, beta)
    return np.asarray(mask["w"]), bool(mask["b"])


# --- The pieces ----------------------------------------------------------------------------


def test_weight_mask_keeps_each_coordinate_with_probability_beta():
    params = {"a": jnp.zeros((300, 200)), "b": jnp.zeros((40_000,))}
    key = jax.random.key(0)
    for beta in (0.3, 0.6):
        mask = efficient_sam.weight_mask(key, params, beta)
        kept = np.concatenate([np.ravel(m) for m in jax.tree.leaves(mask)])
        sigma = np.sqrt(beta * (1 - beta) / kept.size)
        assert abs(kept.mean() - beta) < 5 * sigma, (beta, kept.mean())
        np.testing.assert_allclose(efficient_sam.density(mask), kept.mean(), rtol=1e-6)
        # Every leaf is masked, independently of the others.
        assert all(abs(np.mean(m) - beta) < 0.02 for m in jax.tree.leaves(mask))
    again = efficient_sam.weight_mask(key, params, 0.6)
    other = efficient_sam.weight_mask(jax.random.key(1), params, 0.6)
    trees.assert_equal(again, efficient_sam.weight_mask(key, params, 0.6))
    assert not np.array_equal(again["a"], other["a"])


@pytest.mark.parametrize(
    "num_examples, gamma, shards, count, expected",
    [
        (16, 0.5, 1, 1, 8),
        (16, 0.5, 2, 1, 4),
        (16, 0.5, 2, 2, 4),
        (16, 0.3, 1, 1, 5),  # round(4.8)
        (16, 0.3, 1, 4, 4),  # the nearest multiple of 4
        (16, 0.01, 2, 2, 2),  # at least one per microbatch
        (8, 1.0, 2, 1, 4),
    ],
)
def test_selected_per_shard_rounds_to_the_microbatches(
    num_examples, gamma, shards, count, expected
):
    assert efficient_sam.selected_per_shard(num_examples, gamma, shards, count) == expected


def test_select_keeps_the_top_scores_of_every_shard():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(12,)).astype(np.float32)
    batch = {"x": np.arange(12 * 2).reshape(12, 2), "y": np.arange(12)}
    got = efficient_sam.select(jax.tree.map(jnp.asarray, batch), jnp.asarray(scores), 2, 3)
    expected = []
    for shard in range(3):
        rows = np.arange(4 * shard, 4 * shard + 4)
        expected.extend(rows[np.argsort(-scores[rows])[:2]])
    np.testing.assert_array_equal(got["y"], expected)
    np.testing.assert_array_equal(got["x"], batch["x"][expected])


def test_batch_order_undoes_microbatches():
    values = jnp.arange(24.0)
    for count, shards in [(1, 1), (4, 1), (2, 3), (3, 2)]:
        pieces = batching.microbatches(values, count, shards).reshape(-1)
        np.testing.assert_array_equal(efficient_sam.batch_order(pieces, count, shards), values)


@pytest.mark.parametrize(
    "kwargs", [dict(beta=0.0), dict(beta=1.5), dict(gamma=0.0), dict(gamma="1")]
)
def test_esam_rejects_fractions_outside_zero_one(kwargs):
    with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
        sam_jax.esam(**kwargs)


# --- The SAM step with ESAM ----------------------------------------------------------------


def test_stochastic_weight_perturbation_step_closed_form():
    """ε̂ = (ρ/β) m ⊙ g/‖g‖, m ~ Bernoulli(β) drawn from the step's key; descent at w + ε̂."""
    params, batch = reference.make_problem(num_examples=8, dim=40)
    key, rho, beta = jax.random.key(3), 0.05, 0.5
    tx = sam_jax.sam(optax.sgd(0.1), rho=rho, esam=sam_jax.esam(beta=beta, gamma=1.0))
    new_params, state = _step(tx, params, batch, key)
    mask_w, mask_b = _np_mask(params, key, beta)
    assert 5 < mask_w.sum() < 35  # a real mask
    w, b = reference.to_np(params)
    x, y = reference.batch_np(batch)
    gw, gb = reference.np_weighted_grad(w, b, x, y, np.full(8, 1 / 8))
    norm = np.sqrt(np.sum(gw**2) + gb**2)
    ew, eb = rho / beta * mask_w * gw / norm, rho / beta * mask_b * gb / norm
    dw, db = reference.np_weighted_grad(w + ew, b + eb, x, y, np.full(8, 1 / 8))
    np.testing.assert_allclose(new_params["w"], w - 0.1 * dw, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(new_params["b"], b - 0.1 * db, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        state.metrics.perturbation_norm, np.hypot(np.linalg.norm(ew), eb), rtol=1e-5
    )
    np.testing.assert_allclose(state.metrics.mask_density, (mask_w.sum() + mask_b) / 41, rtol=1e-6)
    np.testing.assert_allclose(state.metrics.rho, rho)


@pytest.mark.parametrize("shards", [1, 2])
def test_data_selection_step_closed_form(shards):
    """The descent uses the γ of every shard's examples whose loss rose most under ε."""
    params, batch = reference.make_problem(num_examples=16)
    rho, gamma = 0.5, 0.25  # a large ρ, so that the losses' rises are far apart
    tx = sam_jax.sam(
        optax.sgd(0.1), rho=rho, num_data_shards=shards, esam=sam_jax.esam(beta=1.0, gamma=gamma)
    )
    new_params, state = _step(tx, params, batch, None)
    w, b = reference.to_np(params)
    x, y = reference.batch_np(batch)
    gw, gb = reference.np_weighted_grad(w, b, x, y, np.full(16, 1 / 16))
    norm = np.sqrt(np.sum(gw**2) + gb**2)
    pw, pb = w + rho * gw / norm, b + rho * gb / norm
    rise = reference.np_losses(pw, pb, x, y) - reference.np_losses(w, b, x, y)
    per_shard = 4 // shards
    selected = np.concatenate(
        [rows[np.argsort(-rise[rows])[:per_shard]] for rows in np.split(np.arange(16), shards)]
    )
    dw, db = reference.np_weighted_grad(pw, pb, x[selected], y[selected], np.full(4, 1 / 4))
    np.testing.assert_allclose(new_params["w"], w - 0.1 * dw, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(new_params["b"], b - 0.1 * db, rtol=1e-5, atol=1e-7)
    # The perturbed loss is still the whole batch's, the descent's without selection.
    np.testing.assert_allclose(
        state.metrics.perturbed_loss, np.mean(reference.np_losses(pw, pb, x, y)), rtol=1e-5
    )
    # The selection matters far beyond rtol.
    full_w, _ = reference.np_weighted_grad(pw, pb, x, y, np.full(16, 1 / 16))
    assert np.max(np.abs(full_w - dw)) > 0.1 * np.max(np.abs(dw))


def test_esam_with_beta_and_gamma_one_is_sam_exactly():
    params, batch = reference.make_problem(num_examples=8)
    key = jax.random.key(0)
    for kwargs in (dict(), dict(ascent_fraction=0.5, sharpness_m=2), dict(num_microbatches=2)):
        sam, sam_state = _step(sam_jax.sam(optax.adamw(1e-2), **kwargs), params, batch, key)
        esam, esam_state = _step(
            sam_jax.sam(optax.adamw(1e-2), esam=sam_jax.esam(1.0, 1.0), **kwargs),
            params,
            batch,
            key,
        )
        trees.assert_equal(esam, sam)
        trees.assert_equal(esam_state.metrics, sam_state.metrics)


def test_f_esam_perturbs_the_fisher_mask_and_the_weight_mask_together():
    """F_ESAM (FSAM's Table 6): ε̂ = (ρ/β) m_F ⊙ m ⊙ g/‖g‖, γ of the examples in the descent."""
    params, batch = reference.make_problem(num_examples=8, dim=29)
    key, rho, beta = jax.random.key(5), 0.05, 0.5
    tx = sam_jax.sam(
        optax.sgd(0.1),
        rho=rho,
        mask=sam_jax.fisher_mask(sparsity=0.5, num_samples=8),
        esam=sam_jax.esam(beta=beta, gamma=0.5),
    )
    new_params, state = _step(tx, params, batch, key)
    w, b = reference.to_np(params)
    x, y = reference.batch_np(batch)
    fisher_w, fisher_b = reference.np_fisher_mask(w, b, x, y, 0.5, 8)
    mask_w, mask_b = _np_mask(params, key, beta)
    keep_w, keep_b = fisher_w & mask_w, fisher_b and mask_b
    assert 0 < keep_w.sum() < fisher_w.sum()
    gw, gb = reference.np_weighted_grad(w, b, x, y, np.full(8, 1 / 8))
    norm = np.sqrt(np.sum(gw**2) + gb**2)
    pw, pb = w + rho / beta * keep_w * gw / norm, b + rho / beta * keep_b * gb / norm
    rise = reference.np_losses(pw, pb, x, y) - reference.np_losses(w, b, x, y)
    selected = np.argsort(-rise)[:4]
    dw, db = reference.np_weighted_grad(pw, pb, x[selected], y[selected], np.full(4, 1 / 4))
    np.testing.assert_allclose(new_params["w"], w - 0.1 * dw, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(new_params["b"], b - 0.1 * db, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(state.metrics.mask_density, (keep_w.sum() + keep_b) / 30, rtol=1e-6)


def test_esam_and_gsam_compose():
    """ESAM's selection and mask, then GSAM's direction on the selected examples' ∇f_p."""
    params, batch = reference.make_problem(num_examples=8, dim=20)
    key, rho, beta, alpha = jax.random.key(2), 0.3, 0.5, 0.4
    tx = sam_jax.sam(
        optax.sgd(1.0),
        rho=rho,
        esam=sam_jax.esam(beta=beta, gamma=0.5),
        surrogate_gap=sam_jax.gsam(alpha),
    )
    new_params, _ = _step(tx, params, batch, key)
    w, b = reference.to_np(params)
    x, y = reference.batch_np(batch)
    mask_w, mask_b = _np_mask(params, key, beta)
    gw, gb = reference.np_weighted_grad(w, b, x, y, np.full(8, 1 / 8))
    norm = np.sqrt(np.sum(gw**2) + gb**2)
    pw, pb = w + rho / beta * mask_w * gw / norm, b + rho / beta * mask_b * gb / norm
    rise = reference.np_losses(pw, pb, x, y) - reference.np_losses(w, b, x, y)
    selected = np.argsort(-rise)[:4]
    dw, db = reference.np_weighted_grad(pw, pb, x[selected], y[selected], np.full(4, 1 / 4))
    perturbed, clean = np.concatenate([[db], dw]), np.concatenate([[gb], gw])
    d = perturbed - alpha * (clean - (clean @ perturbed) / (perturbed @ perturbed) * perturbed)
    np.testing.assert_allclose(new_params["b"], b - d[0], rtol=1e-5)
    np.testing.assert_allclose(new_params["w"], w - d[1:], rtol=1e-5)


def test_data_selection_on_packed_rows_ranks_rows_by_their_summed_rise():
    params, slot_x, slot_y = packed_slots.packed_problem(seed=4)
    rho = 0.5
    config = core.SamConfig(rho=rho, esam=sam_jax.esam(beta=1.0, gamma=0.5))
    result = packed_slots.slot_sam_gradient(params, slot_x, slot_y, config)
    present = packed_slots.PRESENT
    w, b = reference.to_np(params)
    x, y = slot_x[present].astype(np.float64), slot_y[present].astype(np.float64)
    gw, gb = reference.np_weighted_grad(w, b, x, y, np.full(14, 1 / 14))
    norm = np.sqrt(np.sum(gw**2) + gb**2)
    pw, pb = w + rho * gw / norm, b + rho * gb / norm
    row_of = np.nonzero(present)[0]  # the row of each example
    rise = reference.np_losses(pw, pb, x, y) - reference.np_losses(w, b, x, y)
    row_rise = np.bincount(row_of, weights=rise, minlength=8)
    rows = np.argsort(-row_rise)[:4]
    chosen = np.isin(row_of, rows)
    # The descent: the mean over the 4 selected rows' 12 slots (absent slots count, as 0).
    dw, db = reference.np_weighted_grad(pw, pb, x[chosen], y[chosen], np.full(chosen.sum(), 1 / 12))
    np.testing.assert_allclose(result.grads["w"], dw, rtol=1e-5)
    np.testing.assert_allclose(result.grads["b"], db, rtol=1e-5)


# --- What cannot be done -------------------------------------------------------------------


def test_data_selection_with_an_ascent_micro_batch_is_refused():
    with pytest.raises(ValueError, match=r"esam\(gamma=0.5\) .* ascent_fraction=0.25 .* set"):
        sam_jax.sam(optax.sgd(0.1), ascent_fraction=0.25, esam=sam_jax.esam(0.6, 0.5))
    # The weight perturbation alone composes with it.
    sam_jax.sam(optax.sgd(0.1), ascent_fraction=0.25, esam=sam_jax.esam(0.6, 1.0))


def test_weight_perturbation_without_a_key_is_refused():
    params, batch = reference.make_problem(num_examples=8)
    tx = sam_jax.sam(optax.sgd(0.1), esam=sam_jax.esam(0.6, 1.0))
    with pytest.raises(
        ValueError, match=r"esam\(beta=0.6\) draws a random weight mask every step: pass `key`"
    ):
        _step(tx, params, batch, None)
    with pytest.raises(TypeError, match=r"esam must be sam_jax.esam"):
        sam_jax.sam(optax.sgd(0.1), esam=(0.6, 0.5))


def test_rho_zero_with_esam_is_the_plain_gradient():
    params, batch = reference.make_problem(num_examples=8)
    new_params, _ = _step(
        sam_jax.sam(optax.sgd(0.1), rho=0.0, esam=sam_jax.esam(0.5, 0.5)), params, batch, None
    )
    grads = jax.grad(lambda p: jnp.mean(reference.loss_fn(p, batch, None)))(params)
    trees.assert_close(new_params, jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), rtol=1e-6)

"""Tests for sam_jax.surrogate_gap: GSAM's descent direction and ρ schedule (Zhuang et al. 2022)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import packed_slots
import pytest
import reference
import trees

import sam_jax
from sam_jax import core
from sam_jax import surrogate_gap


def np_gsam_direction(perturbed, clean, alpha):
    """∇f_p − α (∇f − (∇f·∇f_p / ‖∇f_p‖²) ∇f_p) on flat float64 vectors (the paper's Alg. 1)."""
    along = clean @ perturbed / (perturbed @ perturbed)
    return perturbed - alpha * (clean - along * perturbed)


def _flat(w, b):
    return np.concatenate([[b], w])


def _sgd_step(tx, params, batch, key=None, state=None, loss_fn=reference.loss_fn):
    state = tx.init(params) if state is None else state
    step = sam_jax.update_from_loss(tx, state, params, loss_fn, batch, key)
    return optax.apply_updates(params, step.updates), step.opt_state


# --- The direction ---------------------------------------------------------------------


def test_descent_direction_is_the_equation():
    rng = np.random.default_rng(0)
    perturbed = {"a": rng.normal(size=(3, 4)), "b": rng.normal(size=(5,))}
    clean = {"a": rng.normal(size=(3, 4)), "b": rng.normal(size=(5,))}
    as_f32 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t)  # noqa: E731
    got = surrogate_gap.descent_direction(as_f32(perturbed), as_f32(clean), 0.7)
    flat = lambda t: np.concatenate([t["a"].ravel(), t["b"]])  # noqa: E731
    expected = np_gsam_direction(flat(perturbed), flat(clean), 0.7)
    np.testing.assert_allclose(flat(jax.tree.map(np.asarray, got)), expected, rtol=1e-5, atol=1e-6)
    # d · ∇f_p = ‖∇f_p‖²: the step decreases f_p as SAM's does, whatever α.
    np.testing.assert_allclose(
        flat(jax.tree.map(np.asarray, got)) @ flat(perturbed), flat(perturbed) @ flat(perturbed)
    )


def test_a_zero_perturbed_gradient_leaves_minus_alpha_times_the_clean_one():
    zero = {"w": jnp.zeros((3,))}
    clean = {"w": jnp.asarray([1.0, -2.0, 3.0])}
    got = surrogate_gap.descent_direction(zero, clean, 0.5)
    np.testing.assert_array_equal(got["w"], [-0.5, 1.0, -1.5])


def test_descent_direction_keeps_bfloat16_dtypes():
    p = {"w": jnp.asarray([1.0, 2.0], jnp.bfloat16)}
    c = {"w": jnp.asarray([0.0, 1.0], jnp.bfloat16)}
    assert surrogate_gap.descent_direction(p, c, 0.1)["w"].dtype == jnp.bfloat16


@pytest.mark.parametrize("alpha", [-0.1, "0.3", None])
def test_gsam_rejects_a_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha must be a number ≥ 0"):
        sam_jax.gsam(alpha)


# --- The SAM step with GSAM --------------------------------------------------------------


@pytest.mark.parametrize("fraction, ascent", [(1.0, 8), (0.5, 4)])
def test_gsam_step_closed_form(fraction, ascent):
    """∇f from the ascent micro-batch, ∇f_p from the whole batch at w + ε, by hand."""
    params, batch = reference.make_problem(num_examples=8)
    lr, rho, alpha = 0.1, 0.05, 0.4
    tx = sam_jax.sam(
        optax.sgd(lr), rho=rho, ascent_fraction=fraction, surrogate_gap=sam_jax.gsam(alpha)
    )
    new_params, _ = _sgd_step(tx, params, batch)
    w, b = reference.to_np(params)
    x, y = reference.batch_np(batch)
    perturbed = _flat(*reference.np_sam_gradient(w, b, x, y, rho, x[:ascent], y[:ascent]))
    clean = _flat(
        *reference.np_weighted_grad(w, b, x[:ascent], y[:ascent], np.full(ascent, 1 / ascent))
    )
    d = np_gsam_direction(perturbed, clean, alpha)
    np.testing.assert_allclose(new_params["b"], b - lr * d[0], rtol=1e-5)
    np.testing.assert_allclose(new_params["w"], w - lr * d[1:], rtol=1e-5)
    # α matters beyond the tolerance (measured ≥ 290 × it with f = 1, where g ∥ ∇f_p nearly).
    assert np.max(np.abs(d - perturbed)) > 100 * 1e-5 * np.max(np.abs(perturbed))


def test_gsam_with_alpha_zero_is_sam_exactly():
    params, batch = reference.make_problem(num_examples=8)
    for kwargs in (dict(), dict(ascent_fraction=0.5, sharpness_m=2), dict(adaptive=True)):
        sam, _ = _sgd_step(sam_jax.sam(optax.adamw(1e-2), **kwargs), params, batch)
        gsam, state = _sgd_step(
            sam_jax.sam(optax.adamw(1e-2), surrogate_gap=sam_jax.gsam(0.0), **kwargs),
            params,
            batch,
        )
        trees.assert_equal(gsam, sam)


def test_gsam_with_m_sharpness_averages_the_groups_directions():
    params, batch = reference.make_problem(num_examples=8)
    alpha = 0.5
    tx = sam_jax.sam(optax.sgd(1.0), sharpness_m=2, surrogate_gap=sam_jax.gsam(alpha))
    new_params, _ = _sgd_step(tx, params, batch)
    w, b = reference.to_np(params)
    x, y = reference.batch_np(batch)
    directions = []
    for rows in (slice(0, 4), slice(4, 8)):
        perturbed = _flat(*reference.np_sam_gradient(w, b, x[rows], y[rows], 0.05))
        clean = _flat(*reference.np_weighted_grad(w, b, x[rows], y[rows], np.full(4, 0.25)))
        directions.append(np_gsam_direction(perturbed, clean, alpha))
    d = np.mean(directions, axis=0)
    np.testing.assert_allclose(_flat(*reference.to_np(new_params)), _flat(w, b) - d, rtol=1e-5)


def test_gsam_with_a_fisher_mask_uses_the_masked_perturbation():
    """F_GSAM (FSAM's Table 6): ε masked, ∇f the unmasked clean gradient."""
    params, batch = reference.make_problem(num_examples=8, dim=9)
    mask = sam_jax.fisher_mask(sparsity=0.5, num_samples=8)
    tx = sam_jax.sam(optax.sgd(0.1), mask=mask, surrogate_gap=sam_jax.gsam(0.3))
    new_params, state = _sgd_step(tx, params, batch)
    w, b = reference.to_np(params)
    x, y = reference.batch_np(batch)
    mask_w, mask_b = reference.np_fisher_mask(w, b, x, y, 0.5, 8)
    perturbed = _flat(*reference.np_sam_gradient(w, b, x, y, 0.05, mask=(mask_w, mask_b)))
    clean = _flat(*reference.np_weighted_grad(w, b, x, y, np.full(8, 1 / 8)))
    d = np_gsam_direction(perturbed, clean, 0.3)
    np.testing.assert_allclose(
        _flat(*reference.to_np(new_params)), _flat(w, b) - 0.1 * d, rtol=1e-5
    )
    np.testing.assert_allclose(state.metrics.mask_density, 0.5)


def test_gsam_on_packed_rows_equals_gsam_on_the_examples_alone():
    """The descent averages over all slots, g over the present ones: GSAM compares the two alike."""
    params, slot_x, slot_y = packed_slots.packed_problem(seed=3)
    config = core.SamConfig(rho=0.05, surrogate_gap=sam_jax.gsam(0.5))
    result = packed_slots.slot_sam_gradient(params, slot_x, slot_y, config)
    present = packed_slots.PRESENT
    w, b = reference.to_np(params)
    x, y = slot_x[present].astype(np.float64), slot_y[present].astype(np.float64)
    perturbed = _flat(*reference.np_sam_gradient(w, b, x, y, 0.05))
    clean = _flat(*reference.np_weighted_grad(w, b, x, y, np.full(14, 1 / 14)))
    d = np_gsam_direction(perturbed, clean, 0.5) * 14 / 24  # the mean over all 24 slots
    np.testing.assert_allclose(_flat(*reference.to_np(result.grads)), d, rtol=1e-5)


def test_gsam_with_reweighting_is_refused():
    with pytest.raises(ValueError, match="surrogate_gap .* reweight=delta_sam"):
        sam_jax.sam(optax.sgd(0.1), surrogate_gap=sam_jax.gsam(0.3), reweight=sam_jax.delta_sam())
    with pytest.raises(TypeError, match=r"surrogate_gap must be sam_jax.gsam"):
        sam_jax.sam(optax.sgd(0.1), surrogate_gap=0.3)


# --- Against big_vision's gsam_gradient ------------------------------------------------


def np_big_vision_gsam(w, b, x, y, rho_max, rho_min, alpha, lr, lr_max, lr_min, eps=1e-12):
    """big_vision's `gsam_gradient` with `minimize_fp=True`, transcribed into numpy.

    google-research/big_vision, big_vision/trainers/proj/gsam/gsam.py, commit
    0127fb6b337ee2a27bf4e54dea79cff176527356, line by line: ρ interpolated
    between rho_min and rho_max by the learning rate, w + ρ g/(‖g‖ + eps),
    g_robust there, g_clean's residual orthogonal to g_robust/‖g_robust‖, and
    g_robust − α·residual. Written from that file, not from sam_jax.
    """
    uniform = np.full(len(y), 1.0 / len(y))
    g_clean = _flat(*reference.np_weighted_grad(w, b, x, y, uniform))
    g_clean_length = np.sqrt(np.sum(g_clean**2))
    if lr_max == lr_min:
        sam_rho = rho_max
    else:
        sam_rho = rho_min + (rho_max - rho_min) * (lr - lr_min) / (lr_max - lr_min)
    param_sam = _flat(w, b) + sam_rho * g_clean / (g_clean_length + eps)
    g_robust = _flat(*reference.np_weighted_grad(param_sam[1:], param_sam[0], x, y, uniform))
    g_robust_normalized = g_robust / np.sqrt(np.sum(g_robust**2))
    g_clean_projection_norm = np.vdot(g_robust_normalized, g_clean)
    g_clean_residual = g_clean - g_clean_projection_norm * g_robust_normalized
    return g_robust - g_clean_residual * alpha


def test_gsam_with_its_rho_schedule_equals_big_vision_over_several_steps():
    """SGD with a decaying learning rate, ρ following it (big_vision's ViT config's form)."""
    params, batch = reference.make_problem(num_examples=16)
    lr_max, lr_min, rho_max, rho_min, alpha, steps = 0.1, 0.02, 0.08, 0.02, 0.4, 6
    lr_schedule = optax.linear_schedule(lr_max, lr_min, transition_steps=steps - 1)
    rho = sam_jax.gsam_rho_schedule(lr_schedule, rho_max, rho_min, lr_max, lr_min)
    tx = sam_jax.sam(optax.sgd(lr_schedule), rho=rho, surrogate_gap=sam_jax.gsam(alpha))
    step = jax.jit(lambda p, s: sam_jax.update_from_loss(tx, s, p, reference.loss_fn, batch)[:2])
    x, y = reference.batch_np(batch)
    ours, state, theirs = params, tx.init(params), _flat(*reference.to_np(params))
    for t in range(steps):
        lr = lr_max + (lr_min - lr_max) * t / (steps - 1)
        theirs = theirs - lr * np_big_vision_gsam(
            theirs[1:], theirs[0], x, y, rho_max, rho_min, alpha, lr, lr_max, lr_min
        )
        updates, state = step(ours, state)
        ours = optax.apply_updates(ours, updates)
        np.testing.assert_allclose(_flat(*reference.to_np(ours)), theirs, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(
            state.metrics.rho, rho_min + (rho_max - rho_min) * (lr - lr_min) / (lr_max - lr_min)
        )
    # GSAM moved away from SAM far beyond the tolerance.
    sam_tx = sam_jax.sam(optax.sgd(lr_schedule), rho=rho)
    sam_params, sam_state = params, sam_tx.init(params)
    for _ in range(steps):
        sam_params, sam_state = _sgd_step(sam_tx, sam_params, batch, state=sam_state)
    assert max(trees.leaf_changes(ours, sam_params)) > 1e-3


# --- ρ schedule --------------------------------------------------------------------------


def test_rho_schedule_follows_the_learning_rate():
    lr = optax.cosine_decay_schedule(1e-3, decay_steps=100, alpha=0.1)
    rho = sam_jax.gsam_rho_schedule(lr, rho_max=0.2, rho_min=0.05, lr_max=1e-3, lr_min=1e-4)
    for count in (0, 10, 50, 99, 100):
        expected = 0.05 + 0.15 * (float(lr(count)) - 1e-4) / (1e-3 - 1e-4)
        np.testing.assert_allclose(rho(count), expected, rtol=1e-5)
    np.testing.assert_allclose(rho(0), 0.2, rtol=1e-6)
    np.testing.assert_allclose(rho(100), 0.05, rtol=1e-5)


def test_rho_schedule_of_a_constant_learning_rate_is_constant():
    rho = sam_jax.gsam_rho_schedule(1e-3, rho_max=0.05, rho_min=0.05)
    assert float(rho(0)) == float(rho(1000)) == pytest.approx(0.05)


@pytest.mark.parametrize(
    "args, match",
    [
        ((1e-3, 0.1, 0.05), "the learning rate is constant .* set them equal"),
        ((optax.constant_schedule(1e-3), 0.1, 0.05), "needs lr_max and lr_min"),
        ((1e-3, 0.05, 0.1), "rho_min ≤ rho_max"),
        ((optax.constant_schedule(1e-3), 0.1, 0.05, 1e-4, 1e-3), "lr_max ≥ lr_min"),
    ],
)
def test_rho_schedule_rejects_what_it_cannot_follow(args, match):
    with pytest.raises(ValueError, match=match):
        sam_jax.gsam_rho_schedule(*args)

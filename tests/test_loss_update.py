"""Tests for sam_jax.update_from_loss: one call for plain Optax and sam; aux; plain cost."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference

import sam_jax
from sam_jax import loss_update

RHO, LEARNING_RATE = 0.05, 0.1


def _losses_and_residuals(params, batch, key):
    del key
    x, y = batch
    residuals = x @ params["w"] + params["b"] - y
    return residuals**2, residuals


def test_plain_optimizer_step_is_the_mean_loss_gradient_step():
    params, batch = reference.make_problem()
    tx = optax.adam(1e-2)
    state = tx.init(params)
    step = sam_jax.update_from_loss(tx, state, params, reference.loss_fn, batch)
    x, y = map(np.asarray, batch)
    gw, gb = reference.np_weighted_grad(
        np.asarray(params["w"]), np.asarray(params["b"]), x, y, np.full(len(y), 1 / len(y))
    )
    expected, _ = tx.update({"w": jnp.asarray(gw), "b": jnp.asarray(gb)}, state, params)
    for name in expected:
        np.testing.assert_allclose(step.updates[name], expected[name], rtol=1e-5)
    np.testing.assert_allclose(
        step.loss, np.mean(reference.np_losses(params["w"], params["b"], x, y)), rtol=1e-6
    )
    assert step.metrics is None and step.aux is None


def test_sam_step_is_the_hand_computed_sam_step_with_metrics():
    params, batch = reference.make_problem()
    tx = sam_jax.sam(optax.sgd(LEARNING_RATE), rho=RHO)
    step = sam_jax.update_from_loss(tx, tx.init(params), params, reference.loss_fn, batch)
    x, y = map(np.asarray, batch)
    gw, gb = reference.np_sam_gradient(np.asarray(params["w"]), np.asarray(params["b"]), x, y, RHO)
    np.testing.assert_allclose(step.updates["w"], -LEARNING_RATE * gw, rtol=1e-5)
    np.testing.assert_allclose(step.updates["b"], -LEARNING_RATE * gb, rtol=1e-5)
    assert step.metrics is not None
    np.testing.assert_allclose(step.loss, step.metrics.perturbed_loss)
    np.testing.assert_allclose(step.metrics.perturbation_norm, RHO, rtol=1e-5)


@pytest.mark.parametrize("rho", [0.0, RHO])
def test_aux_comes_from_the_descent_pass(rho):
    """aux is loss_fn's second output at w + ε (w with ρ = 0), as with value_and_grad(has_aux)."""
    params, batch = reference.make_problem()
    tx = sam_jax.sam(optax.sgd(LEARNING_RATE), rho=rho)
    step = jax.jit(
        lambda s, p: sam_jax.update_from_loss(tx, s, p, _losses_and_residuals, batch, has_aux=True)
    )(tx.init(params), params)
    x, y = map(np.asarray, batch)
    w, b = np.asarray(params["w"]), np.asarray(params["b"])
    gw, gb = reference.np_weighted_grad(w, b, x, y, np.full(len(y), 1 / len(y)))
    norm = np.sqrt(np.sum(gw**2) + gb**2)
    perturbed = x @ (w + rho * gw / norm) + (b + rho * gb / norm) - y
    np.testing.assert_allclose(step.aux, perturbed, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(step.loss, np.mean(perturbed**2), rtol=1e-5)


def test_one_loop_switches_between_plain_and_sam_by_configuration():
    params, batch = reference.make_problem()

    def train(tx, steps=3):
        @jax.jit
        def train_step(p, s):
            step = sam_jax.update_from_loss(tx, s, p, reference.loss_fn, batch)
            return optax.apply_updates(p, step.updates), step.opt_state

        p, s = params, tx.init(params)
        for _ in range(steps):
            p, s = train_step(p, s)
        return p

    plain = train(optax.sgd(LEARNING_RATE))
    sam_zero = train(sam_jax.sam(optax.sgd(LEARNING_RATE), rho=0.0))
    sam = train(sam_jax.sam(optax.sgd(LEARNING_RATE), rho=RHO))
    for name in params:
        np.testing.assert_array_equal(sam_zero[name], plain[name])  # bit for bit
        assert not np.allclose(sam[name], plain[name], rtol=1e-6, atol=0)


def _step_flops(tx, params, batch):
    def step(s, p):
        return sam_jax.update_from_loss(tx, s, p, _mlp_loss, batch).updates

    compiled = jax.jit(step).lower(tx.init(params), params).compile()
    return compiled.cost_analysis()["flops"]


def _mlp_loss(params, batch, key):
    del key
    x, y = batch
    hidden = jnp.tanh(x @ params["w1"])
    return (hidden @ params["w2"] - y) ** 2


def test_sam_with_rho_zero_compiles_to_the_plain_step():
    """XLA's flop count: ρ = 0 is the plain step; ρ > 0 adds an ascent pass (≈ 2×)."""
    rng = np.random.default_rng(0)
    params = {
        "w1": jnp.asarray(rng.normal(size=(64, 256)), jnp.float32),
        "w2": jnp.asarray(rng.normal(size=(256,)), jnp.float32),
    }
    batch = (jnp.asarray(rng.normal(size=(128, 64)), jnp.float32), jnp.zeros(128))
    plain = _step_flops(optax.adam(1e-3), params, batch)
    sam_zero = _step_flops(sam_jax.sam(optax.adam(1e-3), rho=0.0), params, batch)
    sam = _step_flops(sam_jax.sam(optax.adam(1e-3), rho=RHO), params, batch)
    assert sam_zero <= 1.01 * plain
    assert sam >= 1.8 * plain


def test_the_loss_shape_error_names_the_piece_and_the_batch():
    params, batch = reference.make_problem(num_examples=64)
    tx = sam_jax.sam(optax.sgd(LEARNING_RATE), ascent_fraction=0.25)

    def loss_without_last(p, b, k):
        return reference.loss_fn(p, b, k)[:-1]

    with pytest.raises(ValueError, match=r"N = 16.*your batch of 64"):
        sam_jax.update_from_loss(tx, tx.init(params), params, loss_without_last, batch)


def test_uses_sam_sees_sam_through_wrappers_and_chains():
    params, _ = reference.make_problem()
    sam = sam_jax.sam(optax.sgd(LEARNING_RATE))
    for tx in (
        sam,
        optax.chain(sam, optax.scale(0.5)),
        optax.inject_hyperparams(sam_jax.sam)(optimizer=optax.sgd(LEARNING_RATE), rho=RHO),
        sam_jax.per_instance_sam(optax.sgd(LEARNING_RATE)),
    ):
        assert loss_update.uses_sam(tx.init(params))
    assert not loss_update.uses_sam(optax.adamw(1e-3).init(params))

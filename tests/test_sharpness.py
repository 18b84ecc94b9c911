"""Tests for sam_jax.sharpness: L_adv, R_batch and R_inst against hand computations."""

import numpy as np
import reference

import sam_jax


def _np_epsilon(gw, gb, rho):
    norm = np.sqrt(np.sum(gw**2) + gb**2)
    return rho * gw / norm, rho * gb / norm


def _np_instance_losses(params, batch, rho):
    w, b = reference.to_np(params)
    x, y = reference.batch_np(batch)
    gw, gb = reference.np_example_grads(w, b, x, y)
    clean, adversarial = reference.np_losses(w, b, x, y), []
    for i in range(len(y)):
        ew, eb = _np_epsilon(gw[i], gb[i], rho)
        adversarial.append(reference.np_losses(w + ew, b + eb, x[i : i + 1], y[i : i + 1])[0])
    return clean, np.array(adversarial)


def test_adversarial_risk_is_the_mean_per_instance_perturbed_loss():
    params, batch = reference.make_problem(num_examples=6)
    _, adversarial = _np_instance_losses(params, batch, 0.05)
    risk = sam_jax.sharpness.adversarial_risk(reference.loss_fn, params, batch, rho=0.05)
    np.testing.assert_allclose(risk, adversarial.mean(), rtol=1e-5)


def test_instance_sharpness_closed_form():
    params, batch = reference.make_problem(num_examples=6)
    clean, adversarial = _np_instance_losses(params, batch, 0.05)
    r_inst = sam_jax.sharpness.instance_sharpness(reference.loss_fn, params, batch, rho=0.05)
    np.testing.assert_allclose(r_inst, np.mean(adversarial - clean), rtol=1e-4)


def test_batch_sharpness_closed_form_and_bound():
    params, batch = reference.make_problem(num_examples=6)
    w, b = reference.to_np(params)
    x, y = reference.batch_np(batch)
    gw, gb = reference.np_weighted_grad(w, b, x, y, np.full(6, 1 / 6))
    ew, eb = _np_epsilon(gw, gb, 0.05)
    expected = np.mean(reference.np_losses(w + ew, b + eb, x, y) - reference.np_losses(w, b, x, y))
    r_batch = sam_jax.sharpness.batch_sharpness(reference.loss_fn, params, batch, rho=0.05)
    np.testing.assert_allclose(r_batch, expected, rtol=1e-4)
    # Per-instance perturbations are at least as adversarial (paper §4.1: R_inst ≥ R_batch).
    r_inst = sam_jax.sharpness.instance_sharpness(reference.loss_fn, params, batch, rho=0.05)
    assert float(r_inst) > float(r_batch) > 0

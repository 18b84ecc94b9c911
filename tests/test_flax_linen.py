"""Tests for sam_jax.flax_linen: `TrainState.apply_loss` for plain Optax and `sam` alike."""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import trees
from flax.training import train_state

import sam_jax
from sam_jax import flax_linen

# This file's default tolerance.
assert_trees_close = functools.partial(trees.assert_close, rtol=1e-05, atol=1e-06)


class Net(nn.Module):
    """Dense, BatchNorm, ReLU, dropout, Dense: batch statistics and a dropout key."""

    @nn.compact
    def __call__(self, x, *, train):
        x = nn.Dense(16, use_bias=False)(x)  # BatchNorm adds the bias
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.Dropout(0.25, deterministic=not train)(nn.relu(x))
        return nn.Dense(3)(x)


class BatchNormState(flax_linen.TrainState):
    batch_stats: Any


MODEL = Net()
KEY = jax.random.key(3)


def _problem(num_examples=16, seed=0):
    """(variables, batch) of a 3-class problem with 5 features."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(num_examples, 5)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, num_examples))
    return MODEL.init(jax.random.key(seed), x, train=False), (x, y)


def _losses_and_stats(params, batch_stats, batch, key):
    """Per-example losses in training mode, and the new batch statistics."""
    x, y = batch
    variables = {"params": params, "batch_stats": batch_stats}
    logits, updates = MODEL.apply(
        variables, x, train=True, rngs={"dropout": key}, mutable=["batch_stats"]
    )
    return optax.softmax_cross_entropy_with_integer_labels(logits, y), updates["batch_stats"]


def _loss_fn(batch_stats, has_aux=False):
    def loss_fn(params, batch, key):
        losses, new_stats = _losses_and_stats(params, batch_stats, batch, key)
        return (losses, new_stats) if has_aux else losses

    return loss_fn


def _mean_loss(loss_fn, batch, key):
    return lambda params: jnp.mean(loss_fn(params, batch, key))


def _perturbed(params, loss_fn, batch, key, rho):
    """w + ρ g / ‖g‖ with g the full-batch gradient at w: SAM's ascent step, by hand."""
    grads = jax.grad(_mean_loss(loss_fn, batch, key))(params)
    norm = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads)))
    return jax.tree.map(lambda w, g: w + rho * g / norm, params, grads)


def _create(tx, variables, cls=flax_linen.TrainState, **fields):
    return cls.create(apply_fn=MODEL.apply, params=variables["params"], tx=tx, **fields)


def test_sam_apply_loss_equals_update_from_loss_and_apply_updates():
    variables, batch = _problem()
    tx = sam_jax.sam(optax.adamw(1e-2), rho=0.1, ascent_fraction=0.5)
    loss_fn = _loss_fn(variables["batch_stats"])
    state, step = _create(tx, variables).apply_loss(loss_fn, batch, KEY)

    params = variables["params"]
    expected = sam_jax.update_from_loss(tx, tx.init(params), params, loss_fn, batch, KEY)
    trees.assert_equal(state.params, optax.apply_updates(params, expected.updates))
    trees.assert_equal(state.opt_state, expected.opt_state)
    trees.assert_equal(step, expected)
    assert int(state.step) == 1
    assert isinstance(state, flax_linen.TrainState)


def test_sam_sgd_apply_loss_equals_hand_computed_sam():
    """w − lr ∇L(w + ρ g/‖g‖), every pass with the step's dropout key."""
    variables, batch = _problem()
    lr, rho = 0.1, 0.05
    loss_fn = _loss_fn(variables["batch_stats"])
    state = _create(sam_jax.sam(optax.sgd(lr), rho=rho), variables)
    state, step = state.apply_loss(loss_fn, batch, KEY)

    params = variables["params"]
    perturbed = _perturbed(params, loss_fn, batch, KEY, rho)
    descent = jax.grad(_mean_loss(loss_fn, batch, KEY))(perturbed)
    assert_trees_close(state.params, jax.tree.map(lambda w, g: w - lr * g, params, descent))
    mean_loss = _mean_loss(loss_fn, batch, KEY)
    np.testing.assert_allclose(step.loss, mean_loss(perturbed), rtol=1e-6)
    np.testing.assert_allclose(step.metrics.clean_loss, mean_loss(params), rtol=1e-6)
    assert step.loss > step.metrics.clean_loss  # the ascent step raised the loss


def test_plain_apply_loss_equals_flax_apply_gradients():
    variables, batch = _problem()
    tx = optax.adam(1e-2)
    loss_fn = _loss_fn(variables["batch_stats"])
    state = _create(tx, variables)
    new_state, step = state.apply_loss(loss_fn, batch, KEY)

    mean_loss = _mean_loss(loss_fn, batch, KEY)
    grads = jax.grad(mean_loss)(variables["params"])
    expected = _create(tx, variables, cls=train_state.TrainState).apply_gradients(grads=grads)
    trees.assert_equal(new_state.params, expected.params)
    trees.assert_equal(new_state.opt_state, expected.opt_state)
    assert int(new_state.step) == int(expected.step) == 1
    np.testing.assert_array_equal(step.loss, mean_loss(variables["params"]))
    assert step.metrics is None and step.aux is None
    # With a plain tx, apply_gradients is Flax's own.
    trees.assert_equal(state.apply_gradients(grads=grads).params, expected.params)


def test_sam_with_rho_zero_applies_the_plain_optimizer():
    variables, batch = _problem()
    loss_fn = _loss_fn(variables["batch_stats"])
    plain, _ = _create(optax.adam(1e-2), variables).apply_loss(loss_fn, batch, KEY)
    sam, step = _create(sam_jax.sam(optax.adam(1e-2), rho=0.0), variables).apply_loss(
        loss_fn, batch, KEY
    )
    assert_trees_close(sam.params, plain.params, rtol=1e-6, atol=1e-7)
    assert float(step.metrics.perturbation_norm) == 0.0


@pytest.mark.parametrize("rho", [0.0, 0.1])
def test_batch_stats_come_back_through_aux_from_the_descent_pass(rho):
    """aux holds the batch statistics of the forward pass at w + ε (at w with ρ = 0)."""
    variables, batch = _problem()
    stats = variables["batch_stats"]
    tx = sam_jax.sam(optax.sgd(0.1), rho=rho)
    state = _create(tx, variables, cls=BatchNormState, batch_stats=stats)
    new_state, step = state.apply_loss(_loss_fn(stats, has_aux=True), batch, KEY, has_aux=True)
    new_state = new_state.replace(batch_stats=step.aux)

    params = variables["params"]
    perturbed = _perturbed(params, _loss_fn(stats), batch, KEY, rho) if rho else params
    _, expected = _losses_and_stats(perturbed, stats, batch, KEY)
    _, clean = _losses_and_stats(params, stats, batch, KEY)
    assert isinstance(new_state, BatchNormState)
    assert_trees_close(new_state.batch_stats, expected)
    assert min(trees.leaf_changes(expected, stats)) > 1e-3  # the statistics were updated
    # With ρ > 0, the perturbed pass's statistics, not the clean pass's.
    assert (max(trees.leaf_changes(expected, clean)) > 1e-5) == (rho > 0)


@pytest.mark.parametrize(
    "tx",
    [
        sam_jax.sam(optax.sgd(0.1), rho=0.05),
        optax.chain(sam_jax.sam(optax.sgd(0.1), rho=0.05), optax.scale(0.5)),
        optax.inject_hyperparams(sam_jax.sam)(optimizer=optax.sgd(0.1), rho=0.05),
    ],
    ids=["sam", "chain", "inject_hyperparams"],
)
def test_apply_gradients_on_a_sam_state_points_to_apply_loss(tx):
    variables, batch = _problem()
    state = _create(tx, variables)
    grads = jax.grad(_mean_loss(_loss_fn(variables["batch_stats"]), batch, KEY))(state.params)
    with pytest.raises(ValueError, match=r"call `state\.apply_loss\(loss_fn, batch, key\)`"):
        state.apply_gradients(grads=grads)
    new_state, _ = state.apply_loss(_loss_fn(variables["batch_stats"]), batch, KEY)
    assert int(new_state.step) == 1


@pytest.mark.parametrize("use_sam", [False, True])
def test_apply_loss_under_jit_equals_eager(use_sam):
    variables, batch = _problem()
    tx = optax.adamw(1e-2)
    tx = sam_jax.sam(tx, rho=0.05, ascent_fraction=0.5) if use_sam else tx

    def train_step(state, batch, key):
        loss_fn = _loss_fn(state.batch_stats, has_aux=True)
        state, step = state.apply_loss(loss_fn, batch, key, has_aux=True)
        return state.replace(batch_stats=step.aux), step.loss

    initial = _create(tx, variables, cls=BatchNormState, batch_stats=variables["batch_stats"])
    states, losses = {}, {}
    for name, step_fn in (("eager", train_step), ("jit", jax.jit(train_step))):
        state, losses[name] = initial, []
        for key in jax.random.split(KEY, 3):
            state, loss = step_fn(state, batch, key)
            losses[name].append(float(loss))
        states[name] = state
    assert int(states["jit"].step) == 3
    assert_trees_close(states["jit"].params, states["eager"].params)
    assert_trees_close(states["jit"].batch_stats, states["eager"].batch_stats)
    np.testing.assert_allclose(losses["jit"], losses["eager"], rtol=1e-5)
    assert min(trees.leaf_changes(states["jit"].params, initial.params)) > 1e-3

"""Tests for sam_jax.flax_nnx: `update` steps an `nnx.Optimizer` from a loss, plain or SAM."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import trees
from flax import nnx

import sam_jax
from sam_jax import flax_nnx

# This file's default tolerance.
assert_trees_close = functools.partial(trees.assert_close, rtol=1e-05, atol=1e-06)


KEY = jax.random.key(3)


class Net(nnx.Module):
    """Linear, BatchNorm, ReLU, dropout, Linear; `rngs` carries the dropout key."""

    def __init__(self, rngs):
        self.hidden = nnx.Linear(5, 16, use_bias=False, rngs=rngs)  # BatchNorm adds the bias
        self.norm = nnx.BatchNorm(16, momentum=0.9, rngs=rngs)
        self.dropout = nnx.Dropout(0.25)
        self.out = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x, *, rngs=None):
        x = nnx.relu(self.norm(self.hidden(x)))
        return self.out(self.dropout(x, rngs=rngs))


def _batch(num_examples=16, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(num_examples, 5)), jnp.float32)
    return x, jnp.asarray(rng.integers(0, 3, num_examples))


def loss_fn(model, batch, key):
    x, y = batch
    logits = model(x, rngs=nnx.Rngs(dropout=key))
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def loss_and_stats(model, batch, key):
    return loss_fn(model, batch, key), nnx.state(model, nnx.BatchStat)


def _params(model):
    return nnx.as_pure(nnx.state(model, nnx.Param))


@pytest.mark.parametrize("graph", [True, False], ids=["graph", "tree"])
def test_sam_update_equals_the_functional_path(graph):
    """The split parameters through `update_from_loss` and `optax.apply_updates`."""
    model, batch = Net(nnx.Rngs(0)), _batch()
    tx = sam_jax.sam(optax.adamw(1e-2), rho=0.1, ascent_fraction=0.5)

    reference = nnx.clone(model)
    graphdef, params, others = nnx.split(reference, nnx.Param, ...)
    params, others = nnx.to_pure_dict(params), nnx.to_pure_dict(others)

    def pure_loss(p, batch, key):
        return loss_fn(nnx.merge(graphdef, p, others), batch, key)

    expected = sam_jax.update_from_loss(tx, tx.init(params), params, pure_loss, batch, KEY)

    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param, graph=graph)
    out = flax_nnx.update(optimizer, model, loss_fn, batch, KEY)
    new_params = optax.apply_updates(params, expected.updates)
    trees.assert_equal(nnx.to_pure_dict(_params(model)), new_params)
    trees.assert_equal(
        jax.tree.leaves(nnx.as_pure(optimizer.opt_state)), jax.tree.leaves(expected.opt_state)
    )
    trees.assert_equal(out, flax_nnx.StepOutput(expected.loss, expected.aux, expected.metrics))
    assert int(optimizer.step[...]) == 1


def _mlp_losses(p, batch):
    """A two-layer tanh MLP written out by hand on the parameters' dict."""
    x, y = batch
    hidden = jnp.tanh(x @ p["hidden"]["kernel"] + p["hidden"]["bias"])
    logits = hidden @ p["out"]["kernel"] + p["out"]["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


class Mlp(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(5, 8, rngs=rngs)
        self.out = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.hidden(x)))


def test_sam_sgd_update_equals_hand_computed_sam():
    """w − lr ∇L(w + ρ g/‖g‖), the loss written without Flax."""
    model, batch = Mlp(nnx.Rngs(1)), _batch()
    lr, rho = 0.1, 0.05
    optimizer = nnx.Optimizer(model, sam_jax.sam(optax.sgd(lr), rho=rho), wrt=nnx.Param)
    w = nnx.to_pure_dict(_params(model))

    def mlp_loss(model, batch, key):
        del key
        return optax.softmax_cross_entropy_with_integer_labels(model(batch[0]), batch[1])

    out = flax_nnx.update(optimizer, model, mlp_loss, batch)

    def mean_loss(p):
        return jnp.mean(_mlp_losses(p, batch))

    g = jax.grad(mean_loss)(w)
    norm = jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(g)))
    perturbed = jax.tree.map(lambda p, d: p + rho * d / norm, w, g)
    descent = jax.grad(mean_loss)(perturbed)
    expected = jax.tree.map(lambda p, d: p - lr * d, w, descent)
    assert_trees_close(nnx.to_pure_dict(_params(model)), expected)
    np.testing.assert_allclose(out.loss, mean_loss(perturbed), rtol=1e-6)
    np.testing.assert_allclose(out.metrics.clean_loss, mean_loss(w), rtol=1e-6)


def test_plain_update_equals_nnx_optimizer_update():
    """With a plain tx: `nnx.Optimizer.update(model, nnx.grad(mean loss))`."""
    batch, tx = _batch(), optax.adam(1e-2)
    model, reference = Net(nnx.Rngs(0)), Net(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    out = flax_nnx.update(optimizer, model, loss_fn, batch, KEY)

    ref_optimizer = nnx.Optimizer(reference, tx, wrt=nnx.Param)
    mean_loss = lambda m: jnp.mean(loss_fn(m, batch, KEY))  # noqa: E731
    loss, grads = nnx.value_and_grad(mean_loss)(reference)
    ref_optimizer.update(reference, grads)
    trees.assert_equal(_params(model), _params(reference))
    trees.assert_equal(nnx.as_pure(optimizer.opt_state), nnx.as_pure(ref_optimizer.opt_state))
    assert int(optimizer.step[...]) == int(ref_optimizer.step[...]) == 1
    np.testing.assert_array_equal(out.loss, loss)
    assert out.aux is None and out.metrics is None


@pytest.mark.parametrize("use_sam", [False, True])
def test_update_under_nnx_jit_equals_eager(use_sam):
    batch, tx = _batch(), optax.adamw(1e-2)
    tx = sam_jax.sam(tx, rho=0.05, ascent_fraction=0.5) if use_sam else tx

    def train_step(model, optimizer, batch, key):
        out = flax_nnx.update(optimizer, model, loss_and_stats, batch, key, has_aux=True)
        nnx.update(model, out.aux)
        return out.loss

    models, losses = {}, {}
    for name, step_fn in (("eager", train_step), ("jit", nnx.jit(train_step))):
        model = models[name] = Net(nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        losses[name] = [
            float(step_fn(model, optimizer, batch, key)) for key in jax.random.split(KEY, 3)
        ]
        assert int(optimizer.step[...]) == 3
    assert_trees_close(nnx.state(models["jit"]), nnx.state(models["eager"]))
    np.testing.assert_allclose(losses["jit"], losses["eager"], rtol=1e-5)
    assert min(trees.leaf_changes(_params(models["jit"]), _params(Net(nnx.Rngs(0))))) > 1e-3


def test_aux_returns_the_descent_pass_batch_stats_and_other_state_is_not_kept():
    """Batch statistics come back through aux (at w + ε); unreturned, they are unchanged."""
    model, batch = Net(nnx.Rngs(0)), _batch()
    rho = 0.1
    initial = nnx.clone(model)
    optimizer = nnx.Optimizer(model, sam_jax.sam(optax.sgd(0.1), rho=rho), wrt=nnx.Param)
    out = flax_nnx.update(optimizer, model, loss_and_stats, batch, KEY, has_aux=True)
    stats_before = nnx.as_pure(nnx.state(initial, nnx.BatchStat))
    trees.assert_equal(nnx.as_pure(nnx.state(model, nnx.BatchStat)), stats_before)

    # The batch statistics of a forward pass at w + ε, by hand.
    grads = nnx.grad(lambda m: jnp.mean(loss_fn(m, batch, KEY)))(nnx.clone(initial))
    grads = nnx.as_pure(grads)
    norm = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads)))
    perturbed = nnx.clone(initial)
    nnx.update(perturbed, jax.tree.map(lambda w, g: w + rho * g / norm, _params(initial), grads))
    perturbed_losses = loss_fn(perturbed, batch, KEY)  # updates its batch statistics
    expected = nnx.as_pure(nnx.state(perturbed, nnx.BatchStat))

    nnx.update(model, out.aux)
    assert_trees_close(nnx.as_pure(nnx.state(model, nnx.BatchStat)), expected)
    np.testing.assert_allclose(out.loss, jnp.mean(perturbed_losses), rtol=1e-6)
    assert min(trees.leaf_changes(expected, stats_before)) > 1e-3  # the statistics were updated


def test_nnx_optimizer_update_with_a_sam_tx_points_to_flax_nnx_update():
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, sam_jax.sam(optax.sgd(0.1)), wrt=nnx.Param)
    grads = nnx.state(model, nnx.Param)
    with pytest.raises(ValueError, match=r"sam_jax.flax_nnx.update"):
        optimizer.update(model, grads)

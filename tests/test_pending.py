"""Tests for sam_jax.pending: Optax wrappers before or around sam fail loudly; inside, work."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference

import sam_jax

RHO, LEARNING_RATE = 0.05, 0.1


def _step(tx, params, batch, state=None, jit=False):
    state = tx.init(params) if state is None else state

    def step(state, params, batch):
        return sam_jax.update_from_loss(tx, state, params, reference.loss_fn, batch)

    return (jax.jit(step) if jit else step)(state, params, batch)


def _messages(error: BaseException) -> str:
    """The error's message and those it was raised while handling (the traceback shows all)."""
    messages = []
    while error is not None:
        messages.append(str(error))
        error = error.__cause__ or error.__context__
    return "\n".join(messages)


def _sam_gradient(params, batch):
    """SAM's gradient by hand (numpy), for f = 1."""
    x, y = map(np.asarray, batch)
    w, b = np.asarray(params["w"]), np.asarray(params["b"])
    gw, gb = reference.np_sam_gradient(w, b, x, y, RHO)
    return {"w": gw, "b": gb}


@pytest.mark.parametrize(
    "before",
    [
        optax.clip_by_global_norm(1e-3),
        optax.scale(0.0),
        optax.add_decayed_weights(1e-2),
        optax.zero_nans(),
        optax.clip(1e-3),
    ],
    ids=["clip_by_global_norm", "scale", "add_decayed_weights", "zero_nans", "clip"],
)
@pytest.mark.parametrize("jit", [False, True])
def test_a_transformation_before_sam_in_a_chain_raises_where_it_belongs(before, jit):
    params, batch = reference.make_problem()
    tx = optax.chain(before, sam_jax.sam(optax.sgd(LEARNING_RATE), rho=RHO))
    with pytest.raises((TypeError, ValueError, AttributeError)) as error:
        _step(tx, params, batch, jit=jit)
    assert "Put it inside sam" in _messages(error.value)


@pytest.mark.parametrize(
    "outer, inner_form",
    [
        (lambda tx: optax.apply_if_finite(tx, 3), r"sam\(optax.apply_if_finite\(optimizer, 3\)\)"),
        (lambda tx: optax.MultiSteps(tx, 2), r"sam\(optax.MultiSteps\(optimizer, k\)\)"),
    ],
    ids=["apply_if_finite", "MultiSteps"],
)
def test_a_wrapper_around_sam_raises_and_names_the_inner_form(outer, inner_form):
    params, batch = reference.make_problem()
    tx = outer(sam_jax.sam(optax.sgd(LEARNING_RATE), rho=RHO))
    with pytest.raises((TypeError, ValueError, AttributeError)) as error:
        _step(tx, params, batch)
    assert re.search(inner_form, _messages(error.value))
    assert "num_microbatches=k" in _messages(error.value)


def test_clipping_inside_sam_clips_the_sam_gradient():
    params, batch = reference.make_problem()
    max_norm = 1e-3
    inner = optax.chain(optax.clip_by_global_norm(max_norm), optax.sgd(LEARNING_RATE))
    step = _step(sam_jax.sam(inner, rho=RHO), params, batch)
    grad = _sam_gradient(params, batch)
    scale = max_norm / np.sqrt(sum(np.sum(g**2) for g in grad.values()))
    assert scale < 1  # the clip is active
    for name in grad:
        np.testing.assert_allclose(
            step.updates[name], -LEARNING_RATE * scale * grad[name], rtol=1e-5, atol=1e-9
        )


def test_apply_if_finite_inside_sam_skips_a_nan_batch_and_counts_it():
    params, (x, y) = reference.make_problem()
    tx = sam_jax.sam(optax.apply_if_finite(optax.sgd(LEARNING_RATE), 3), rho=RHO)
    bad = _step(tx, params, (x, y.at[0].set(jnp.nan)), jit=True)
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(bad.updates))
    assert int(bad.opt_state.inner_state.notfinite_count) == 1
    assert not bool(bad.opt_state.inner_state.last_finite)
    good = _step(tx, params, (x, y), state=bad.opt_state, jit=True)
    assert int(good.opt_state.inner_state.notfinite_count) == 0
    grad = _sam_gradient(params, (x, y))
    for name in grad:
        np.testing.assert_allclose(good.updates[name], -LEARNING_RATE * grad[name], rtol=1e-5)


def test_multisteps_inside_sam_applies_the_mean_of_k_sam_gradients():
    params, batch = reference.make_problem(num_examples=16)
    first, second = (tuple(part[i::2] for part in batch) for i in range(2))
    tx = sam_jax.sam(optax.MultiSteps(optax.sgd(LEARNING_RATE), 2), rho=RHO)
    step = _step(tx, params, first)
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(step.updates))
    step = _step(tx, params, second, state=step.opt_state)
    grads = [_sam_gradient(params, part) for part in (first, second)]
    for name in grads[0]:
        mean = (grads[0][name] + grads[1][name]) / 2
        np.testing.assert_allclose(step.updates[name], -LEARNING_RATE * mean, rtol=1e-5)


def test_sam_refuses_none_and_gradients_in_place_of_the_pending_gradient():
    params, batch = reference.make_problem()
    tx = sam_jax.sam(optax.sgd(LEARNING_RATE))
    for wrong in (None, params):
        with pytest.raises(ValueError, match=r"takes sam_jax.pending_gradient\(params\)"):
            tx.update(wrong, tx.init(params), params, loss_fn=reference.loss_fn, batch=batch)


def test_the_pending_gradient_refuses_arithmetic_and_conversion():
    placeholder = jax.tree.leaves(sam_jax.pending_gradient({"w": jnp.ones(2)}))[0]
    for use in (
        lambda p: p + 1,
        lambda p: 2.0 * p,
        lambda p: jnp.square(p),
        lambda p: np.asarray(p),
        lambda p: p.shape,
    ):
        with pytest.raises((TypeError, AttributeError)) as error:
            use(placeholder)
        assert "Put it inside sam" in _messages(error.value)


def test_the_optimizers_injected_hyperparameters_and_a_transformation_after_sam_work():
    params, batch = reference.make_problem()
    grad = _sam_gradient(params, batch)
    inner = optax.inject_hyperparams(optax.sgd)(learning_rate=LEARNING_RATE)
    tx = sam_jax.sam(inner, rho=RHO)
    state = tx.init(params)
    state.inner_state.hyperparams["learning_rate"] = jnp.asarray(0.5, jnp.float32)
    step = _step(tx, params, batch, state=state, jit=True)
    np.testing.assert_allclose(step.updates["w"], -0.5 * grad["w"], rtol=1e-5)
    chained = optax.chain(sam_jax.sam(optax.sgd(LEARNING_RATE), rho=RHO), optax.scale(0.5))
    step = _step(chained, params, batch)
    np.testing.assert_allclose(step.updates["w"], -0.5 * LEARNING_RATE * grad["w"], rtol=1e-5)

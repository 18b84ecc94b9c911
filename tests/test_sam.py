"""Tests for sam_jax.sam: the SAM step against its equations, invariants and peers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference
import trees

import sam_jax
from sam_jax import core
from sam_jax import perturbation
from sam_jax import transform

# This file's default tolerance.
assert_trees_close = functools.partial(trees.assert_close, rtol=1e-05, atol=1e-07)


def _sgd_step(tx, params, batch, key=None, state=None):
    state = tx.init(params) if state is None else state
    updates, state = tx.update(
        sam_jax.pending_gradient(params),
        state,
        params,
        loss_fn=reference.loss_fn,
        batch=batch,
        key=key,
    )
    return optax.apply_updates(params, updates), state


# --- The SAM step against a hand-written reference ------------------------------------


@pytest.mark.parametrize("fraction, ascent", [(1.0, 8), (0.25, 2), (0.5, 4)])
def test_sgd_step_equals_hand_computed_sam(fraction, ascent):
    """Ascent on the first f·N examples, descent on all N (Bahri et al., Algorithm 1)."""
    params, batch = reference.make_problem(num_examples=8)
    lr, rho = 0.1, 0.05
    new_params, state = _sgd_step(
        sam_jax.sam(optax.sgd(lr), rho=rho, ascent_fraction=fraction), params, batch
    )
    w, b = reference.to_np(params)
    x, y = reference.batch_np(batch)
    gw, gb = reference.np_sam_gradient(w, b, x, y, rho, x[:ascent], y[:ascent])
    np.testing.assert_allclose(new_params["w"], w - lr * gw, rtol=1e-5)
    np.testing.assert_allclose(new_params["b"], b - lr * gb, rtol=1e-5)
    np.testing.assert_allclose(
        state.metrics.clean_loss,
        np.mean(reference.np_losses(w, b, x[:ascent], y[:ascent])),
        rtol=1e-5,
    )
    np.testing.assert_allclose(state.metrics.perturbation_norm, rho, rtol=1e-5)
    np.testing.assert_allclose(state.metrics.weight_entropy, np.log(ascent), rtol=1e-5)


def test_fraction_equals_sam_on_the_sub_batch_ascent():
    """f·N ascent examples == full SAM whose ascent batch is those examples (descent on all)."""
    params, batch = reference.make_problem(num_examples=16)
    quarter, _ = _sgd_step(sam_jax.sam(optax.sgd(0.1), ascent_fraction=0.25), params, batch)
    w, b = reference.to_np(params)
    x, y = reference.batch_np(batch)
    gw, gb = reference.np_sam_gradient(w, b, x, y, 0.05, x[:4], y[:4])
    np.testing.assert_allclose(quarter["w"], w - 0.1 * gw, rtol=1e-5)
    full, _ = _sgd_step(sam_jax.sam(optax.sgd(0.1)), params, batch)
    assert not np.allclose(full["w"], quarter["w"])  # the sub-batch really matters


def test_full_batch_sam_with_sgd_equals_optax_contrib_sam():
    params, batch = reference.make_problem(num_examples=8)
    lr, rho = 0.1, 0.05
    ours, _ = _sgd_step(sam_jax.sam(optax.sgd(lr), rho=rho), params, batch)

    peer = optax.contrib.sam(
        optax.sgd(lr),
        optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
        sync_period=2,
        opaque_mode=True,
    )

    def mean_loss(p):
        return jnp.mean(reference.loss_fn(p, batch, None))

    grads = jax.grad(mean_loss)(params)
    updates, _ = peer.update(
        grads, peer.init(params), params, grad_fn=lambda p, _: jax.grad(mean_loss)(p)
    )
    assert_trees_close(ours, optax.apply_updates(params, updates), rtol=1e-6)


def test_asam_step_closed_form():
    params, batch = reference.make_problem(num_examples=8)
    lr, rho, eta = 0.1, 0.5, 0.01
    new_params, _ = _sgd_step(
        sam_jax.sam(optax.sgd(lr), rho=rho, adaptive=True, adaptive_eta=eta), params, batch
    )
    w, b = reference.to_np(params)
    x, y = reference.batch_np(batch)
    gw, gb = reference.np_weighted_grad(w, b, x, y, np.full(8, 1 / 8))
    tw, tb = np.abs(w) + eta, abs(b) + eta
    norm = np.sqrt(np.sum((tw * gw) ** 2) + (tb * gb) ** 2)
    ew, eb = rho * tw**2 * gw / norm, rho * tb**2 * gb / norm
    dw, db = reference.np_weighted_grad(w + ew, b + eb, x, y, np.full(8, 1 / 8))
    np.testing.assert_allclose(new_params["w"], w - lr * dw, rtol=1e-5)
    np.testing.assert_allclose(new_params["b"], b - lr * db, rtol=1e-5)


def test_delta_sam_step_uses_weighted_ascent_and_unweighted_descent():
    params, batch = reference.make_problem(num_examples=8)
    key, rho, eta = jax.random.key(7), 0.05, 1e-4
    new_params, state = _sgd_step(
        sam_jax.sam(optax.sgd(0.1), rho=rho, reweight=sam_jax.delta_sam(eta)), params, batch, key
    )
    # Weights by Eq. 5 with the transform's random direction, evaluated in numpy.
    r = perturbation.random_perturbation(core.reweight_key(key), params, rho)
    w, b = reference.to_np(params)
    rw, rb = reference.to_np(r)
    x, y = reference.batch_np(batch)
    clean = reference.np_losses(w, b, x, y)
    plus = reference.np_losses(w + rw, b + rb, x, y)
    minus = reference.np_losses(w - rw, b - rb, x, y)
    g = np.abs(plus + minus - 2 * clean) / np.maximum(np.abs(plus - minus), eta)
    weights = g / g.sum()
    gw, gb = reference.np_sam_gradient(w, b, x, y, rho, weights=weights)
    # The weights come from fp32 finite differences of size ~ρ², hence atol.
    np.testing.assert_allclose(new_params["w"], w - 0.1 * gw, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(new_params["b"], b - 0.1 * gb, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(state.metrics.weight_max, weights.max(), rtol=1e-3)
    np.testing.assert_allclose(state.metrics.weight_min, weights.min(), rtol=1e-3)


# --- Invariants -------------------------------------------------------------------------


@pytest.mark.parametrize("rule", [sam_jax.delta_sam(), sam_jax.delta_sam_draft(beta=5.0)])
def test_identical_examples_make_delta_sam_equal_sam(rule):
    params, batch = reference.make_problem(num_examples=1)
    batch = jax.tree.map(lambda v: jnp.repeat(v, 8, axis=0), batch)
    key = jax.random.key(0)
    sam_params, _ = _sgd_step(sam_jax.sam(optax.sgd(0.1), ascent_fraction=0.5), params, batch, key)
    delta_params, state = _sgd_step(
        sam_jax.sam(optax.sgd(0.1), ascent_fraction=0.5, reweight=rule), params, batch, key
    )
    assert_trees_close(delta_params, sam_params, rtol=1e-6)
    np.testing.assert_allclose(state.metrics.weight_entropy, np.log(4), rtol=1e-5)


def test_fisher_mask_with_zero_sparsity_equals_sam_exactly():
    params, batch = reference.make_problem(num_examples=8)
    optimizer = optax.adamw(1e-2)
    plain, plain_state = _sgd_step(sam_jax.sam(optimizer, ascent_fraction=0.5), params, batch)
    masked, masked_state = _sgd_step(
        sam_jax.sam(optimizer, ascent_fraction=0.5, mask=sam_jax.fisher_mask(sparsity=0.0)),
        params,
        batch,
    )
    for x, y in zip(jax.tree.leaves(plain), jax.tree.leaves(masked), strict=True):
        np.testing.assert_array_equal(x, y)
    assert float(masked_state.metrics.mask_density) == 1.0
    assert float(plain_state.metrics.perturbation_norm) == float(
        masked_state.metrics.perturbation_norm
    )


def test_fisher_mask_perturbs_only_the_masked_coordinates():
    params, batch = reference.make_problem(num_examples=8, dim=9)
    mask = sam_jax.fisher_mask(sparsity=0.5, num_samples=8)
    new_params, state = _sgd_step(sam_jax.sam(optax.sgd(0.1), mask=mask), params, batch)
    w, b = reference.to_np(params)
    x, y = reference.batch_np(batch)
    # Numpy: the top round(0.5 × 10) = 5 of the empirical Fisher over the 8 examples.
    mask_w, mask_b = reference.np_fisher_mask(w, b, x, y, 0.5, 8)
    assert mask_w.sum() + mask_b.sum() == 5
    np.testing.assert_array_equal(state.mask_state.mask["w"], mask_w)
    np.testing.assert_array_equal(state.mask_state.mask["b"], mask_b)
    gw, gb = reference.np_sam_gradient(w, b, x, y, 0.05, mask=(mask_w, mask_b))
    np.testing.assert_allclose(new_params["w"], w - 0.1 * gw, rtol=1e-5)
    np.testing.assert_allclose(new_params["b"], b - 0.1 * gb, rtol=1e-5)
    # ‖ε ⊙ m‖ = ρ‖g ⊙ m‖/‖g‖ (normalised by the unmasked gradient).
    ascent_w, ascent_b = reference.np_weighted_grad(w, b, x, y, np.full(8, 1 / 8))
    masked_norm = np.sqrt(np.sum((ascent_w * mask_w) ** 2) + (ascent_b * mask_b) ** 2)
    full_norm = np.sqrt(np.sum(ascent_w**2) + ascent_b**2)
    np.testing.assert_allclose(
        state.metrics.perturbation_norm, 0.05 * masked_norm / full_norm, rtol=1e-5
    )
    np.testing.assert_allclose(state.metrics.mask_density, 0.5)
    # The mask matters far beyond rtol: unmasked SAM would move the parameters elsewhere.
    sam_w, _ = reference.np_sam_gradient(w, b, x, y, 0.05)
    assert np.max(np.abs(sam_w - gw) / np.abs(gw)) > 1e3 * 1e-5


def test_m_equal_to_batch_size_equals_per_instance_sam():
    params, batch = reference.make_problem(num_examples=8)
    m_sharp, m_state = _sgd_step(sam_jax.sam(optax.sgd(0.1), sharpness_m=8), params, batch)
    per_instance, p_state = _sgd_step(sam_jax.per_instance_sam(optax.sgd(0.1)), params, batch)
    assert_trees_close(m_sharp, per_instance, rtol=1e-5)
    np.testing.assert_allclose(m_state.metrics.perturbed_loss, p_state.metrics.perturbed_loss)


def test_m_sharpness_averages_group_sam_gradients():
    params, batch = reference.make_problem(num_examples=8)
    new_params, _ = _sgd_step(sam_jax.sam(optax.sgd(0.1), sharpness_m=2), params, batch)
    w, b = reference.to_np(params)
    x, y = reference.batch_np(batch)
    grads = [reference.np_sam_gradient(w, b, x[k : k + 4], y[k : k + 4], 0.05) for k in (0, 4)]
    np.testing.assert_allclose(
        new_params["w"], w - 0.1 * (grads[0][0] + grads[1][0]) / 2, rtol=1e-5
    )


def test_per_instance_sam_closed_form():
    params, batch = reference.make_problem(num_examples=4)
    new_params, _ = _sgd_step(sam_jax.per_instance_sam(optax.sgd(0.1), rho=0.05), params, batch)
    w, b = reference.to_np(params)
    x, y = reference.batch_np(batch)
    grads = [reference.np_sam_gradient(w, b, x[i : i + 1], y[i : i + 1], 0.05) for i in range(4)]
    np.testing.assert_allclose(
        new_params["w"], w - 0.1 * np.mean([g[0] for g in grads], 0), rtol=1e-5
    )
    np.testing.assert_allclose(new_params["b"], b - 0.1 * np.mean([g[1] for g in grads]), rtol=1e-5)


def test_rho_zero_is_the_plain_optimizer():
    params, batch = reference.make_problem(num_examples=8)
    ours, _ = _sgd_step(sam_jax.sam(optax.adam(1e-2), rho=0.0), params, batch)
    grads = jax.grad(lambda p: jnp.mean(reference.loss_fn(p, batch, None)))(params)
    tx = optax.adam(1e-2)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert_trees_close(ours, optax.apply_updates(params, updates), rtol=1e-6)


# --- Composition with optax -------------------------------------------------------------


@pytest.mark.parametrize(
    "optimizer",
    [
        optax.adamw(1e-2, weight_decay=0.1),
        optax.adafactor(1e-2),
        optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(1e-2)),
        optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2),
    ],
    ids=["adamw", "adafactor", "clip+adamw", "inject_hyperparams"],
)
def test_wraps_any_optimizer_with_the_sam_gradient(optimizer):
    params, batch = reference.make_problem(num_examples=8)
    ours, _ = _sgd_step(sam_jax.sam(optimizer, ascent_fraction=0.5), params, batch)
    w, b = reference.to_np(params)
    x, y = reference.batch_np(batch)
    gw, gb = reference.np_sam_gradient(w, b, x, y, 0.05, x[:4], y[:4])
    grads = {"w": jnp.asarray(gw, jnp.float32), "b": jnp.asarray(gb, jnp.float32)}
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    assert_trees_close(ours, optax.apply_updates(params, updates), rtol=1e-4, atol=1e-6)


def test_rho_schedule_is_followed_per_step():
    params, batch = reference.make_problem(num_examples=8)
    schedule = optax.linear_schedule(0.0, 0.3, transition_steps=3)
    tx = sam_jax.sam(optax.sgd(0.01), rho=schedule)
    state = tx.init(params)
    for step in range(4):
        params, state = _sgd_step(tx, params, batch, state=state)
        np.testing.assert_allclose(state.metrics.rho, schedule(step), rtol=1e-6)
        np.testing.assert_allclose(state.metrics.perturbation_norm, schedule(step), rtol=1e-5)


def test_extra_args_reach_the_inner_optimizer():
    params, batch = reference.make_problem(num_examples=8)
    inner = optax.chain(optax.sgd(0.1), optax.contrib.reduce_on_plateau(patience=0))
    tx = sam_jax.sam(inner)
    state = tx.init(params)
    _, state = tx.update(
        sam_jax.pending_gradient(params),
        state,
        params,
        loss_fn=reference.loss_fn,
        batch=batch,
        value=jnp.float32(3.0),
    )
    assert float(state.inner_state[1].best_value) == 3.0


# --- jit, sharding, checkpoints -----------------------------------------------------------


def _all_variants():
    return {
        "sam": dict(),
        "sam_quarter": dict(ascent_fraction=0.25),
        "delta_sam": dict(ascent_fraction=0.25, reweight=sam_jax.delta_sam()),
        "delta_sam_draft": dict(ascent_fraction=0.25, reweight=sam_jax.delta_sam_draft()),
        "fsam": dict(ascent_fraction=0.25, mask=sam_jax.fisher_mask(sparsity=0.5, interval=2)),
        "asam": dict(adaptive=True),
        "m_sharpness": dict(sharpness_m=2, ascent_fraction=0.5),
        "gsam": dict(surrogate_gap=sam_jax.gsam(0.5)),
        # β = 0.8: with the 6 coordinates of the linear model, β = 0.5 masks all of them
        # in one step of 64 (ε = 0, every example's rise 0: a selection by rounding noise).
        "esam": dict(esam=sam_jax.esam(beta=0.8, gamma=0.5)),
        "fgsam": dict(
            ascent_fraction=0.25,
            mask=sam_jax.fisher_mask(sparsity=0.5, interval=2),
            surrogate_gap=sam_jax.gsam(0.5),
        ),
        "fesam": dict(
            mask=sam_jax.fisher_mask(sparsity=0.5, interval=2),
            esam=sam_jax.esam(beta=0.8, gamma=0.5),
        ),
        "gsam_m_sharpness": dict(
            sharpness_m=2, ascent_fraction=0.5, surrogate_gap=sam_jax.gsam(0.5)
        ),
        "esam_m_sharpness": dict(sharpness_m=2, esam=sam_jax.esam(beta=0.8, gamma=0.5)),
    }


def _train(tx, params, batch, steps=3, jit=True):
    def step(p, s, key):
        updates, s = tx.update(
            sam_jax.pending_gradient(p), s, p, loss_fn=reference.loss_fn, batch=batch, key=key
        )
        return optax.apply_updates(p, updates), s

    step = jax.jit(step) if jit else step
    state = tx.init(params)
    for i in range(steps):
        params, state = step(params, state, jax.random.key(i))
    return params, state


# jit vs eager differs only by float32 rounding and fusion. Measured after 3 steps: ≤ 6e-7
# relative (≤ 2.4e-7 absolute) on the parameters and momentum, so a few float32 ulps.
# The variants' parameters are ≥ 9e-3 apart, and ≥ 1.8e-2 from plain momentum SGD: more
# than 1000× this tolerance.
JIT_RTOL, JIT_ATOL = 2e-6, 1e-6
# The metrics of the non-δ variants agree to ≤ 5e-7 too, but δ-SAM's weights are built from
# loss differences l_j(w + ε) − l_j(w) ~ 0.1 of O(1) losses, which amplifies the rounding:
# measured up to 3.1e-6 absolute on weight_min (0.034) and 1.3e-5 on grad_norm (2.55).
METRICS_RTOL, METRICS_ATOL = 2e-5, 1e-5


def _momentum_sgd_np(params, batch, steps=3, lr=0.1, momentum=0.9):
    """Plain (ρ = 0) momentum SGD on the mean loss, by numpy."""
    w, b = reference.to_np(params)
    x, y = reference.batch_np(batch)
    trace_w, trace_b = np.zeros_like(w), 0.0
    uniform = np.full(len(y), 1.0 / len(y))
    for _ in range(steps):
        gw, gb = reference.np_weighted_grad(w, b, x, y, uniform)
        trace_w, trace_b = gw + momentum * trace_w, gb + momentum * trace_b
        w, b = w - lr * trace_w, b - lr * trace_b
    return {"b": np.array(b), "w": w}


def _max_violation(a, b):
    """max |a − b| / (atol + rtol·|b|) over all leaves: > 1 fails the jit tolerance."""
    return max(
        np.max(np.abs(x - y) / (JIT_ATOL + JIT_RTOL * np.abs(y)))
        for x, y in zip(
            jax.tree.leaves(jax.tree.map(lambda v: np.asarray(v, np.float64), a)),
            jax.tree.leaves(jax.tree.map(lambda v: np.asarray(v, np.float64), b)),
            strict=True,
        )
    )


@pytest.mark.parametrize("variant", list(_all_variants()))
def test_jit_equals_eager(variant):
    # Momentum SGD, not Adam: Adam's first step is ±lr whatever the gradient, so after 3
    # steps the variants' parameters were only 5–45× the old tolerance (rtol 1e-5) from plain
    # Adam, and fsam only 2× from asam. SGD moves the parameters by the SAM gradient itself.
    params, batch = reference.make_problem(num_examples=16)
    tx = sam_jax.sam(optax.sgd(0.1, momentum=0.9), **_all_variants()[variant])
    jitted_params, jitted_state = _train(tx, params, batch, jit=True)
    eager_params, eager_state = _train(tx, params, batch, jit=False)
    assert_trees_close(jitted_params, eager_params, rtol=JIT_RTOL, atol=JIT_ATOL)
    assert_trees_close(
        jitted_state.inner_state, eager_state.inner_state, rtol=JIT_RTOL, atol=JIT_ATOL
    )
    assert int(jitted_state.count) == int(eager_state.count) == 3
    for name in transform.SamMetrics._fields:
        np.testing.assert_allclose(
            getattr(jitted_state.metrics, name),
            getattr(eager_state.metrics, name),
            rtol=METRICS_RTOL,
            atol=METRICS_ATOL,
            err_msg=name,
        )
    assert_trees_close(jitted_state.mask_state, eager_state.mask_state, rtol=0, atol=0)
    # The metrics are of a real SAM step, and the step is far from plain momentum SGD.
    assert float(jitted_state.metrics.perturbation_norm) > 0.01
    assert float(jitted_state.metrics.perturbed_loss) != float(jitted_state.metrics.clean_loss)
    assert _max_violation(jitted_params, _momentum_sgd_np(params, batch)) > 1000


def test_the_jit_variants_train_differently():
    """Every variant of test_jit_equals_eager is told apart from every other by its tolerance."""
    params, batch = reference.make_problem(num_examples=16)
    trained = {
        name: _train(sam_jax.sam(optax.sgd(0.1, momentum=0.9), **kwargs), params, batch)[0]
        for name, kwargs in _all_variants().items()
    }
    for first, a in trained.items():
        for second, b in trained.items():
            if first < second:
                assert _max_violation(a, b) > 1000, (first, second)


def _mlp_problem():
    rng = np.random.default_rng(0)
    params = {
        "hidden": jnp.asarray(rng.normal(size=(6, 8)) * 0.5, jnp.float32),
        "out": jnp.asarray(rng.normal(size=(8,)) * 0.5, jnp.float32),
    }
    batch = (
        jnp.asarray(rng.normal(size=(16, 6)), jnp.float32),
        jnp.asarray(rng.normal(size=(16,)), jnp.float32),
    )
    return params, batch


def _mlp_loss(params, batch, key):
    x, y = batch
    hidden = jnp.tanh(x @ params["hidden"])
    keep = jax.random.bernoulli(key, 0.9, hidden.shape)  # dropout shared by all passes
    return (jnp.where(keep, hidden / 0.9, 0.0) @ params["out"] - y) ** 2


def _mlp_step(tx):
    def step(p, s, key, b):
        updates, s = tx.update(
            sam_jax.pending_gradient(p), s, p, loss_fn=_mlp_loss, batch=b, key=key
        )
        return optax.apply_updates(p, updates), s

    return jax.jit(step)


@pytest.mark.parametrize("variant", list(_all_variants()))
def test_sharded_on_a_data_model_mesh_equals_unsharded(variant):
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    kwargs = dict(_all_variants()[variant])
    if kwargs.get("sharpness_m", 1) == 1:
        kwargs["num_data_shards"] = 4
    tx = sam_jax.sam(optax.adamw(1e-2), **kwargs)

    def run(params, batch):
        step, state = _mlp_step(tx), tx.init(params)
        for i in range(3):
            params, state = step(params, state, jax.random.key(i), batch)
        return params, state

    params, batch = _mlp_problem()
    expected_params, expected_state = run(params, batch)

    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    param_sharding = {
        "hidden": NamedSharding(mesh, P(None, "model")),
        "out": NamedSharding(mesh, P("model")),
    }
    sharded_params = jax.device_put(params, param_sharding)
    sharded_batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
    with jax.set_mesh(mesh):
        got_params, got_state = run(sharded_params, sharded_batch)
    assert len(got_params["hidden"].sharding.device_set) == 8
    # δ-SAM's weights are fp32 finite differences of size ~ρ²: a one-ulp change of a
    # loss from another reduction order moves them by ~ulp/ρ², hence looser tolerances
    # (the smallest weight, of the flattest example, most: 1e-4 is 0.04 % of 1/|M|).
    reweighted = "reweight" in kwargs
    assert_trees_close(got_params, expected_params, rtol=1e-4 if reweighted else 1e-5, atol=1e-6)
    assert_trees_close(
        got_state.metrics,
        expected_state.metrics,
        rtol=1e-3 if reweighted else 1e-5,
        atol=1e-4 if reweighted else 1e-6,
    )


def test_state_round_trips_through_an_orbax_checkpoint(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")  # the train extra (not the core install)

    params, batch = reference.make_problem(num_examples=8)
    tx = sam_jax.sam(
        optax.adamw(1e-2), ascent_fraction=0.5, mask=sam_jax.fisher_mask(sparsity=0.5, interval=2)
    )
    params, state = _train(tx, params, batch, steps=1)
    with ocp.CheckpointManager(tmp_path) as manager:
        manager.save(1, args=ocp.args.StandardSave(state))
        manager.wait_until_finished()
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        restored = manager.restore(1, args=ocp.args.StandardRestore(abstract))
    assert isinstance(restored, sam_jax.SamState)
    assert isinstance(restored.mask_state, sam_jax.FisherMaskState)
    for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(x, y)
        assert x.dtype == y.dtype
    # The restored state continues exactly like the original one.
    step = jax.jit(
        lambda s: tx.update(
            sam_jax.pending_gradient(params),
            s,
            params,
            loss_fn=reference.loss_fn,
            batch=batch,
            key=None,
        )
    )
    assert_trees_close(step(state), step(restored), rtol=0, atol=0)


# --- Numerics ----------------------------------------------------------------------------


def test_zero_gradient_gives_finite_updates_and_zero_epsilon():
    params = {"w": jnp.zeros((3,)), "b": jnp.float32(0.0)}
    batch = (jnp.zeros((4, 3)), jnp.zeros((4,)))  # loss 0 everywhere, gradient 0
    for kwargs in _all_variants().values():
        new_params, state = _sgd_step(
            sam_jax.sam(optax.adamw(1e-2), **kwargs), params, batch, jax.random.key(0)
        )
        for leaf in jax.tree.leaves((new_params, state)):
            assert np.all(np.isfinite(np.asarray(leaf, np.float32)))
        assert float(state.metrics.perturbation_norm) == 0.0


def test_bfloat16_parameters_are_perturbed_in_float32_and_kept_exactly():
    params, batch = reference.make_problem(num_examples=8)
    params = jax.tree.map(lambda v: v.astype(jnp.bfloat16), params)
    seen = []

    def recording_loss(p, b, key):
        jax.debug.callback(lambda w, b: seen.append({"w": w, "b": b}), p["w"], p["b"])
        return reference.loss_fn(p, b, key).astype(jnp.float32)

    original = jax.tree.map(np.asarray, params)
    tx = sam_jax.sam(optax.sgd(0.1), rho=0.05)
    updates, state = tx.update(
        sam_jax.pending_gradient(params),
        tx.init(params),
        params,
        loss_fn=recording_loss,
        batch=batch,
    )
    ascent_params, descent_params = seen
    # w is untouched (the transform never writes w + ε − ε back), and the ascent is at w.
    for x, y, z in zip(*map(jax.tree.leaves, (params, original, ascent_params)), strict=True):
        np.testing.assert_array_equal(np.asarray(x), y)
        np.testing.assert_array_equal(np.asarray(z), y)
    # w + ε was computed in float32 and rounded once to bfloat16.
    grads = jax.grad(lambda p: jnp.mean(reference.loss_fn(p, batch, None)))(params)
    g32 = jax.tree.map(lambda g: np.asarray(g, np.float32), grads)
    norm = np.sqrt(sum(np.sum(g**2) for g in jax.tree.leaves(g32)))
    for name in ("w", "b"):
        expected = (np.asarray(params[name], np.float32) + 0.05 * g32[name] / norm).astype(
            jnp.bfloat16
        )
        np.testing.assert_array_equal(np.asarray(descent_params[name]), expected)
    assert all(np.isfinite(np.asarray(u, np.float32)).all() for u in jax.tree.leaves(updates))


def test_bfloat16_activations_still_give_a_float32_perturbation_of_norm_rho():
    params, batch = reference.make_problem(num_examples=8)

    def bf16_loss(p, b, key):  # the model computes and returns its losses in bfloat16
        low = jax.tree.map(lambda v: v.astype(jnp.bfloat16), (p, b))
        return reference.loss_fn(*low, key)

    for kwargs in _all_variants().values():
        tx = sam_jax.sam(optax.adamw(1e-2), rho=0.05, **kwargs)
        updates, state = tx.update(
            sam_jax.pending_gradient(params),
            tx.init(params),
            params,
            loss_fn=bf16_loss,
            batch=batch,
            key=jax.random.key(0),
        )
        assert all(u.dtype == jnp.float32 for u in jax.tree.leaves(updates))
        assert all(np.isfinite(u).all() for u in jax.tree.leaves(updates))
        assert state.metrics.clean_loss.dtype == jnp.float32
        if not {"mask", "adaptive", "esam"} & kwargs.keys():
            np.testing.assert_allclose(state.metrics.perturbation_norm, 0.05, rtol=1e-5)


@pytest.mark.parametrize(
    "probe, passes",
    # l(w) with its vjp, the jvp of a jvp (or l(w + r) and l(w − r)), descent l(w + ε).
    [("forward_mode", 3), ("finite_difference", 4)],
)
def test_delta_sam_passes_share_the_dropout_key(probe, passes):
    params, batch = _mlp_problem()
    keys = []

    def recording_loss(p, b, key):
        keys.append(key)
        return _mlp_loss(p, b, key)

    rule = sam_jax.delta_sam(probe=probe)
    tx = sam_jax.sam(optax.sgd(0.1), ascent_fraction=0.25, reweight=rule)
    key = jax.random.key(11)
    tx.update(
        sam_jax.pending_gradient(params),
        tx.init(params),
        params,
        loss_fn=recording_loss,
        batch=batch,
        key=key,
    )
    assert len(keys) == passes
    for k in keys:
        np.testing.assert_array_equal(jax.random.key_data(k), jax.random.key_data(key))


# --- Bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rho=-0.1), "rho must be ≥ 0"),
        (dict(ascent_fraction=0.0), r"ascent_fraction must be in \(0, 1\]"),
        (dict(ascent_fraction=1.5), r"ascent_fraction must be in \(0, 1\]"),
        (dict(sharpness_m=0), "sharpness_m must be an integer ≥ 1"),
        (dict(num_data_shards=0), "num_data_shards must be an integer ≥ 1"),
        (dict(adaptive=True, adaptive_eta=0.0), "adaptive_eta must be > 0"),
    ],
)
def test_sam_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sam_jax.sam(optax.sgd(0.1), **kwargs)


def test_per_instance_sam_rejects_negative_rho():
    with pytest.raises(ValueError, match="rho must be ≥ 0"):
        sam_jax.per_instance_sam(optax.sgd(0.1), rho=-1.0)


def test_sam_rejects_bad_reweight_and_mask_types():
    with pytest.raises(TypeError, match="reweight must be"):
        sam_jax.sam(optax.sgd(0.1), reweight="delta_sam")
    with pytest.raises(TypeError, match="mask must be"):
        sam_jax.sam(optax.sgd(0.1), mask=0.9)


@pytest.mark.parametrize(
    "kwargs, num_examples, match",
    [
        (dict(sharpness_m=3), 8, r"batch of 8 examples must be divisible by sharpness_m=3 ×"),
        (dict(num_data_shards=3), 8, r"batch of 8 .* by sharpness_m=1 × num_data_shards=3 ×"),
        (
            dict(sharpness_m=2, num_data_shards=2, num_microbatches=4),
            8,
            r"sharpness_m=2 × num_data_shards=2 × num_microbatches=4 = 16",
        ),
    ],
)
def test_update_rejects_batches_that_do_not_divide(kwargs, num_examples, match):
    params, batch = reference.make_problem(num_examples=num_examples)
    with pytest.raises(ValueError, match=match):
        _sgd_step(sam_jax.sam(optax.sgd(0.1), **kwargs), params, batch)


def test_update_rejects_a_scalar_loss():
    params, batch = reference.make_problem(num_examples=8)
    tx = sam_jax.sam(optax.sgd(0.1))
    with pytest.raises(ValueError, match="per-example losses of shape"):
        tx.update(
            sam_jax.pending_gradient(params),
            tx.init(params),
            params,
            loss_fn=lambda p, b, k: jnp.mean(reference.loss_fn(p, b, k)),
            batch=batch,
        )


def test_update_rejects_gradients_and_a_missing_key_for_delta_sam():
    params, batch = reference.make_problem(num_examples=8)
    tx = sam_jax.sam(optax.sgd(0.1), reweight=sam_jax.delta_sam())
    with pytest.raises(ValueError, match="takes sam_jax.pending_gradient"):
        tx.update(params, tx.init(params), params, loss_fn=reference.loss_fn, batch=batch)
    with pytest.raises(ValueError, match="pass `key`"):
        tx.update(
            sam_jax.pending_gradient(params),
            tx.init(params),
            params,
            loss_fn=reference.loss_fn,
            batch=batch,
        )


@pytest.mark.parametrize("variant", list(_all_variants()))
@pytest.mark.parametrize("num_microbatches, shards", [(4, 1), (2, 2)])
def test_microbatched_step_equals_the_full_batch_step(variant, num_microbatches, shards):
    params, batch = reference.make_problem(num_examples=16)
    kwargs = dict(_all_variants()[variant])
    if kwargs.get("sharpness_m", 1) == 1:
        kwargs["num_data_shards"] = shards
    elif shards > 1:
        pytest.skip("m-sharpness groups are contiguous: num_data_shards is not used")
    full = _train(sam_jax.sam(optax.adamw(1e-2), **kwargs), params, batch)
    micro = _train(
        sam_jax.sam(optax.adamw(1e-2), num_microbatches=num_microbatches, **kwargs), params, batch
    )
    rtol = 1e-4 if "reweight" in kwargs else 1e-5  # δ-SAM: fp32 finite differences
    assert_trees_close(micro[0], full[0], rtol=rtol, atol=1e-6)
    assert_trees_close(micro[1].metrics, full[1].metrics, rtol=1e-3, atol=1e-5)


def test_num_microbatches_is_validated():
    with pytest.raises(ValueError, match="num_microbatches must be an integer ≥ 1"):
        sam_jax.sam(optax.sgd(0.1), num_microbatches=0)
    params, batch = reference.make_problem(num_examples=8)
    with pytest.raises(ValueError, match="num_microbatches=3"):
        _sgd_step(sam_jax.sam(optax.sgd(0.1), num_microbatches=3), params, batch)


@pytest.mark.parametrize("rule", [sam_jax.delta_sam(), sam_jax.delta_sam_draft()])
def test_microbatched_delta_sam_with_a_microbatched_ascent_equals_the_full_step(rule):
    # f = 1 with 4 microbatches: the ascent itself runs in 4 pieces, the weights
    # still come from the losses of all of M.
    params, batch = _mlp_problem()
    full_tx = sam_jax.sam(optax.adamw(1e-2), reweight=rule)
    micro_tx = sam_jax.sam(optax.adamw(1e-2), reweight=rule, num_microbatches=4)

    def deterministic_loss(p, b, key):
        del key
        x, y = b
        return (jnp.tanh(x @ p["hidden"]) @ p["out"] - y) ** 2

    results = []
    for tx in (full_tx, micro_tx):
        state = tx.init(params)
        updates, state = tx.update(
            sam_jax.pending_gradient(params),
            state,
            params,
            loss_fn=deterministic_loss,
            batch=batch,
            key=jax.random.key(0),
        )
        results.append((updates, state.metrics))
    assert_trees_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-7)
    # The smallest weight is the noisiest fp32 finite difference (see the sharded test).
    assert_trees_close(results[1][1], results[0][1], rtol=1e-3, atol=1e-4)


# --- optax.inject_hyperparams ---------------------------------------------------------------


def _injected(**kwargs):
    return optax.inject_hyperparams(sam_jax.sam)(optimizer=optax.sgd(0.1), **kwargs)


def _jit_step(tx, params, batch, state):
    @jax.jit
    def step(state, params):
        return sam_jax.update_from_loss(tx, state, params, reference.loss_fn, batch)

    return step(state, params)


def test_inject_hyperparams_without_static_args_equals_sam():
    """Shape settings given as numbers become traced hyperparameters: the step still equals sam."""
    params, batch = reference.make_problem(num_examples=16)
    settings = dict(rho=0.05, ascent_fraction=0.25, sharpness_m=2, num_microbatches=2)
    tx = _injected(**settings)
    state = tx.init(params)
    injected = _jit_step(tx, params, batch, state)
    expected = _jit_step(
        sam_jax.sam(optax.sgd(0.1), **settings),
        params,
        batch,
        sam_jax.sam(optax.sgd(0.1), **settings).init(params),
    )
    assert_trees_close(injected.updates, expected.updates, rtol=0, atol=0)
    assert float(injected.opt_state.hyperparams["rho"]) == pytest.approx(0.05)


def test_an_injected_rho_changes_the_step():
    params, batch = reference.make_problem()
    tx = _injected(rho=0.05)
    state = tx.init(params)
    state.hyperparams["rho"] = jnp.asarray(0.2, jnp.float32)
    step = _jit_step(tx, params, batch, state)
    x, y = map(np.asarray, batch)
    gw, gb = reference.np_sam_gradient(np.asarray(params["w"]), np.asarray(params["b"]), x, y, 0.2)
    np.testing.assert_allclose(step.updates["w"], -0.1 * gw, rtol=1e-5)
    np.testing.assert_allclose(step.updates["b"], -0.1 * gb, rtol=1e-5)
    np.testing.assert_allclose(step.metrics.rho, 0.2)


@pytest.mark.parametrize("how", ["injected", "schedule"])
def test_a_negative_traced_rho_is_clipped_to_zero_and_shown(how):
    params, batch = reference.make_problem()
    if how == "injected":
        tx = _injected(rho=0.05)
        state = tx.init(params)
        state.hyperparams["rho"] = jnp.asarray(-0.1, jnp.float32)
    else:
        tx = sam_jax.sam(optax.sgd(0.1), rho=lambda count: -0.1 + 0.0 * count)
        state = tx.init(params)
    step = _jit_step(tx, params, batch, state)
    plain = _jit_step(optax.sgd(0.1), params, batch, optax.sgd(0.1).init(params))
    assert float(step.metrics.rho) == 0.0
    assert float(step.metrics.perturbation_norm) == 0.0
    assert_trees_close(step.updates, plain.updates, rtol=1e-6, atol=1e-7)


def test_a_negative_constant_rho_is_refused():
    with pytest.raises(ValueError, match="rho must be ≥ 0"):
        sam_jax.sam(optax.sgd(0.1), rho=-0.1)


def test_changing_an_injected_shape_setting_is_an_error():
    params, batch = reference.make_problem(num_examples=16)
    tx = _injected(rho=0.05, ascent_fraction=0.25)
    state = tx.init(params)
    state.hyperparams["ascent_fraction"] = jnp.asarray(0.5, jnp.float32)
    with pytest.raises(Exception, match="shape settings cannot change after init"):
        jax.block_until_ready(_jit_step(tx, params, batch, state))
        jax.effects_barrier()
    with pytest.raises(ValueError, match="cannot change after init"):  # eager: concrete values
        sam_jax.update_from_loss(tx, state, params, reference.loss_fn, batch)


def test_inject_hyperparams_init_under_jit_says_what_to_do():
    params, _ = reference.make_problem()
    tx = _injected(rho=0.05, ascent_fraction=0.5)
    with pytest.raises(ValueError, match=r"call tx.init outside jax.jit.*static_args"):
        jax.jit(tx.init)(params)


def test_a_state_of_other_shape_settings_is_refused():
    params, batch = reference.make_problem(num_examples=16)
    state = sam_jax.sam(optax.sgd(0.1), ascent_fraction=0.5).init(params)
    with pytest.raises(ValueError, match="cannot change after init"):
        sam_jax.update_from_loss(
            sam_jax.sam(optax.sgd(0.1), ascent_fraction=0.25),
            state,
            params,
            reference.loss_fn,
            batch,
        )

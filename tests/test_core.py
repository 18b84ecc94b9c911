"""Tests for sam_jax.core: the one SAM gradient, its groups, keys, layout and precision."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import packed_slots
import pytest
import reference
import trees
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import sam_jax
from sam_jax import batching
from sam_jax import core

# This file's default tolerance.
assert_trees_close = functools.partial(trees.assert_close, rtol=1e-06, atol=1e-07)


def _dropout_problem(num_examples=16):
    """A one-hidden-layer net whose loss depends on the dropout key."""
    rng = np.random.default_rng(0)
    params = {
        "hidden": jnp.asarray(rng.normal(size=(6, 8)) * 0.5, jnp.float32),
        "out": jnp.asarray(rng.normal(size=(8,)) * 0.5, jnp.float32),
    }
    batch = (
        jnp.asarray(rng.normal(size=(num_examples, 6)), jnp.float32),
        jnp.asarray(rng.normal(size=(num_examples,)), jnp.float32),
    )
    return params, batch


def _dropout_loss(params, batch, key):
    x, y = batch
    hidden = jnp.tanh(x @ params["hidden"])
    keep = jax.random.bernoulli(key, 0.7, hidden.shape)
    return (jnp.where(keep, hidden / 0.7, 0.0) @ params["out"] - y) ** 2


def _gradient(params, batch, key, loss_fn=_dropout_loss, **config):
    config = core.SamConfig(**config)
    state = core.sam_gradient_init(params, config)
    return core.sam_gradient(loss_fn, params, batch, key, state, config)


# --- One implementation: the transforms are the core plus an optimizer ------------------


@pytest.mark.parametrize(
    "config",
    [
        dict(),
        dict(ascent_fraction=0.25, reweight=sam_jax.delta_sam()),
        dict(mask=sam_jax.fisher_mask(sparsity=0.5, interval=2), adaptive=True),
        dict(sharpness_m=2, num_microbatches=2, reweight=sam_jax.delta_sam_draft()),
        dict(
            num_microbatches=2,
            mask=sam_jax.fisher_mask(sparsity=0.5, interval=2),
            surrogate_gap=sam_jax.gsam(0.3),
            esam=sam_jax.esam(0.5, 0.5),
        ),
    ],
)
def test_sam_transform_is_the_core_gradient_then_the_optimizer(config):
    params, batch = _dropout_problem()
    key = jax.random.key(3)
    tx = sam_jax.sam(optax.adamw(1e-2), **config)
    updates, state = tx.update(
        sam_jax.pending_gradient(params),
        tx.init(params),
        params,
        loss_fn=_dropout_loss,
        batch=batch,
        key=key,
    )
    result = _gradient(params, batch, key, **config)
    expected, _ = optax.adamw(1e-2).update(result.grads, optax.adamw(1e-2).init(params), params)
    jax.tree.map(np.testing.assert_array_equal, updates, expected)
    jax.tree.map(np.testing.assert_array_equal, state.metrics, result.metrics)
    assert int(state.count) == int(result.state.count) == 1


def test_an_own_loop_hands_the_gradient_to_any_optax_chain():
    params, batch = reference.make_problem(num_examples=8)
    config = sam_jax.SamConfig(rho=0.05)
    tx = optax.chain(optax.clip_by_global_norm(1e-3), optax.sgd(1.0))
    opt_state, sam_state = tx.init(params), sam_jax.sam_gradient_init(params, config)

    @jax.jit
    def step(params, opt_state, sam_state):
        result = sam_jax.sam_gradient(reference.loss_fn, params, batch, None, sam_state, config)
        updates, opt_state = tx.update(result.grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, result.state

    new_params, _, sam_state = step(params, opt_state, sam_state)
    w, b = reference.to_np(params)
    gw, gb = reference.np_sam_gradient(w, b, *reference.batch_np(batch), 0.05)
    scale = min(1.0, 1e-3 / np.sqrt(np.sum(gw**2) + gb**2))  # the clip acts
    assert scale < 1.0
    np.testing.assert_allclose(new_params["w"], w - scale * gw, rtol=1e-5)
    assert int(sam_state.count) == 1


# --- Groups: an even share of every data shard, their own key, in parallel --------------


def test_groups_take_an_even_share_of_every_data_shard():
    params, batch = reference.make_problem(num_examples=16)
    result = _gradient(
        params,
        batch,
        None,
        loss_fn=reference.loss_fn,
        sharpness_m=2,
        num_data_shards=2,
        ascent_fraction=0.5,
    )
    w, b = reference.to_np(params)
    x, y = reference.batch_np(batch)
    # Shards are rows 0-7 and 8-15; group g is the g-th half of each shard, and
    # its ascent micro-batch the first half of that, in each shard.
    groups = [np.r_[0:4, 8:12], np.r_[4:8, 12:16]]
    ascents = [np.r_[0:2, 8:10], np.r_[4:6, 12:14]]
    grads = [
        reference.np_sam_gradient(w, b, x[g], y[g], 0.05, x[a], y[a])
        for g, a in zip(groups, ascents, strict=True)
    ]
    np.testing.assert_allclose(result.grads["w"], (grads[0][0] + grads[1][0]) / 2, rtol=1e-5)
    np.testing.assert_allclose(result.grads["b"], (grads[0][1] + grads[1][1]) / 2, rtol=1e-5)


def test_group_g_gets_fold_in_key_g_and_its_microbatch_j_fold_in_again():
    params, batch = _dropout_problem()
    key = jax.random.key(5)
    config = dict(sharpness_m=2, num_data_shards=2, num_microbatches=2, ascent_fraction=0.5)
    result = _gradient(params, batch, key, **config)
    groups = batching.microbatches(batch, 2, 2)

    def mean_over_groups(key_of):
        one = dict(config, sharpness_m=1)
        grads = [
            _gradient(params, jax.tree.map(lambda x, g=g: x[g], groups), key_of(g), **one).grads
            for g in range(2)
        ]
        return jax.tree.map(lambda a, b: (a + b) / 2, *grads)

    assert_trees_close(result.grads, mean_over_groups(lambda g: jax.random.fold_in(key, g)))
    shared = mean_over_groups(lambda g: key)  # the rule matters: one key for all differs
    assert not np.allclose(result.grads["out"], shared["out"], rtol=1e-3)


def test_per_instance_sam_gives_example_i_the_key_fold_in_i():
    params, batch = _dropout_problem(num_examples=4)
    key = jax.random.key(9)
    tx = sam_jax.per_instance_sam(optax.sgd(1.0))
    updates, _ = tx.update(
        sam_jax.pending_gradient(params),
        tx.init(params),
        params,
        loss_fn=_dropout_loss,
        batch=batch,
        key=key,
    )
    per_example = [
        _gradient(
            params, jax.tree.map(lambda v, i=i: v[i : i + 1], batch), jax.random.fold_in(key, i)
        ).grads
        for i in range(4)
    ]
    mean = jax.tree.map(lambda *g: sum(g) / 4, *per_example)
    assert_trees_close(jax.tree.map(jnp.negative, updates), mean, rtol=1e-5, atol=1e-7)


def _compiled(fn, *args):
    return jax.jit(fn).lower(*args).compile()


def test_groups_run_in_parallel_unless_parallel_groups_bounds_them():
    rng = np.random.default_rng(0)
    params = {  # wide enough that parameter-sized buffers dominate memory
        "hidden": jnp.asarray(rng.normal(size=(64, 512)) * 0.1, jnp.float32),
        "out": jnp.asarray(rng.normal(size=(512,)) * 0.1, jnp.float32),
    }
    batch = (
        jnp.asarray(rng.normal(size=(32, 64)), jnp.float32),
        jnp.asarray(rng.normal(size=(32,)), jnp.float32),
    )
    parameter_bytes = sum(w.nbytes for w in jax.tree.leaves(params))
    key = jax.random.key(0)

    def compiled(parallel_groups):
        def step(p, b, k):
            return _gradient(p, b, k, sharpness_m=8, parallel_groups=parallel_groups).grads

        return _compiled(step, params, batch, key)

    parallel, serial = compiled(None), compiled(1)
    # Equal up to summation order (jaxlib versions sum the groups differently).
    assert_trees_close(
        parallel(params, batch, key), serial(params, batch, key), rtol=1e-5, atol=1e-6
    )
    # All 8 groups in one vmapped pass: no loop over the groups in the program
    # (threefry's own loops remain); the serial one loops 8 times.
    over_groups = '"known_trip_count":{"n":"8"}'
    assert over_groups not in parallel.as_text()
    assert over_groups in serial.as_text()
    # The same arithmetic: XLA counts a loop body once, so the serial program
    # shows one group's FLOPs (measured 11.3 M parallel, 8 × 1.55 M serial).
    flops = parallel.cost_analysis()["flops"], serial.cost_analysis()["flops"]
    assert flops[0] == pytest.approx(8 * flops[1], rel=0.15)
    # Memory: a perturbation and gradients per group in flight, against one
    # group's and a float32 running sum (measured 9.8 and 2.3 parameter copies).
    copies = [c.memory_analysis().temp_size_in_bytes / parameter_bytes for c in (parallel, serial)]
    assert copies[0] > 8 and copies[1] < 3, copies


def test_parallel_groups_must_divide_sharpness_m():
    with pytest.raises(ValueError, match="parallel_groups=3 must divide sharpness_m=4"):
        core.SamConfig(sharpness_m=4, parallel_groups=3)


# --- Locality on a mesh, read from the compiled program ---------------------------------


def _collectives(hlo_text):
    ops = ("all-gather", "all-to-all", "collective-permute", "all-reduce", "reduce-scatter")
    return {op: hlo_text.count(f" {op}(") + hlo_text.count(f" {op}-start(") for op in ops}


@pytest.mark.parametrize("sharpness_m, ascent_fraction", [(1, 0.25), (2, 0.5), (4, 1.0)])
def test_sharded_groups_and_ascent_slices_stay_on_their_devices(sharpness_m, ascent_fraction):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    params, batch = _dropout_problem(num_examples=64)
    replicated = NamedSharding(mesh, P())
    by_example = NamedSharding(mesh, P("data"))

    def hlo(num_data_shards):
        def step(p, b, k):
            return _gradient(
                p,
                b,
                k,
                sharpness_m=sharpness_m,
                ascent_fraction=ascent_fraction,
                num_data_shards=num_data_shards,
            ).grads

        compiled = (
            jax.jit(
                step, in_shardings=(replicated, by_example, replicated), out_shardings=replicated
            )
            .lower(params, batch, jax.random.key(0))
            .compile()
        )
        return _collectives(compiled.as_text())

    local = hlo(8)
    # Only the gradient and norm reductions cross devices.
    assert local["all-reduce"] > 0
    assert local["all-gather"] == local["all-to-all"] == local["collective-permute"] == 0, local
    if ascent_fraction < 1:
        # Told nothing of the shards, the ascent slices are contiguous rows,
        # which live on other devices: XLA has to move examples.
        moved = hlo(1)
        assert moved["all-gather"] + moved["all-to-all"] + moved["collective-permute"] > 0, moved


# --- Auxiliary outputs, packed rows ---------------------------------------------------


def test_aux_of_the_descent_pass_is_stacked_over_groups_and_microbatches():
    params, batch = reference.make_problem(num_examples=16)

    def loss_with_aux(p, b, key):
        losses = reference.loss_fn(p, b, key)
        return losses, {"sum": jnp.sum(losses), "rows": jnp.float32(losses.shape[0])}

    with pytest.raises(ValueError, match="must return per-example losses"):
        _gradient(params, batch, None, loss_fn=loss_with_aux)  # has_aux is off by default
    config = core.SamConfig(sharpness_m=2, num_microbatches=4)
    state = core.sam_gradient_init(params, config)
    result = core.sam_gradient(loss_with_aux, params, batch, None, state, config, has_aux=True)
    assert result.aux["rows"].shape == (2, 4)
    np.testing.assert_array_equal(result.aux["rows"], 2.0)
    # The descent pass's losses: their mean is the perturbed loss.
    np.testing.assert_allclose(
        np.sum(result.aux["sum"]) / 16, result.metrics.perturbed_loss, rtol=1e-6
    )


def test_rows_of_example_slots_with_a_present_mask_equal_the_examples_alone():
    """Losses [N, S] (packed rows of up to S examples) with absent slots marked."""
    params, slot_x, slot_y = packed_slots.packed_problem(seed=3)
    result = packed_slots.slot_sam_gradient(params, slot_x, slot_y, core.SamConfig(rho=0.05))
    w, b = reference.to_np(params)
    examples_x, examples_y = slot_x[packed_slots.PRESENT], slot_y[packed_slots.PRESENT]
    gw, gb = reference.np_sam_gradient(w, b, examples_x, examples_y, 0.05)
    # The descent objective is the mean over all 24 slots: Σ over the 14 examples / 24.
    np.testing.assert_allclose(result.grads["w"], gw * 14 / 24, rtol=1e-5)
    np.testing.assert_allclose(result.grads["b"], gb * 14 / 24, rtol=1e-5)
    np.testing.assert_allclose(result.metrics.weight_min, 1 / 14, rtol=1e-6)
    clean = np.mean(reference.np_losses(w, b, examples_x, examples_y))
    np.testing.assert_allclose(result.metrics.clean_loss, clean, rtol=1e-5)

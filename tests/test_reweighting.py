"""Tests for sam_jax.reweighting: δ-SAM weights against the papers' equations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sam_jax
from sam_jax import core
from sam_jax import perturbation
from sam_jax import reweighting


def _losses_at_quadratic(curvatures, slopes):
    """l_i(w) = slope_i · w_0 + ½ curvature_i · ‖w‖² on a 1-leaf parameter tree."""

    def losses_at(params):
        w = params["w"]
        return slopes * w[0] + 0.5 * curvatures * jnp.sum(w**2)

    return losses_at


# Tolerances: on these quadratics Eq. 5's finite differences are exact, so
# forward mode matches the float64 reference to float32 rounding (measured
# 1.8e-7 relative). The float32 finite differences cancel: l ≈ 0.1 while the
# curvature term is ≈ ρ²·c/2 ≈ 1e-3, so float32's relative 6e-8 on l grows
# about 100-fold on the weights (measured 2.2e-5 for Eq. 5, 2.5e-6 for the draft).
PROBE_RTOL = {"forward_mode": 1e-6, "finite_difference": 1e-4}


@pytest.mark.parametrize("probe", reweighting.PROBES)
def test_delta_sam_weights_follow_eq5(probe):
    params = {"w": jnp.array([0.3, -0.2, 0.1])}
    curvatures = jnp.array([1.0, 4.0, 0.5, 2.0])
    slopes = jnp.array([0.5, -1.0, 0.0, 2.0])
    losses_at = _losses_at_quadratic(curvatures, slopes)
    key, rho, eta = jax.random.key(3), 0.05, 1e-4
    rule = sam_jax.delta_sam(eta=eta, probe=probe)
    weights = rule.weights(losses_at, params, losses_at(params), key, rho)

    r = np.asarray(perturbation.random_perturbation(key, params, rho)["w"], np.float64)
    w = np.asarray(params["w"], np.float64)
    c, s = np.asarray(curvatures, np.float64), np.asarray(slopes, np.float64)

    def loss(v):
        return s * v[0] + 0.5 * c * np.sum(v**2)

    g = np.abs(loss(w + r) + loss(w - r) - 2 * loss(w)) / np.maximum(
        np.abs(loss(w + r) - loss(w - r)), eta
    )
    np.testing.assert_allclose(weights, g / g.sum(), rtol=PROBE_RTOL[probe])


@pytest.mark.parametrize("probe", reweighting.PROBES)
def test_delta_sam_draft_weights_follow_eq3_to_6(probe):
    params = {"w": jnp.array([0.3, -0.2, 0.1])}
    curvatures = jnp.array([1.0, 4.0, 0.5, 2.0])
    slopes = jnp.array([0.5, -1.0, 0.3, 2.0])
    losses_at = _losses_at_quadratic(curvatures, slopes)
    key, rho, beta = jax.random.key(5), 0.05, 3.0
    rule = sam_jax.delta_sam_draft(beta=beta, probe=probe)
    weights = rule.weights(losses_at, params, losses_at(params), key, rho)

    r = np.asarray(perturbation.random_perturbation(key, params, rho)["w"], np.float64)
    w = np.asarray(params["w"], np.float64)
    c, s = np.asarray(curvatures, np.float64), np.asarray(slopes, np.float64)

    def loss(v):
        return s * v[0] + 0.5 * c * np.sum(v**2)

    a = loss(w + r) - loss(w)
    g = np.abs(a) / np.abs(a).sum()
    scale = beta * abs(a.mean()) / abs(np.sum(g * a))
    expected = (g - 1 / 4) * scale + 1 / 4
    np.testing.assert_allclose(weights, expected, rtol=PROBE_RTOL[probe], atol=1e-7)
    np.testing.assert_allclose(np.sum(weights), 1.0, rtol=1e-5)


@pytest.mark.parametrize("rule", [sam_jax.delta_sam(), sam_jax.delta_sam_draft()])
def test_identical_examples_get_uniform_weights(rule):
    params = {"w": jnp.array([0.3, -0.2])}
    losses_at = _losses_at_quadratic(jnp.full((5,), 2.0), jnp.full((5,), 0.7))
    weights = rule.weights(losses_at, params, losses_at(params), jax.random.key(0), 0.05)
    np.testing.assert_allclose(weights, np.full(5, 0.2), rtol=1e-6)


@pytest.mark.parametrize("rule", [sam_jax.delta_sam(), sam_jax.delta_sam_draft()])
def test_flat_losses_fall_back_to_uniform_weights(rule):
    params = {"w": jnp.array([0.3, -0.2])}

    def losses_at(p):
        del p
        return jnp.ones((4,))

    weights = rule.weights(losses_at, params, losses_at(params), jax.random.key(0), 0.05)
    np.testing.assert_array_equal(weights, np.full(4, 0.25))


def test_statistics_of_uniform_and_peaked_weights():
    uniform = reweighting.statistics(reweighting.uniform(4))
    np.testing.assert_allclose(uniform.entropy, np.log(4), rtol=1e-6)
    np.testing.assert_allclose([uniform.min, uniform.max], [0.25, 0.25])
    peaked = reweighting.statistics(jnp.array([1.0, 0.0, 0.0]))
    np.testing.assert_allclose(peaked.entropy, 0.0, atol=1e-7)
    assert float(peaked.max) == 1.0 and float(peaked.min) == 0.0


# Rows 1, 4 and 5 are absent (e.g. empty packing slots); their losses are
# deliberately not zero, so only the mask can keep them out.
PRESENT = np.array([True, False, True, True, False, False, True])


def _masked_and_removed(rule, present):
    """The rule's weights on a batch with absent rows, and on its present rows alone."""
    params = {"w": jnp.array([0.3, -0.2, 0.1])}
    curvatures = jnp.array([1.0, 9.0, 4.0, 0.5, 3.0, 7.0, 2.0])
    slopes = jnp.array([0.5, 5.0, -1.0, 0.3, -2.0, 1.5, 2.0])
    key, rho = jax.random.key(7), 0.05
    full = _losses_at_quadratic(curvatures, slopes)
    kept = _losses_at_quadratic(curvatures[present], slopes[present])
    masked = rule.weights(full, params, full(params), key, rho, present=jnp.asarray(present))
    removed = rule.weights(kept, params, kept(params), key, rho)
    return np.asarray(masked), np.asarray(removed)


@pytest.mark.parametrize("rule", [sam_jax.delta_sam(), sam_jax.delta_sam_draft(beta=3)])
def test_absent_rows_are_as_if_removed(rule):
    masked, removed = _masked_and_removed(rule, PRESENT)

    assert not np.allclose(removed, 1 / PRESENT.sum()), "the weights should not be uniform"
    np.testing.assert_array_equal(masked[~PRESENT], 0.0)
    np.testing.assert_allclose(masked[PRESENT], removed, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(masked.sum(), 1.0, rtol=1e-6)
    masked_spread = reweighting.statistics(jnp.asarray(masked), jnp.asarray(PRESENT))
    removed_spread = reweighting.statistics(jnp.asarray(removed))
    for name in reweighting.WeightStatistics._fields:
        np.testing.assert_allclose(
            getattr(masked_spread, name), getattr(removed_spread, name), rtol=1e-6, err_msg=name
        )


@pytest.mark.parametrize("rule", [sam_jax.delta_sam(), sam_jax.delta_sam_draft()])
def test_flat_losses_with_absent_rows_fall_back_to_uniform_over_present_rows(rule):
    params = {"w": jnp.array([0.3, -0.2])}

    def losses_at(p):
        del p
        return jnp.ones((7,))

    present = jnp.asarray(PRESENT)
    weights = rule.weights(losses_at, params, losses_at(params), jax.random.key(0), 0.05, present)
    np.testing.assert_allclose(weights, np.where(PRESENT, 0.25, 0.0), rtol=1e-7)


def test_all_present_mask_is_no_mask():
    present = np.ones(7, np.bool_)
    for rule in (sam_jax.delta_sam(), sam_jax.delta_sam_draft(beta=3)):
        masked, removed = _masked_and_removed(rule, present)
        np.testing.assert_allclose(masked, removed, rtol=1e-6, atol=1e-7)
    weights = jnp.array([0.5, 0.25, 0.25, 0.0])
    for a, b in zip(
        reweighting.statistics(weights, jnp.ones(4, jnp.bool_)), reweighting.statistics(weights)
    ):
        np.testing.assert_allclose(a, b, rtol=1e-7)


def test_statistics_ignore_absent_rows_and_uniform_spreads_over_present_rows():
    present = jnp.array([True, False, True, False])
    uniform = reweighting.uniform(4, present)
    np.testing.assert_array_equal(uniform, [0.5, 0.0, 0.5, 0.0])
    spread = reweighting.statistics(uniform, present)
    np.testing.assert_allclose([spread.min, spread.max], [0.5, 0.5])
    np.testing.assert_allclose(spread.entropy, np.log(2), rtol=1e-6)
    nobody = reweighting.statistics(jnp.zeros(3), jnp.zeros(3, jnp.bool_))
    np.testing.assert_array_equal([nobody.min, nobody.max, nobody.entropy], [0.0, 0.0, 0.0])


def _toy_batch():
    """8 rows, 3 of them empty (like packing slots): their loss is 0 at any w."""
    rng = np.random.RandomState(0)
    return {
        "target": jnp.asarray(rng.randn(8, 3), jnp.float32),
        "curvature": jnp.asarray(rng.rand(8) + 0.5, jnp.float32),
        "present": jnp.array([True, False, True, True, False, True, True, False]),
    }


def _toy_piece_losses(params, piece, index):
    del index
    distance = jnp.sum((params["w"] - piece["target"]) ** 2, axis=-1)
    return jnp.where(piece["present"], 0.5 * piece["curvature"] * distance, 0.0)


def _toy_loss(params, batch, key):
    del key
    distance = jnp.sum((params["w"] - batch["target"]) ** 2, axis=-1)
    return jnp.where(batch["present"], 0.5 * batch["curvature"] * distance, 0.0)


def _ascent_step(params, reweight, direction, present_of=None, **config):
    config = core.SamConfig(reweight=reweight, **config)
    return core.StepContext(
        config, _toy_loss, False, present_of, params, 0.5, direction, None, batch_examples=None
    )


@pytest.mark.parametrize("count, shards", [(1, 1), (2, 2), (4, 1)])
def test_ascent_gradient_with_absent_rows_equals_the_present_rows_alone(count, shards):
    batch = _toy_batch()
    params = {"w": jnp.array([0.3, -0.2, 0.1])}
    rule = sam_jax.delta_sam_draft(beta=3)
    direction = perturbation.random_perturbation(jax.random.key(4), params, 0.5)
    step = _ascent_step(
        params, rule, direction, lambda piece: piece["present"], num_data_shards=shards
    )
    grads, _, weights, present = core.ascent_gradient(step, batch, None, count)
    kept = {k: v[np.asarray(batch["present"])] for k, v in batch.items()}
    expected_grads, _, expected_weights, _ = core.ascent_gradient(
        _ascent_step(params, rule, direction), kept, None, 1
    )

    # Microbatch order: piece j holds the j-th count-th of every shard's rows.
    order = np.arange(8).reshape(shards, count, -1).swapaxes(0, 1).reshape(-1)
    np.testing.assert_array_equal(present, np.asarray(batch["present"])[order])
    unpermuted = np.empty(8, np.float32)
    unpermuted[order] = weights
    np.testing.assert_allclose(
        unpermuted[np.asarray(batch["present"])], expected_weights, rtol=1e-5
    )
    np.testing.assert_array_equal(unpermuted[~np.asarray(batch["present"])], 0.0)
    np.testing.assert_allclose(grads["w"], expected_grads["w"], rtol=1e-5, atol=1e-7)


def test_a_rule_without_the_present_argument_still_works_unmasked():
    def weights_along(losses_at, params, clean_losses, direction):
        del losses_at, params, direction
        return reweighting.normalize(clean_losses)

    rule = reweighting.InstanceReweighting("custom", weights_along, "finite_difference")
    params = {"w": jnp.array([0.3, -0.2, 0.1])}
    batch = {k: v for k, v in _toy_batch().items()}
    grads, clean, out, present = core.ascent_gradient(
        _ascent_step(params, rule, None), batch, None, 1
    )
    assert present is None
    np.testing.assert_allclose(out, clean / clean.sum(), rtol=1e-6)


@pytest.mark.parametrize("eta", [0.0, -1e-4, "1e-4"])
def test_delta_sam_rejects_bad_eta(eta):
    with pytest.raises(ValueError, match="eta must be a number > 0"):
        sam_jax.delta_sam(eta=eta)


@pytest.mark.parametrize("beta", [0.0, -3.0])
def test_delta_sam_draft_rejects_bad_beta(beta):
    with pytest.raises(ValueError, match="beta must be a number > 0"):
        sam_jax.delta_sam_draft(beta=beta)


# --- Mixed precision: the probes in bfloat16 --------------------------------------------


def _mlp_losses_at(dtype):
    """A 1.05 M-parameter MLP whose forward casts float32 params to `dtype` (as Flax's
    `dtype=bfloat16` layers do), and its per-example cross-entropy on 32 examples."""
    rng = np.random.default_rng(0)
    params = {
        "w1": jnp.asarray(rng.normal(size=(512, 1024)) / np.sqrt(512), jnp.float32),
        "w2": jnp.asarray(rng.normal(size=(1024, 512)) / np.sqrt(1024), jnp.float32),
        "w3": jnp.asarray(rng.normal(size=(512, 10)) / np.sqrt(512), jnp.float32),
    }
    x = jnp.asarray(rng.normal(size=(32, 512)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, size=32))

    def losses_at(p):
        p = jax.tree.map(lambda w: w.astype(dtype), p)
        hidden = jax.nn.gelu(jax.nn.gelu(x.astype(dtype) @ p["w1"]) @ p["w2"])
        log_probs = jax.nn.log_softmax((hidden @ p["w3"]).astype(jnp.float32))
        return -jnp.take_along_axis(log_probs, y[:, None], 1)[:, 0]

    return params, losses_at


def _spearman(a, b):
    ranks = [np.argsort(np.argsort(np.asarray(v))) for v in (a, b)]
    return np.corrcoef(*ranks)[0, 1]


@pytest.mark.parametrize("rule", [sam_jax.delta_sam, sam_jax.delta_sam_draft])
def test_forward_mode_weights_in_bfloat16_agree_with_float32(rule):
    params, f32 = _mlp_losses_at(jnp.float32)
    _, bf16 = _mlp_losses_at(jnp.bfloat16)
    key, rho = jax.random.key(1), 0.05  # r's coordinates ≈ 5e-5, below bf16's spacing at |w|

    def weights(probe, losses_at):
        return rule(probe=probe).weights(losses_at, params, losses_at(params), key, rho)

    paper_f32 = weights("finite_difference", f32)
    # Measured Spearman: forward mode in bf16 against the paper's rule in float32
    # 0.948 (delta_sam; float32's finite differences carry rounding noise too) and
    # 0.9996 (draft); against forward mode in float32 0.9996 for both.
    assert _spearman(weights("forward_mode", bf16), paper_f32) >= 0.9
    assert _spearman(weights("forward_mode", bf16), weights("forward_mode", f32)) >= 0.99
    # The finite difference in bf16 is rounding noise (measured 0.17 and −0.13):
    # the rule the library used before the forward-mode probe.
    assert abs(_spearman(weights("finite_difference", bf16), paper_f32)) < 0.5


def test_forward_mode_probe_names_the_fix_for_a_custom_vjp_loss():
    @jax.custom_vjp
    def square(x):
        return x**2

    square.defvjp(lambda x: (x**2, x), lambda x, g: (2 * x * g,))
    params = {"w": jnp.array([0.3, -0.2])}

    def losses_at(p):
        return square(p["w"])

    with pytest.raises(ValueError, match="probe='finite_difference'"):
        sam_jax.delta_sam().weights(losses_at, params, losses_at(params), jax.random.key(0), 0.1)
    fd = sam_jax.delta_sam(probe="finite_difference")
    assert np.isfinite(
        fd.weights(losses_at, params, losses_at(params), jax.random.key(0), 0.1)
    ).all()


def test_delta_sam_rejects_an_unknown_probe():
    with pytest.raises(ValueError, match="probe must be one of"):
        sam_jax.delta_sam(probe="jet")

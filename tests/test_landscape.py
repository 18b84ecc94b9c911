"""Tests for sam_jax.landscape against closed forms computed with numpy.

The loss is a quadratic with one centre per example,
l_i(θ) = ½ (θ − c_i)ᵀ A (θ − c_i), θ the concatenation of the flattened
parameter arrays, so every landscape has a numpy closed form.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sam_jax import landscape

SHAPES = {"bias": (4,), "kernel": (3, 4)}  # sorted keys: jax.tree order.
DIM = 16


def _params(seed):
    rng = np.random.default_rng(seed)
    return {name: rng.normal(size=shape).astype(np.float32) for name, shape in SHAPES.items()}


def _flat(params, xp=np):
    return xp.concatenate([xp.ravel(params[name]) for name in sorted(SHAPES)])


def _quadratic(seed=0, num_examples=3, diagonal=False):
    """(loss_fn, batch, A [D, D], centres [N, D]) in float32."""
    rng = np.random.default_rng(seed)
    if diagonal:
        a = np.diag(rng.uniform(0.5, 2.0, size=DIM))
    else:
        m = rng.normal(size=(DIM, DIM))
        a = m @ m.T / DIM + np.eye(DIM)
    a = a.astype(np.float32)
    centres = rng.normal(size=(num_examples, DIM)).astype(np.float32)

    def loss_fn(params, batch, key):
        del key
        diff = _flat(params, jnp)[None, :] - batch["c"]
        return 0.5 * jnp.einsum("nd,de,ne->n", diff, jnp.asarray(a), diff)

    return loss_fn, {"c": jnp.asarray(centres)}, a.astype(np.float64), centres.astype(np.float64)


def _np_loss(theta, a, centres):
    diff = theta[None, :] - centres
    return np.mean(0.5 * np.einsum("nd,de,ne->n", diff, a, diff))


def test_interpolation_matches_quadratic_closed_form():
    loss_fn, batch, a, centres = _quadratic()
    theta0, theta1 = _params(1), _params(2)
    alphas = np.linspace(-1.0, 1.0, 9)
    result = landscape.interpolation(loss_fn, theta0, theta1, batch, alphas=alphas)
    t0, t1 = _flat(theta0).astype(np.float64), _flat(theta1).astype(np.float64)
    expected = [_np_loss(t1 + alpha * (t1 - t0), a, centres) for alpha in alphas]
    assert isinstance(result, landscape.Interpolation)
    np.testing.assert_allclose(result.alphas, alphas, rtol=1e-7)
    np.testing.assert_allclose(result.losses, expected, rtol=1e-5)
    # α = 0 is θ₁ and α = −1 is θ₀.
    np.testing.assert_allclose(result.losses[4], _np_loss(t1, a, centres), rtol=1e-5)
    np.testing.assert_allclose(result.losses[0], _np_loss(t0, a, centres), rtol=1e-5)


def test_interpolation_default_grid_and_parabola_curvature():
    loss_fn, batch, a, _ = _quadratic(diagonal=True)
    theta0, theta1 = _params(3), _params(4)
    result = landscape.interpolation(loss_fn, theta0, theta1, batch)
    np.testing.assert_allclose(result.alphas, np.linspace(-1, 1, 41), atol=1e-7)
    # L(α) is a parabola with L'' = Δᵀ A Δ = Σ_k a_kk Δ_k², Δ = θ₁ − θ₀.
    delta = (_flat(theta1) - _flat(theta0)).astype(np.float64)
    quadratic_coefficient = np.polyfit(np.asarray(result.alphas), np.asarray(result.losses), 2)[0]
    np.testing.assert_allclose(2 * quadratic_coefficient, np.sum(np.diag(a) * delta**2), rtol=1e-4)


def _np_surface(params, directions, xs, ys, a, centres):
    theta = _flat(params).astype(np.float64)
    d1, d2 = (_flat(jax.device_get(d)).astype(np.float64) for d in directions)
    return np.array([[_np_loss(theta + x * d1 + y * d2, a, centres) for x in xs] for y in ys])


def test_surface_matches_quadratic_closed_form():
    loss_fn, batch, a, centres = _quadratic(seed=5)
    params = _params(6)
    key = jax.random.key(7)
    xs, ys = np.linspace(-1.0, 1.0, 7), np.linspace(-0.5, 1.5, 5)  # [Y, X] = [5, 7]
    result = landscape.surface(loss_fn, params, batch, key, xs=xs, ys=ys)
    directions = landscape.random_directions(key, params)
    assert isinstance(result, landscape.Surface)
    assert result.losses.shape == (5, 7)
    np.testing.assert_allclose(result.xs, xs, rtol=1e-7)
    np.testing.assert_allclose(result.ys, ys, rtol=1e-7)
    expected = _np_surface(params, directions, xs, ys, a, centres)
    np.testing.assert_allclose(result.losses, expected, rtol=1e-5)
    # The bias (rank 1) is not moved: the surface only depends on the kernel.
    assert not np.any(np.asarray(directions[0]["bias"]))


def test_surface_along_given_directions_and_default_grid():
    loss_fn, batch, a, centres = _quadratic(seed=8)
    params = _params(9)
    rng = np.random.default_rng(10)
    directions = tuple(
        {name: rng.normal(size=shape).astype(np.float32) for name, shape in SHAPES.items()}
        for _ in range(2)
    )
    result = landscape.surface_along(loss_fn, params, batch, directions)
    grid = np.linspace(-1.0, 1.0, 25)
    assert result.losses.shape == (25, 25)
    np.testing.assert_allclose(result.xs, grid, atol=1e-7)
    np.testing.assert_allclose(result.ys, grid, atol=1e-7)
    expected = _np_surface(params, directions, grid, grid, a, centres)
    np.testing.assert_allclose(result.losses, expected, rtol=1e-5)
    # The centre of the grid is θ itself.
    np.testing.assert_allclose(result.losses[12, 12], _np_loss(_flat(params), a, centres), 1e-5)


def _direction_params():
    rng = np.random.default_rng(11)
    shapes = {"conv": (2, 3, 4, 6), "dense": (5, 3), "bias": (6,), "scale": ()}
    params = {k: rng.normal(size=s).astype(np.float32) * 3.0 for k, s in shapes.items()}
    params["dense"][:, 1] = 0.0  # a zero filter gets a zero direction
    params["step"] = np.int32(3)
    return params


def _check_filter_normalized(direction, params):
    for name in ("conv", "dense"):
        d, theta = np.asarray(direction[name], np.float64), params[name].astype(np.float64)
        assert d.shape == theta.shape and direction[name].dtype == jnp.float32
        axes = tuple(range(theta.ndim - 1))
        d_norms, theta_norms = (np.sqrt(np.sum(v**2, axis=axes)) for v in (d, theta))
        assert d_norms.shape == (theta.shape[-1],)  # one filter per output unit
        np.testing.assert_allclose(d_norms, theta_norms, rtol=2e-6, atol=1e-30)
    for name in ("bias", "scale", "step"):
        assert direction[name].shape == np.shape(params[name])
        assert not np.any(np.asarray(direction[name]))


def test_filter_normalized_direction_per_filter_norms():
    params = _direction_params()
    direction = landscape.filter_normalized_direction(jax.random.key(0), params)
    assert jax.tree.structure(direction) == jax.tree.structure(params)
    _check_filter_normalized(direction, params)
    np.testing.assert_array_equal(direction["dense"][:, 1], 0.0)
    # Random, not a rescaled θ: a filter's direction is far from parallel to θ's.
    d, theta = np.asarray(direction["conv"]).reshape(-1, 6), params["conv"].reshape(-1, 6)
    cosines = np.sum(d * theta, 0) / np.linalg.norm(d, axis=0) / np.linalg.norm(theta, axis=0)
    assert np.all(np.abs(cosines) < 0.9)


def test_directions_depend_on_the_key_and_are_independent():
    params = _direction_params()
    same = landscape.filter_normalized_direction(jax.random.key(0), params)
    again = landscape.filter_normalized_direction(jax.random.key(0), params)
    other = landscape.filter_normalized_direction(jax.random.key(1), params)
    np.testing.assert_array_equal(same["conv"], again["conv"])
    assert not np.allclose(same["conv"], other["conv"])
    d1, d2 = landscape.random_directions(jax.random.key(2), params)
    _check_filter_normalized(d1, params)
    _check_filter_normalized(d2, params)
    u, v = np.ravel(d1["conv"]), np.ravel(d2["conv"])  # 144 entries: |cos| ~ 0.08
    assert abs(u @ v) / np.linalg.norm(u) / np.linalg.norm(v) < 0.4


def _mlp():
    """A tiny MLP with softmax cross-entropy: (loss_fn, params, batch)."""
    rng = np.random.default_rng(12)
    params = {
        "bias": rng.normal(size=(8,)).astype(np.float32),
        "kernel": rng.normal(size=(6, 8)).astype(np.float32) / 2,
        "out": rng.normal(size=(8, 3)).astype(np.float32) / 3,
    }
    batch = {
        "x": rng.normal(size=(16, 6)).astype(np.float32),
        "y": rng.integers(0, 3, size=(16,)).astype(np.int32),
    }

    def loss_fn(params, batch, key):
        del key
        hidden = jnp.tanh(batch["x"] @ params["kernel"] + params["bias"])
        logits = hidden @ params["out"]
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["y"][:, None], 1)[:, 0]

    return loss_fn, params, batch


def test_sharded_equals_unsharded_under_jit():
    loss_fn, params, batch = _mlp()
    theta0 = jax.tree.map(lambda p: p * 0.5, params)
    xs, ys = np.linspace(-1, 1, 6), np.linspace(-1, 1, 5)

    def run(theta0, theta1, batch, key):
        interp = landscape.interpolation(loss_fn, theta0, theta1, batch, chunk_size=4)
        surf = landscape.surface(loss_fn, theta1, batch, key, xs=xs, ys=ys, chunk_size=8)
        return interp.losses, surf.losses

    key = jax.random.key(13)
    unsharded = jax.jit(run)(theta0, params, batch, key)
    mesh = Mesh(
        np.array(jax.devices()[:8]).reshape(2, 4),
        ("data", "model"),
        axis_types=(jax.sharding.AxisType.Auto,) * 2,
    )
    specs = {"bias": P("model"), "kernel": P(None, "model"), "out": P("model", None)}
    shardings = {k: NamedSharding(mesh, spec) for k, spec in specs.items()}
    put = lambda tree: jax.device_put(tree, shardings)  # noqa: E731
    sharded_batch = jax.device_put(batch, NamedSharding(mesh, P("data")))
    sharded_params = put(params)
    assert len(sharded_params["kernel"].sharding.device_set) == 8
    sharded = jax.jit(run)(put(theta0), sharded_params, sharded_batch, key)
    for got, want in zip(sharded, unsharded, strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-6)
    assert unsharded[1].shape == (5, 6) and np.all(np.isfinite(unsharded[1]))
    # Eager on sharded arrays (the directions then take the parameters' shardings).
    eager = landscape.surface(loss_fn, sharded_params, sharded_batch, key, xs=xs, ys=ys)
    np.testing.assert_allclose(eager.losses, unsharded[1], rtol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 5, 7, 25, 100])
def test_surface_chunk_sizes_agree(chunk_size):
    loss_fn, params, batch = _mlp()
    grid = np.linspace(-1, 1, 5)
    key = jax.random.key(14)
    reference = landscape.surface(loss_fn, params, batch, key, xs=grid, ys=grid, chunk_size=25)
    result = landscape.surface(loss_fn, params, batch, key, xs=grid, ys=grid, chunk_size=chunk_size)
    np.testing.assert_allclose(result.losses, reference.losses, rtol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 4, 11, 50])
def test_interpolation_chunk_sizes_agree(chunk_size):
    loss_fn, params, batch = _mlp()
    theta0 = jax.tree.map(jnp.zeros_like, params)
    alphas = np.linspace(-1, 1, 11)
    reference = landscape.interpolation(
        loss_fn, theta0, params, batch, alphas=alphas, chunk_size=11
    )
    result = landscape.interpolation(
        loss_fn, theta0, params, batch, alphas=alphas, chunk_size=chunk_size
    )
    np.testing.assert_allclose(result.losses, reference.losses, rtol=1e-6)


def test_argument_errors():
    loss_fn, params, batch = _mlp()
    with pytest.raises(ValueError, match="chunk_size"):
        landscape.interpolation(loss_fn, params, params, batch, chunk_size=0)
    with pytest.raises(ValueError, match="alphas"):
        landscape.interpolation(loss_fn, params, params, batch, alphas=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="kind"):
        landscape.plot_surface(landscape.Surface(None, None, None), "x.png", kind="heatmap")
    with pytest.raises(ValueError, match="per-example losses"):
        landscape.surface(
            lambda p, b, k: jnp.sum(loss_fn(p, b, k)), params, batch, jax.random.key(0)
        )


def test_plots_write_png_files(tmp_path):
    pytest.importorskip("matplotlib")
    loss_fn, params, batch = _mlp()
    grid = np.linspace(-1, 1, 5)
    surf = landscape.surface(loss_fn, params, batch, jax.random.key(15), xs=grid, ys=grid)
    interp = landscape.interpolation(loss_fn, jax.tree.map(jnp.zeros_like, params), params, batch)
    paths = [
        landscape.plot_interpolation(interp, tmp_path / "interp.png", title="1-D", label="SAM"),
        landscape.plot_surface(surf, tmp_path / "contour.png", kind="contour"),
        landscape.plot_surface(surf, tmp_path / "surface.png", kind="surface", title="2-D"),
    ]
    for path in paths:
        data = path.read_bytes()
        assert len(data) > 1000 and data.startswith(b"\x89PNG\r\n\x1a\n")

"""Loss landscapes: 1-D interpolations and 2-D filter-normalised surfaces.

The two pictures of FSAM (Zhong et al. 2022, §5, Figs. 4 and 5):

* `interpolation`: the loss along θ(α) = θ₁ + α(θ₁ − θ₀) between the pretrained
  weights θ₀ and the fine-tuned weights θ₁, α ∈ [−1, 1] (Fig. 5; α = 0 is θ₁,
  α = −1 is θ₀).
* `surface`: the loss at θ + a·d₁ + b·d₂ on a 25 × 25 grid of [−1, 1]² along two
  random filter-normalised directions d₁, d₂ (Fig. 4), the method of Li et al.
  (2018), "Visualizing the Loss Landscape of Neural Nets", NeurIPS, §4.

Filter convention (`filter_normalized_direction`). Li et al. §4 draw a Gaussian
direction d with the shape of θ and rescale every *filter* of every layer,
d_{i,j} ← d_{i,j} / ‖d_{i,j}‖ · ‖θ_{i,j}‖ (their Eq. 1, Frobenius norms), where a
fully connected layer's filter is "the weights that generate one neuron". Flax
stores kernels as [..., out] (Dense [in, out], Conv [h, w, in, out], sam_jax's
T5 and BERT kernels [in, out]), so here the filters of an array of rank ≥ 2 are
its slices along the LAST axis, θ[..., j]: one per output unit. For embedding
tables [vocab, embed] that makes a filter one feature column over the
vocabulary (PyTorch's [num, dim] layout, which the authors' code slices along
axis 0, gives one row per token instead). Arrays of rank ≤ 1 (biases, layer /
batch-norm scales and offsets, scalars) get a zero direction: the "biasbn"
rule of the authors' reference implementation (github.com/tomgoldstein/
loss-landscape, `net_plotter.normalize_directions_for_weights`, `ignore=
'biasbn'`, the default of its random directions); §4's text states only the
filter rule. A zero filter of θ gets a zero direction. Non-floating leaves get
zeros and are never perturbed.

Losses follow `sam_jax.sharpness`: `loss_fn(params, batch, key)` returns
per-example losses [N], and the loss at a point is their float32 mean. The same
`key` (dropout) is used at every point; pass `key=None` (dropout off) for a
deterministic landscape. For a whole data set, average the results of equal-size
batches. The grid is evaluated inside one jitted function, `chunk_size` points
at a time (`jax.lax.map` over chunks, `jax.vmap` within a chunk): a chunk holds
`chunk_size` perturbed copies of the parameters and their activations. Nothing
is fetched to the host, so the functions also run under the caller's `jax.jit`
with sharded parameters; the output is a small array.

Example::

  interp = landscape.interpolation(loss_fn, pretrained, finetuned, batch)
  surf = landscape.surface(loss_fn, finetuned, batch, jax.random.key(0))
  landscape.plot_interpolation(interp, "interp.png")
  landscape.plot_surface(surf, "surface.png", kind="surface")
"""

import functools
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sam_jax import batching

Params = Any
DEFAULT_NUM_ALPHAS = 41  # α ∈ [−1, 1] in steps of 0.05 (FSAM Fig. 5).
DEFAULT_GRID_SIZE = 25  # 25 × 25 points in [−1, 1]² (FSAM Fig. 4).
DEFAULT_CHUNK_SIZE = 16


class Interpolation(NamedTuple):
    """Losses along θ(α) = θ₁ + α(θ₁ − θ₀).

    Attributes:
      alphas: the α grid [A], float32.
      losses: L(θ(α)) [A], float32.
    """

    alphas: jax.Array
    losses: jax.Array


class Surface(NamedTuple):
    """Losses on a 2-D grid around θ.

    Attributes:
      xs: coefficients a along d₁ [X], float32.
      ys: coefficients b along d₂ [Y], float32.
      losses: [Y, X]; losses[i, j] = L(θ + xs[j]·d₁ + ys[i]·d₂), the layout of
        matplotlib's `contour(xs, ys, losses)`.
    """

    xs: jax.Array
    ys: jax.Array
    losses: jax.Array


def _is_float(leaf) -> bool:
    return jnp.issubdtype(jnp.result_type(leaf), jnp.floating)


def _filter_normalized(key: jax.Array, leaf: jax.Array) -> jax.Array:
    """One tensor's direction: Gaussian, each last-axis slice scaled to ‖θ[..., j]‖."""
    if leaf.ndim <= 1 or not _is_float(leaf):
        return jnp.zeros(leaf.shape, jnp.float32)
    direction = jax.random.normal(key, leaf.shape, jnp.float32)
    axes = tuple(range(leaf.ndim - 1))
    theta_norm = jnp.sqrt(jnp.sum(jnp.square(leaf.astype(jnp.float32)), axes, keepdims=True))
    direction_norm = jnp.sqrt(jnp.sum(jnp.square(direction), axes, keepdims=True))
    scale = jnp.where(direction_norm > 0, theta_norm / direction_norm, 0.0)
    return direction * scale


def filter_normalized_direction(key: jax.Array, params: Params) -> Params:
    """A random filter-normalised direction (Li et al. 2018, §4, Eq. 1).

    For every array of rank ≥ 2, d ~ N(0, I) with its shape, rescaled so that
    every filter (slice along the last axis, one per output unit of a Flax
    kernel [..., out]) has the norm of θ's: ‖d[..., j]‖ = ‖θ[..., j]‖. Arrays of
    rank ≤ 1 (biases, norm scales) and non-floating arrays get zeros, as in the
    authors' code (`ignore='biasbn'`). See the module docstring.

    Args:
      key: PRNG key; leaf k uses `jax.random.split(key, num_leaves)[k]`.
      params: the parameter tree θ (any dtypes and shardings).

    Returns:
      A float32 tree with the structure and shapes of `params`.

    Example::

      d = filter_normalized_direction(jax.random.key(0), params)
    """
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    directions = [_filter_normalized(k, leaf) for k, leaf in zip(keys, leaves, strict=True)]
    return jax.tree.unflatten(treedef, directions)


def random_directions(key: jax.Array, params: Params) -> tuple[Params, Params]:
    """The two independent directions of `surface`: d₁, d₂ from `jax.random.split(key)`.

    Args:
      key: PRNG key.
      params: the parameter tree θ.

    Returns:
      (d₁, d₂), each `filter_normalized_direction(k, params)` with its own key.

    Example::

      d1, d2 = random_directions(jax.random.key(0), params)
    """
    key_x, key_y = jax.random.split(key)
    return (
        filter_normalized_direction(key_x, params),
        filter_normalized_direction(key_y, params),
    )


def _concrete_shardings(params: Params):
    """The leaves' shardings if all are concrete `jax.Array`s (not traced), else None."""
    leaves = jax.tree.leaves(params)
    if all(isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) for x in leaves):
        return jax.tree.map(lambda x: x.sharding, params)
    return None


def _grid(values, default_num: int, name: str) -> jax.Array:
    """A 1-D float32 grid, linspace(−1, 1, default_num) when `values` is None."""
    if values is None:
        return jnp.linspace(-1.0, 1.0, default_num, dtype=jnp.float32)
    values = jnp.asarray(values, jnp.float32)
    if values.ndim != 1 or values.shape[0] == 0:
        raise ValueError(f"`{name}` must be a non-empty 1-D array, got shape {values.shape}.")
    return values


def _check_chunk_size(chunk_size: int) -> None:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive int, got {chunk_size!r}.")


def _mean_loss(loss_fn, params: Params, batch, key) -> jax.Array:
    """The float32 mean of the per-example losses (checked to be [N])."""
    return jnp.mean(batching.per_example_losses(loss_fn, params, batch, key).astype(jnp.float32))


def _combine(params: Params, coefficients, directions) -> Params:
    """θ + Σ_k c_k·u_k in float32, cast back to each leaf's dtype (non-floats untouched)."""

    def leaf(p, *leaf_directions):
        if not _is_float(p):
            return p
        total = p.astype(jnp.float32)
        for coefficient, u in zip(coefficients, leaf_directions, strict=True):
            total = total + coefficient * u.astype(jnp.float32)
        return total.astype(p.dtype)

    return jax.tree.map(leaf, params, *directions)


def _map_points(point_loss, points, chunk_size: int) -> jax.Array:
    """`point_loss` at every row of `points` [P, ...], `chunk_size` rows per vmap."""
    return jax.lax.map(point_loss, points, batch_size=min(chunk_size, points.shape[0]))


@functools.partial(jax.jit, static_argnames=("loss_fn", "chunk_size"))
def _interpolation_losses(loss_fn, theta0, theta1, batch, key, alphas, chunk_size):
    delta = jax.tree.map(
        lambda a, b: b.astype(jnp.float32) - a.astype(jnp.float32) if _is_float(b) else b,
        theta0,
        theta1,
    )

    def point_loss(alpha):
        return _mean_loss(loss_fn, _combine(theta1, [alpha], [delta]), batch, key)

    return _map_points(point_loss, alphas, chunk_size)


def interpolation(
    loss_fn,
    theta0: Params,
    theta1: Params,
    batch,
    *,
    key=None,
    alphas=None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Interpolation:
    """The 1-D loss curve L(θ₁ + α(θ₁ − θ₀)) (FSAM, Zhong et al. 2022, §5, Fig. 5).

    θ₀ are the pretrained weights and θ₁ the fine-tuned ones: α = 0 is θ₁,
    α = −1 is θ₀, α = 1 extrapolates past θ₁ (following Hao et al. 2019).

    Args:
      loss_fn: `loss_fn(params, batch, key) -> losses [N]` (as in `sam_jax.sharpness`).
      theta0: pretrained parameters θ₀.
      theta1: fine-tuned parameters θ₁, the same tree structure and shapes.
      batch: pytree of arrays [N, ...] the losses are averaged over.
      key: dropout key passed to `loss_fn`, the same at every α (None: no dropout).
      alphas: 1-D grid of α; default `linspace(−1, 1, 41)`.
      chunk_size: α values evaluated at once (memory: chunk_size × params).

    Returns:
      `Interpolation(alphas, losses)`, float32 arrays [A].

    Example::

      curve = interpolation(loss_fn, pretrained, finetuned, batch)
      plot_interpolation(curve, "fig5.png")
    """
    _check_chunk_size(chunk_size)
    alphas = _grid(alphas, DEFAULT_NUM_ALPHAS, "alphas")
    losses = _interpolation_losses(loss_fn, theta0, theta1, batch, key, alphas, chunk_size)
    return Interpolation(alphas, losses)


@functools.partial(jax.jit, static_argnames=("loss_fn", "chunk_size"))
def _surface_losses(loss_fn, params, batch, key, directions, xs, ys, chunk_size):
    d1, d2 = directions
    grid_x, grid_y = jnp.meshgrid(xs, ys)  # [Y, X], 'xy' indexing.
    points = jnp.stack([grid_x.ravel(), grid_y.ravel()], axis=-1)

    def point_loss(point):
        perturbed = _combine(params, (point[0], point[1]), (d1, d2))
        return _mean_loss(loss_fn, perturbed, batch, key)

    return _map_points(point_loss, points, chunk_size).reshape(grid_x.shape)


def surface_along(
    loss_fn,
    params: Params,
    batch,
    directions: tuple[Params, Params],
    *,
    key=None,
    xs=None,
    ys=None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Surface:
    """The loss L(θ + a·d₁ + b·d₂) on a grid, along two given directions.

    `surface` calls this with `random_directions`; pass your own (d₁, d₂), e.g.
    θ₁ − θ₀ and a random direction, to slice the landscape another way.

    Args:
      loss_fn: `loss_fn(params, batch, key) -> losses [N]`.
      params: the centre θ.
      batch: pytree of arrays [N, ...].
      directions: (d₁, d₂), trees shaped like `params` (float32 is best).
      key: dropout key, the same at every point (None: no dropout).
      xs: 1-D grid of a; default `linspace(−1, 1, 25)`.
      ys: 1-D grid of b; default `linspace(−1, 1, 25)`.
      chunk_size: grid points evaluated at once (memory: chunk_size × params).

    Returns:
      `Surface(xs, ys, losses)` with losses [Y, X].

    Example::

      surf = surface_along(loss_fn, params, batch, (finetuned_minus_pretrained, d))
    """
    _check_chunk_size(chunk_size)
    xs = _grid(xs, DEFAULT_GRID_SIZE, "xs")
    ys = _grid(ys, DEFAULT_GRID_SIZE, "ys")
    directions = tuple(directions)
    if len(directions) != 2:
        raise ValueError(f"`directions` must be a pair (d1, d2), got {len(directions)}.")
    losses = _surface_losses(loss_fn, params, batch, key, directions, xs, ys, chunk_size)
    return Surface(xs, ys, losses)


def surface(
    loss_fn,
    params: Params,
    batch,
    direction_key: jax.Array,
    *,
    key=None,
    xs=None,
    ys=None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Surface:
    """The 2-D loss surface along two random filter-normalised directions.

    Li et al. (2018), "Visualizing the Loss Landscape of Neural Nets", §4;
    FSAM (Zhong et al. 2022) Fig. 4 uses a 25 × 25 grid of [−1, 1]², the
    default. The directions are `random_directions(direction_key, params)`:
    call it to get (d₁, d₂) back. Called on concrete (possibly sharded) arrays,
    each direction gets its parameter's sharding; inside the caller's `jax.jit`
    XLA chooses, so for large sharded models there call `random_directions`,
    apply `jax.lax.with_sharding_constraint` and use `surface_along`.

    Args:
      loss_fn: `loss_fn(params, batch, key) -> losses [N]`.
      params: the centre θ (e.g. the fine-tuned weights).
      batch: pytree of arrays [N, ...].
      direction_key: PRNG key of the two directions.
      key: dropout key, the same at every point (None: no dropout).
      xs: 1-D grid along d₁; default `linspace(−1, 1, 25)`.
      ys: 1-D grid along d₂; default `linspace(−1, 1, 25)`.
      chunk_size: grid points evaluated at once (memory: chunk_size × params).

    Returns:
      `Surface(xs, ys, losses)` with losses [Y, X].

    Example::

      surf = surface(loss_fn, params, batch, jax.random.key(0))
      plot_surface(surf, "fig4.png", kind="surface")
    """
    shardings = _concrete_shardings(params)
    if shardings is None:  # traced (the caller's jit) or host arrays: XLA propagates.
        directions = jax.jit(random_directions)(direction_key, params)
    else:  # each direction laid out like its parameter (not replicated)
        directions = jax.jit(random_directions, out_shardings=(shardings, shardings))(
            direction_key, params
        )
    return surface_along(
        loss_fn, params, batch, directions, key=key, xs=xs, ys=ys, chunk_size=chunk_size
    )


def plot_interpolation(result: Interpolation, path, *, title: str | None = None, label=None):
    """Draws an `Interpolation` as a loss-vs-α curve and writes it as a PNG.

    Needs matplotlib (the `train` extra); pyplot is not used, so no GUI backend
    or global state is touched.

    Args:
      result: the output of `interpolation`.
      path: file to write (PNG).
      title: optional figure title.
      label: optional legend label of the curve.

    Returns:
      `path`.

    Example::

      plot_interpolation(interpolation(loss_fn, theta0, theta1, batch), "fig5.png")
    """
    from matplotlib.figure import Figure  # noqa: PLC0415 (optional dependency)

    figure = Figure(figsize=(5, 4))
    axes = figure.add_subplot()
    axes.plot(np.asarray(result.alphas), np.asarray(result.losses), marker=".", label=label)
    axes.set_xlabel("α  (θ₁ + α(θ₁ − θ₀))")
    axes.set_ylabel("loss")
    if label is not None:
        axes.legend()
    if title is not None:
        axes.set_title(title)
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path


def plot_surface(
    result: Surface, path, kind: str = "contour", *, title: str | None = None, levels: int = 30
):
    """Draws a `Surface` as contour lines or a 3-D surface and writes it as a PNG.

    Args:
      result: the output of `surface` or `surface_along`.
      path: file to write (PNG).
      kind: 'contour' (Li et al. 2018's 2-D plots) or 'surface' (3-D, FSAM Fig. 4).
      title: optional figure title.
      levels: number of contour levels (kind='contour').

    Returns:
      `path`.

    Example::

      plot_surface(surface(loss_fn, params, batch, key), "fig4.png", kind="surface")
    """
    if kind not in ("contour", "surface"):
        raise ValueError(f"`kind` must be 'contour' or 'surface', got {kind!r}.")
    from matplotlib.figure import Figure  # noqa: PLC0415 (optional dependency)

    xs, ys, losses = (np.asarray(v) for v in result)
    figure = Figure(figsize=(5, 4))
    if kind == "contour":
        axes = figure.add_subplot()
        lines = axes.contour(xs, ys, losses, levels=levels)
        axes.clabel(lines, fontsize=6)
        axes.set_aspect("equal")
    else:
        axes = figure.add_subplot(projection="3d")
        grid_x, grid_y = np.meshgrid(xs, ys)
        axes.plot_surface(grid_x, grid_y, losses, cmap="viridis", linewidth=0)
        axes.set_zlabel("loss")
    axes.set_xlabel("d₁")
    axes.set_ylabel("d₂")
    if title is not None:
        axes.set_title(title)
    figure.savefig(path, format="png")
    return path

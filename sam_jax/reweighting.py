"""Instance weights for the ascent step: δ-SAM and its draft rule.

δ-SAM (Zhou, Liu, Chen 2022) replaces SAM's uniform ascent batch by a
reweighted one, so that the shared perturbation approximates per-instance
perturbations, while the descent step stays unweighted. The weights are
constants (no gradient flows through them) computed from a few forward passes
under one random perturbation r per step.

Every rule returns weights normalised to sum to 1. Since ε = ρ g / ‖g‖ is
invariant to the scale of g, this leaves the papers' ε unchanged (their Eq. 6
sums g_i l_i unnormalised) and makes uniform weights exactly SAM's 1/|M|.

A batch may have rows that hold no example (the empty segment slots of a
packed batch). The rules and `statistics` take an optional boolean `present`
mask: absent rows get weight 0 and the rules are those of the batch of present
examples alone (N, means, normalisation and the weights' spread count only
them). `present=None` means every row is an example.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sam_jax import perturbation

# losses_at(params) -> per-example losses [a] on the ascent micro-batch, with
# the same dropout key as the ascent pass.
LossesAt = Callable[[perturbation.Params], jax.Array]


PROBES = ("forward_mode", "finite_difference")


class InstanceReweighting(NamedTuple):
    """A rule that weights the examples of the ascent micro-batch.

    Attributes:
      name: the rule's name, for logs.
      weights_along: `weights_along(losses_at, params, clean_losses, direction,
        present=None) -> [a]`, the instance weights (summing to 1) given the
        per-example losses l_i(w) of the ascent pass, a function evaluating the
        losses at other weights, the step's random direction r (a tree like the
        parameters, float32, ‖r‖ = ρ) and an optional boolean mask [a] of the rows
        that are examples (absent rows get 0). `sam_gradient` draws r once per
        step and calls this.
      probe: how the rule reads the losses along r: ``"forward_mode"`` or
        ``"finite_difference"`` (see `directional_derivatives`).
    """

    name: str
    weights_along: Callable[..., jax.Array]
    probe: str

    def weights(self, losses_at, params, clean_losses, key, rho, present=None) -> jax.Array:
        """The rule's weights with r drawn from `key` (‖r‖ = ρ), for analysis.

        Example::

          rule = sam_jax.delta_sam(eta=1e-4)
          p = rule.weights(losses_at, params, losses_at(params), key, rho=0.05)
        """
        direction = perturbation.random_perturbation(key, params, rho)
        return self.weights_along(losses_at, params, clean_losses, direction, present)


class DirectionalDerivatives(NamedTuple):
    """Per-example derivatives of the losses along a direction r.

    Attributes:
      slope: ∇l_i(w)·r, [a] float32.
      curvature: rᵀ∇²l_i(w) r, [a] float32.
    """

    slope: jax.Array
    curvature: jax.Array


def directional_derivatives(losses_at: LossesAt, params, direction) -> DirectionalDerivatives:
    """∇l_i·r and rᵀH_i r for every example, by forward-mode autodiff (jvp of jvp).

    Unlike the finite differences l(w ± r), nothing cancels: in bfloat16, w ± r
    rounds back to w wherever r's coordinates fall below bf16's spacing at |w|,
    while the tangents r here are carried at their own scale. Costs about two to
    three forward passes (one second-order forward pass) on the ascent batch.

    Args:
      losses_at: `losses_at(params) -> [a]`.
      params: the point w.
      direction: r, a tree like `params` (cast to each parameter's dtype).
    """
    tangent = jax.tree.map(lambda r, w: r.astype(w.dtype), direction, params)

    def slope_at(p):
        return jax.jvp(losses_at, (p,), (tangent,))[1]

    try:
        slope, curvature = jax.jvp(slope_at, (params,), (tangent,))
    except (TypeError, NotImplementedError) as error:
        if "custom_vjp" not in str(error) and "custom_lin" not in str(error):
            raise
        raise ValueError(
            "probe='forward_mode' needs forward-mode derivatives of loss_fn, which "
            "calls a jax.custom_vjp function (JAX cannot take its jvp). Give that "
            "function a custom_jvp, or use probe='finite_difference' (the paper's rule; "
            f"inexact when the model computes in bfloat16). JAX said: {error}"
        ) from None
    return DirectionalDerivatives(slope.astype(jnp.float32), curvature.astype(jnp.float32))


def _check_probe(probe: str) -> None:
    if probe not in PROBES:
        raise ValueError(f"probe must be one of {PROBES}, got {probe!r}.")


def _masked(values: jax.Array, present: jax.Array | None) -> jax.Array:
    """`values` with absent rows set to 0."""
    return values if present is None else jnp.where(present, values, 0)


def _count(values: jax.Array, present: jax.Array | None):
    """The number of examples N: the rows, or the present ones (float32, at least 1)."""
    if present is None:
        return values.shape[0]
    return jnp.maximum(jnp.sum(present, dtype=jnp.float32), 1.0)


def normalize(scores: jax.Array, present: jax.Array | None = None) -> jax.Array:
    """scores / Σ scores; uniform when the scores are all zero (or not finite).

    Args:
      scores: non-negative scores [a].
      present: optional boolean [a], the rows that are examples; absent rows
        get 0 and the sum and the uniform fallback are over present rows.
    """
    scores = _masked(scores, present)
    fallback = uniform(scores.shape[0], present).astype(scores.dtype)
    total = jnp.sum(scores)
    valid = jnp.isfinite(total) & (total > 0)
    return jnp.where(valid, scores / jnp.where(valid, total, 1.0), fallback)


def uniform(num_examples: int, present: jax.Array | None = None) -> jax.Array:
    """SAM's weights, 1/|M| each (1/N over the present rows, 0 elsewhere, with `present`)."""
    if present is None:
        return jnp.full((num_examples,), 1.0 / num_examples, jnp.float32)
    return jnp.where(present, 1.0 / _count(present, present), 0.0).astype(jnp.float32)


class WeightStatistics(NamedTuple):
    """Spread of the instance weights, for logging.

    Attributes:
      min: smallest weight.
      max: largest weight.
      entropy: entropy (nats) of |p| / Σ|p|; log |M| for uniform weights.
    """

    min: jax.Array
    max: jax.Array
    entropy: jax.Array


def statistics(weights: jax.Array, present: jax.Array | None = None) -> WeightStatistics:
    """Min, max and entropy of instance weights.

    Args:
      weights: instance weights [a].
      present: optional boolean [a], the rows that are examples; the statistics
        are then those of the present rows' weights (zeros if none is present).
    """
    p = normalize(jnp.abs(weights), present)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    if present is None:
        return WeightStatistics(jnp.min(weights), jnp.max(weights), entropy)
    any_present = jnp.any(present)
    smallest = jnp.min(jnp.where(present, weights, jnp.inf))
    largest = jnp.max(jnp.where(present, weights, -jnp.inf))
    zero = jnp.zeros((), weights.dtype)
    return WeightStatistics(
        jnp.where(any_present, smallest, zero), jnp.where(any_present, largest, zero), entropy
    )


def _check_positive(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}.")


def delta_sam(eta: float = 1e-4, probe: str = "forward_mode") -> InstanceReweighting:
    """δ-SAM instance weights, final version (Zhou et al. 2022, EMNLP Findings, Eq. 5).

    With one r ~ N(0, I) per step rescaled to ‖r‖ = ρ, and l_i(w) from the
    ascent pass (all passes share the dropout key)::

      g_i = |l_i(w+r) + l_i(w−r) − 2 l_i(w)| / max(|l_i(w+r) − l_i(w−r)|, η)

    i.e. curvature a_i‖∇l_i‖² over gradient magnitude ‖∇l_i‖, an estimate of
    a_i‖∇l_i‖ (the paper's §4.2). The numerator is rᵀH_i r + O(ρ⁴) and the
    denominator's argument 2∇l_i·r + O(ρ³), which is how the default probe
    computes them:

    * ``probe="forward_mode"`` (default): g_i = |rᵀH_i r| / max(|2∇l_i·r|, η)
      with exact directional derivatives (`directional_derivatives`). It
      measures curvature in any precision: with bfloat16 compute the finite
      differences below are mostly rounding (w ± r rounds back to w), and rank
      the examples almost at random. One second-order forward pass.
    * ``probe="finite_difference"``: the paper's formula, two extra forward
      passes at w ± r. Use it to reproduce the paper bit for bit in float32.

    Example::

      tx = sam_jax.sam(optax.adamw(1e-4), rho=0.02, ascent_fraction=0.25,
                       reweight=sam_jax.delta_sam(eta=1e-4))

    Absent rows (a `present` mask, e.g. empty packing slots) get weight 0.

    Args:
      eta: η > 0, the floor of the denominator (paper grid 1e-4 … 1e-3).
      probe: ``"forward_mode"`` or ``"finite_difference"``.

    Returns:
      An `InstanceReweighting` to pass as `sam(..., reweight=...)`.
    """
    _check_positive("eta", eta)
    _check_probe(probe)

    def weights_along(losses_at: LossesAt, params, clean_losses, direction, present=None):
        if probe == "forward_mode":
            derivatives = directional_derivatives(losses_at, params, direction)
            curvature = jnp.abs(derivatives.curvature)
            slope = jnp.maximum(jnp.abs(2.0 * derivatives.slope), eta)
        else:
            clean = clean_losses.astype(jnp.float32)
            plus = losses_at(perturbation.perturbed(params, direction, +1.0)).astype(jnp.float32)
            minus = losses_at(perturbation.perturbed(params, direction, -1.0)).astype(jnp.float32)
            curvature = jnp.abs(plus + minus - 2.0 * clean)
            slope = jnp.maximum(jnp.abs(plus - minus), eta)
        return normalize(curvature / slope, present)

    return InstanceReweighting("delta_sam", weights_along, probe)


def delta_sam_draft(beta: float = 3.0, probe: str = "forward_mode") -> InstanceReweighting:
    """δ-SAM instance weights, draft version (Zhou et al. 2022, draft, Eq. 3–6).

    With one r ~ N(0, I) per step rescaled to ‖r‖ = ρ and N = |M|::

      a_j = l_j(w + r) − l_j(w)                  (3)
      g_j = |a_j| / Σ_i |a_i|                    (4)
      scale = β · |mean(a)| / |Σ_j g_j a_j|      (5)
      g'_j = (g_j − 1/N) · scale + 1/N           (6)

    The g' sum to 1 and may be negative when scale > 1. Degenerate batches
    (all a_j = 0, or Σ g_j a_j = 0) fall back to uniform weights. Costs one
    extra forward pass on the ascent micro-batch. With a `present` mask, N and
    the sums and mean are over the present examples, and absent rows get 0.

    Example::

      tx = sam_jax.sam(optax.adamw(1e-4), rho=0.05,
                       reweight=sam_jax.delta_sam_draft(beta=3))

    Args:
      beta: β > 0, the mixing strength (paper grid 3, 5, 10, 20, 50, 70).
      probe: ``"forward_mode"`` or ``"finite_difference"``.

    Returns:
      An `InstanceReweighting` to pass as `sam(..., reweight=...)`.
    """
    _check_positive("beta", beta)
    _check_probe(probe)

    def weights_along(losses_at: LossesAt, params, clean_losses, direction, present=None):
        if probe == "forward_mode":
            derivatives = directional_derivatives(losses_at, params, direction)
            change = derivatives.slope + 0.5 * derivatives.curvature
        else:
            plus = losses_at(perturbation.perturbed(params, direction)).astype(jnp.float32)
            change = plus - clean_losses.astype(jnp.float32)
        change = _masked(change, present)
        num_examples = _count(change, present)
        mean_change = jnp.mean(change) if present is None else jnp.sum(change) / num_examples
        g = normalize(jnp.abs(change), present)
        weighted_change = jnp.abs(jnp.sum(g * change))
        valid = weighted_change > 0
        scale = beta * jnp.abs(mean_change) / jnp.where(valid, weighted_change, 1.0)
        mixed = _masked((g - 1.0 / num_examples) * scale + 1.0 / num_examples, present)
        return jnp.where(valid, mixed, uniform(change.shape[0], present))

    return InstanceReweighting("delta_sam_draft", weights_along, probe)

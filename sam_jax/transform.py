"""`sam`: Sharpness-Aware Minimization as an Optax gradient transformation.

One transformation covers the SAM family used for language models:

* the ascent micro-batch of Bahri, Mobahi & Tay (2022): the ascent gradient is
  computed on a fraction of the batch (¼ in the paper), the descent gradient on
  all of it;
* m-sharpness (Foret et al. 2021): m groups, each with its own perturbation;
* δ-SAM instance reweighting of the ascent batch (Zhou et al. 2022);
* FSAM's Fisher mask on the perturbation (Zhong et al. 2022);
* ASAM's scale-adaptive perturbation (Kwon et al. 2021);
* GSAM's surrogate-gap guided descent direction (Zhuang et al. 2022);
* ESAM's stochastic weight perturbation and data selection (Du et al. 2022).

The transform computes its own gradient from the loss function, so it takes a
`pending_gradient(params)` placeholder where Optax expects a gradient, and the
loss function and batch as extra arguments::

  tx = sam_jax.sam(optax.adamw(1e-4), rho=0.05, ascent_fraction=0.25)
  opt_state = tx.init(params)
  step = sam_jax.update_from_loss(tx, opt_state, params, loss_fn, batch, key)
  params = optax.apply_updates(params, step.updates)

which is `tx.update(sam_jax.pending_gradient(params), opt_state, params,
loss_fn=loss_fn, batch=batch, key=key)`. `loss_fn(params, batch, key)` returns
per-example losses [N] and `key` drives dropout (see `sam_jax.core` for the
keys of groups and microbatches). Wrappers that act on the gradient (clipping,
`apply_if_finite`, `MultiSteps`) go inside `sam`, on its optimizer; placed
before or around it they raise an error (see `sam_jax.pending`).
"""

import dataclasses
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sam_jax import core
from sam_jax import efficient_sam
from sam_jax import fisher
from sam_jax import pending
from sam_jax import reweighting
from sam_jax import surrogate_gap as gsam

ScalarOrSchedule = core.ScalarOrSchedule
SamMetrics = core.SamMetrics

# The settings that fix array shapes: they cannot be traced values.
SHAPE_SETTINGS = (
    "ascent_fraction",
    "sharpness_m",
    "num_data_shards",
    "num_microbatches",
    "parallel_groups",
)


@dataclasses.dataclass(frozen=True)
class ShapeSettings:
    """A `sam` state's `SHAPE_SETTINGS`: static (no leaves) in its pytree."""

    ascent_fraction: float
    sharpness_m: int
    num_data_shards: int
    num_microbatches: int
    parallel_groups: int | None

    @classmethod
    def of(cls, config: core.SamConfig) -> "ShapeSettings":
        return cls(**{name: getattr(config, name) for name in SHAPE_SETTINGS})


jax.tree_util.register_pytree_node(
    ShapeSettings, lambda settings: ((), settings), lambda settings, _: settings
)


class SamState(NamedTuple):
    """State of the `sam` transformation.

    Attributes:
      count: number of `update` calls so far (drives ρ schedules and the mask).
      inner_state: state of the wrapped (descent) optimizer.
      mask_state: `FisherMaskState`, or `optax.EmptyState()` without a mask.
      metrics: `SamMetrics` of the latest step (zeros before the first).
      shapes: the `ShapeSettings` the state was built for (static, no leaves).
    """

    count: jnp.ndarray
    inner_state: optax.OptState
    mask_state: Any
    metrics: SamMetrics
    shapes: ShapeSettings


def init_state(optimizer, params, config: core.SamConfig) -> SamState:
    """The state of a SAM transformation before its first step."""
    gradient_state = core.sam_gradient_init(params, config)
    return SamState(
        count=gradient_state.count,
        inner_state=optimizer.init(params),
        mask_state=gradient_state.mask_state,
        metrics=SamMetrics.zeros(),
        shapes=ShapeSettings.of(config),
    )


def check_update_arguments(name: str, params, loss_fn, batch) -> None:
    """Rejects a missing `params`, `loss_fn` or `batch`."""
    if params is None or loss_fn is None or batch is None:
        raise ValueError(f"{name}'s update needs `params`, `loss_fn` and `batch`.")


def _check_shapes(name: str, state: SamState, config: core.SamConfig) -> None:
    if state.shapes != ShapeSettings.of(config):
        raise ValueError(
            f"This {name} state was built with {state.shapes}, but the transformation has "
            f"{ShapeSettings.of(config)}: these settings fix array shapes and cannot change "
            "after init (with optax.inject_hyperparams, leave them unchanged in "
            "state.hyperparams)."
        )


def sam_transformation(
    optimizer: optax.GradientTransformation,
    config: core.SamConfig,
    name: str,
    config_of=None,
) -> optax.GradientTransformationExtraArgs:
    """An Optax transformation that runs `core.sam_gradient` and then `optimizer`.

    Args:
      optimizer: the descent optimizer.
      config: the `SamConfig`.
      name: the transformation's name, for errors.
      config_of: optional `config_of(batch) -> SamConfig`, the step's config
        when it depends on the batch (per-instance SAM's groups); else `config`.
    """
    optimizer = optax.with_extra_args_support(optimizer)

    def init_fn(params):
        return init_state(optimizer, params, config)

    def update_fn(updates, state, params=None, *, loss_fn=None, batch=None, key=None, **extra):
        request = pending.requested(name, updates)
        check_update_arguments(name, params, loss_fn, batch)
        _check_shapes(name, state, config)
        step_config = config if config_of is None else config_of(batch)
        result = core.sam_gradient(
            loss_fn,
            params,
            batch,
            key,
            core.SamGradientState(state.count, state.mask_state),
            step_config,
            has_aux=request.has_aux,
        )
        request.result = result
        updates, inner_state = optimizer.update(result.grads, state.inner_state, params, **extra)
        return updates, SamState(
            count=result.state.count,
            inner_state=inner_state,
            mask_state=result.state.mask_state,
            metrics=result.metrics,
            shapes=state.shapes,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _concrete(value):
    """A shape setting as a Python number, or None when it is traced."""
    if not isinstance(value, (jax.Array, np.ndarray)):
        return value
    try:
        return np.asarray(value).item()
    except jax.errors.TracerArrayConversionError:
        return None


def _traced_settings_transformation(
    optimizer, settings: dict, traced: dict
) -> optax.GradientTransformationExtraArgs:
    """`sam` when `optax.inject_hyperparams` passes traced shape settings.

    The state, built when they were concrete, holds them (`SamState.shapes`);
    the step uses those, and stops with an error if the traced values differ.
    """

    def init_fn(params):
        del params
        raise ValueError(
            f"sam's {sorted(traced)} fix array shapes, so they must be concrete when the "
            "state is built, but they are traced: call tx.init outside jax.jit (with "
            "optax.inject_hyperparams, or pass it static_args="
            f"{tuple(sorted(traced))})."
        )

    def update_fn(updates, state, params=None, **extra_args):
        shapes = dataclasses.asdict(state.shapes)
        config = core.SamConfig(**{**settings, **shapes})

        def check(values):
            changed = {  # compared in the hyperparameter's own dtype (bf16 for bf16 params)
                name: value.item()
                for name, value in values.items()
                if np.asarray(shapes[name], value.dtype) != value
            }
            if changed:
                raise ValueError(
                    f"sam's shape settings cannot change after init: state.hyperparams has "
                    f"{changed}, the state was built with {state.shapes}."
                )

        jax.debug.callback(check, traced)
        return sam_transformation(optimizer, config, "sam").update(
            updates, state, params, **extra_args
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def sam(
    optimizer: optax.GradientTransformation,
    rho: ScalarOrSchedule = 0.05,
    ascent_fraction: float = 1.0,
    sharpness_m: int = 1,
    reweight: reweighting.InstanceReweighting | None = None,
    mask: fisher.FisherMask | None = None,
    adaptive: bool = False,
    adaptive_eta: float = 0.01,
    num_data_shards: int = 1,
    num_microbatches: int = 1,
    parallel_groups: int | None = None,
    surrogate_gap: gsam.SurrogateGap | None = None,
    esam: efficient_sam.Esam | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Sharpness-Aware Minimization around any Optax optimizer.

    Each step computes `sam_jax.sam_gradient` (see `sam_jax.core`): for every
    group of the m = `sharpness_m` groups of the batch (usually one):

    1. M = the ascent micro-batch, the first ≈ f·N/D examples of every one of
       the D = `num_data_shards` shards (f = `ascent_fraction`).
    2. g = ∇ Σ_{i∈M} p_i l_i(w) with p_i = 1/|M|, or the `reweight` rule's
       weights computed from the losses of this same pass.
    3. ε = ρ · T ⊙ m ⊙ (T g) / ‖T g‖ (T = |w| + η with `adaptive`, else 1; m the
       Fisher `mask`, else 1), in float32; a zero gradient gives ε = 0.
    4. The descent gradient ∇ mean_{i∈B_g} l_i(w + ε) (unweighted).

    The group gradients are averaged and given to `optimizer`, which updates
    the original w. This is Bahri et al. (2022) Algorithm 1. With `esam`, ε is
    kept on a random fraction β of the coordinates (divided by β) and step 4
    uses the fraction γ of B_g whose loss rose most; with `surrogate_gap`,
    step 4's gradient ∇f_p becomes GSAM's ∇f_p − α ∇f_⊥ (∇f_⊥: the part of g
    orthogonal to ∇f_p).

    Example::

      tx = sam_jax.sam(optax.adamw(1e-4), rho=0.05, ascent_fraction=0.25,
                       reweight=sam_jax.delta_sam(eta=1e-4),
                       mask=sam_jax.fisher_mask(sparsity=0.9, interval=100))
      step = sam_jax.update_from_loss(tx, opt_state, params, loss_fn, batch, key)
      params = optax.apply_updates(params, step.updates)

      # F_GSAM and F_ESAM (FSAM's Table 6):
      sam_jax.sam(opt, rho, mask=sam_jax.fisher_mask(), surrogate_gap=sam_jax.gsam(0.3))
      sam_jax.sam(opt, rho, mask=sam_jax.fisher_mask(), esam=sam_jax.esam(0.6, 0.5))

    Args:
      optimizer: the descent optimizer (AdamW, Adafactor, any chain).
      rho: radius ρ ≥ 0, a float or an Optax schedule of the step count. The
        constant 0 makes every variant plain training at plain cost (one
        forward and backward pass), so a loop can switch by configuration.
      ascent_fraction: f in (0, 1]; 0.25 reproduces Bahri et al., 1.0 is SAM.
      sharpness_m: the number m ≥ 1 of groups with separate perturbations
        (Bahri et al.'s m; Foret et al.'s m is the group size, N / m).
      reweight: `delta_sam(...)` or `delta_sam_draft(...)`, or None (uniform).
      mask: `fisher_mask(...)`, or None.
      adaptive: ASAM's scale-adaptive perturbation.
      adaptive_eta: η > 0 of ASAM's T_w = |w| + η.
      num_data_shards: shards of the example axis (the data axis of the mesh);
        the ascent micro-batch, groups and microbatches take the same number of
        examples from each.
      num_microbatches: k ≥ 1, gradient accumulation: the descent gradient is
        accumulated over k microbatches (each 1/k of every data shard), and the
        ascent micro-batch over as few microbatches as keep each no larger than
        a descent one. Activation memory falls by k; the result is the same as
        with k = 1 (up to summation order) when `loss_fn` ignores `key`. With
        k > 1 microbatch j gets `fold_in(key, j)`, so dropout masks differ
        across microbatches.
      parallel_groups: m-sharpness groups computed at once (None: all).
      surrogate_gap: `gsam(alpha)`: GSAM's descent direction (not with
        `reweight`); its ρ schedule is `gsam_rho_schedule(...)`, passed as `rho`.
      esam: `esam(beta, gamma)`: ESAM's weight perturbation (β < 1 needs `key`)
        and data selection (γ < 1 needs `ascent_fraction=1`).

    Returns:
      An `optax.GradientTransformationExtraArgs` whose `update` takes
      `pending_gradient(params)` in place of a gradient and keyword arguments
      `loss_fn`, `batch` and `key` (required with `reweight`); any other
      keyword arguments are passed on to `optimizer`.

    `optax.inject_hyperparams(sam)(optimizer=..., rho=0.05, ...)` works without
    `static_args`: `rho` and `adaptive_eta` become hyperparameters that change
    the step (a negative ρ is clipped to 0, and `metrics.rho` shows it). The
    shape settings (`ascent_fraction`, `sharpness_m`, `num_data_shards`,
    `num_microbatches`, `parallel_groups`) are fixed by `init`, which must then
    run outside `jax.jit`; changing them in `state.hyperparams` is an error.
    """
    shape_settings = {
        "ascent_fraction": ascent_fraction,
        "sharpness_m": sharpness_m,
        "num_data_shards": num_data_shards,
        "num_microbatches": num_microbatches,
        "parallel_groups": parallel_groups,
    }
    settings = {
        "rho": rho,
        "reweight": reweight,
        "mask": mask,
        "adaptive": adaptive,
        "adaptive_eta": adaptive_eta,
        "surrogate_gap": surrogate_gap,
        "esam": esam,
    }
    return _transformation_of(optimizer, settings, shape_settings)


def _transformation_of(
    optimizer, settings: dict, shape_settings: dict
) -> optax.GradientTransformationExtraArgs:
    """`sam`'s transformation, for concrete shape settings or traced ones.

    Args:
      optimizer: the descent optimizer.
      settings: `sam`'s other `SamConfig` arguments (ρ, the variants).
      shape_settings: the `SHAPE_SETTINGS` arguments, Python numbers or arrays;
        traced ones come from `optax.inject_hyperparams` under `jax.jit`.

    Returns:
      `sam_transformation` of the config, or, when a shape setting is traced,
      `_traced_settings_transformation`.
    """
    traced = {
        name: v for name, v in shape_settings.items() if _concrete(v) is None and v is not None
    }
    if traced:  # optax.inject_hyperparams, under jax.jit
        return _traced_settings_transformation(optimizer, settings, traced)
    concrete = {name: _concrete(value) for name, value in shape_settings.items()}
    return sam_transformation(optimizer, core.SamConfig(**settings, **concrete), "sam")

"""`sam`: Sharpness-Aware Minimization as an Optax gradient transformation.

One transformation covers the SAM family used for language models:

* the ascent micro-batch of Bahri, Mobahi & Tay (2022): the ascent gradient is
  computed on a fraction of the batch (¼ in the paper), the descent gradient on
  all of it;
* m-sharpness (Foret et al. 2021): m groups, each with its own perturbation;
* δ-SAM instance reweighting of the ascent batch (Zhou et al. 2022);
* FSAM's Fisher mask on the perturbation (Zhong et al. 2022);
* ASAM's scale-adaptive perturbation (Kwon et al. 2021).

The transform computes its own gradients, so it is called with the loss
function and the batch instead of gradients::

  tx = sam_jax.sam(optax.adamw(1e-4), rho=0.05, ascent_fraction=0.25)
  state = tx.init(params)
  updates, state = tx.update(None, state, params, loss_fn=loss_fn, batch=batch, key=key)
  params = optax.apply_updates(params, updates)

where `loss_fn(params, batch, key)` returns per-example losses [N] and `key`
drives dropout (see `sam_jax.core` for the keys of groups and microbatches).
"""

from typing import Any
from typing import NamedTuple

import jax.numpy as jnp
import optax

from sam_jax import core
from sam_jax import fisher
from sam_jax import reweighting

ScalarOrSchedule = core.ScalarOrSchedule
SamMetrics = core.SamMetrics


class SamState(NamedTuple):
    """State of the `sam` transformation.

    Attributes:
      count: number of `update` calls so far (drives ρ schedules and the mask).
      inner_state: state of the wrapped (descent) optimizer.
      mask_state: `FisherMaskState`, or `optax.EmptyState()` without a mask.
      metrics: `SamMetrics` of the latest step (zeros before the first).
    """

    count: jnp.ndarray
    inner_state: optax.OptState
    mask_state: Any
    metrics: SamMetrics


def init_state(optimizer, params, config: core.SamConfig) -> SamState:
    """The state of a SAM transformation before its first step."""
    gradient_state = core.sam_gradient_init(params, config)
    return SamState(
        count=gradient_state.count,
        inner_state=optimizer.init(params),
        mask_state=gradient_state.mask_state,
        metrics=SamMetrics.zeros(),
    )


def check_update_arguments(name: str, updates, params, loss_fn, batch) -> None:
    """Rejects gradients passed in, and a missing `params`, `loss_fn` or `batch`."""
    if updates is not None:
        raise ValueError(
            f"{name} computes its own gradients: call update(None, state, params, "
            "loss_fn=..., batch=..., key=...)."
        )
    if params is None or loss_fn is None or batch is None:
        raise ValueError(f"{name}'s update needs `params`, `loss_fn` and `batch`.")


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
        check_update_arguments(name, updates, params, loss_fn, batch)
        step_config = config if config_of is None else config_of(batch)
        result = core.sam_gradient(
            loss_fn,
            params,
            batch,
            key,
            core.SamGradientState(state.count, state.mask_state),
            step_config,
        )
        updates, inner_state = optimizer.update(result.grads, state.inner_state, params, **extra)
        return updates, SamState(
            count=result.state.count,
            inner_state=inner_state,
            mask_state=result.state.mask_state,
            metrics=result.metrics,
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
    the original w. This is Bahri et al. (2022) Algorithm 1.

    Example::

      tx = sam_jax.sam(optax.adamw(1e-4), rho=0.05, ascent_fraction=0.25,
                       reweight=sam_jax.delta_sam(eta=1e-4),
                       mask=sam_jax.fisher_mask(sparsity=0.9, interval=100))
      updates, state = tx.update(None, state, params, loss_fn=loss_fn,
                                 batch=batch, key=key)

    Args:
      optimizer: the descent optimizer (AdamW, Adafactor, any chain).
      rho: radius ρ ≥ 0, a float or an Optax schedule of the step count.
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

    Returns:
      An `optax.GradientTransformationExtraArgs` whose `update` takes keyword
      arguments `loss_fn`, `batch` and `key` (required with `reweight`); any
      other keyword arguments are passed on to `optimizer`.
    """
    config = core.SamConfig(
        rho=rho,
        ascent_fraction=ascent_fraction,
        sharpness_m=sharpness_m,
        reweight=reweight,
        mask=mask,
        adaptive=adaptive,
        adaptive_eta=adaptive_eta,
        num_data_shards=num_data_shards,
        num_microbatches=num_microbatches,
        parallel_groups=parallel_groups,
    )
    return sam_transformation(optimizer, config, "sam")

"""Per-instance SAM: a separate perturbation for every example (the costly reference).

δ-SAM (Zhou et al. 2022, Eq. 2) and m-sharpness with m = N both approximate
or equal it; it is the baseline they are measured against. It is m-sharpness
with one example per group, so it runs the same `sam_jax.sam_gradient`.
"""

import dataclasses

import optax

from sam_jax import batching
from sam_jax import core
from sam_jax import transform


def per_instance_sam(
    optimizer: optax.GradientTransformation,
    rho: core.ScalarOrSchedule = 0.05,
    parallel_groups: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Per-instance SAM (Zhou et al. 2022, Eq. 2): `sam` with one group per example.

    For each example i: ε_i = ρ ∇l_i(w) / ‖∇l_i(w)‖, and the descent gradient is
    mean_i ∇l_i(w + ε_i). Example i gets the dropout key `fold_in(key, i)`.
    The examples run in parallel (vmap), so memory grows with N copies of the
    gradient; `parallel_groups` bounds how many run at once. Same update
    signature and state as `sam`.

    Example::

      tx = sam_jax.per_instance_sam(optax.adamw(1e-4), rho=0.05)
      step = sam_jax.update_from_loss(tx, opt_state, params, loss_fn, batch, key)

    Args:
      optimizer: the descent optimizer.
      rho: radius ρ ≥ 0, a float or an Optax schedule.
      parallel_groups: examples computed at once (None: all).

    Returns:
      An `optax.GradientTransformationExtraArgs`; its state is a `SamState`.
    """
    config = core.SamConfig(rho=rho, parallel_groups=parallel_groups)

    def config_of(batch):
        return dataclasses.replace(config, sharpness_m=batching.batch_size(batch))

    return transform.sam_transformation(optimizer, config, "per_instance_sam", config_of)

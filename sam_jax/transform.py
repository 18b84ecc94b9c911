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
drives dropout (the same key is used by every forward pass of a step).
"""

from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_jax import batching
from sam_jax import fisher
from sam_jax import perturbation
from sam_jax import reweighting

ScalarOrSchedule = float | optax.Schedule


def reweight_key(key: jax.Array) -> jax.Array:
    """The key of a step's random direction r for δ-SAM, derived from the step's key.

    It is folded out of `key` so that `loss_fn` receives the step's key itself
    (the same dropout masks) in every forward pass.
    """
    return jax.random.fold_in(key, 0x5A3)


class SamMetrics(NamedTuple):
    """What one `sam` step measured, for logging (float32 scalars).

    With m-sharpness each field is the mean over the m groups.

    Attributes:
      clean_loss: mean loss l(w) on the ascent micro-batch (unweighted).
      perturbed_loss: mean loss l(w + ε) on the batch: the descent objective.
      grad_norm: ‖g‖₂ of the (weighted) ascent gradient.
      perturbation_norm: ‖ε‖₂.
      rho: the radius ρ of this step.
      weight_min: smallest instance weight in the ascent micro-batch.
      weight_max: largest instance weight.
      weight_entropy: entropy of the instance weights (log |M| when uniform).
      mask_density: fraction of coordinates perturbed (1 without a mask).
    """

    clean_loss: jax.Array
    perturbed_loss: jax.Array
    grad_norm: jax.Array
    perturbation_norm: jax.Array
    rho: jax.Array
    weight_min: jax.Array
    weight_max: jax.Array
    weight_entropy: jax.Array
    mask_density: jax.Array

    @classmethod
    def zeros(cls) -> "SamMetrics":
        return cls(*([jnp.zeros((), jnp.float32)] * len(cls._fields)))


class SamState(NamedTuple):
    """State of the `sam` transformation.

    Attributes:
      count: number of `update` calls so far (drives ρ schedules and the mask).
      inner_state: state of the wrapped (descent) optimizer.
      mask_state: `FisherMaskState`, or `optax.EmptyState()` without a mask.
      metrics: `SamMetrics` of the latest step (zeros before the first).
    """

    count: jax.Array
    inner_state: optax.OptState
    mask_state: Any
    metrics: SamMetrics


def check_rho(rho: ScalarOrSchedule) -> None:
    """Rejects a negative constant ρ (schedules and traced values are not checked)."""
    if isinstance(rho, (int, float)) and not rho >= 0:
        raise ValueError(f"rho must be ≥ 0, got {rho!r}.")


def check_arguments(
    *,
    rho: ScalarOrSchedule,
    ascent_fraction: float,
    sharpness_m: int,
    reweight,
    adaptive: bool,
    adaptive_eta: float,
    mask=None,
    num_data_shards: int = 1,
    num_microbatches: int = 1,
) -> None:
    """Validates the options of a SAM step (`sam`, and trainers that run the same step).

    Raises:
      ValueError: naming the argument and its allowed values.
      TypeError: for a `reweight` or `mask` that is not one of sam_jax's.
    """
    check_rho(rho)
    if not isinstance(ascent_fraction, (int, float)) or not 0.0 < ascent_fraction <= 1.0:
        raise ValueError(f"ascent_fraction must be in (0, 1], got {ascent_fraction!r}.")
    for name, value in (
        ("sharpness_m", sharpness_m),
        ("num_data_shards", num_data_shards),
        ("num_microbatches", num_microbatches),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer ≥ 1, got {value!r}.")
    if adaptive and not adaptive_eta > 0:
        raise ValueError(f"adaptive_eta must be > 0, got {adaptive_eta!r}.")
    if reweight is not None and not isinstance(reweight, reweighting.InstanceReweighting):
        raise TypeError(
            "reweight must be sam_jax.delta_sam(...), sam_jax.delta_sam_draft(...) or None, "
            f"got {reweight!r}."
        )
    if mask is not None and not isinstance(mask, fisher.FisherMask):
        raise TypeError(f"mask must be sam_jax.fisher_mask(...) or None, got {mask!r}.")


def rho_at(rho: ScalarOrSchedule, count: jax.Array) -> jax.Array:
    """ρ for step `count`, as a float32 scalar."""
    return jnp.asarray(rho(count) if callable(rho) else rho, jnp.float32)


def init_state(optimizer, params, mask=None) -> SamState:
    """The state of a SAM transformation before its first step."""
    return SamState(
        count=jnp.zeros((), jnp.int32),
        inner_state=optimizer.init(params),
        mask_state=optax.EmptyState() if mask is None else mask.init(params),
        metrics=SamMetrics.zeros(),
    )


def reweighted_ascent_gradient(
    piece_losses,
    params,
    ascent_batch,
    *,
    reweight: reweighting.InstanceReweighting,
    noise_key: jax.Array,
    rho: jax.Array,
    count: int = 1,
    num_data_shards: int = 1,
    present_of=None,
):
    """g = ∇ Σ_i p_i l_i(w) on an ascent micro-batch M, with the `reweight` rule's weights p.

    The rule needs all of M's losses l_i(w) before the backward pass. With one
    microbatch they come from the gradient's own forward pass (a vjp); with
    `count` > 1 they cost one more forward pass, and the gradient is then
    accumulated microbatch by microbatch. The rule's extra forward passes go
    through the same `piece_losses`, so they see the same dropout keys.

    Args:
      piece_losses: `piece_losses(params, piece, index) -> [n]`, the per-example
        losses of microbatch `index` of M (all of M, index 0, when `count` is
        1), with that microbatch's dropout key.
      params: the parameters w.
      ascent_batch: M, a pytree of arrays [a, ...].
      reweight: `delta_sam(...)` or `delta_sam_draft(...)`.
      noise_key: the key of the rule's random direction (`reweight_key` of the
        step's key).
      rho: this step's ρ.
      count: microbatches of M (see `batching.microbatches`).
      num_data_shards: shards of M's example axis.
      present_of: optional `present_of(piece) -> bool [n]`, which of a piece's
        losses are examples (packed batches have empty slots); absent ones get
        weight 0 and do not count in the rule (see `sam_jax.reweighting`).

    Returns:
      `(grads, clean_losses, weights, present)`; the last three over all of M
      in microbatch order (`present` is None without `present_of`).
    """
    if count == 1:

        def losses_at(p):
            return piece_losses(p, ascent_batch, 0)

        clean_losses, pullback = jax.vjp(losses_at, params)
        present = None if present_of is None else present_of(ascent_batch)
    else:
        pieces = batching.microbatches(ascent_batch, count, num_data_shards)
        indices = jnp.arange(count)

        def losses_at(p):  # all of M, in microbatch order
            losses = jax.lax.map(lambda ip: piece_losses(p, ip[1], ip[0]), (indices, pieces))
            return losses.reshape(-1)

        clean_losses = losses_at(params)
        present = None if present_of is None else jax.vmap(present_of)(pieces).reshape(-1)
    mask = {} if present is None else {"present": present}  # rules without the argument work
    weights = jax.lax.stop_gradient(
        reweight.weights(losses_at, params, clean_losses, noise_key, rho, **mask)
    )
    if count == 1:
        (grads,) = pullback(weights.astype(clean_losses.dtype))
    else:
        per_piece = weights.reshape(count, -1)

        def piece_gradient(piece, index):
            losses, piece_pullback = jax.vjp(lambda p: piece_losses(p, piece, index), params)
            return piece_pullback(per_piece[index].astype(losses.dtype))[0]

        grads = batching.sum_over_microbatches(piece_gradient, ascent_batch, count, num_data_shards)
    return grads, clean_losses, weights, present


def check_update_arguments(name: str, updates, params, loss_fn, batch) -> None:
    """Rejects gradients passed in, and a missing `params`, `loss_fn` or `batch`."""
    if updates is not None:
        raise ValueError(
            f"{name} computes its own gradients: call update(None, state, params, "
            "loss_fn=..., batch=..., key=...)."
        )
    if params is None or loss_fn is None or batch is None:
        raise ValueError(f"{name}'s update needs `params`, `loss_fn` and `batch`.")


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
) -> optax.GradientTransformationExtraArgs:
    """Sharpness-Aware Minimization around any Optax optimizer.

    Each step, for every group k of the m groups of the batch B
    (m = `sharpness_m`, usually 1):

    1. M = the ascent micro-batch, the first a ≈ f·|B_k| examples
       (f = `ascent_fraction`; with `num_data_shards` D > 1, the first a/D of
       each shard's examples, a a multiple of D).
    2. g = ∇ Σ_{i∈M} p_i l_i(w) with p_i = 1/a, or the `reweight` rule's weights
       computed from the losses of this same pass.
    3. ε = ρ · T ⊙ m ⊙ (T g) / ‖T g‖ (T = |w| + η with `adaptive`, else 1; m the
       Fisher `mask`, else 1), in float32; a zero gradient gives ε = 0.
    4. The descent gradient ∇ mean_{i∈B_k} l_i(w + ε) (unweighted).

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
      sharpness_m: m ≥ 1 groups with separate perturbations; must divide N.
      reweight: `delta_sam(...)` or `delta_sam_draft(...)`, or None (uniform).
      mask: `fisher_mask(...)`, or None.
      adaptive: ASAM's scale-adaptive perturbation.
      adaptive_eta: η > 0 of ASAM's T_w = |w| + η.
      num_data_shards: shards of the example axis (the data axis of the mesh);
        the ascent micro-batch takes the same number of examples from each.
      num_microbatches: k ≥ 1, gradient accumulation: the descent gradient is
        accumulated over k microbatches (each 1/k of every data shard), and the
        ascent micro-batch over as few microbatches as keep each no larger than
        a descent one. Activation memory falls by k; the result is the same as
        with k = 1 (up to summation order) when `loss_fn` ignores `key`. With
        k > 1 microbatch j gets `fold_in(key, j)`, so dropout masks differ
        across microbatches.

    Returns:
      An `optax.GradientTransformationExtraArgs` whose `update` takes keyword
      arguments `loss_fn`, `batch` and `key` (required with `reweight`); any
      other keyword arguments are passed on to `optimizer`.
    """
    check_arguments(
        rho=rho,
        ascent_fraction=ascent_fraction,
        sharpness_m=sharpness_m,
        reweight=reweight,
        mask=mask,
        adaptive=adaptive,
        adaptive_eta=adaptive_eta,
        num_data_shards=num_data_shards,
        num_microbatches=num_microbatches,
    )
    optimizer = optax.with_extra_args_support(optimizer)

    def init_fn(params):
        return init_state(optimizer, params, mask)

    def ascent_gradient(loss_fn, params, ascent_batch, shards, key, noise_key, step_rho, count):
        """(g, mean clean loss, instance weights) on the ascent micro-batch M.

        g = ∇ Σ_{i∈M} p_i l_i(w), accumulated over `count` microbatches of M. With
        one microbatch the losses come from the gradient's own forward pass; with
        several, a reweighting rule needs all of M's losses before any backward
        pass, which costs one more forward pass.
        """
        size = batching.batch_size(ascent_batch)

        def piece_losses(p, piece, index):
            piece_key = batching.microbatch_key(key, index, count)
            return batching.per_example_losses(loss_fn, p, piece, piece_key)

        def piece_gradient(piece, index, piece_weights):
            losses, pullback = jax.vjp(lambda p: piece_losses(p, piece, index), params)
            (grads,) = pullback(piece_weights.astype(losses.dtype))
            return grads, jnp.sum(losses.astype(jnp.float32))

        if reweight is None:
            weights = reweighting.uniform(size)
            grads, loss_sum = batching.sum_over_microbatches(
                lambda piece, index: piece_gradient(piece, index, weights[: size // count]),
                ascent_batch,
                count,
                shards,
            )
            return grads, loss_sum / size, weights

        grads, clean_losses, weights, _ = reweighted_ascent_gradient(
            piece_losses,
            params,
            ascent_batch,
            reweight=reweight,
            noise_key=noise_key,
            rho=step_rho,
            count=count,
            num_data_shards=shards,
        )
        return grads, jnp.mean(clean_losses.astype(jnp.float32)), weights

    def group_gradient(
        loss_fn, params, group, key, step_rho, noise_key, coordinate_mask, mask_density
    ):
        """Descent gradient and metrics of one group (the whole batch when m = 1)."""
        shards = num_data_shards if sharpness_m == 1 else 1
        group_size = batching.batch_size(group)
        size = batching.ascent_size(group_size, ascent_fraction, shards)
        ascent_batch = batching.ascent_slice(group, size, shards)
        ascent_count = batching.ascent_microbatch_count(
            size, group_size // num_microbatches, shards
        )
        ascent_grads, clean_loss, weights = ascent_gradient(
            loss_fn, params, ascent_batch, shards, key, noise_key, step_rho, ascent_count
        )
        eps = perturbation.ascent_perturbation(
            ascent_grads,
            params,
            step_rho,
            mask=coordinate_mask,
            adaptive_eta=adaptive_eta if adaptive else None,
        )
        adversarial_params = perturbation.perturbed(params, eps.epsilon)

        def descent(piece, index):
            piece_key = batching.microbatch_key(key, index, num_microbatches)

            def mean_loss(p):
                return jnp.mean(batching.per_example_losses(loss_fn, p, piece, piece_key))

            return jax.value_and_grad(mean_loss)(adversarial_params)

        loss_sum, grad_sum = batching.sum_over_microbatches(
            descent, group, num_microbatches, shards
        )
        grads = jax.tree.map(lambda g: g / num_microbatches, grad_sum)
        spread = reweighting.statistics(weights)
        metrics = SamMetrics(
            clean_loss=clean_loss,
            perturbed_loss=(loss_sum / num_microbatches).astype(jnp.float32),
            grad_norm=eps.grad_norm,
            perturbation_norm=eps.norm,
            rho=step_rho,
            weight_min=spread.min,
            weight_max=spread.max,
            weight_entropy=spread.entropy,
            mask_density=mask_density,
        )
        return grads, metrics

    def update_fn(updates, state, params=None, *, loss_fn=None, batch=None, key=None, **extra):
        check_update_arguments("sam", updates, params, loss_fn, batch)
        if reweight is not None and key is None:
            raise ValueError(
                f"reweight={reweight.name} draws a random perturbation every step: pass `key`."
            )
        num_examples = batching.batch_size(batch)
        if num_examples % num_data_shards:
            raise ValueError(
                f"The batch size {num_examples} is not divisible by "
                f"num_data_shards={num_data_shards}."
            )
        step_rho = rho_at(rho, state.count)
        noise_key = None if key is None else reweight_key(key)
        if mask is None:
            mask_state, coordinate_mask, density = state.mask_state, None, jnp.float32(1.0)
        else:
            mask_state = mask.update(state.mask_state, state.count, params, loss_fn, batch, key)
            coordinate_mask, density = mask_state.mask, mask_state.density

        def gradient_of(group):
            return group_gradient(
                loss_fn, params, group, key, step_rho, noise_key, coordinate_mask, density
            )

        if sharpness_m == 1:
            grads, metrics = gradient_of(batch)
        else:
            groups = batching.split_groups(batch, sharpness_m)

            def accumulate(total, group):
                return jax.tree.map(jnp.add, total, gradient_of(group)), None

            zeros = (
                jax.tree.map(lambda w: jnp.zeros(w.shape, w.dtype), params),
                SamMetrics.zeros(),
            )
            total, _ = jax.lax.scan(accumulate, zeros, groups)
            grads, metrics = jax.tree.map(lambda t: t / sharpness_m, total)

        updates, inner_state = optimizer.update(grads, state.inner_state, params, **extra)
        return updates, SamState(
            count=optax.safe_increment(state.count),
            inner_state=inner_state,
            mask_state=mask_state,
            metrics=metrics,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)

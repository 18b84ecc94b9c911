"""The SAM gradient: one pure function behind every SAM path of sam_jax.

`sam_gradient(loss_fn, params, batch, key, state, config)` computes the
gradient a SAM step hands to its optimizer, with the step's metrics. The
Optax transforms `sam` and `per_instance_sam`, the built-in trainer and T5X's
`SamTrainer` all call it; a loop that owns its optimizer (a Flax `TrainState`,
an `nnx.Optimizer`, T5X) can call it too and pass the gradient to any Optax
chain::

  config = sam_jax.SamConfig(rho=0.05, ascent_fraction=0.25)
  sam_state = sam_jax.sam_gradient_init(params, config)

  @jax.jit
  def train_step(params, opt_state, sam_state, batch, key):
      result = sam_jax.sam_gradient(loss_fn, params, batch, key, sam_state, config)
      updates, opt_state = tx.update(result.grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, result.state

`loss_fn(params, batch, key)` returns per-example losses [N] (or
`(losses, aux)` with `has_aux=True`); `key` drives dropout.

Groups and keys (the same rule everywhere):

* m-sharpness (`sharpness_m = m`, the *number* of groups, as in Bahri et al.
  2022; Foret et al.'s m is the group *size*, N / sharpness_m here): group g
  is the g-th m-th of every data shard (`batching.microbatches`), so each
  group holds an even share of every shard and its ascent slice stays local
  to every device, for any m. Groups run in parallel (`vmap`), or
  `parallel_groups` at a time, the rest in a `lax.map` loop.
* Dropout: group g gets `piece_key(key, g, m)` and its microbatch j
  `piece_key(group_key, j, k)` (`fold_in`, or the key itself when there is one
  piece); every forward pass of a group over the same examples (ascent, the
  δ-SAM probes, descent) uses the same key. Per-instance SAM is m = N, so each
  example gets its own key.
* δ-SAM's random direction r is drawn once per step, from
  `reweight_key(key)`, and ESAM's weight mask from `efficient_sam.key_of(key)`; each is
  shared by all groups (and, being drawn from the step's key, by all devices).
"""

import dataclasses
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from sam_jax import batching
from sam_jax import efficient_sam
from sam_jax import fisher
from sam_jax import perturbation
from sam_jax import reweighting
from sam_jax import surrogate_gap as gsam

ScalarOrSchedule = float | jax.Array | optax.Schedule


class SamMetrics(NamedTuple):
    """What one SAM step measured, for logging (float32 scalars).

    With m-sharpness each field is the mean over the m groups. Losses are the
    per-example losses of `loss_fn` (for T5X models, an example's summed token
    loss), so the fields mean the same for every variant.

    Attributes:
      clean_loss: mean loss l(w) on the ascent micro-batch (unweighted).
      perturbed_loss: mean loss l(w + ε) on the batch: the descent objective
        (with ESAM's data selection, still over the whole batch).
      grad_norm: ‖g‖₂ of the ascent gradient g = ∇ Σ_i p_i l_i with Σ_i p_i = 1
        (the mean loss's gradient for uniform weights).
      perturbation_norm: ‖ε‖₂.
      rho: the radius ρ of this step.
      weight_min: smallest instance weight in the ascent micro-batch.
      weight_max: largest instance weight.
      weight_entropy: entropy of the instance weights (log |M| when uniform).
      mask_density: fraction of coordinates perturbed (1 without a mask): the
        Fisher mask's, times ESAM's weight mask's when β < 1.
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


def check_rho(rho: ScalarOrSchedule) -> None:
    """Rejects a negative constant ρ (a schedule's or a traced ρ is clipped by `rho_at`)."""
    if isinstance(rho, (int, float)) and not rho >= 0:
        raise ValueError(f"rho must be ≥ 0, got {rho!r}.")


def is_plain(rho: ScalarOrSchedule) -> bool:
    """Whether ρ is the constant 0: every SAM variant is then the plain gradient."""
    return isinstance(rho, (int, float)) and rho == 0


def _check_count(name: str, value) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer ≥ 1, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class SamConfig:
    """The settings of a SAM step; checked when built.

    Attributes:
      rho: radius ρ ≥ 0: a float, a scalar array, or an Optax schedule of the
        step count.
      ascent_fraction: f in (0, 1]; the ascent micro-batch is the first f of
        every data shard of a group (0.25 in Bahri et al.; 1.0 is SAM).
      sharpness_m: the number m ≥ 1 of groups with their own perturbation
        (Bahri et al.'s m; Foret et al.'s m is the group size N / sharpness_m).
        m · num_data_shards · num_microbatches must divide the batch.
      reweight: `delta_sam(...)`, `delta_sam_draft(...)`, or None (uniform).
      mask: `fisher_mask(...)`, or None.
      surrogate_gap: `gsam(alpha)` for GSAM's descent direction, or None.
      esam: `esam(beta, gamma)` for ESAM's weight perturbation and data
        selection, or None.
      adaptive: ASAM's scale-adaptive perturbation.
      adaptive_eta: η > 0 of ASAM's T_w = |w| + η.
      num_data_shards: D, shards of the example axis (the mesh's data axis).
      num_microbatches: k, gradient accumulation within each group.
      parallel_groups: groups computed at once (vmapped); None is all m. Memory
        grows with it (a perturbation and two gradients per group); 1 is a
        serial loop with the memory of one group.
    """

    rho: ScalarOrSchedule = 0.05
    ascent_fraction: float = 1.0
    sharpness_m: int = 1
    reweight: reweighting.InstanceReweighting | None = None
    mask: fisher.FisherMask | None = None
    surrogate_gap: gsam.SurrogateGap | None = None
    esam: efficient_sam.Esam | None = None
    adaptive: bool = False
    adaptive_eta: float = 0.01
    num_data_shards: int = 1
    num_microbatches: int = 1
    parallel_groups: int | None = None

    def __post_init__(self):
        check_rho(self.rho)
        fraction = self.ascent_fraction
        if not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
            raise ValueError(f"ascent_fraction must be in (0, 1], got {fraction!r}.")
        for name in ("sharpness_m", "num_data_shards", "num_microbatches"):
            _check_count(name, getattr(self, name))
        if self.parallel_groups is not None:
            _check_count("parallel_groups", self.parallel_groups)
            if self.sharpness_m % self.parallel_groups:
                raise ValueError(
                    f"parallel_groups={self.parallel_groups} must divide sharpness_m="
                    f"{self.sharpness_m} (or be None: all groups at once)."
                )
        eta = self.adaptive_eta  # an injected hyperparameter may be traced
        if self.adaptive and isinstance(eta, (int, float)) and not eta > 0:
            raise ValueError(f"adaptive_eta must be > 0, got {self.adaptive_eta!r}.")
        if self.reweight is not None and not isinstance(
            self.reweight, reweighting.InstanceReweighting
        ):
            raise TypeError(
                "reweight must be sam_jax.delta_sam(...), sam_jax.delta_sam_draft(...) or "
                f"None, got {self.reweight!r}."
            )
        if self.mask is not None and not isinstance(self.mask, fisher.FisherMask):
            raise TypeError(f"mask must be sam_jax.fisher_mask(...) or None, got {self.mask!r}.")
        self._check_gsam_and_esam()

    def _check_gsam_and_esam(self):
        gap, efficient = self.surrogate_gap, self.esam
        if gap is not None and not isinstance(gap, gsam.SurrogateGap):
            raise TypeError(f"surrogate_gap must be sam_jax.gsam(...) or None, got {gap!r}.")
        if efficient is not None and not isinstance(efficient, efficient_sam.Esam):
            raise TypeError(f"esam must be sam_jax.esam(...) or None, got {efficient!r}.")
        if gap is not None and self.reweight is not None:
            raise ValueError(
                "surrogate_gap (GSAM) splits the clean gradient ∇f of the mean loss, but with "
                f"reweight={self.reweight.name} the ascent gradient is a reweighted one: use "
                "one of them."
            )
        if _selects_data(self) and self.ascent_fraction != 1.0:
            raise ValueError(
                f"esam(gamma={efficient.gamma}) ranks every example by l(w + ε) − l(w), but "
                f"with ascent_fraction={self.ascent_fraction} l(w) is computed for the ascent "
                "micro-batch only: set ascent_fraction=1.0, or gamma=1.0."
            )


def _draws_weight_mask(config: SamConfig) -> bool:
    """Whether ESAM perturbs a random fraction β < 1 of the coordinates (SWP)."""
    return config.esam is not None and not config.esam.perturbs_all


def _selects_data(config: SamConfig) -> bool:
    """Whether ESAM's descent uses a fraction γ < 1 of the examples (SDS)."""
    return config.esam is not None and not config.esam.selects_all


class SamGradientState(NamedTuple):
    """What a SAM step carries to the next.

    Attributes:
      count: steps taken (drives ρ schedules and the mask's refreshes).
      mask_state: `FisherMaskState`, or `optax.EmptyState()` without a mask.
    """

    count: jax.Array
    mask_state: Any


class SamGradient(NamedTuple):
    """The result of `sam_gradient`.

    Attributes:
      grads: the descent gradient ∇ mean_i l_i(w + ε), averaged over groups, in
        the parameters' dtypes.
      state: the `SamGradientState` for the next step.
      metrics: `SamMetrics` of this step.
      aux: the descent pass's auxiliary output with `has_aux`, else None; its
        leaves gain a leading axis [m] with m-sharpness groups and then [k]
        with microbatches ([m, k, ...]).
    """

    grads: optax.Params
    state: SamGradientState
    metrics: SamMetrics
    aux: Any


def sam_gradient_init(params, config: SamConfig) -> SamGradientState:
    """The `SamGradientState` before the first step."""
    mask_state = optax.EmptyState() if config.mask is None else config.mask.init(params)
    return SamGradientState(count=jnp.zeros((), jnp.int32), mask_state=mask_state)


def reweight_key(key: jax.Array) -> jax.Array:
    """The key of a step's random direction r for δ-SAM, derived from the step's key.

    It is folded out of `key` so that `loss_fn` receives the step's key itself
    (the same dropout masks) in every forward pass.
    """
    return jax.random.fold_in(key, 0x5A3)


def rho_at(rho: ScalarOrSchedule, count: jax.Array) -> jax.Array:
    """ρ for step `count`, as a float32 scalar, clipped at 0.

    A constant ρ < 0 is refused when the config is built; a schedule's or an
    injected (traced) ρ < 0 is clipped to 0 here, and the step's
    `SamMetrics.rho` shows the 0 that was used.
    """
    return jnp.maximum(jnp.asarray(rho(count) if callable(rho) else rho, jnp.float32), 0.0)


class StepContext(NamedTuple):
    """What every group of one step shares (the arguments of `ascent_gradient` and co.)."""

    config: SamConfig
    loss_fn: Callable
    has_aux: bool
    present_of: Callable | None
    params: optax.Params
    rho: jax.Array
    direction: optax.Params | None
    coordinate_mask: optax.Params | None
    batch_examples: int


def _losses(step: StepContext, params, batch, key):
    """(per-example losses [N] or [N, S], aux or None), the losses' shape checked."""
    out = step.loss_fn(params, batch, key)
    if step.has_aux and (not isinstance(out, tuple) or len(out) != 2):
        raise ValueError("With has_aux=True, `loss_fn` must return (per_example_losses, aux).")
    losses, aux = out if step.has_aux else (out, None)
    batching.check_losses(losses, batch, slots=True, whole_batch=step.batch_examples)
    return losses, aux


def _losses_by_piece(step: StepContext, params, batch, key, count: int):
    """`_losses` of each of `count` microbatches (its key `piece_key(key, j, count)`), stacked.

    Returns:
      `(losses, aux)`, with a leading axis [count] when count > 1.
    """
    if count == 1:
        return _losses(step, params, batch, key)
    pieces = batching.microbatches(batch, count, step.config.num_data_shards)

    def piece_losses(indexed):
        index, piece = indexed
        return _losses(step, params, piece, batching.piece_key(key, index, count))

    return jax.lax.map(piece_losses, (jnp.arange(count), pieces))


def _row_losses(step: StepContext, params, batch, key):
    """Per-row losses [N] (a packed row's slots summed), for the Fisher mask."""
    losses = _losses(step, params, batch, key)[0]
    return losses if losses.ndim == 1 else jnp.sum(losses, axis=-1)


def ascent_gradient(step: StepContext, ascent_batch, key, count: int):
    """g = ∇ Σ_{i∈M} p_i l_i(w) on the ascent micro-batch M, accumulated over `count` pieces.

    p is uniform over M's examples (SAM), or the `reweight` rule's weights. The
    rule needs all of M's losses before the backward pass: with one piece they
    come from the gradient's own forward pass (a vjp); with several they cost
    one more forward pass. The rule's probes use the same keys.

    Returns:
      `(grads, clean_losses [a], weights [a], present [a] or None)`.
    """
    config, params = step.config, step.params
    shards = config.num_data_shards
    pieces = batching.microbatches(ascent_batch, count, shards)

    def piece_losses(p, piece, index):  # flat: [n] or the [n, S] slots of packed rows
        return _losses(step, p, piece, batching.piece_key(key, index, count))[0].reshape(-1)

    def losses_at(p):  # all of M, in microbatch order
        return _losses_by_piece(step, p, ascent_batch, key, count)[0].reshape(-1)

    present = None
    if step.present_of is not None:
        present = jax.vmap(step.present_of)(pieces).reshape(-1)

    def weights_of(clean_losses):
        if config.reweight is None:  # uniform over M's entries (its rows, or rows' slots)
            return reweighting.uniform(jax.eval_shape(losses_at, params).shape[0], present)
        present_argument = {} if present is None else {"present": present}  # rules without it
        weights = config.reweight.weights_along(
            losses_at, params, clean_losses, step.direction, **present_argument
        )
        return jax.lax.stop_gradient(weights)

    if count == 1:
        clean_losses, pullback = jax.vjp(losses_at, params)
        weights = weights_of(clean_losses)
        (grads,) = pullback(weights.astype(clean_losses.dtype))
        return grads, clean_losses, weights, present
    clean_losses = None if config.reweight is None else losses_at(params)
    weights = weights_of(clean_losses)
    per_piece = weights.reshape(count, -1)

    def piece_gradient(piece, index):
        losses, pullback = jax.vjp(lambda p: piece_losses(p, piece, index), params)
        return pullback(per_piece[index].astype(losses.dtype))[0], losses

    grads, piece_clean = batching.accumulate_microbatches(
        piece_gradient, ascent_batch, count, shards
    )
    if clean_losses is None:
        clean_losses = piece_clean.reshape(-1)
    return grads, clean_losses, weights, present


def _loss_sum_and_count(losses, present):
    """Σ of the losses of the examples present (all if `present` is None), and their count."""
    losses = losses.astype(jnp.float32).reshape(-1)
    if present is None:
        return jnp.sum(losses), jnp.float32(losses.size)
    present = present.reshape(-1)
    return jnp.sum(jnp.where(present, losses, 0.0)), jnp.sum(present, dtype=jnp.float32)


def descent_gradient(step: StepContext, group, key, adversarial_params):
    """(∇ mean l(w + ε) over the group's entries, (Σ loss, count) of its examples, aux).

    Accumulated over the microbatches, each weighted equally (they hold equal
    numbers of rows).
    """
    count = step.config.num_microbatches

    def piece_gradient(piece, index):
        piece_key = batching.piece_key(key, index, count)

        def mean_loss(p):
            losses, aux = _losses(step, p, piece, piece_key)
            return jnp.mean(losses), (losses, aux)

        (_, (losses, aux)), grads = jax.value_and_grad(mean_loss, has_aux=True)(adversarial_params)
        present = None if step.present_of is None else step.present_of(piece)
        return (grads, _loss_sum_and_count(losses, present)), aux

    (grad_sum, (loss_sum, examples)), aux = batching.accumulate_microbatches(
        piece_gradient, group, count, step.config.num_data_shards
    )
    grads = jax.tree.map(lambda g: (g / count).astype(g.dtype), grad_sum)
    return grads, (loss_sum, examples), aux


def _row_sums(losses, present, num_rows: int):
    """Per-row loss sums [num_rows] float32 (a packed row's present slots summed)."""
    losses = losses.astype(jnp.float32).reshape(num_rows, -1)
    if present is not None:
        losses = jnp.where(present.reshape(num_rows, -1), losses, 0.0)
    return jnp.sum(losses, axis=-1)


def selected_descent_gradient(
    step: StepContext, group, key, adversarial_params, clean_losses, present
):
    """ESAM's data selection: the descent gradient of the γ of the group that rose most.

    A forward pass at w + ε over the whole group scores every row by
    l(w + ε) − l(w) (summed over a packed row's examples; l(w) from the ascent
    pass, which covered the whole group); the `efficient_sam.selected_per_shard` rows
    with the largest scores of every data shard make the batch whose descent
    gradient is taken (`descent_gradient`). The perturbed-loss metric and `aux`
    are the scoring pass's, over the whole group, as without selection. The
    selected rows take new places in their microbatches, so with dropout their
    descent pass draws other masks than their scoring pass did.

    Returns:
      Like `descent_gradient`: (gradient, (Σ loss, count), aux).
    """
    config = step.config
    count, shards = config.num_microbatches, config.num_data_shards
    rows = batching.batch_size(group)
    losses, aux = _losses_by_piece(step, adversarial_params, group, key, count)
    rise = _row_sums(losses, present, rows) - _row_sums(clean_losses, present, rows)
    scores = efficient_sam.batch_order(jax.lax.stop_gradient(rise), count, shards)
    per_shard = efficient_sam.selected_per_shard(rows, config.esam.gamma, shards, count)
    selected = efficient_sam.select(group, scores, per_shard, shards)
    grads, _, _ = descent_gradient(step, selected, key, adversarial_params)
    return grads, _loss_sum_and_count(losses, present), aux


def _clean_gradient(grads, present):
    """∇ of the clean loss's mean over all of M's entries, from g (uniform over present ones).

    The descent objective is a mean over all entries, a packed row's absent
    slots included; g averages over the present ones. GSAM compares the two.
    """
    if present is None:
        return grads
    share = jnp.mean(present.astype(jnp.float32))
    return jax.tree.map(lambda g: (g * share).astype(g.dtype), grads)


def _mean(total_and_count):
    total, count = total_and_count
    return total / jnp.maximum(count, 1.0)


def plain_group_gradient(step: StepContext, group, key):
    """ρ = 0 (a constant): the group's gradient at w, one pass, no ascent.

    Every variant is then the plain gradient, so none of its passes run. The
    metrics describe the group: its mean loss (both losses), ‖∇‖, ε = 0, and
    uniform weights over its examples.
    """
    grads, loss, aux = descent_gradient(step, group, key, step.params)
    examples = loss[1]
    metrics = SamMetrics(
        clean_loss=_mean(loss),
        perturbed_loss=_mean(loss),
        grad_norm=optax.tree.norm(grads).astype(jnp.float32),
        perturbation_norm=jnp.float32(0.0),
        rho=step.rho,
        weight_min=1.0 / jnp.maximum(examples, 1.0),
        weight_max=1.0 / jnp.maximum(examples, 1.0),
        weight_entropy=jnp.log(jnp.maximum(examples, 1.0)),
        mask_density=jnp.float32(1.0),
    )
    return grads, metrics, aux


def group_gradient(step: StepContext, group, key):
    """Ascent on the group's micro-batch, ε, and the descent gradient at w + ε.

    With ESAM the descent uses the selected examples (`selected_descent_gradient`);
    with GSAM the result is `gsam.descent_direction` of it and the ascent gradient.
    """
    config = step.config
    if is_plain(config.rho):
        return plain_group_gradient(step, group, key)
    shards = config.num_data_shards
    group_size = batching.batch_size(group)
    size = batching.ascent_size(group_size, config.ascent_fraction, shards)
    ascent_batch = batching.ascent_slice(group, size, shards)
    count = batching.ascent_microbatch_count(size, group_size // config.num_microbatches, shards)
    grads, clean_losses, weights, present = ascent_gradient(step, ascent_batch, key, count)
    swp = _draws_weight_mask(config)
    eps = perturbation.ascent_perturbation(  # ESAM: ρ/β on the coordinates kept
        grads,
        step.params,
        step.rho / config.esam.beta if swp else step.rho,
        mask=step.coordinate_mask,
        adaptive_eta=config.adaptive_eta if config.adaptive else None,
    )
    adversarial_params = perturbation.perturbed(step.params, eps.epsilon)
    if _selects_data(config):
        descent, perturbed_loss, aux = selected_descent_gradient(
            step, group, key, adversarial_params, clean_losses, present
        )
    else:
        descent, perturbed_loss, aux = descent_gradient(step, group, key, adversarial_params)
    if config.surrogate_gap is not None:
        clean = _clean_gradient(grads, present)
        descent = gsam.descent_direction(descent, clean, config.surrogate_gap.alpha)
    spread = reweighting.statistics(weights, present)
    metrics = SamMetrics(
        clean_loss=_mean(_loss_sum_and_count(clean_losses, present)),
        perturbed_loss=_mean(perturbed_loss),
        grad_norm=eps.grad_norm,
        perturbation_norm=eps.norm,
        rho=step.rho,
        weight_min=spread.min,
        weight_max=spread.max,
        weight_entropy=spread.entropy,
        mask_density=jnp.float32(1.0),
    )
    return descent, metrics, aux


def _check_key(config: SamConfig, key) -> None:
    """Rejects `key=None` when the step draws random numbers: δ-SAM's r, ESAM's weight mask.

    With ρ the constant 0 neither is drawn (see `_with_mask_and_direction`), so
    no key is needed.

    Raises:
      ValueError: `reweight` is set and `key` is None (checked first), or ESAM's
        β < 1 and `key` is None.
    """
    plain = is_plain(config.rho)
    if config.reweight is not None and key is None and not plain:
        raise ValueError(
            f"reweight={config.reweight.name} draws a random perturbation every step: pass `key`."
        )
    if _draws_weight_mask(config) and key is None and not plain:
        raise ValueError(
            f"esam(beta={config.esam.beta}) draws a random weight mask every step: pass `key`."
        )


def _check_batch(config: SamConfig, num_examples: int) -> None:
    pieces = config.sharpness_m * config.num_data_shards * config.num_microbatches
    if num_examples % pieces:
        raise ValueError(
            f"The batch of {num_examples} examples must be divisible by sharpness_m="
            f"{config.sharpness_m} × num_data_shards={config.num_data_shards} × "
            f"num_microbatches={config.num_microbatches} = {pieces}: every group takes "
            "an even share of every data shard, and every microbatch of every group."
        )


def _over_groups(step: StepContext, batch, key):
    """`group_gradient` of every group, averaged: `parallel_groups` at a time (vmap).

    The chunks of groups run in a `lax.scan` that sums their gradients in
    float32, so memory grows with the chunk, not with m.
    """
    m = step.config.sharpness_m
    chunk = step.config.parallel_groups or m
    groups = batching.microbatches(batch, m, step.config.num_data_shards)  # [m, N/m, ...]

    def chunk_gradient(chunk_groups, chunk_index):
        def one(index, group):
            return group_gradient(step, group, batching.piece_key(key, index, m))

        indices = chunk_index * chunk + jnp.arange(chunk)
        grads, metrics, aux = jax.vmap(one)(indices, chunk_groups)
        summed = jax.tree.map(lambda x: jnp.sum(x.astype(jnp.float32), 0), (grads, metrics))
        return summed, aux

    (grads, metrics), aux = batching.accumulate_microbatches(chunk_gradient, groups, m // chunk)
    if m // chunk > 1:  # [m / chunk, chunk, ...] -> [m, ...]
        aux = jax.tree.map(lambda x: x.reshape((m,) + x.shape[2:]), aux)
    grads = jax.tree.map(lambda g, w: (g / m).astype(w.dtype), grads, step.params)
    return grads, jax.tree.map(lambda x: x / m, metrics), aux


def _batch_gradient(step: StepContext, batch, key):
    """The batch's SAM gradient, metrics and aux: its one group's, or the m groups' mean.

    Args:
      step: the `StepContext`, with this step's masks and direction.
      batch: the whole batch, a pytree of arrays [N, ...].
      key: the step's PRNG key (the one group's key when `sharpness_m` is 1).

    Returns:
      `(grads, metrics, aux)`, as `group_gradient` returns them.
    """
    if step.config.sharpness_m == 1:
        return group_gradient(step, batch, key)
    return _over_groups(step, batch, key)


def _with_refreshed_mask(step: StepContext, state: SamGradientState, batch, key):
    """The step with the Fisher mask of this step (refreshed when due), and the mask's state."""
    mask_state = step.config.mask.update(
        state.mask_state,
        state.count,
        step.params,
        lambda p, b, k: _row_losses(step, p, b, k),
        batch,
        key,
        num_data_shards=step.config.num_data_shards,
    )
    # The SAM passes read the parameters through a data dependency on the
    # refreshed mask, so that nothing of theirs is live during the refresh
    # (see `fisher.after_refresh`).
    params = fisher.after_refresh(step.params, mask_state)
    return step._replace(params=params, coordinate_mask=mask_state.mask), mask_state


def _with_mask_and_direction(step: StepContext, state: SamGradientState, batch, key):
    """The step with this step's Fisher mask, ESAM's weight mask and δ-SAM's r, as configured.

    The coordinates perturbed are those of both masks.

    Returns:
      `(step, mask_state, mask_density)`. With ρ the constant 0 none is
      computed: the masks would perturb nothing and r would weigh nothing.
    """
    config, plain = step.config, is_plain(step.config.rho)
    if config.mask is None or plain:
        mask_state, density = state.mask_state, jnp.float32(1.0)
    else:
        step, mask_state = _with_refreshed_mask(step, state, batch, key)
        density = mask_state.density
    if _draws_weight_mask(config) and not plain:
        kept = efficient_sam.weight_mask(efficient_sam.key_of(key), step.params, config.esam.beta)
        if step.coordinate_mask is not None:
            kept = jax.tree.map(jnp.logical_and, step.coordinate_mask, kept)
        step, density = step._replace(coordinate_mask=kept), efficient_sam.density(kept)
    if config.reweight is not None and not plain:
        direction = perturbation.random_perturbation(reweight_key(key), step.params, step.rho)
        step = step._replace(direction=direction)
    return step, mask_state, density


def sam_gradient(
    loss_fn,
    params,
    batch,
    key,
    state: SamGradientState,
    config: SamConfig,
    *,
    has_aux: bool = False,
    present_of: Callable | None = None,
) -> SamGradient:
    """The SAM gradient of one step (Bahri, Mobahi & Tay 2022, Algorithm 1).

    For each group B_g of the m = `sharpness_m` groups (usually one, the batch):

    1. M = the ascent micro-batch, the first f·|B_g|/D examples of every one of
       the D data shards of B_g (f = `ascent_fraction`).
    2. g = ∇ Σ_{i∈M} p_i l_i(w), p_i = 1/|M| or the `reweight` rule's weights
       (δ-SAM, Zhou et al. 2022) from the losses of this same pass.
    3. ε = ρ · T ⊙ m ⊙ (T g) / ‖T g‖ (T = |w| + η for ASAM, Kwon et al. 2021,
       else 1; m the Fisher mask of FSAM, Zhong et al. 2022, else 1), float32.
    4. The descent gradient ∇ mean_{i∈B_g} l_i(w + ε) (unweighted).

    Two more options change steps 3 and 4:

    * `esam` (Du et al. 2022): ε is kept on a random fraction β of the
      coordinates and divided by β; the descent uses only the fraction γ of
      B_g's examples whose loss rose most under ε (see `sam_jax.esam`).
    * `surrogate_gap` (GSAM, Zhuang et al. 2022): the result of step 4 becomes
      ∇f_p − α ∇f_⊥, ∇f_⊥ the part of g orthogonal to it (see `sam_jax.gsam`).

    The groups' gradients are averaged. See the module docstring for how groups
    and dropout keys are assigned. With ρ the constant 0 every variant is the
    plain gradient, and only the descent pass at w runs (the cost of plain
    training); the Fisher mask is then not refreshed.

    Example::

      config = sam_jax.SamConfig(rho=0.05, ascent_fraction=0.25)
      state = sam_jax.sam_gradient_init(params, config)
      result = sam_jax.sam_gradient(loss_fn, params, batch, key, state, config)
      updates, opt_state = optax.adamw(1e-4).update(result.grads, opt_state, params)

    Args:
      loss_fn: `loss_fn(params, batch, key) -> losses`, or `(losses, aux)`:
        per-example losses [N], or [N, S] for rows that each hold up to S
        examples (a packed batch; mark the empty slots with `present_of`). The
        descent objective is the mean over all N (or N·S) entries.
      params: the weights w.
      batch: a pytree of arrays [N, ...].
      key: the step's PRNG key (dropout; δ-SAM's r), or None for a
        deterministic model without `reweight`.
      state: the `SamGradientState` of this step.
      config: the `SamConfig`.
      has_aux: whether `loss_fn` returns `(losses, aux)`.
      present_of: optional `present_of(batch) -> bool`, shaped like the
        losses: which entries are examples (a packed batch's empty slots are
        not). Absent entries get no ascent weight and do not count in the
        losses or the weights' spread of the metrics.

    Returns:
      A `SamGradient`: the descent gradient, the next state, metrics and aux.
    """
    _check_key(config, key)
    num_examples = batching.batch_size(batch)
    _check_batch(config, num_examples)
    rho = rho_at(config.rho, state.count)
    step = StepContext(config, loss_fn, has_aux, present_of, params, rho, None, None, num_examples)
    step, mask_state, density = _with_mask_and_direction(step, state, batch, key)
    grads, metrics, aux = _batch_gradient(step, batch, key)
    return SamGradient(
        grads=grads,
        state=SamGradientState(optax.safe_increment(state.count), mask_state),
        metrics=metrics._replace(mask_density=density),
        aux=aux,
    )

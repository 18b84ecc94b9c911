"""SamTrainer: T5X's `Trainer` with the SAM family in its train step.

The step follows Bahri, Mobahi & Tay (2022), "Sharpness-Aware Minimization
Improves Language Model Generalization", Algorithm 1, on T5X's own pieces:

1. the ascent micro-batch M is the first `ascent_fraction` of every data shard
   (`sam_jax.batching.ascent_slice` with the partitioner's data-mesh size), so
   it stays evenly sharded;
2. g = ∇ of the model's loss on M (T5X's `accumulate_grads_microbatched`), or,
   with δ-SAM, of Σ_i p_i l_i over M's examples with the `reweight` rule's
   weights p (`sam_jax.reweighting`), the l_i read from the gradient with
   respect to `decoder_loss_weights` and summed per packed segment;
3. ε from `sam_jax.perturbation.ascent_perturbation` (SAM, ASAM, FSAM's mask);
4. the descent gradient of the model's loss at w + ε on the whole batch, again
   through `accumulate_grads_microbatched` (so `num_microbatches` works as in
   T5X), applied to w by the run's optimizer via T5X's `apply_grads`.

With m-sharpness the batch is split into m groups, each taking the same share
of every data shard, and steps 1–4 run per group; their gradients are summed,
as T5X sums microbatch gradients.
"""

import cached_property
import clu.metrics
import jax
import jax.numpy as jnp
from t5x import metrics as t5x_metrics
from t5x import partitioning
from t5x import trainer as trainer_lib

from sam_jax import batching
from sam_jax import perturbation
from sam_jax import reweighting
from sam_jax import transform
from sam_jax.t5x import optimizer as optimizer_lib
from sam_jax.t5x import per_example

PER_TOKEN_LOSS = "loss_per_nonpadding_target_token"


def _scalar_metric(value) -> clu.metrics.Average:
    return clu.metrics.Average.from_model_output(jnp.asarray([value], jnp.float32))


class SamTrainer(trainer_lib.Trainer):
    """T5X trainer whose train step is a SAM step (Bahri et al. 2022).

    Works with any T5X optimizer (T5X's `Adafactor`, `OptaxWrapper`s,
    `MultiOptimizer`): SAM only changes the gradient the optimizer receives.
    FSAM's Fisher mask is enabled by wrapping the optimizer in
    `sam_jax.t5x.FisherMaskOptimizer`, which checkpoints the mask.

    Besides T5X's metrics (computed on the descent pass, i.e. at w + ε) each
    step logs ``sam/clean_loss`` and ``sam/perturbed_loss`` (per non-padding
    target token, on M at w and on the batch at w + ε), ``sam/grad_norm`` ‖g‖,
    ``sam/perturbation_norm`` ‖ε‖, ``sam/rho``, ``sam/weight_min``,
    ``sam/weight_max``, ``sam/weight_entropy`` (spread of the ascent weights)
    and ``sam/mask_density``.

    Example (gin, see `gin/t5x/sam.gin`)::

      train_script.train.trainer_cls = @sam_jax.t5x.SamTrainer
      sam_jax.t5x.SamTrainer:
        learning_rate_fn = @utils.create_learning_rate_scheduler()
        num_microbatches = None
        rho = 0.05
        ascent_fraction = 0.25

    Args:
      model: the T5X model; with δ-SAM or a Fisher mask its
        `loss_normalizing_factor` must be None or a number.
      train_state: the initial train state (models with flax mutable
        collections are not supported).
      partitioner: the partitioner; its data-mesh size shards the batch.
      eval_names: names of the evaluation datasets.
      summary_dir: where TensorBoard summaries go, or None.
      train_state_axes: partitioning of the train state.
      rng: base PRNG key, folded with the step for dropout.
      learning_rate_fn: the learning rate of a step.
      num_microbatches: gradient accumulation of the descent pass (and of the
        ascent pass, in as few microbatches as keep each no larger), or None.
      rho: radius ρ ≥ 0, a float or a schedule of the step (0.05 for T5 Small,
        0.15 for Base and larger in Bahri et al.).
      ascent_fraction: f in (0, 1], the ascent micro-batch's share of the batch
        (0.25 in Bahri et al.; 1 is classic SAM).
      sharpness_m: m ≥ 1 groups with their own perturbation (m-sharpness).
      reweight: `sam_jax.delta_sam(...)`, `sam_jax.delta_sam_draft(...)` or
        None for uniform weights. With packed batches every packed example is
        weighted on its own (and counted as one of the rule's examples).
      adaptive: ASAM's scale-adaptive perturbation.
      adaptive_eta: η > 0 of ASAM's T_w = |w| + η.
      weight_metrics_computer: T5X's optional weight metrics.
    """

    def __init__(
        self,
        model,
        train_state,
        partitioner,
        eval_names,
        summary_dir,
        train_state_axes,
        rng,
        learning_rate_fn,
        num_microbatches,
        rho: transform.ScalarOrSchedule = 0.05,
        ascent_fraction: float = 1.0,
        sharpness_m: int = 1,
        reweight: reweighting.InstanceReweighting | None = None,
        adaptive: bool = False,
        adaptive_eta: float = 0.01,
        weight_metrics_computer=None,
    ):
        transform.check_arguments(
            rho=rho,
            ascent_fraction=ascent_fraction,
            sharpness_m=sharpness_m,
            reweight=reweight,
            adaptive=adaptive,
            adaptive_eta=adaptive_eta,
        )
        if train_state.flax_mutables:
            raise ValueError("SamTrainer does not support models with flax mutable collections.")
        optimizer_def = model.optimizer_def
        self._mask = (
            optimizer_def.mask
            if isinstance(optimizer_def, optimizer_lib.FisherMaskOptimizer)
            else None
        )
        if reweight is not None or self._mask is not None:
            per_example.check_linear_in_weights(model)
        self._rho = rho
        self._ascent_fraction = ascent_fraction
        self._sharpness_m = sharpness_m
        self._reweight = reweight
        self._adaptive_eta = adaptive_eta if adaptive else None
        super().__init__(
            model=model,
            train_state=train_state,
            partitioner=partitioner,
            eval_names=eval_names,
            summary_dir=summary_dir,
            train_state_axes=train_state_axes,
            rng=rng,
            learning_rate_fn=learning_rate_fn,
            num_microbatches=num_microbatches,
            weight_metrics_computer=weight_metrics_computer,
        )

    @cached_property.cached_property
    def _partitioned_train_step(self) -> trainer_lib.PartitionedTrainCallable:
        """T5X's partitioned train step with the SAM gradient in place of the plain one."""

        def train_step(train_state, batch):
            step = train_state.step
            dropout_rng = self._get_step_rng(step)
            if self._mask is None:
                coordinate_mask, density = None, jnp.float32(1.0)
            else:
                mask_state, fisher_step = optimizer_lib.fisher_mask_state(train_state, self._mask)
                mask_state = self._mask.update(
                    mask_state,
                    fisher_step,
                    train_state.params,
                    self._row_losses,
                    batch,
                    dropout_rng,
                )
                coordinate_mask, density = mask_state.mask, mask_state.density
            grads, metrics = self._sam_gradient(
                train_state, batch, dropout_rng, coordinate_mask, density
            )
            new_train_state, metrics = trainer_lib.apply_grads(
                train_state,
                grads,
                metrics,
                self._learning_rate_fn(step),
                self._weight_metrics_computer,
            )
            if self._mask is not None:
                new_train_state = optimizer_lib.replace_fisher_mask_state(
                    new_train_state, mask_state, fisher_step + 1
                )
            return new_train_state, metrics

        return self._partitioner.partition(
            train_step,
            in_axis_resources=(self._train_state_axes, self._partitioner.data_partition_spec),
            out_axis_resources=(self._train_state_axes, None),
            donate_argnums=(0,),
        )

    def _row_losses(self, params, batch, dropout_rng):
        """Per-row losses for the Fisher mask's estimators."""
        return per_example.row_losses(self._model, params, batch, dropout_rng)

    def _constrain(self, batch):
        """Annotates a slice of the batch with the batch's data sharding."""
        spec = self._partitioner.data_partition_spec
        return jax.tree.map(lambda x: partitioning.with_sharding_constraint(x, spec), batch)

    def _sam_gradient(self, train_state, batch, dropout_rng, coordinate_mask, density):
        """The descent gradient (summed over the m groups) and the step's metrics."""
        shards = self._partitioner.data_mesh_size
        step_rho = transform.rho_at(self._rho, train_state.step)
        m = self._sharpness_m

        def group_gradient(group, index):
            return self._group_gradient(
                train_state,
                self._constrain(group),
                batching.microbatch_key(dropout_rng, index, m),
                shards,
                step_rho,
                coordinate_mask,
                density,
            )

        if m == 1:
            return group_gradient(batch, 0)
        groups = batching.microbatches(batch, m, shards)
        first_group = jax.tree.map(lambda x: x[0], groups)
        metric_shapes = jax.eval_shape(lambda: group_gradient(first_group, 0)[1])
        initial = (
            jax.tree.map(lambda w: jnp.zeros(w.shape, jnp.float32), train_state.params),
            {k: t5x_metrics.shape_obj_to_defined_obj(v) for k, v in metric_shapes.items()},
        )

        def accumulate(carry, indexed):
            grad_sum, metrics = carry
            index, group = indexed
            grads, group_metrics = group_gradient(group, index)
            metrics = jax.lax.cond(
                index == 0,
                lambda: group_metrics,
                lambda: trainer_lib.merge_metrics(metrics, group_metrics),
            )
            return (jax.tree.map(jnp.add, grad_sum, grads), metrics), None

        (grads, metrics), _ = jax.lax.scan(accumulate, initial, (jnp.arange(m), groups))
        return grads, metrics

    def _group_gradient(self, train_state, group, key, shards, step_rho, coordinate_mask, density):
        """Ascent on the group's micro-batch, ε, and the descent gradient at w + ε."""
        params = train_state.params
        rows = batching.batch_size(group)
        size = batching.ascent_size(rows, self._ascent_fraction, shards)
        ascent_batch = self._constrain(batching.ascent_slice(group, size, shards))
        count = batching.ascent_microbatch_count(
            size, rows // (self._num_microbatches or 1), shards
        )
        if self._reweight is None:
            ascent_grads, ascent_metrics, _ = trainer_lib.accumulate_grads_microbatched(
                self._model,
                train_state,
                ascent_batch,
                key,
                count,
                self._partitioner.data_partition_spec,
            )
            clean_loss = ascent_metrics[PER_TOKEN_LOSS]
            spread = reweighting.statistics(reweighting.uniform(size))
        else:
            ascent_grads, clean_loss, spread = self._reweighted_ascent(
                params, ascent_batch, key, count, shards, step_rho
            )
        eps = perturbation.ascent_perturbation(
            ascent_grads,
            params,
            step_rho,
            mask=coordinate_mask,
            adaptive_eta=self._adaptive_eta,
        )
        adversarial_state = train_state.replace_params(perturbation.perturbed(params, eps.epsilon))
        grads, metrics, _ = trainer_lib.accumulate_grads_microbatched(
            self._model,
            adversarial_state,
            group,
            key,
            self._num_microbatches,
            self._partitioner.data_partition_spec,
        )
        metrics.update(
            {
                "sam/clean_loss": clean_loss,
                "sam/perturbed_loss": metrics[PER_TOKEN_LOSS],
                "sam/grad_norm": _scalar_metric(eps.grad_norm),
                "sam/perturbation_norm": _scalar_metric(eps.norm),
                "sam/rho": _scalar_metric(step_rho),
                "sam/weight_min": _scalar_metric(spread.min),
                "sam/weight_max": _scalar_metric(spread.max),
                "sam/weight_entropy": _scalar_metric(spread.entropy),
                "sam/mask_density": _scalar_metric(density),
            }
        )
        return grads, metrics

    def _reweighted_ascent(self, params, ascent_batch, key, count, shards, step_rho):
        """g = ∇ Σ_i p_i l_i(w) over M's examples, with the `reweight` rule's p.

        `sam_jax.transform.reweighted_ascent_gradient` on the model's
        per-example losses; the rule's extra forward passes use the ascent
        pass's dropout key(s), so its finite differences see the same dropout
        masks. In a packed batch the examples are the segments; the empty
        segment slots are marked absent, so they get no weight and do not count
        as examples in the rule or the weights' statistics.
        """

        def piece_losses(p, piece, index):
            piece_key = batching.microbatch_key(key, index, count)
            return per_example.example_losses(self._model, p, piece, piece_key)

        packed = per_example.SEGMENT_IDS in ascent_batch
        grads, clean_losses, weights, present = transform.reweighted_ascent_gradient(
            piece_losses,
            params,
            ascent_batch,
            reweight=self._reweight,
            noise_key=transform.reweight_key(key),
            rho=step_rho,
            count=count,
            num_data_shards=shards,
            present_of=per_example.present_examples if packed else None,
        )
        spread = reweighting.statistics(weights, present)
        tokens = jnp.sum(per_example.example_token_counts(ascent_batch))
        clean_loss = clu.metrics.Average(total=jnp.sum(clean_losses), count=tokens)
        return grads, clean_loss, spread

"""SamTrainer: T5X's `Trainer` with the SAM family in its train step.

The step is `sam_jax.sam_gradient` (Bahri, Mobahi & Tay 2022, Algorithm 1),
the same function as `sam_jax.sam`'s, on the per-example losses of the
model's own `loss_fn` (`sam_jax.t5x.per_example`):

1. the ascent micro-batch M is the first `ascent_fraction` of every data shard
   (the partitioner's data-mesh size), so it stays evenly sharded;
2. g = ∇ Σ_i p_i l_i over M's examples (every packed segment is an example),
   p uniform or the `reweight` rule's weights;
3. ε from `sam_jax.perturbation.ascent_perturbation` (SAM, ASAM, FSAM's mask);
4. the descent gradient of the model's loss at w + ε on the whole batch, in
   `num_microbatches` microbatches, applied to w by the run's optimizer via
   T5X's `apply_grads`.

With m-sharpness the batch is split into m groups, each taking the same share
of every data shard, and steps 1–4 run per group. The gradient handed to the
optimizer is that of T5X's summed loss L = Σ_i l_i, as T5X's own step's.
"""

import dataclasses

import cached_property
import clu.metrics
import gin
import jax
import jax.numpy as jnp
from t5x import trainer as trainer_lib

from sam_jax import batching
from sam_jax import core
from sam_jax import reweighting
from sam_jax.t5x import optimizer as optimizer_lib
from sam_jax.t5x import per_example


def _scalar_metric(value) -> clu.metrics.Average:
    return clu.metrics.Average.from_model_output(jnp.asarray([value], jnp.float32))


def _merge_pieces(metrics, num_stacked_axes: int):
    """Merges T5X metrics stacked over groups and microbatches into one of each."""
    if num_stacked_axes == 0:
        return metrics
    flat = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[num_stacked_axes:]), metrics)
    count = jax.tree.leaves(flat)[0].shape[0]
    merged = jax.tree.map(lambda x: x[0], flat)
    for index in range(1, count):
        piece = jax.tree.map(lambda x, i=index: x[i], flat)
        merged = trainer_lib.merge_metrics(merged, piece)
    return merged


# T5X's Trainer arguments that T5X's gin files bind on `trainer.Trainer`; a
# binding there does not reach a subclass, so SamTrainer carries it over.
CARRIED_OVER = ("learning_rate_fn", "num_microbatches", "weight_metrics_computer")


def _gin_bindings(configurable, resolve_references: bool) -> dict:
    try:
        return gin.get_bindings(configurable, resolve_references=resolve_references)
    except ValueError:  # not registered with gin: nothing bound
        return {}


def carried_over(sam_trainer_cls, arguments: dict) -> dict:
    """`CARRIED_OVER` arguments: SamTrainer's own, else those gin binds on T5X's `Trainer`.

    Args:
      sam_trainer_cls: the SamTrainer class (its own gin bindings are compared).
      arguments: the `CARRIED_OVER` arguments SamTrainer received (None: unset).

    Raises:
      ValueError: both `trainer.Trainer` and `SamTrainer` bind one of them to
        different values, or no learning rate is bound anywhere.
    """
    theirs = _gin_bindings(trainer_lib.Trainer, resolve_references=False)
    ours = _gin_bindings(sam_trainer_cls, resolve_references=False)
    for name in CARRIED_OVER:
        if name in theirs and name in ours and repr(theirs[name]) != repr(ours[name]):
            raise ValueError(
                f"trainer.Trainer.{name} = {theirs[name]!r} and sam_jax.t5x.SamTrainer."
                f"{name} = {ours[name]!r} are both bound: bind one (SamTrainer takes "
                f"trainer.Trainer's {name} when its own is not bound)."
            )
    missing = [name for name in CARRIED_OVER if arguments[name] is None and name in theirs]
    resolved = _gin_bindings(trainer_lib.Trainer, resolve_references=True) if missing else {}
    values = {name: resolved.get(name, arguments[name]) for name in CARRIED_OVER}
    if values["learning_rate_fn"] is None:
        raise ValueError(
            "SamTrainer needs a learning rate: bind trainer.Trainer.learning_rate_fn (T5X's "
            "runs/finetune.gin does) or sam_jax.t5x.SamTrainer.learning_rate_fn."
        )
    return values


def check_fisher_mask_optimizer(model) -> None:
    """Rejects a model whose optimizer is not a `FisherMaskOptimizer` (FSAM would be SAM)."""
    if isinstance(model.optimizer_def, optimizer_lib.FisherMaskOptimizer):
        return
    name = type(model).__name__
    raise ValueError(
        f"FSAM needs the model's optimizer wrapped in sam_jax.t5x.FisherMaskOptimizer, but "
        f"this {name}'s optimizer_def is {type(model.optimizer_def).__name__}: fsam.gin wraps "
        "models.EncoderDecoderModel's and models.DecoderOnlyModel's; for this model class "
        f"bind {name}.optimizer_def = @sam_jax.t5x.FisherMaskOptimizer() too."
    )


class SamTrainer(trainer_lib.Trainer):
    """T5X trainer whose train step is a SAM step (Bahri et al. 2022).

    Works with any T5X optimizer (T5X's `Adafactor`, `OptaxWrapper`s,
    `MultiOptimizer`): SAM only changes the gradient the optimizer receives.
    FSAM's Fisher mask is enabled by wrapping the optimizer in
    `sam_jax.t5x.FisherMaskOptimizer`, which checkpoints the mask.

    Besides T5X's metrics (computed on the descent pass, i.e. at w + ε) each
    step logs the `sam_jax.SamMetrics` of the step, the same for every variant:
    ``sam/clean_loss`` and ``sam/perturbed_loss`` (mean example loss, an
    example's loss being its summed token loss, on M at w and on the batch at
    w + ε), ``sam/grad_norm`` ‖g‖ of the ascent gradient of the (weighted) mean
    example loss, ``sam/perturbation_norm`` ‖ε‖, ``sam/rho``,
    ``sam/weight_min``, ``sam/weight_max``, ``sam/weight_entropy`` (the ascent
    weights over M's examples; a packed segment is an example) and
    ``sam/mask_density``.

    Example (gin, see `gin/t5x/sam.gin`)::

      train_script.train.trainer_cls = @sam_jax.t5x.SamTrainer
      sam_jax.t5x.SamTrainer:
        learning_rate_fn = @utils.create_learning_rate_scheduler()
        num_microbatches = None
        rho = 0.05
        ascent_fraction = 0.25

    Args:
      model: the T5X model; its `loss_normalizing_factor` must be None or a
        number (per-example losses are read through the loss weights).
      train_state: the initial train state (models with flax mutable
        collections are not supported).
      partitioner: the partitioner; its data-mesh size shards the batch.
      eval_names: names of the evaluation datasets.
      summary_dir: where TensorBoard summaries go, or None.
      train_state_axes: partitioning of the train state.
      rng: base PRNG key, folded with the step for dropout.
      learning_rate_fn: the learning rate of a step; None takes gin's binding
        of `trainer.Trainer.learning_rate_fn` (T5X's runs/finetune.gin binds it).
      num_microbatches: gradient accumulation of the descent pass (and of the
        ascent pass, in as few microbatches as keep each no larger); None takes
        gin's binding of `trainer.Trainer.num_microbatches`, else 1.
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
      weight_metrics_computer: T5X's optional weight metrics; None takes gin's
        binding of `trainer.Trainer.weight_metrics_computer`. Binding any of
        these three on both `trainer.Trainer` and `SamTrainer`, differently,
        is an error.
      parallel_groups: m-sharpness groups computed at once (None: all).
      fisher_mask_required: the run asked for FSAM (`gin/t5x/fsam.gin` sets
        it): an error unless the model's optimizer is a `FisherMaskOptimizer`,
        rather than silently plain SAM.
      surrogate_gap: `sam_jax.gsam(alpha)` for GSAM's descent direction, or None.
      esam: `sam_jax.esam(beta, gamma)` for ESAM, or None (γ < 1 selects packed
        rows, by the summed loss rise of their examples).
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
        learning_rate_fn=None,
        num_microbatches=None,
        rho: core.ScalarOrSchedule = 0.05,
        ascent_fraction: float = 1.0,
        sharpness_m: int = 1,
        reweight: reweighting.InstanceReweighting | None = None,
        adaptive: bool = False,
        adaptive_eta: float = 0.01,
        weight_metrics_computer=None,
        parallel_groups: int | None = None,
        fisher_mask_required: bool = False,
        surrogate_gap=None,
        esam=None,
    ):
        if train_state.flax_mutables:
            raise ValueError("SamTrainer does not support models with flax mutable collections.")
        inherited = carried_over(
            type(self),
            {
                "learning_rate_fn": learning_rate_fn,
                "num_microbatches": num_microbatches,
                "weight_metrics_computer": weight_metrics_computer,
            },
        )
        num_microbatches = inherited["num_microbatches"]
        optimizer_def = model.optimizer_def
        if fisher_mask_required:
            check_fisher_mask_optimizer(model)
        self._mask = (
            optimizer_def.mask
            if isinstance(optimizer_def, optimizer_lib.FisherMaskOptimizer)
            else None
        )
        self._config = core.SamConfig(
            rho=rho,
            ascent_fraction=ascent_fraction,
            sharpness_m=sharpness_m,
            reweight=reweight,
            mask=self._mask,
            adaptive=adaptive,
            adaptive_eta=adaptive_eta,
            num_data_shards=partitioner.data_mesh_size,
            num_microbatches=num_microbatches or 1,
            parallel_groups=parallel_groups,
            surrogate_gap=surrogate_gap,
            esam=esam,
        )
        per_example.check_linear_in_weights(model)
        super().__init__(
            model=model,
            train_state=train_state,
            partitioner=partitioner,
            eval_names=eval_names,
            summary_dir=summary_dir,
            train_state_axes=train_state_axes,
            rng=rng,
            **inherited,
        )

    @cached_property.cached_property
    def _partitioned_train_step(self) -> trainer_lib.PartitionedTrainCallable:
        """T5X's partitioned train step with the SAM gradient in place of the plain one."""

        def train_step(train_state, batch):
            step = train_state.step
            grads, metrics, sam_state = self._sam_gradient(train_state, batch)
            new_train_state, metrics = trainer_lib.apply_grads(
                train_state,
                grads,
                metrics,
                self._learning_rate_fn(step),
                self._weight_metrics_computer,
            )
            if self._mask is not None:
                new_train_state = optimizer_lib.replace_fisher_mask_state(
                    new_train_state, sam_state.mask_state, sam_state.count
                )
            return new_train_state, metrics

        return self._partitioner.partition(
            train_step,
            in_axis_resources=(self._train_state_axes, self._partitioner.data_partition_spec),
            out_axis_resources=(self._train_state_axes, None),
            donate_argnums=(0,),
        )

    def _sam_gradient(self, train_state, batch):
        """`sam_jax.sam_gradient` of T5X's summed loss, T5X's and SAM's metrics, the next state.

        ρ follows the train step; the mask's refreshes follow its own step
        count, kept with it in the optimizer state.
        """
        step = train_state.step
        config = dataclasses.replace(self._config, rho=core.rho_at(self._config.rho, step))
        if self._mask is None:
            state = core.SamGradientState(jnp.zeros((), jnp.int32), None)
        else:
            mask_state, fisher_step = optimizer_lib.fisher_mask_state(train_state, self._mask)
            state = core.SamGradientState(fisher_step, mask_state)

        reweight = self._config.reweight
        forward_mode = reweight is not None and reweight.probe == "forward_mode"

        def loss_fn(params, piece, key):
            if not forward_mode:
                return per_example.example_losses(self._model, params, piece, key)
            with per_example.forward_differentiable_cross_entropy():
                return per_example.example_losses(self._model, params, piece, key)

        packed = per_example.SEGMENT_IDS in batch
        result = core.sam_gradient(
            loss_fn,
            train_state.params,
            batch,
            self._get_step_rng(step),
            state,
            config,
            has_aux=True,
            present_of=per_example.present_examples if packed else None,
        )
        # sam_gradient averages over the N rows (N·S slots of packed rows);
        # T5X's optimizers expect the gradient of the sum.
        entries = batching.batch_size(batch) * (
            batch[per_example.SEGMENT_IDS].shape[-1] if packed else 1
        )
        grads = jax.tree.map(lambda g: g * entries, result.grads)
        stacked_axes = (config.sharpness_m > 1) + (config.num_microbatches > 1)
        metrics = dict(_merge_pieces(result.aux, stacked_axes))
        for field, value in result.metrics._asdict().items():
            metrics[f"sam/{field}"] = _scalar_metric(value)
        return grads, metrics, result.state

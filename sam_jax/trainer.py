"""Training and evaluation steps of a task model, as pure functions (T5X style).

A `Trainer` binds a task model (`sam_jax.models.task_models`: a T5 encoder-decoder
or a BERT-family classifier) to an optimizer: a plain Optax optimizer (AdamW,
Adafactor, …) or one wrapped by a SAM transform (`sam_jax.sam`,
`sam_jax.per_instance_sam`), which computes its own gradients. Its
`train_step(state, batch, key)` and `eval_step(params, batch)` are pure
functions of arrays, ready for `jax.jit` or `Partitioner.partition`; the
training loop, data, checkpoints and gin live in `sam_jax.train`.

Example::

  model = task_models.EncoderDecoderModel(t5.t5_1_1_config("tiny", vocab_size=1280))
  trainer = Trainer(
      model,
      optimizer=optax.adamw,
      learning_rate=1e-3,
      sam=functools.partial(sam_jax.sam, rho=0.05, ascent_fraction=0.25),
  )
  state = trainer.init_state(jax.random.key(0))
  step = jax.jit(trainer.train_step, donate_argnums=0)
  state, metrics = step(state, batch, jax.random.key(1))  # metrics["loss"], ...
"""

import inspect
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from sam_jax import batching
from sam_jax import data
from sam_jax import loss_update
from sam_jax.models import task_models

Batch = Mapping[str, jax.Array]
LearningRate = float | optax.Schedule
# A SAM transform factory: `sam(descent_optimizer, **kwargs) -> GradientTransformationExtraArgs`.
SamFactory = Callable[..., optax.GradientTransformationExtraArgs]


class TrainState(NamedTuple):
    """Everything a training run checkpoints.

    Attributes:
      step: int32 scalar, the number of optimizer steps taken so far (so also the
        index of the next step; its dropout key is `fold_in(key, step)`).
      params: the model parameters, float32, unboxed (no logical-axis boxes).
      opt_state: the optimizer state; a `sam_jax.SamState` when a SAM transform
        wraps the optimizer (its `metrics` are the last step's `SamMetrics`).
    """

    step: jax.Array
    params: Any
    opt_state: Any


def rsqrt_schedule(
    base_learning_rate: float = 1.0, warmup_steps: int = 10_000, linear_warmup_steps: int = 0
) -> optax.Schedule:
    """T5X's `constant * rsqrt_decay` schedule, optionally with a linear ramp.

    lr(step) = base / sqrt(max(step, warmup_steps)) · min(1, step / linear_warmup_steps):
    constant at base / sqrt(warmup_steps) for the first `warmup_steps` steps, then
    decaying as 1 / sqrt(step). T5X pre-trains with base 1.0 and 10k warmup steps
    (lr 0.01, then decay).

    Example::

      schedule = rsqrt_schedule(1.0, warmup_steps=10_000)  # schedule(0) == 0.01

    Args:
      base_learning_rate: the constant factor.
      warmup_steps: steps at a constant rate before the 1/sqrt decay starts.
      linear_warmup_steps: if > 0, the rate also ramps linearly from 0 over these steps.

    Returns:
      An `optax.Schedule`.
    """
    if warmup_steps < 1:
        raise ValueError(f"warmup_steps must be ≥ 1, got {warmup_steps!r}.")

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        rate = base_learning_rate * jax.lax.rsqrt(jnp.maximum(step, warmup_steps))
        if linear_warmup_steps > 0:
            rate = rate * jnp.minimum(1.0, (step + 1.0) / linear_warmup_steps)
        return rate

    return schedule


def warmup_linear_decay_schedule(
    learning_rate: float, train_steps: int, warmup_fraction: float = 0.1
) -> optax.Schedule:
    """BERT's schedule: a linear ramp from 0 over the first steps, then linear decay to 0.

    The fine-tuning schedule of Devlin et al. (2019) and of FSAM's Table 10
    ("warmup ratio 10 %"), as Hugging Face's `get_linear_schedule_with_warmup`:
    lr(t) = peak · t / w for t < w, then peak · (T − t) / (T − w), w =
    round(warmup_fraction · T).

    Example::

      schedule = warmup_linear_decay_schedule(2e-5, train_steps=1000)  # peak at step 100

    Args:
      learning_rate: the peak rate.
      train_steps: T, the run's steps (the rate is 0 at T).
      warmup_fraction: the ramp's share of the steps, in [0, 1).
    """
    if not 0 <= warmup_fraction < 1 or train_steps < 1:
        raise ValueError(
            f"need 0 ≤ warmup_fraction < 1 and train_steps ≥ 1, got {warmup_fraction!r} and "
            f"{train_steps!r}."
        )
    warmup = round(warmup_fraction * train_steps)
    return optax.join_schedules(
        [
            optax.linear_schedule(0.0, learning_rate, max(warmup, 1)),
            optax.linear_schedule(learning_rate, 0.0, train_steps - warmup),
        ],
        [warmup],
    )


def learning_rate_at(learning_rate: LearningRate, step: jax.Array) -> jax.Array:
    """The learning rate of step `step`, a float32 scalar."""
    value = learning_rate(step) if callable(learning_rate) else learning_rate
    return jnp.asarray(value, jnp.float32)


def make_optimizer(
    optimizer: Callable[..., optax.GradientTransformation],
    learning_rate: LearningRate,
    sam: SamFactory | None = None,
    *,
    num_microbatches: int = 1,
    num_data_shards: int = 1,
) -> optax.GradientTransformation:
    """The descent optimizer, wrapped by a SAM transform if one is given.

    Args:
      optimizer: an Optax optimizer factory called as `optimizer(learning_rate=...)`,
        e.g. `optax.adafactor` or `functools.partial(optax.adamw, weight_decay=0.01)`.
      learning_rate: a float or an Optax schedule.
      sam: None for the plain optimizer, or a SAM factory called as
        `sam(descent_optimizer, **kwargs)`; it receives `num_microbatches` and
        `num_data_shards` if its signature has them.
      num_microbatches: gradient accumulation steps.
      num_data_shards: shards of the example axis (the mesh's data axis).

    Returns:
      The optimizer; a `GradientTransformationExtraArgs` that computes its own
      gradients when `sam` is given.

    Raises:
      ValueError: if `num_microbatches` > 1 and the SAM factory cannot accumulate.
    """
    descent = optimizer(learning_rate=learning_rate)
    if sam is None:
        return descent
    accepted = inspect.signature(sam).parameters
    kwargs = {}
    if "num_data_shards" in accepted:
        kwargs["num_data_shards"] = num_data_shards
    if "num_microbatches" in accepted:
        kwargs["num_microbatches"] = num_microbatches
    elif num_microbatches > 1:
        name = getattr(sam, "__name__", repr(sam))
        raise ValueError(
            f"{name} does not accumulate gradients over microbatches: set num_microbatches=1 "
            f"(got {num_microbatches})."
        )
    return sam(descent, **kwargs)


def logical_names_matching_rank(tree):
    """Unboxes logical-axis boxes whose value does not have one name per dimension.

    Optax states built from boxed parameters keep the parameter's box around
    every per-parameter leaf, including reduced ones such as Adafactor's
    factored row and column statistics; those are left unboxed (replicated).
    """

    def fix(leaf):
        if isinstance(leaf, nn.Partitioned):
            if getattr(leaf.value, "ndim", None) == len(leaf.names):
                return leaf
            return leaf.value
        return leaf

    return jax.tree.map(fix, tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


class Trainer:
    """A task model and its optimizer: pure init, train and eval steps.

    Attributes:
      model: the task model (`task_models.EncoderDecoderModel` or
        `task_models.EncoderClassifierModel`).
      optimizer: the Optax optimizer (SAM-wrapped or plain).
      learning_rate: the descent learning rate (float or schedule), for logging.
      uses_sam: whether `optimizer` is a SAM transform (computes its own gradients).
      num_microbatches: gradient accumulation steps.
      num_data_shards: shards of the example axis.
    """

    def __init__(
        self,
        model: task_models.TaskModel,
        optimizer: Callable[..., optax.GradientTransformation] = optax.adafactor,
        learning_rate: LearningRate = 1e-3,
        sam: SamFactory | None = None,
        *,
        num_microbatches: int = 1,
        num_data_shards: int = 1,
    ):
        """Builds the optimizer (see `make_optimizer` for the arguments)."""
        if not isinstance(num_microbatches, int) or num_microbatches < 1:
            raise ValueError(f"num_microbatches must be an integer ≥ 1, got {num_microbatches!r}.")
        self.model = model
        self.learning_rate = learning_rate
        self.uses_sam = sam is not None
        self.num_microbatches = num_microbatches
        self.num_data_shards = num_data_shards
        self.optimizer = make_optimizer(
            optimizer,
            learning_rate,
            sam,
            num_microbatches=num_microbatches,
            num_data_shards=num_data_shards,
        )

    # ---------------------------------------------------------------- model --

    def loss_fn(self, params, batch: Batch, key: jax.Array | None) -> jax.Array:
        """Per-example losses [N] of the model (see its `loss`); dropout on when `key` is given."""
        return self.model.loss(params, batch, key)

    def init_params(self, rng: jax.Array):
        """The model's parameters, boxed with their logical axis names."""
        return self.model.init_params(rng)

    def init_state(self, rng: jax.Array) -> TrainState:
        """A fresh `TrainState` at step 0 (unboxed float32 parameters)."""
        return self.state_from_params(nn.meta.unbox(self.init_params(rng)))

    def state_from_params(self, params) -> TrainState:
        """The `TrainState` at step 0 that starts from `params` (e.g. a pre-trained model's)."""
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=self.optimizer.init(params),
        )

    def logical_state(self) -> TrainState:
        """The abstract `TrainState` with logical axis names on its leaves.

        Parameters and every optimizer-state leaf shaped like its parameter carry
        the parameter's names; everything else (counts, factored statistics,
        metrics) is unboxed, i.e. replicated. Pass it to `Partitioner.shardings`.
        """

        def init():
            params = self.init_params(jax.random.key(0))
            return TrainState(
                step=jnp.zeros((), jnp.int32),
                params=params,
                opt_state=self.optimizer.init(params),
            )

        return logical_names_matching_rank(jax.eval_shape(init))

    # ---------------------------------------------------------------- steps --

    def gradients(self, params, batch: Batch, key: jax.Array):
        """(mean loss, gradient of the mean loss), accumulated over the microbatches."""

        def microbatch_gradient(microbatch, index):
            microbatch_key = batching.piece_key(key, index, self.num_microbatches)

            def mean_loss(p):
                return jnp.mean(self.loss_fn(p, microbatch, microbatch_key))

            return jax.value_and_grad(mean_loss)(params)

        loss_sum, grad_sum = batching.sum_over_microbatches(
            microbatch_gradient, batch, self.num_microbatches, self.num_data_shards
        )
        scale = 1.0 / self.num_microbatches
        return loss_sum * scale, jax.tree.map(lambda g: g * scale, grad_sum)

    def train_step(
        self, state: TrainState, batch: Batch, key: jax.Array
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimizer step; pure, so a restored state continues bit for bit.

        Args:
          state: the current `TrainState`.
          batch: the model's features (its feature converter's), arrays [N, ...];
            other features are ignored.
          key: the run's dropout key; step s uses `fold_in(key, s)`.

        Returns:
          The new state and float32 scalar metrics: `loss` (the clean training loss:
          the batch mean, or with SAM the mean over the ascent micro-batch), `lr`,
          and `grad_norm` (plain) or every `SamMetrics` field as `sam/<field>`.
        """
        step_key = jax.random.fold_in(key, state.step)
        batch = {name: value for name, value in batch.items() if name in self.model.features}
        metrics = {"lr": learning_rate_at(self.learning_rate, state.step)}
        if self.uses_sam:
            step = loss_update.update_from_loss(
                self.optimizer, state.opt_state, state.params, self.loss_fn, batch, step_key
            )
            updates, opt_state, sam_metrics = step.updates, step.opt_state, step.metrics
            metrics["loss"] = sam_metrics.clean_loss
            for field, value in sam_metrics._asdict().items():
                metrics[f"sam/{field}"] = jnp.asarray(value, jnp.float32)
        else:
            loss, grads = self.gradients(state.params, batch, step_key)
            updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
            metrics["loss"] = jnp.asarray(loss, jnp.float32)
            metrics["grad_norm"] = optax.tree.norm(grads).astype(jnp.float32)
        params = optax.apply_updates(state.params, updates)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    def eval_step(self, params, batch: Batch) -> dict[str, jax.Array]:
        """Sums for the eval loss over a batch (no dropout; padding rows ignored).

        Args:
          params: the parameters.
          batch: the model's features and `data.EXAMPLE_MASK` (0 on rows that pad the batch).

        Returns:
          `loss_sum` (sum of per-example losses) and `examples` (non-empty rows);
          the eval loss is their ratio, summed over batches first.
        """
        losses = self.loss_fn(params, batch, None)
        real = batch[data.EXAMPLE_MASK] > 0
        return {
            "loss_sum": jnp.sum(jnp.where(real, losses, 0.0)),
            "examples": jnp.sum(real).astype(jnp.float32),
        }

"""Evaluation of a task model on seqio tasks: eval loss and seqio metrics of its predictions."""

import functools
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from sam_jax import data
from sam_jax import partitioning
from sam_jax import trainer as trainer_lib
from sam_jax.models import task_models


def evaluate(
    eval_tasks: Sequence[data.EvalTask],
    params,
    *,
    model: task_models.TaskModel,
    partitioner: partitioning.Partitioner,
    eval_step: Callable,
    predict: Callable,
) -> dict[str, float]:
    """Eval loss and seqio metrics of every task on the model's predictions.

    Args:
      eval_tasks: the evaluation sets (`data.eval_tasks`).
      params: the parameters, sharded as `eval_step` and `predict` take them.
      model: the task model (its features, and how its outputs become predictions).
      partitioner: the mesh (each process feeds its rows of every batch).
      eval_step: `Trainer.eval_step`, partitioned.
      predict: `model.predict` at the run's sequence lengths, partitioned:
        `predict(params, global_batch) -> outputs`, one row per example.

    Returns:
      {'<task>/<metric>': value, '<task>/loss': mean per-example loss}.
    """
    results = {}
    indices = partitioner.data_layout.local_indices
    features = (*model.features, data.EXAMPLE_MASK)
    for task in eval_tasks:
        loss_sum = examples = 0.0
        outputs = []
        for batch in task.batches:
            local = {
                name: value[indices(len(value))]
                for name, value in batch.items()
                if name in features
            }
            global_batch = partitioner.global_batch(local)
            sums = jax.device_get(eval_step(params, global_batch))
            loss_sum += float(sums["loss_sum"])
            examples += float(sums["examples"])
            outputs.append(
                multihost_utils.process_allgather(predict(params, global_batch), tiled=True)
            )
        real = np.concatenate(outputs)[: len(task.targets)]
        predictions = model.metric_predictions(real, task.task)
        for metric_fn in task.task.predict_metric_fns:
            for name, value in metric_fn(task.targets, predictions).items():
                results[f"{task.name}/{name}"] = float(value)
        results[f"{task.name}/loss"] = loss_sum / max(examples, 1.0)
    return results


def make_evaluator(
    trainer: trainer_lib.Trainer,
    partitioner: partitioning.Partitioner,
    param_shardings,
    eval_tasks: Sequence[data.EvalTask],
    sequence_length: Mapping[str, int],
) -> Callable[[Any], dict[str, float]]:
    """`evaluate(params)` of a run: `evaluate` with the trainer's steps partitioned.

    Example::

      evaluate = make_evaluator(setup.trainer, setup.partitioner,
                                setup.state_shardings.params, eval_tasks, {"inputs": 64})
      results = evaluate(state.params)  # {'local_sst2/accuracy': ..., 'local_sst2/loss': ...}
    """
    model = trainer.model
    eval_step = partitioner.partition(
        trainer.eval_step,
        in_shardings=(param_shardings, partitioner.data_sharding()),
        out_shardings=partitioner.replicated(),
    )
    predict = partitioner.partition(
        lambda params, batch: model.predict(params, batch, sequence_length),
        in_shardings=(param_shardings, partitioner.data_sharding()),
        out_shardings=partitioner.data_sharding(),
    )
    return functools.partial(
        evaluate,
        eval_tasks,
        model=model,
        partitioner=partitioner,
        eval_step=eval_step,
        predict=predict,
    )

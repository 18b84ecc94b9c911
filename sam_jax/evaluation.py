"""Evaluation of a T5 model on seqio tasks: eval loss and seqio metrics of greedy predictions."""

from collections.abc import Callable
from collections.abc import Sequence

import jax
from jax.experimental import multihost_utils

from sam_jax import data
from sam_jax import decoding
from sam_jax import partitioning


def evaluate(
    eval_tasks: Sequence[data.EvalTask],
    params,
    *,
    partitioner: partitioning.Partitioner,
    eval_step: Callable,
    decode: Callable,
) -> dict[str, float]:
    """Eval loss and seqio metrics of every task on its greedy predictions.

    Returns:
      {'<task>/<metric>': value, '<task>/loss': mean per-example loss}.
    """
    results = {}
    indices = partitioner.data_layout.local_indices
    for task in eval_tasks:
        vocabulary = task.task.output_features["targets"].vocabulary
        loss_sum = examples = 0.0
        predicted_ids = []
        for batch in task.batches:
            local = {name: batch[name][indices(len(batch[name]))] for name in data.ENC_DEC_FEATURES}
            global_batch = partitioner.global_batch(local)
            sums = jax.device_get(eval_step(params, global_batch))
            loss_sum += float(sums["loss_sum"])
            examples += float(sums["examples"])
            tokens = multihost_utils.process_allgather(decode(params, global_batch), tiled=True)
            predicted_ids.extend(decoding.strip_after_eos(tokens))
        predictions = [
            task.task.postprocess_fn(vocabulary.decode(ids), example=None, is_target=False)
            for ids in predicted_ids[: len(task.targets)]
        ]
        for metric_fn in task.task.predict_metric_fns:
            for name, value in metric_fn(task.targets, predictions).items():
                results[f"{task.name}/{name}"] = float(value)
        results[f"{task.name}/loss"] = loss_sum / max(examples, 1.0)
    return results

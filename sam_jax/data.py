"""The seqio input pipeline: deterministic, resumable training batches and eval sets.

Training reads a seqio Task or Mixture shuffled with a fixed seed and repeated
forever, converts it with the model's feature converter (T5X's
`EncDecFeatureConverter`, optionally packing several examples per row, or
`sam_jax.encoder_features.EncoderFeatureConverter`) and batches it per process.
The order of the batches depends only on the seed and the input shard, so a run
resumed at step k skips k batches and continues exactly as the uninterrupted
run::

  batches = train_batches(
      "demo_mixture",
      sequence_length={"inputs": 24, "targets": 4},
      global_batch_size=32,
      seed=0,
      start_step=restored_step,
  )
  batch = next(batches)  # {"encoder_input_tokens": int32 [32, 64], ...}

Skipping reads the k batches (O(k)). The returned `TrainBatches` instead saves
its position, the tf.data iterator's state with the batches tf.data prefetched,
and restores it in O(1); `sam_jax.checkpoints.Checkpointer` saves it with every
checkpoint (T5X's `train_ds`)::

  batches.save(directory)  # an existing directory
  resumed = train_batches("demo_mixture", ...)  # the same arguments, no start_step
  resumed.restore(directory)  # next(resumed) is next(batches)

Evaluation reads every sub-task of a mixture that has metrics, unshuffled, into
padded batches with an `example_mask`, along with the targets that seqio metric
functions take: the postprocessed `targets` text of a text-to-text task, or the
`label` of a classification or regression task.

Tasks and mixtures must be registered first (`import sam_jax.tasks` for this project's).
"""

import difflib
import os
from collections.abc import Iterator
from collections.abc import Mapping
from typing import Any
from typing import NamedTuple

import jax
import numpy as np
import seqio
import tensorflow as tf

# The features of `seqio.EncDecFeatureConverter` (T5X's encoder-decoder models).
ENC_DEC_FEATURES = (
    "encoder_input_tokens",
    "decoder_input_tokens",
    "decoder_target_tokens",
    "decoder_loss_weights",
)
# What packing adds: which example a token belongs to, and its position in it.
PACKING_FEATURES = (
    "encoder_segment_ids",
    "encoder_positions",
    "decoder_segment_ids",
    "decoder_positions",
)
# In eval batches: 1 for a real example, 0 for a row that pads the last batch.
EXAMPLE_MASK = "example_mask"
# The label of a classification or regression task (sam_jax.tasks.local).
LABEL = "label"

_MAX_NAMES_LISTED = 40
# Training batches tf.data prepares ahead of the one the trainer reads (they are
# part of the saved iterator state).
PREFETCH_BATCHES = 2
# The file prefix of a saved iterator state in its directory (tf.train.Checkpoint files).
ITERATOR_CHECKPOINT = "iterator"
# Next to it: the input shard the position is of ('shard_<i>-of-<n>').
SHARD_FILE = "input_shard"


def registered_names() -> list[str]:
    """The names of every registered seqio Task and Mixture, sorted."""
    return sorted(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))


def get_mixture_or_task(name: str) -> seqio.Task | seqio.Mixture:
    """The registered seqio Task or Mixture called `name`.

    Raises:
      ValueError: for an unknown name, listing the registered names (and the
        closest ones first).
    """
    names = registered_names()
    if name in names:
        return seqio.get_mixture_or_task(name)
    close = difflib.get_close_matches(name, names, n=3)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    listed = ", ".join(names[:_MAX_NAMES_LISTED])
    if len(names) > _MAX_NAMES_LISTED:
        listed += f", ... ({len(names) - _MAX_NAMES_LISTED} more)"
    raise ValueError(
        f"Unknown seqio task or mixture {name!r}.{hint} Registered ({len(names)}): "
        f"{listed or 'none'}. Import the module that registers it (e.g. `import sam_jax.tasks`)."
    )


def _deterministic(ds: tf.data.Dataset, *, keep_noops: bool = False) -> tf.data.Dataset:
    """`ds` with a deterministic order; `keep_noops` keeps e.g. `skip(0)` in the graph.

    tf.data's `noop_elimination` removes `skip(0)`, and an iterator state saved from
    a pipeline with `skip(k)` then no longer restores into the same pipeline built
    with `skip(0)`.
    """
    options = tf.data.Options()
    options.deterministic = True
    if keep_noops:
        options.experimental_optimization.noop_elimination = False
    return ds.with_options(options)


class TrainBatches(Iterator[dict[str, np.ndarray]]):
    """An iterator of numpy training batches whose position can be saved and restored.

    The position is the tf.data iterator's state, prefetched batches included,
    written with `tf.train.Checkpoint` (as T5X saves `train_ds` with its
    checkpoints). Restore only into the pipeline of the same `train_batches`
    arguments (`start_step` aside).

    Example::

      batches = train_batches("demo_mixture", sequence_length=..., global_batch_size=8, seed=0)
      next(batches)
      batches.save(directory)
      resumed = train_batches("demo_mixture", sequence_length=..., global_batch_size=8, seed=0)
      resumed.restore(directory)  # next(resumed) is next(batches)
    """

    def __init__(self, ds: tf.data.Dataset, shard: str):
        """Iterates over `ds`, the batches of input shard `shard` ('shard_<i>-of-<n>')."""
        self._iterator = iter(ds)
        self._checkpoint = tf.train.Checkpoint(ds=self._iterator)
        self.shard = shard

    def __next__(self) -> dict[str, np.ndarray]:
        return {key: value.numpy() for key, value in next(self._iterator).items()}

    def save(self, directory: str) -> None:
        """Writes the position, and the input shard it is of, to `directory` (which must exist)."""
        self._checkpoint.write(os.path.join(directory, ITERATOR_CHECKPOINT))
        with open(os.path.join(directory, SHARD_FILE), "w", encoding="utf-8") as f:
            f.write(self.shard)

    @staticmethod
    def saved_shard(directory: str) -> str | None:
        """The input shard whose position `directory` holds, or None if it holds none."""
        path = os.path.join(directory, SHARD_FILE)
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as f:
            return f.read()

    def restore(self, directory: str) -> None:
        """Continues from the position saved in `directory`.

        Raises:
          tf.errors.OpError: (e.g. NotFoundError) for a missing state or one saved
            from another pipeline.
        """
        self._checkpoint.read(os.path.join(directory, ITERATOR_CHECKPOINT)).assert_consumed()


def input_shard(shard_id: int | None = None, num_shards: int | None = None) -> str:
    """The name of an input shard, 'shard_<i>-of-<n>' (default: this process's of all)."""
    shard_id = jax.process_index() if shard_id is None else shard_id
    num_shards = jax.process_count() if num_shards is None else num_shards
    return f"shard_{shard_id}-of-{num_shards}"


def train_batches(
    mixture_or_task_name: str,
    *,
    sequence_length: Mapping[str, int],
    global_batch_size: int,
    seed: int,
    feature_converter: seqio.FeatureConverter | None = None,
    start_step: int = 0,
    split: str = "train",
    shard_id: int | None = None,
    num_shards: int | None = None,
) -> TrainBatches:
    """An endless, deterministic iterator over this process's training batches.

    tf.data prefetches `PREFETCH_BATCHES` batches in its threads, so the host
    prepares input while the devices compute. Resume with `start_step` (O(start_step):
    the skipped batches are read) only where `TrainBatches.restore` (O(1)) cannot.

    Args:
      mixture_or_task_name: a registered seqio Task or Mixture.
      sequence_length: {'inputs': ..., 'targets': ...}; longer examples are
        truncated, shorter ones padded (or packed).
      global_batch_size: examples per step over all processes.
      seed: drives the shuffle of every task and the mixture's sampling.
      feature_converter: the model's; default `seqio.EncDecFeatureConverter(pack=False)`
        (with `pack=True` it adds `PACKING_FEATURES`).
      start_step: skip this many batches (resuming at step `start_step`).
      split: the split to read.
      shard_id: this process's input shard; default `jax.process_index()`
        (pass `Partitioner.data_layout.shard_id` when the model axis spans processes).
      num_shards: the number of input shards; default `jax.process_count()`.

    Returns:
      An iterator of {feature: np.ndarray [global_batch_size / num_shards, ...]},
      the converter's model features (`ENC_DEC_FEATURES` by default).

    Raises:
      ValueError: for an unknown name or a batch size not divisible by `num_shards`.
    """
    shard_id = jax.process_index() if shard_id is None else shard_id
    num_shards = jax.process_count() if num_shards is None else num_shards
    if global_batch_size < 1 or global_batch_size % num_shards:
        raise ValueError(
            f"The global batch size {global_batch_size} must be a positive multiple of the "
            f"number of input shards (processes) {num_shards}."
        )
    provider = get_mixture_or_task(mixture_or_task_name)
    ds = provider.get_dataset(
        sequence_length=dict(sequence_length),
        split=split,
        use_cached=False,
        shuffle=True,
        seed=seed,
        shard_info=seqio.ShardInfo(index=shard_id, num_shards=num_shards),
        num_epochs=None,
    )
    feature_converter = feature_converter or seqio.EncDecFeatureConverter(pack=False)
    ds = feature_converter(ds, dict(sequence_length))
    ds = ds.batch(global_batch_size // num_shards, drop_remainder=True)
    ds = _deterministic(ds.skip(start_step), keep_noops=True)
    return TrainBatches(ds.prefetch(PREFETCH_BATCHES), input_shard(shard_id, num_shards))


class EvalTask(NamedTuple):
    """One task's evaluation set, ready for a model and seqio's metric functions.

    Attributes:
      name: the task's name.
      batches: {feature: np.ndarray [batch_size, ...]} dicts with the feature
        converter's features and `EXAMPLE_MASK` (int32 [batch_size], 0 on the rows
        that pad the last batch); every process holds all of them.
      targets: the target of each real example, in order (what
        `task.metric_fns` take as targets): its postprocessed `targets` text, or
        its `label` (a class index or a float).
      task: the `seqio.Task` (its `postprocess_fn` and `metric_fns`).
      inputs_text: the input text of each real example, in order (the texts of
        a sentence pair joined by a tab).
    """

    name: str
    batches: list[dict[str, np.ndarray]]
    targets: list[Any]
    task: seqio.Task
    inputs_text: list[str]


def _text(example: Mapping[str, Any], feature: str, task: seqio.Task) -> str:
    """The raw text of a feature: '<feature>_pretokenized', else decoded ids."""
    if f"{feature}_pretokenized" in example:
        return tf.compat.as_text(example[f"{feature}_pretokenized"])
    return task.output_features[feature].vocabulary.decode(example[feature].tolist())


def _metric_target(example: Mapping[str, Any], task: seqio.Task) -> Any:
    """What metric functions take as an example's target: postprocessed text, or the label."""
    if "targets" in task.output_features:
        text = _text(example, "targets", task)
        return task.postprocess_fn(text, example=example, is_target=True)
    return example[LABEL].item()


def _inputs_text(example: Mapping[str, Any], task: seqio.Task) -> Any:
    """The input text(s) of an example: 'inputs', or the text features in order."""
    names = [n for n, f in task.output_features.items() if f.rank == 1 and n != "targets"]
    texts = [_text(example, name, task) for name in names]
    return texts[0] if len(texts) == 1 else "\t".join(texts)


def _padded_batches(features: list[dict[str, np.ndarray]], batch_size: int) -> list[dict]:
    """Stacks examples into batches; zero rows and `EXAMPLE_MASK` complete the last one."""
    batches = []
    for start in range(0, len(features), batch_size):
        rows = features[start : start + batch_size]
        batch = {k: np.stack([row[k] for row in rows]) for k in rows[0]}
        batch[EXAMPLE_MASK] = np.ones((len(rows),), np.int32)
        padding = batch_size - len(rows)
        batch = {k: np.pad(v, [(0, padding)] + [(0, 0)] * (v.ndim - 1)) for k, v in batch.items()}
        batches.append(batch)
    return batches


def _eval_task(
    task: seqio.Task,
    sequence_length: Mapping[str, int],
    batch_size: int,
    split: str,
    max_examples: int | None,
    feature_converter: seqio.FeatureConverter,
) -> EvalTask:
    ds = task.get_dataset(
        sequence_length=dict(sequence_length),
        split=split,
        use_cached=False,
        shuffle=False,
        num_epochs=1,
    )
    if max_examples is not None:
        ds = ds.take(max_examples)
    ds = _deterministic(ds)
    examples = list(ds.as_numpy_iterator())
    features = list(feature_converter(ds, dict(sequence_length)).as_numpy_iterator())
    return EvalTask(
        name=task.name,
        batches=_padded_batches(features, batch_size),
        targets=[_metric_target(ex, task) for ex in examples],
        task=task,
        inputs_text=[_inputs_text(ex, task) for ex in examples],
    )


def eval_tasks(
    mixture_or_task_name: str,
    *,
    sequence_length: Mapping[str, int],
    batch_size: int,
    split: str = "validation",
    max_examples: int | None = None,
    feature_converter: seqio.FeatureConverter | None = None,
) -> list[EvalTask]:
    """The evaluation sets of a task, or of every task of a mixture.

    Only tasks with `metric_fns` and the split are included; each is read
    unshuffled, once, and converted with `feature_converter` (which must not
    pack; default `EncDecFeatureConverter(pack=False)`).

    Args:
      mixture_or_task_name: a registered seqio Task or Mixture.
      sequence_length: {'inputs': ..., 'targets': ...}.
      batch_size: examples per batch (the last batch is padded).
      split: the split to read.
      max_examples: read at most this many examples per task.
      feature_converter: the model's feature converter, without packing.

    Returns:
      One `EvalTask` per task, sorted by name.

    Raises:
      ValueError: for an unknown name, or when no task has metrics and the split.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}.")
    provider = get_mixture_or_task(mixture_or_task_name)
    tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
    evaluated = [task for task in tasks if task.metric_fns and split in task.splits]
    if not evaluated:
        raise ValueError(
            f"No task of {mixture_or_task_name!r} has metric_fns and a {split!r} split."
        )
    feature_converter = feature_converter or seqio.EncDecFeatureConverter(pack=False)
    if feature_converter.pack:
        raise ValueError(
            "Evaluation reads one example per row: pass an unpacked feature converter."
        )
    return [
        _eval_task(task, sequence_length, batch_size, split, max_examples, feature_converter)
        for task in sorted(evaluated, key=lambda t: t.name)
    ]

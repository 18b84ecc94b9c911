"""`FakeTfds`: serves chosen (or generated) examples for any `tfds.load`, without data or downloads.

Used by the tests of the TFDS tasks (test_benchmark_tasks.py) and of the paper
protocols that read them (test_reproduce.py).
"""

import contextlib

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds


def _default(spec):
    """An empty/zero value for a TFDS feature spec (nested dicts included)."""
    if isinstance(spec, dict):
        return {key: _default(value) for key, value in spec.items()}
    if spec.shape.rank == 0:
        return b"" if spec.dtype == tf.string else 0
    return np.zeros((0,), dtype=spec.dtype.as_numpy_dtype)


def _complete(example, spec):
    """`example` with every feature it leaves out filled with `_default`."""
    if not isinstance(spec, dict):
        return example
    return {
        key: _complete(example[key], value) if key in example else _default(value)
        for key, value in spec.items()
    }


def _columns(examples, spec):
    """Examples of scalar features as (nested) columns, for `from_tensor_slices`."""
    if isinstance(spec, dict):
        return {key: _columns([ex[key] for ex in examples], value) for key, value in spec.items()}
    return np.array(examples, dtype=spec.dtype.as_numpy_dtype)


WORDS = ("the cat sat", "a dog ran far", "stocks fell", "it rained all day", "we won")


def generated_examples(spec, count: int) -> list[dict]:
    """`count` examples of scalar features: short sentences, labels 0, 1, 0, ..., floats."""

    def value(leaf, index):
        if leaf.dtype == tf.string:
            return WORDS[index % len(WORDS)].encode()
        if leaf.dtype.is_floating:
            return float(index % 5)
        return index % 2

    return [{key: value(leaf, i) for key, leaf in spec.items()} for i in range(count)]


class FakeTfds:
    """Serves chosen examples for any `tfds.load`, without data or downloads.

    `data[(dataset, config)][tfds_split]` is a list of (partial) examples;
    `requested` records every (dataset, config, split) that was read. With
    `generate=n`, a dataset missing from `data` serves `generated_examples(n)`
    (scalar features only, as GLUE's).
    """

    def __init__(self, data=None, generate: int = 0):
        self.data = data or {}
        self.generate = generate
        self.requested = []

    def dataset(self, builder, split):
        config = builder.builder_config.name if builder.builder_config else None
        self.requested.append((builder.name, config, str(split)))
        spec = builder.info.features.get_tensor_spec()
        if (builder.name, config) not in self.data and self.generate:
            examples = generated_examples(spec, self.generate)
        else:
            examples = self.data[(builder.name, config)][str(split)]
        examples = [_complete(ex, spec) for ex in examples]
        if all(leaf.shape.rank == 0 for leaf in tf.nest.flatten(spec)):  # fast path
            return tf.data.Dataset.from_tensor_slices(_columns(examples, spec))
        return tf.data.Dataset.from_generator(lambda: iter(examples), output_signature=spec)

    @contextlib.contextmanager
    def mocked(self):
        def as_dataset(builder, split, **unused_kwargs):  # replaces builder._as_dataset
            return self.dataset(builder, split)

        with tfds.testing.mock_data(
            as_dataset_fn=as_dataset, policy=tfds.testing.MockPolicy.USE_CODE
        ):
            yield self

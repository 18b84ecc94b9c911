"""Tests of sam_jax/tasks/subsampling.py: deterministic, nested `train_fraction` subsets."""

import math

import numpy as np
import pytest

seqio = pytest.importorskip("seqio")
tf = pytest.importorskip("tensorflow")

from sam_jax.tasks import splitmix  # noqa: E402
from sam_jax.tasks import subsampling  # noqa: E402


def _source(n: int, shuffled_order=None) -> seqio.FunctionDataSource:
    """n examples {'idx', 'text'} in 'train' and 'validation'; shuffled_order when shuffling."""
    values = [f"example {i}" for i in range(n)]

    def dataset_fn(split, shuffle_files, seed=None):
        del split, seed
        idx = shuffled_order if shuffle_files and shuffled_order else list(range(n))
        return tf.data.Dataset.from_tensor_slices(
            {"idx": np.array(idx, np.int32), "text": np.array([values[i] for i in idx])}
        )

    return seqio.FunctionDataSource(
        dataset_fn, splits=("train", "validation"), num_input_examples={"train": n, "validation": n}
    )


@pytest.mark.parametrize("n", [1, 7, 1080, 2000])
def test_train_fraction_indices_exact_nested_deterministic(n):
    previous = set()
    for fraction in (0.02, 0.05, 0.1, 0.2, 0.5, 0.8, 1.0):
        idx = subsampling.train_fraction_indices(n, fraction, seed=0)
        expected = max(1, math.floor(fraction * n + 0.5))
        assert len(idx) == expected == subsampling.num_train_examples(n, fraction)
        assert len(set(idx.tolist())) == len(idx)
        assert idx.min() >= 0 and idx.max() < n
        assert np.all(np.diff(idx) > 0)  # sorted: source order is kept
        assert previous <= set(idx.tolist())  # nested
        previous = set(idx.tolist())
        np.testing.assert_array_equal(idx, subsampling.train_fraction_indices(n, fraction, seed=0))
    assert previous == set(range(n))
    if n >= 1000:
        a = subsampling.train_fraction_indices(n, 0.1, seed=0)
        b = subsampling.train_fraction_indices(n, 0.1, seed=1)
        assert len(set(a.tolist()) & set(b.tolist())) < len(a) // 2
        # Spread over the whole split, not a prefix.
        assert a.max() > 0.8 * n and a.min() < 0.2 * n


def test_train_fraction_indices_are_the_smallest_keys():
    """The rule, in plain Python: keep the k indices with the smallest mix64(seed, i)."""
    n, seed = 50, 9
    by_key = sorted(range(n), key=lambda i: splitmix.mix64(seed, i))
    assert subsampling.train_fraction_indices(n, 0.2, seed).tolist() == sorted(by_key[:10])


def test_num_train_examples_rounds_half_up_and_keeps_one():
    assert subsampling.num_train_examples(10, 0.25) == 3  # 2.5 -> 3
    assert subsampling.num_train_examples(10, 0.01) == 1  # never empty
    assert subsampling.num_train_examples(0, 0.5) == 0


def test_train_fraction_suffix():
    assert subsampling.train_fraction_suffix() == ""
    assert subsampling.train_fraction_suffix(1.0, seed=3) == ""
    assert subsampling.train_fraction_suffix(0.05) == "_frac0.05"
    assert subsampling.train_fraction_suffix(0.05, seed=7) == "_frac0.05_seed7"


@pytest.mark.parametrize(
    "bad", [0, 0.0, -0.1, -1, 1.0001, 2, float("nan"), float("inf"), True, "0.5", None]
)
def test_bad_train_fraction_raises(bad):
    with pytest.raises(ValueError, match=r"train_fraction.*\(0, 1\]"):
        subsampling.validate_train_fraction(bad)
    with pytest.raises(ValueError, match="train_fraction"):
        subsampling.train_fraction_indices(100, bad)
    with pytest.raises(ValueError, match="train_fraction"):
        subsampling.TrainFractionSource(_source(4), bad)
    with pytest.raises(ValueError, match="train_fraction"):
        subsampling.with_train_fraction(_source(4), bad)


def test_train_fraction_source_with_index_key_ignores_order():
    """The GLUE/TFDS path: a stable 'idx' feature, shuffled source order."""
    n = 50
    source = _source(n, shuffled_order=splitmix.Rng("test-order").sample(range(n), n))
    wrapped = subsampling.TrainFractionSource(source, 0.3, seed=2, index_key="idx")
    by_enumeration = subsampling.TrainFractionSource(source, 0.3, seed=2)
    expected = {f"example {i}" for i in subsampling.train_fraction_indices(n, 0.3, seed=2)}
    for shuffle in (False, True):
        got = [
            ex["text"].decode()
            for ex in wrapped.get_dataset("train", shuffle=shuffle).as_numpy_iterator()
        ]
        assert set(got) == expected and len(got) == 15
    got = [
        ex["text"].decode()
        for ex in by_enumeration.get_dataset("train", shuffle=True).as_numpy_iterator()
    ]
    assert set(got) == expected
    assert wrapped.num_input_examples("train") == 15
    assert wrapped.num_input_examples("validation") == n
    assert len(list(wrapped.get_dataset("validation", shuffle=False))) == n
    assert subsampling.with_train_fraction(source, 1.0, seed=5) is source
    assert isinstance(
        subsampling.with_train_fraction(source, 0.3, seed=2), subsampling.TrainFractionSource
    )


def test_train_fraction_source_needs_the_split_and_its_size():
    with pytest.raises(ValueError, match="split 'test' is not one of"):
        subsampling.TrainFractionSource(_source(4), 0.5, split="test")
    unsized = seqio.FunctionDataSource(lambda split, shuffle_files: None, splits=("train",))
    with pytest.raises(ValueError, match="pass num_examples="):
        subsampling.TrainFractionSource(unsized, 0.5)
    assert (
        subsampling.TrainFractionSource(unsized, 0.5, num_examples=8).num_input_examples("train")
        == 4
    )

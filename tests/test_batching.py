"""Tests for sam_jax.batching: ascent micro-batch sizes and slices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_jax import batching


@pytest.mark.parametrize(
    "num_examples, fraction, shards, expected",
    [
        (64, 0.25, 1, 16),  # Bahri et al.: a = b / 4
        (64, 1.0, 1, 64),
        (8, 0.25, 1, 2),
        (6, 0.25, 1, 2),  # 1.5 rounds to 2
        (4, 0.01, 1, 1),  # at least one example
        (64, 0.25, 4, 16),
        (8, 0.01, 4, 4),  # at least one example per shard
        (24, 0.3, 4, 8),  # 0.3 × 6 = 1.8 → 2 per shard
    ],
)
def test_ascent_size(num_examples, fraction, shards, expected):
    assert batching.ascent_size(num_examples, fraction, shards) == expected


def test_ascent_size_rejects_batch_not_divisible_by_shards():
    with pytest.raises(ValueError, match="num_data_shards=4"):
        batching.ascent_size(10, 0.25, 4)


def test_ascent_slice_one_shard_is_the_first_examples():
    batch = {"x": jnp.arange(16).reshape(8, 2), "y": jnp.arange(8)}
    sliced = batching.ascent_slice(batch, 3)
    np.testing.assert_array_equal(sliced["y"], [0, 1, 2])
    np.testing.assert_array_equal(sliced["x"], np.arange(16).reshape(8, 2)[:3])


def test_ascent_slice_takes_the_first_examples_of_every_shard():
    # 12 examples on 3 shards hold [0..3], [4..7], [8..11]; a = 6 takes 2 of each.
    sliced = batching.ascent_slice(jnp.arange(12), 6, num_data_shards=3)
    np.testing.assert_array_equal(sliced, [0, 1, 4, 5, 8, 9])


def test_batch_size_rejects_mismatched_leading_dims():
    with pytest.raises(ValueError, match="leading"):
        batching.batch_size({"a": jnp.zeros((4, 2)), "b": jnp.zeros((5,))})


def test_per_example_losses_rejects_a_scalar_loss():
    def mean_loss(params, batch, key):
        del params, key
        return jnp.mean(batch)

    with pytest.raises(ValueError, match="per-example losses of shape"):
        batching.per_example_losses(mean_loss, None, jnp.zeros((4,)), None)


def test_microbatches_take_the_same_share_of_every_shard():
    # 12 examples on 2 shards, [0..5] and [6..11]; 3 microbatches of 2 per shard.
    pieces = batching.microbatches(jnp.arange(12), 3, num_data_shards=2)
    np.testing.assert_array_equal(pieces, [[0, 1, 6, 7], [2, 3, 8, 9], [4, 5, 10, 11]])
    np.testing.assert_array_equal(batching.microbatches(jnp.arange(6), 3), [[0, 1], [2, 3], [4, 5]])


def test_microbatches_reject_sizes_that_do_not_divide():
    with pytest.raises(ValueError, match="num_microbatches=4 must be ≥ 1 and, times"):
        batching.microbatches(jnp.arange(12), 4, num_data_shards=2)


def test_sum_over_microbatches_sums_and_passes_the_index():
    total = batching.sum_over_microbatches(
        lambda piece, index: (jnp.sum(piece), index), jnp.arange(8.0), 4
    )
    np.testing.assert_allclose(total[0], 28.0)
    assert int(total[1]) == 0 + 1 + 2 + 3


@pytest.mark.parametrize(
    "ascent, microbatch, shards, expected",
    [(16, 16, 1, 1), (64, 16, 1, 4), (32, 16, 4, 2), (24, 16, 4, 2), (12, 8, 4, 3)],
)
def test_ascent_microbatch_count(ascent, microbatch, shards, expected):
    count = batching.ascent_microbatch_count(ascent, microbatch, shards)
    assert count == expected
    assert (ascent // shards) % count == 0


def test_microbatch_sums_accumulate_in_float32_and_keep_the_dtype():
    ones = jnp.ones((300, 1), jnp.bfloat16)

    def fn(piece, index):
        del index
        return jnp.sum(piece)  # 1.0 in bfloat16 per microbatch

    total = batching.sum_over_microbatches(fn, ones, 300)
    assert total.dtype == jnp.bfloat16
    # A bfloat16 running sum stalls at 256 (its spacing there is 2 > 1).
    assert float(total) == 300.0
    stalled = jax.lax.fori_loop(0, 300, lambda i, s: s + jnp.bfloat16(1), jnp.bfloat16(0))
    assert float(stalled) == 256.0


def test_accumulate_microbatches_stacks_the_second_output():
    batch = jnp.arange(8.0).reshape(8, 1)
    total, stacked = batching.accumulate_microbatches(
        lambda piece, index: (jnp.sum(piece), index), batch, 4, num_data_shards=2
    )
    assert float(total) == 28.0
    np.testing.assert_array_equal(stacked, [0, 1, 2, 3])

"""Tests of greedy decoding (sam_jax.decoding) with a random one-layer T5."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from sam_jax import decoding
from sam_jax import partitioning
from sam_jax.models import t5

VOCAB = 128
TARGET_LENGTH = 6
CONFIG = t5.t5_1_1_config(
    "tiny", vocab_size=VOCAB, dropout_rate=0.0, num_encoder_layers=1, num_decoder_layers=1
)
MODEL = t5.Transformer(CONFIG)


@pytest.fixture(scope="module")
def params():
    init = jax.jit(lambda key: nn.meta.unbox(t5.init_variables(CONFIG, key)["params"]))
    return init(jax.random.key(0))


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, VOCAB, (8, 10)).astype(np.int32)
    tokens[:, 7:] = 0  # padding
    return tokens


@functools.partial(jax.jit, static_argnames=("eos_id", "num_valid_ids"))
def _decode(params, inputs, eos_id=decoding.EOS_ID, num_valid_ids=None):
    return decoding.greedy_decode(
        MODEL, params, inputs, TARGET_LENGTH, eos_id=eos_id, num_valid_ids=num_valid_ids
    )


@jax.jit
def _teacher_forced_argmax(params, inputs, targets):
    decoder_inputs = jnp.pad(targets[:, :-1], ((0, 0), (1, 0)))
    logits = MODEL.apply(
        {"params": params}, inputs, decoder_inputs, jnp.ones_like(targets), enable_dropout=False
    )
    return jnp.argmax(logits, -1)


def test_each_token_is_the_argmax_given_the_tokens_before_it(params, inputs):
    tokens = np.asarray(_decode(params, inputs, eos_id=-1))  # no EOS: every position
    assert tokens.shape == (8, TARGET_LENGTH) and tokens.dtype == np.int32
    np.testing.assert_array_equal(_teacher_forced_argmax(params, inputs, tokens), tokens)
    assert len({tuple(row) for row in tokens}) > 1  # depends on the inputs


def test_rows_stop_at_their_first_eos(params, inputs):
    free = np.asarray(_decode(params, inputs, eos_id=-1))
    eos_id = int(free[0, 2])  # treat the token row 0 emits third as EOS
    tokens = np.asarray(_decode(params, inputs, eos_id=eos_id))
    for free_row, row in zip(free, tokens):
        hits = np.flatnonzero(free_row == eos_id)
        end = hits[0] + 1 if len(hits) else TARGET_LENGTH
        np.testing.assert_array_equal(row[:end], free_row[:end])
        assert not row[end:].any()
    assert not tokens[0, 3:].any()


def test_num_valid_ids_masks_the_padded_vocabulary(params, inputs):
    tokens = np.asarray(_decode(params, inputs, eos_id=-1, num_valid_ids=5))
    assert tokens.max() < 5


def test_strip_after_eos():
    rows = decoding.strip_after_eos(np.array([[5, 6, 1, 7], [0, 5, 0, 0], [1, 2, 3, 4]]))
    assert rows == [[5, 6], [5], []]


def test_decoder_on_the_mesh_equals_one_device(params, inputs):
    partitioner = partitioning.Partitioner(num_partitions=2)
    abstract = jax.eval_shape(
        lambda key: t5.init_variables(CONFIG, key)["params"], jax.random.key(0)
    )
    shardings = partitioner.shardings(abstract)
    decode = partitioner.partition(
        lambda p, batch: decoding.greedy_decode(
            MODEL, p, batch["encoder_input_tokens"], TARGET_LENGTH, eos_id=-1, num_valid_ids=VOCAB
        ),
        in_shardings=(shardings, partitioner.data_sharding()),
        out_shardings=partitioner.data_sharding(),
    )
    sharded = decode(
        jax.device_put(params, shardings),
        partitioner.global_batch({"encoder_input_tokens": inputs}),
    )
    assert sharded.sharding.spec == jax.sharding.PartitionSpec("data")
    np.testing.assert_array_equal(
        np.asarray(sharded), np.asarray(_decode(params, inputs, eos_id=-1))
    )

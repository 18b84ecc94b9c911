"""Tests of the T5.1.1 model (sam_jax.models.t5) on tiny configurations."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from sam_jax.models import t5

VOCAB = 128
CONFIG = t5.t5_1_1_config("tiny", vocab_size=VOCAB, dropout_rate=0.1)


# XLA's CPU backend spends most of this file's time compiling; its cheaper code
# generation halves that and computes the same functions.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@functools.partial(
    jax.jit, static_argnames=("config", "enable_dropout"), compiler_options=FAST_COMPILE
)
def _jitted_forward(
    config,
    params,
    encoder_tokens,
    decoder_inputs,
    decoder_targets,
    encoder_segment_ids,
    decoder_segment_ids,
    dropout_key,
    enable_dropout,
):
    return t5.Transformer(config).apply(
        {"params": params},
        encoder_tokens,
        decoder_inputs,
        decoder_targets,
        encoder_segment_ids,
        decoder_segment_ids,
        enable_dropout=enable_dropout,
        rngs={"dropout": dropout_key},
    )


def _forward(
    config,
    params,
    encoder_tokens,
    decoder_inputs,
    decoder_targets,
    encoder_segment_ids=None,
    decoder_segment_ids=None,
    dropout_key=None,
    enable_dropout=False,
):
    """Logits of a jitted forward pass; always passes a key, so dropout on/off share shapes."""
    if dropout_key is None:
        dropout_key = jax.random.key(0)
    return _jitted_forward(
        config,
        params,
        encoder_tokens,
        decoder_inputs,
        decoder_targets,
        encoder_segment_ids,
        decoder_segment_ids,
        dropout_key,
        enable_dropout,
    )


@pytest.fixture(scope="module")
def abstract_variables():
    """Shapes and logical axis names of CONFIG's variables, without allocation."""
    return jax.eval_shape(functools.partial(t5.init_variables, CONFIG), jax.random.key(0))


@pytest.fixture(scope="module")
def params(abstract_variables):
    """Random parameters of realistic scale, drawn with NumPy.

    Compiling the model's own initializers costs several seconds on CPU; the tests that
    use this fixture do not depend on how parameters are initialized.
    """
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        name = path[-1].key
        if name == "scale":
            return (1.0 + 0.1 * rng.normal(size=leaf.shape)).astype(np.float32)
        std = {"embedding": 1.0, "rel_embedding": 0.5}.get(name, 1.0 / math.sqrt(leaf.shape[0]))
        return (std * rng.normal(size=leaf.shape)).astype(np.float32)

    return jax.tree.map_with_path(draw, nn.meta.unbox(abstract_variables["params"]))


def _random_batch(seed, batch=8, input_length=7, target_length=5):
    rng = np.random.default_rng(seed)
    encoder_tokens = rng.integers(1, VOCAB, (batch, input_length), dtype=np.int32)
    targets = rng.integers(1, VOCAB, (batch, target_length), dtype=np.int32)
    decoder_inputs = np.pad(targets[:, :-1], ((0, 0), (1, 0)))
    return encoder_tokens, decoder_inputs, targets


# ----------------------------------------------------------------------------------
# Configuration.
# ----------------------------------------------------------------------------------


def test_presets_and_unknown_size():
    small = t5.t5_1_1_config("small")
    assert (small.emb_dim, small.num_heads, small.head_dim, small.mlp_dim) == (512, 6, 64, 1024)
    assert (small.num_encoder_layers, small.num_decoder_layers, small.vocab_size) == (8, 8, 32128)
    assert not small.logits_via_embedding
    assert t5.t5_1_1_config("base", dtype=jnp.bfloat16).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match=r"size='huge'.*'tiny', 'small', 'base', 'large', 'xl'"):
        t5.t5_1_1_config("huge")


# Published T5.1.1 sizes with the 32128-entry vocabulary (the HF / T5X checkpoints:
# google/t5-v1_1-{small,base,large,xl}).
@pytest.mark.parametrize(
    "size, published",
    [("small", 76_961_152), ("base", 247_577_856), ("large", 783_150_080), ("xl", 2_849_757_184)],
)
def test_parameter_count_matches_published_checkpoints(size, published):
    count = t5.count_params(t5.t5_1_1_config(size))
    assert count == pytest.approx(published, rel=0.01)
    assert count == published  # The layout is T5X's, so the count is exact.


def test_tied_embedding_drops_the_output_head():
    untied = t5.count_params(CONFIG)
    tied = t5.count_params(t5.t5_1_1_config("tiny", vocab_size=VOCAB, logits_via_embedding=True))
    assert untied - tied == VOCAB * CONFIG.emb_dim


# ----------------------------------------------------------------------------------
# Layers against hand computations.
# ----------------------------------------------------------------------------------

# (key - query offset, bucket) with 32 buckets and max_distance 128, worked by hand.
# Bidirectional: 16 buckets per direction, 8 exact; keys after the query add 16;
# beyond: 8 + floor(ln(d / 8) / ln(16) * 8), capped at 15.
BIDIRECTIONAL_BUCKETS = [
    (0, 0),
    (-3, 3),
    (3, 19),
    (-7, 7),
    (7, 23),
    (-8, 8),
    (8, 24),
    (-12, 9),  # 8 + floor(ln 1.5 / ln 16 * 8) = 8 + floor(1.17)
    (-20, 10),  # 8 + floor(ln 2.5 / ln 16 * 8) = 8 + floor(2.64)
    (-32, 12),  # 8 + floor(0.5 * 8)
    (-100, 15),  # 8 + floor(ln 12.5 / ln 16 * 8) = 8 + floor(7.29)
    (-127, 15),  # 8 + floor(7.98)
    (-128, 15),  # clipped from max_distance on
    (-1000, 15),
    (1000, 31),
]
# Causal: 32 buckets, 16 exact, keys after the query -> 0;
# beyond: 16 + floor(ln(d / 16) / ln(8) * 16), capped at 31.
CAUSAL_BUCKETS = [
    (0, 0),
    (5, 0),
    (1000, 0),
    (-5, 5),
    (-15, 15),
    (-16, 16),
    (-20, 17),  # 16 + floor(ln 1.25 / ln 8 * 16) = 16 + floor(1.72)
    (-50, 24),  # 16 + floor(ln 3.125 / ln 8 * 16) = 16 + floor(8.77)
    (-100, 30),  # 16 + floor(ln 6.25 / ln 8 * 16) = 16 + floor(14.10)
    (-127, 31),
    (-128, 31),
    (-500, 31),
]


# 8 buckets, max_distance 20, bidirectional: 4 buckets per direction, 2 exact;
# beyond: 2 + floor(ln(d / 2) / ln(10) * 2), capped at 3.
SMALL_BIDIRECTIONAL_BUCKETS = [
    (0, 0),
    (-1, 1),
    (1, 5),
    (-5, 2),  # 2 + floor(ln 2.5 / ln 10 * 2) = 2 + floor(0.80)
    (-9, 3),  # 2 + floor(ln 4.5 / ln 10 * 2) = 2 + floor(1.31)
    (-25, 3),
    (25, 7),
]


@pytest.mark.parametrize(
    "bidirectional, num_buckets, max_distance, table",
    [
        (True, 32, 128, BIDIRECTIONAL_BUCKETS),
        (False, 32, 128, CAUSAL_BUCKETS),
        (True, 8, 20, SMALL_BIDIRECTIONAL_BUCKETS),
    ],
)
def test_relative_position_bucket_matches_hand_computation(
    bidirectional, num_buckets, max_distance, table
):
    offsets, expected = map(np.array, zip(*table, strict=True))
    buckets = t5.relative_position_bucket(offsets, bidirectional, num_buckets, max_distance)
    np.testing.assert_array_equal(buckets, expected)


def test_relative_position_bias_is_shared_and_indexed_by_offset(params):
    variables = {"params": params["encoder"]["relpos_bias"]}
    bias = t5.RelativePositionBias(num_heads=4, bidirectional=True).apply(variables, 3, 4)
    table = np.asarray(params["encoder"]["relpos_bias"]["rel_embedding"])
    assert bias.shape == (1, 4, 3, 4)
    # Query 2, key 0: offset -2 -> bucket 2; query 0, key 3: offset +3 -> bucket 19.
    np.testing.assert_array_equal(bias[0, :, 2, 0], table[:, 2])
    np.testing.assert_array_equal(bias[0, :, 0, 3], table[:, 19])
    # One table per stack, none per layer.
    assert "relpos_bias" not in params["encoder"]["layers_0"]["attention"]


def test_rms_norm_matches_numpy():
    x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype(np.float32) * 3.0
    scale = np.random.default_rng(1).normal(size=(8,)).astype(np.float32)
    out = t5.RMSNorm().apply({"params": {"scale": scale}}, x)
    expected = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + 1e-6) * scale
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def test_gated_gelu_mlp_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 8)).astype(np.float32)
    wi_0, wi_1 = rng.normal(size=(2, 8, 16)) / math.sqrt(8)
    wo = rng.normal(size=(16, 8)) / 4.0
    mlp_params = {"wi_0": {"kernel": wi_0}, "wi_1": {"kernel": wi_1}, "wo": {"kernel": wo}}
    out = t5.GatedGeluMlp(mlp_dim=16).apply(
        {"params": jax.tree.map(np.float32, mlp_params)}, x, deterministic=True
    )
    expected = (_gelu_tanh(x @ wi_0) * (x @ wi_1)) @ wo
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_query_kernel_carries_the_logit_scaling():
    attention = t5.MultiHeadDotProductAttention(num_heads=4, head_dim=64)
    x = np.ones((1, 2, 256), np.float32)
    init = jax.jit(
        functools.partial(attention.init, deterministic=True), compiler_options=FAST_COMPILE
    )
    kernels = init(jax.random.key(0), x, x)["params"]
    ratio = np.std(kernels["key"]["kernel"].value) / np.std(kernels["query"]["kernel"].value)
    assert ratio == pytest.approx(math.sqrt(64), rel=0.05)


# ----------------------------------------------------------------------------------
# Masks.
# ----------------------------------------------------------------------------------


def test_decoder_self_attention_is_causal(params):
    encoder_tokens, decoder_inputs, targets = _random_batch(0)
    changed = decoder_inputs.copy()
    changed[:, 3] = (changed[:, 3] % (VOCAB - 1)) + 1  # a different non-padding token
    logits = _forward(CONFIG, params, encoder_tokens, decoder_inputs, targets)
    logits_changed = _forward(CONFIG, params, encoder_tokens, changed, targets)
    np.testing.assert_allclose(logits[:, :3], logits_changed[:, :3], rtol=1e-5, atol=1e-5)
    assert np.abs(logits[:, 3:] - logits_changed[:, 3:]).max() > 1e-3


def test_encoder_padding_does_not_change_outputs(params):
    encoder_tokens, decoder_inputs, targets = _random_batch(1)
    padded = np.pad(encoder_tokens, ((0, 0), (0, 4)))
    logits = _forward(CONFIG, params, encoder_tokens, decoder_inputs, targets)
    logits_padded = _forward(CONFIG, params, padded, decoder_inputs, targets)
    np.testing.assert_allclose(logits, logits_padded, rtol=1e-5, atol=1e-5)


def test_packed_segments_are_isolated(params):
    # Equal lengths, so that both examples run alone with one compilation.
    first = dict(inputs=[5, 6, 7, 4], targets=[11, 12, 1])
    second = dict(inputs=[8, 9, 10, 3], targets=[13, 14, 1])

    def shift_right(targets):
        return [0] + targets[:-1]

    packed_encoder = np.array([first["inputs"] + second["inputs"] + [0]], np.int32)
    encoder_segments = np.array([[1, 1, 1, 1, 2, 2, 2, 2, 0]], np.int32)
    packed_targets = np.array([first["targets"] + second["targets"] + [0, 0]], np.int32)
    packed_inputs = np.array(
        [shift_right(first["targets"]) + shift_right(second["targets"]) + [0, 0]], np.int32
    )
    decoder_segments = np.array([[1, 1, 1, 2, 2, 2, 0, 0]], np.int32)
    packed = _forward(
        CONFIG,
        params,
        packed_encoder,
        packed_inputs,
        packed_targets,
        encoder_segments,
        decoder_segments,
    )

    for example, positions in ((first, slice(0, 3)), (second, slice(3, 6))):
        alone = _forward(
            CONFIG,
            params,
            np.array([example["inputs"]], np.int32),
            np.array([shift_right(example["targets"])], np.int32),
            np.array([example["targets"]], np.int32),
        )
        np.testing.assert_allclose(packed[:, positions], alone, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------
# Dtypes, dropout, partitioning.
# ----------------------------------------------------------------------------------


def _dot_general_dtypes(jaxpr):
    """(operand dtypes, output shape) of every dot_general in a jaxpr, sub-jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append((tuple(str(v.aval.dtype) for v in eqn.invars), eqn.outvars[0].aval.shape))
        for value in eqn.params.values():
            if isinstance(value, jax.extend.core.ClosedJaxpr):
                found += _dot_general_dtypes(value.jaxpr)
            elif isinstance(value, jax.extend.core.Jaxpr):
                found += _dot_general_dtypes(value)
    return found


def test_bfloat16_activations_give_finite_float32_logits(params):
    config = t5.t5_1_1_config("tiny", vocab_size=VOCAB, dtype=jnp.bfloat16)
    batch = _random_batch(2)
    logits = _forward(config, params, *batch)
    reference = np.asarray(_forward(CONFIG, params, *batch), np.float64)
    assert logits.dtype == jnp.float32
    assert np.isfinite(logits).all()
    # bfloat16 keeps 8 significant bits: unit roundoff u = 2⁻⁸ ≈ 0.0039 per rounding. The
    # tiny model rounds activations ~50 times along a path (casts, projections, attention,
    # MLP, residual adds over 2 + 2 layers); independent roundings of RMS u/√3 add up to
    # about √50·u/√3 ≈ 4u ≈ 1.6 %. Measured on 4 batches: RMS error / RMS logit 2.0–2.4 %
    # (this batch 2.3 %), max |error| 0.10–0.14 on logits of std 1.0 (max |logit| 3.6–4.0),
    # argmax agreement 92–98 %, correlation > 0.9997. The old bound, 15 % of the largest
    # logit (≈ 0.55), was 4× the largest error. Bounds: 10u relative RMS, a third of the
    # logits' spread for any single logit, and an error of at least u/4 (else the
    # activations were not rounded to bfloat16 at all).
    error = np.asarray(logits, np.float64) - reference
    relative_rms = np.linalg.norm(error) / np.linalg.norm(reference)
    u = 2.0**-8
    assert u / 4 < relative_rms < 10 * u, relative_rms
    assert np.abs(error).max() < reference.std() / 3, np.abs(error).max()
    assert np.mean(logits.argmax(-1) == reference.argmax(-1)) > 0.8
    # Every layer computes in bfloat16: all matrix products take bfloat16 operands (q, k,
    # v, out, q·k and weights·v per attention; wi_0, wi_1, wo per MLP), except the float32
    # vocabulary head.
    jaxpr = jax.make_jaxpr(
        lambda p, *b: t5.Transformer(config).apply({"params": p}, *b, enable_dropout=False)
    )(params, *batch).jaxpr
    products = _dot_general_dtypes(jaxpr)
    head = [shape for dtypes, shape in products if dtypes != ("bfloat16", "bfloat16")]
    assert head == [logits.shape]
    per_layer = (6 + 3) * config.num_encoder_layers + (6 + 6 + 3) * config.num_decoder_layers
    assert len(products) == per_layer + 1
    abstract = jax.eval_shape(functools.partial(t5.init_variables, config), jax.random.key(0))
    assert {leaf.dtype for leaf in jax.tree.leaves(abstract)} == {jnp.dtype(jnp.float32)}


def test_dropout(params):
    batch = _random_batch(3)
    key, other_key = jax.random.key(1), jax.random.key(2)
    off = _forward(CONFIG, params, *batch, dropout_key=key)
    np.testing.assert_array_equal(off, _forward(CONFIG, params, *batch, dropout_key=other_key))
    on = _forward(CONFIG, params, *batch, dropout_key=key, enable_dropout=True)
    np.testing.assert_array_equal(
        on, _forward(CONFIG, params, *batch, dropout_key=key, enable_dropout=True)
    )
    on_other = _forward(CONFIG, params, *batch, dropout_key=other_key, enable_dropout=True)
    assert np.abs(on - on_other).max() > 1e-3
    assert np.abs(on - off).max() > 1e-3


def test_every_parameter_has_logical_axis_names(abstract_variables):
    abstract = abstract_variables
    boxes = jax.tree.leaves(
        abstract["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
    )
    assert boxes and all(isinstance(box, nn.LogicallyPartitioned) for box in boxes)
    specs = jax.tree.leaves(
        nn.get_partition_spec(abstract["params"]),
        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec),
    )
    known = {name for name, _ in t5.DEFAULT_LOGICAL_AXIS_RULES}
    for box, spec in zip(boxes, specs, strict=True):
        assert len(spec) == box.value.ndim and set(spec) <= known, spec
    logits_spec = nn.get_partition_spec(abstract)["params"]["decoder"]["logits_dense"]["kernel"]
    assert logits_spec == jax.sharding.PartitionSpec("embed", "vocab")


def test_sharded_forward_equals_unsharded(params, abstract_variables):
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rules = t5.DEFAULT_LOGICAL_AXIS_RULES
    batch = _random_batch(4)
    reference = _forward(CONFIG, params, *batch)

    param_shardings = nn.logical_to_mesh_sharding(
        nn.get_partition_spec(abstract_variables["params"]), mesh, rules
    )
    embedding_spec = param_shardings["token_embedder"]["embedding"].spec
    assert embedding_spec == jax.sharding.PartitionSpec("model", None)
    batch_sharding = nn.logical_to_mesh_sharding(jax.sharding.PartitionSpec("batch"), mesh, rules)

    def forward(params, *batch):
        return t5.Transformer(CONFIG).apply({"params": params}, *batch, enable_dropout=False)

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        sharded = jax.jit(
            forward,
            compiler_options=FAST_COMPILE,
            in_shardings=(param_shardings,) + (batch_sharding,) * 3,
            out_shardings=nn.logical_to_mesh_sharding(
                jax.sharding.PartitionSpec("batch", "length", "vocab"), mesh, rules
            ),
        )
        logits = sharded(
            jax.device_put(params, param_shardings), *jax.device_put(batch, batch_sharding)
        )
    assert logits.sharding.spec == jax.sharding.PartitionSpec("data", None, "model")
    np.testing.assert_allclose(logits, reference, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------
# Loss.
# ----------------------------------------------------------------------------------


def _numpy_token_cross_entropy(logits, targets):
    logits = logits.astype(np.float64)
    log_z = np.log(np.sum(np.exp(logits), axis=-1))
    return log_z - np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0], log_z


def test_per_example_cross_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 4, 10)).astype(np.float32) * 2
    targets = rng.integers(1, 10, (3, 4))
    weights = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], np.float32)
    token_loss, log_z = _numpy_token_cross_entropy(logits, targets)
    summed = np.sum(token_loss * weights, axis=-1)

    losses = t5.per_example_cross_entropy(logits, targets, weights)
    assert losses.shape == (3,) and losses.dtype == jnp.float32
    # Default normalizer: the mean weight per example (8 / 3), so the mean is the token-mean loss.
    np.testing.assert_allclose(losses, summed * 3 / 8, rtol=1e-5)
    np.testing.assert_allclose(np.mean(losses), np.sum(summed) / weights.sum(), rtol=1e-5)

    # A constant z = Z / N: T5X's objective with loss_normalizing_factor Z = 12, and
    # each example's loss is the same in any sub-batch.
    constant = t5.per_example_cross_entropy(logits, targets, weights, example_normalizer=4.0)
    np.testing.assert_allclose(np.mean(constant), np.sum(summed) / 12.0, rtol=1e-5)
    alone = t5.per_example_cross_entropy(logits[:1], targets[:1], weights[:1], 4.0)
    np.testing.assert_allclose(alone, constant[:1], rtol=1e-6)

    with_z = t5.per_example_cross_entropy(logits, targets, weights, 4.0, z_loss=1e-2)
    z_summed = np.sum((token_loss + 1e-2 * log_z**2) * weights, axis=-1)
    np.testing.assert_allclose(with_z, z_summed / 4.0, rtol=1e-5)


def test_per_example_cross_entropy_ignores_padding():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 3, 6)).astype(np.float32)
    targets = np.array([[2, 3, 0], [4, 0, 0]])
    weights = (targets > 0).astype(np.float32)
    losses = t5.per_example_cross_entropy(logits, targets, weights)
    changed_logits = logits.copy()
    changed_logits[0, 2] += 5.0 * rng.normal(size=6)
    changed_targets = targets.copy()
    changed_targets[1, 2] = 5
    np.testing.assert_array_equal(
        losses, t5.per_example_cross_entropy(changed_logits, changed_targets, weights)
    )
    np.testing.assert_array_equal(
        t5.per_example_cross_entropy(logits, targets, np.zeros_like(weights)), [0.0, 0.0]
    )

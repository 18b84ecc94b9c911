"""T5.1.1 encoder-decoder Transformer in Flax Linen, with logical axis names.

The architecture is T5.1.1 (Raffel et al. 2020, "Exploring the Limits of Transfer
Learning with a Unified Text-to-Text Transformer", JMLR; the T5.1.1 checkpoints of the
T5 repository): pre-norm residual blocks with RMS layer norm (no mean subtraction,
no bias), gated-GELU feed-forward layers, relative position biases shared by all
layers of a stack, no biases anywhere, dropout, and an output head that is not tied
to the input embedding.

The layout follows T5X's `t5x/examples/t5/{layers,network}.py`: the same parameter
names and shapes (attention kernels stored as 2-D `[embed, heads * head_dim]`
matrices), the same logical axis names and the same feature names of the batch, so
that T5X checkpoints and partitioning rules carry over.

Parameters are float32; activations are computed in `T5Config.dtype` (float32 or
bfloat16); layer norms, softmax statistics (optionally) and the logits are float32.

Only the teacher-forced forward pass is implemented. `Transformer.encode` and
`Transformer.decode` keep T5X's split so that autoregressive decoding with a key/value
cache can be added to `decode` later.
"""

import dataclasses
import functools
import math
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Array = jax.Array
DType = Any
Initializer = Callable[..., Array]

# Logical -> mesh axis rules for a ('data', 'model') mesh: data parallelism over the
# batch, Megatron-style model parallelism over vocabulary, MLP and attention heads.
DEFAULT_LOGICAL_AXIS_RULES = (
    ("batch", "data"),
    ("vocab", "model"),
    ("mlp", "model"),
    ("heads", "model"),
    ("joined_kv", "model"),
    ("embed", None),
    ("kv", None),
    ("length", None),
    ("relpos_buckets", None),
)

# Added to attention logits of masked key positions (as T5X does).
_MASKED_LOGIT = -1e10
_LAYER_NORM_EPSILON = 1e-6

# Initializers of T5X's T5.1.1 models.
_DENSE_INIT = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
_ATTENTION_INIT = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
_EMBEDDING_INIT = nn.initializers.normal(stddev=1.0)
_RELATIVE_POSITION_INIT = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Hyper-parameters of a T5.1.1 encoder-decoder.

    Attributes:
        vocab_size: size of the (shared input, separate output) vocabulary.
        emb_dim: model width d_model.
        num_heads: attention heads per attention layer.
        num_encoder_layers: encoder blocks.
        num_decoder_layers: decoder blocks.
        head_dim: width of each attention head (d_kv).
        mlp_dim: hidden width of the gated-GELU feed-forward layers (d_ff).
        dropout_rate: dropout after embeddings, on attention weights, inside the MLP,
            after each sub-layer and after the final norms. T5.1.1 was pre-trained
            without dropout; 0.1 is the usual fine-tuning value.
        dtype: activation dtype (`jnp.float32` or `jnp.bfloat16`). Parameters are
            always float32 and logits always float32.
        logits_via_embedding: tie the output head to the input embedding (T5.0);
            False (a separate `logits_dense` kernel) for T5.1.1.
        relative_attention_num_buckets: buckets of the relative position biases.
        relative_attention_max_distance: offsets at or beyond this distance share the
            last bucket.
        float32_attention_logits: compute attention logits and softmax in float32
            whatever `dtype` is.
    """

    vocab_size: int
    emb_dim: int
    num_heads: int
    num_encoder_layers: int
    num_decoder_layers: int
    head_dim: int
    mlp_dim: int
    dropout_rate: float = 0.1
    dtype: DType = jnp.float32
    logits_via_embedding: bool = False
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    float32_attention_logits: bool = False


# Shapes of the released T5.1.1 checkpoints; `tiny` is for tests and CPU runs.
_T5_1_1_SIZES = {
    "tiny": dict(
        emb_dim=64,
        num_heads=4,
        head_dim=16,
        mlp_dim=256,
        num_encoder_layers=2,
        num_decoder_layers=2,
    ),
    "small": dict(
        emb_dim=512,
        num_heads=6,
        head_dim=64,
        mlp_dim=1024,
        num_encoder_layers=8,
        num_decoder_layers=8,
    ),
    "base": dict(
        emb_dim=768,
        num_heads=12,
        head_dim=64,
        mlp_dim=2048,
        num_encoder_layers=12,
        num_decoder_layers=12,
    ),
    "large": dict(
        emb_dim=1024,
        num_heads=16,
        head_dim=64,
        mlp_dim=2816,
        num_encoder_layers=24,
        num_decoder_layers=24,
    ),
    "xl": dict(
        emb_dim=2048,
        num_heads=32,
        head_dim=64,
        mlp_dim=5120,
        num_encoder_layers=24,
        num_decoder_layers=24,
    ),
}


def t5_1_1_config(size: str, vocab_size: int = 32128, **overrides: Any) -> T5Config:
    """The configuration of a T5.1.1 model of a named size.

    Args:
        size: one of 'tiny', 'small', 'base', 'large', 'xl'.
        vocab_size: vocabulary size; 32128 is T5's SentencePiece vocabulary padded to
            a multiple of 128.
        **overrides: any other `T5Config` field, e.g. `dtype=jnp.bfloat16` or
            `dropout_rate=0.0`.

    Returns:
        The `T5Config`.

    Raises:
        ValueError: if `size` is not a known size.
    """
    if size not in _T5_1_1_SIZES:
        raise ValueError(f"Unknown T5.1.1 size={size!r}; expected one of {list(_T5_1_1_SIZES)}.")
    return T5Config(vocab_size=vocab_size, **{**_T5_1_1_SIZES[size], **overrides})


# ------------------------------------------------------------------------------------
# Layers.
# ------------------------------------------------------------------------------------


def _canonical_tuple(x: int | Sequence[int]) -> tuple[int, ...]:
    return tuple(x) if isinstance(x, Sequence) else (x,)


class DenseGeneral(nn.Module):
    """A bias-free linear map contracting one or more trailing axes of its input.

    The kernel is stored as a 2-D float32 matrix [prod(contracted dims),
    prod(features)] (as T5X does, so that `kernel_axes` can name the joined head
    axis 'joined_kv' and fan-in initializers see the true fan-in).

    Attributes:
        features: output feature dimension(s).
        kernel_axes: logical names of the two kernel axes.
        axis: input axes to contract.
        dtype: computation dtype.
        kernel_init: initializer of the 2-D kernel.
    """

    features: int | Sequence[int]
    kernel_axes: tuple[str, str]
    axis: int | Sequence[int] = -1
    dtype: DType = jnp.float32
    kernel_init: Initializer = _DENSE_INIT

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        """Applies the linear map; the output has the contracted axes replaced by features."""
        features = _canonical_tuple(self.features)
        axis = tuple(a % inputs.ndim for a in _canonical_tuple(self.axis))
        contracted_shape = tuple(inputs.shape[a] for a in axis)
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
            (math.prod(contracted_shape), math.prod(features)),
            jnp.float32,
        )
        kernel = jnp.reshape(jnp.asarray(kernel, self.dtype), contracted_shape + features)
        inputs = jnp.asarray(inputs, self.dtype)
        return jnp.tensordot(inputs, kernel, axes=(axis, tuple(range(len(axis)))))


class Embed(nn.Module):
    """Token embedding table, usable as the tied output head through `attend`.

    Attributes:
        num_embeddings: vocabulary size.
        features: embedding width.
        dtype: dtype of the looked-up embeddings.
    """

    num_embeddings: int
    features: int
    dtype: DType = jnp.float32

    def setup(self):
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(_EMBEDDING_INIT, ("vocab", "embed")),
            (self.num_embeddings, self.features),
            jnp.float32,
        )

    def __call__(self, tokens: Array) -> Array:
        """Looks up integer `tokens` [batch, length] -> [batch, length, features]."""
        embedded = jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)
        return nn.with_logical_constraint(embedded, ("batch", "length", "embed"))

    def attend(self, query: Array) -> Array:
        """Float32 inner products of `query` [..., features] with every embedding."""
        return jnp.dot(jnp.asarray(query, jnp.float32), self.embedding.T)


class RMSNorm(nn.Module):
    """T5's layer norm: x / sqrt(mean(x^2) + eps) * scale, without mean or bias.

    Statistics are computed in float32; the result is cast to `dtype`.

    Attributes:
        dtype: output dtype.
        epsilon: added to the mean square.
    """

    dtype: DType = jnp.float32
    epsilon: float = _LAYER_NORM_EPSILON

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Normalizes over the last axis."""
        x = jnp.asarray(x, jnp.float32)
        mean_square = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        normalized = jnp.asarray(x * jax.lax.rsqrt(mean_square + self.epsilon), self.dtype)
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
            (x.shape[-1],),
            jnp.float32,
        )
        return normalized * jnp.asarray(scale, self.dtype)


def relative_position_bucket(
    relative_position: Array,
    bidirectional: bool = True,
    num_buckets: int = 32,
    max_distance: int = 128,
) -> Array:
    """Maps relative positions (key position - query position) to T5's buckets.

    With `bidirectional`, half of the buckets are for keys before or at the query and
    half (offset by num_buckets / 2) for keys after it; otherwise keys after the query
    all go to bucket 0 (the causal mask hides them anyway). Within each half of `n`
    buckets, distances d < n / 2 get their own bucket d; larger distances share
    logarithmically wider buckets
        n / 2 + floor(log(d / (n / 2)) / log(max_distance / (n / 2)) * n / 2),
    clipped to n - 1, so every distance >= max_distance lands in the last bucket.

    Args:
        relative_position: integer array of key minus query positions.
        bidirectional: encoder (True) or causal decoder (False) attention.
        num_buckets: total number of buckets.
        max_distance: distance from which on all offsets share one bucket.

    Returns:
        int32 array of buckets in [0, num_buckets), shaped like `relative_position`.
    """
    distance = -jnp.asarray(relative_position, jnp.int32)  # > 0: key before query.
    if bidirectional:
        num_buckets //= 2
        half = jnp.where(distance < 0, num_buckets, 0)
        distance = jnp.abs(distance)
    else:
        half = 0
        distance = jnp.maximum(distance, 0)
    max_exact = num_buckets // 2
    # T5X adds float32 eps so that exact powers of two are not rounded down.
    log_fraction = jnp.log(
        distance.astype(jnp.float32) / max_exact + jnp.finfo(jnp.float32).eps
    ) / math.log(max_distance / max_exact)
    log_bucket = max_exact + (log_fraction * (num_buckets - max_exact)).astype(jnp.int32)
    log_bucket = jnp.minimum(log_bucket, num_buckets - 1)
    return half + jnp.where(distance < max_exact, distance, log_bucket)


class RelativePositionBias(nn.Module):
    """Learned per-head scalar biases of attention logits, indexed by offset bucket.

    Attributes:
        num_heads: attention heads (one bias table row each).
        bidirectional: bucket keys after the query separately (encoder) or not.
        num_buckets: see `relative_position_bucket`.
        max_distance: see `relative_position_bucket`.
        dtype: output dtype.
    """

    num_heads: int
    bidirectional: bool
    num_buckets: int = 32
    max_distance: int = 128
    dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, query_length: int, key_length: int) -> Array:
        """Returns the bias [1, num_heads, query_length, key_length]."""
        relative_position = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
        buckets = relative_position_bucket(
            relative_position,
            bidirectional=self.bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )
        table = self.param(
            "rel_embedding",
            nn.with_logical_partitioning(_RELATIVE_POSITION_INIT, ("heads", "relpos_buckets")),
            (self.num_heads, self.num_buckets),
            jnp.float32,
        )
        bias = jnp.take(jnp.asarray(table, self.dtype), buckets, axis=1)
        return bias[None]


class MultiHeadDotProductAttention(nn.Module):
    """Multi-head dot-product attention without biases and without logit scaling.

    T5 does not divide the logits by sqrt(head_dim): the factor is folded into the
    initialization of the query kernel instead.

    Attributes:
        num_heads: attention heads.
        head_dim: width of each head.
        dtype: computation dtype.
        dropout_rate: dropout on the attention weights (broadcast over queries).
        float32_logits: compute logits and softmax in float32.
    """

    num_heads: int
    head_dim: int
    dtype: DType = jnp.float32
    dropout_rate: float = 0.0
    float32_logits: bool = False

    @nn.compact
    def __call__(
        self,
        inputs_q: Array,
        inputs_kv: Array,
        mask: Array | None = None,
        bias: Array | None = None,
        *,
        deterministic: bool,
    ) -> Array:
        """Attends from `inputs_q` [batch, q_len, embed] to `inputs_kv` [batch, kv_len, embed].

        Args:
            inputs_q: query inputs.
            inputs_kv: key/value inputs.
            mask: boolean [batch, 1, q_len, kv_len]; False hides a key from a query.
            bias: additive logit bias broadcastable to [batch, heads, q_len, kv_len].
            deterministic: disables dropout.

        Returns:
            [batch, q_len, embed] in `dtype`.
        """

        def projection(name: str, kernel_init: Initializer) -> DenseGeneral:
            return DenseGeneral(
                features=(self.num_heads, self.head_dim),
                kernel_axes=("embed", "joined_kv"),
                dtype=self.dtype,
                kernel_init=kernel_init,
                name=name,
            )

        def query_init(*args: Any) -> Array:
            return _ATTENTION_INIT(*args) / math.sqrt(self.head_dim)

        head_axes = ("batch", "length", "heads", "kv")
        query = nn.with_logical_constraint(projection("query", query_init)(inputs_q), head_axes)
        key = nn.with_logical_constraint(projection("key", _ATTENTION_INIT)(inputs_kv), head_axes)
        value = nn.with_logical_constraint(
            projection("value", _ATTENTION_INIT)(inputs_kv), head_axes
        )

        logits_dtype = jnp.float32 if self.float32_logits else self.dtype
        logits = jnp.einsum("bqhd,bkhd->bhqk", query.astype(logits_dtype), key.astype(logits_dtype))
        if mask is not None:
            logits = logits + jnp.where(mask, 0.0, _MASKED_LOGIT).astype(logits_dtype)
        if bias is not None:
            logits = logits + bias.astype(logits_dtype)
        weights = jax.nn.softmax(logits).astype(self.dtype)
        weights = nn.Dropout(rate=self.dropout_rate, broadcast_dims=(-2,))(
            weights, deterministic=deterministic
        )
        context = jnp.einsum("bhqk,bkhd->bqhd", weights, value)
        return DenseGeneral(
            features=inputs_q.shape[-1],
            axis=(-2, -1),
            kernel_axes=("joined_kv", "embed"),
            dtype=self.dtype,
            kernel_init=_ATTENTION_INIT,
            name="out",
        )(context)


class GatedGeluMlp(nn.Module):
    """T5.1.1 feed-forward block: wo(gelu(wi_0 x) * wi_1 x) (Shazeer 2020, GEGLU).

    The GELU is the tanh approximation (T5.1.1's 'gelu_new').

    Attributes:
        mlp_dim: hidden width.
        dtype: computation dtype.
        dropout_rate: dropout on the hidden activations (broadcast over length).
    """

    mlp_dim: int
    dtype: DType = jnp.float32
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, inputs: Array, *, deterministic: bool) -> Array:
        """Maps [batch, length, embed] -> [batch, length, embed]."""

        def hidden_projection(name: str) -> DenseGeneral:
            return DenseGeneral(
                self.mlp_dim, kernel_axes=("embed", "mlp"), dtype=self.dtype, name=name
            )

        gate = nn.gelu(hidden_projection("wi_0")(inputs), approximate=True)
        hidden = gate * hidden_projection("wi_1")(inputs)
        hidden = nn.Dropout(rate=self.dropout_rate, broadcast_dims=(-2,))(
            hidden, deterministic=deterministic
        )
        hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
        return DenseGeneral(
            inputs.shape[-1], kernel_axes=("mlp", "embed"), dtype=self.dtype, name="wo"
        )(hidden)


def _sublayer_dropout(config: T5Config) -> nn.Dropout:
    """Dropout on a residual branch or embedding, broadcast over the length axis."""
    return nn.Dropout(rate=config.dropout_rate, broadcast_dims=(-2,))


def _attention(config: T5Config, name: str) -> MultiHeadDotProductAttention:
    return MultiHeadDotProductAttention(
        num_heads=config.num_heads,
        head_dim=config.head_dim,
        dtype=config.dtype,
        dropout_rate=config.dropout_rate,
        float32_logits=config.float32_attention_logits,
        name=name,
    )


def _mlp(config: T5Config) -> GatedGeluMlp:
    return GatedGeluMlp(
        mlp_dim=config.mlp_dim, dtype=config.dtype, dropout_rate=config.dropout_rate, name="mlp"
    )


def _relative_position_bias(config: T5Config, bidirectional: bool) -> RelativePositionBias:
    return RelativePositionBias(
        num_heads=config.num_heads,
        bidirectional=bidirectional,
        num_buckets=config.relative_attention_num_buckets,
        max_distance=config.relative_attention_max_distance,
        dtype=config.dtype,
        name="relpos_bias",
    )


class EncoderLayer(nn.Module):
    """Pre-norm block: x + self-attention(norm(x)), then + MLP(norm(.))."""

    config: T5Config

    @nn.compact
    def __call__(
        self, inputs: Array, mask: Array, relative_bias: Array, *, deterministic: bool
    ) -> Array:
        """Maps [batch, length, embed] -> [batch, length, embed]."""
        cfg = self.config
        x = RMSNorm(dtype=cfg.dtype, name="pre_attention_layer_norm")(inputs)
        x = _attention(cfg, "attention")(x, x, mask, relative_bias, deterministic=deterministic)
        x = inputs + _sublayer_dropout(cfg)(x, deterministic=deterministic)

        y = RMSNorm(dtype=cfg.dtype, name="pre_mlp_layer_norm")(x)
        y = _mlp(cfg)(y, deterministic=deterministic)
        y = x + _sublayer_dropout(cfg)(y, deterministic=deterministic)
        return nn.with_logical_constraint(y, ("batch", "length", "embed"))


class DecoderLayer(nn.Module):
    """Pre-norm block: causal self-attention, cross-attention to the encoder, MLP."""

    config: T5Config

    @nn.compact
    def __call__(
        self,
        inputs: Array,
        encoded: Array,
        self_attention_mask: Array,
        cross_attention_mask: Array,
        relative_bias: Array,
        *,
        deterministic: bool,
    ) -> Array:
        """Maps [batch, target_length, embed] -> [batch, target_length, embed]."""
        cfg = self.config
        x = RMSNorm(dtype=cfg.dtype, name="pre_self_attention_layer_norm")(inputs)
        x = _attention(cfg, "self_attention")(
            x, x, self_attention_mask, relative_bias, deterministic=deterministic
        )
        x = inputs + _sublayer_dropout(cfg)(x, deterministic=deterministic)

        y = RMSNorm(dtype=cfg.dtype, name="pre_cross_attention_layer_norm")(x)
        y = _attention(cfg, "encoder_decoder_attention")(
            y, encoded, cross_attention_mask, deterministic=deterministic
        )
        y = x + _sublayer_dropout(cfg)(y, deterministic=deterministic)

        z = RMSNorm(dtype=cfg.dtype, name="pre_mlp_layer_norm")(y)
        z = _mlp(cfg)(z, deterministic=deterministic)
        z = y + _sublayer_dropout(cfg)(z, deterministic=deterministic)
        return nn.with_logical_constraint(z, ("batch", "length", "embed"))


class Encoder(nn.Module):
    """Embedding, a stack of encoder layers sharing one relative bias, final norm."""

    config: T5Config
    token_embedder: Embed

    @nn.compact
    def __call__(self, tokens: Array, mask: Array, *, deterministic: bool) -> Array:
        """Encodes `tokens` [batch, length] -> [batch, length, embed]."""
        cfg = self.config
        length = tokens.shape[-1]
        relative_bias = _relative_position_bias(cfg, bidirectional=True)(length, length)
        x = _sublayer_dropout(cfg)(self.token_embedder(tokens), deterministic=deterministic)
        for i in range(cfg.num_encoder_layers):
            x = EncoderLayer(cfg, name=f"layers_{i}")(
                x, mask, relative_bias, deterministic=deterministic
            )
        x = RMSNorm(dtype=cfg.dtype, name="encoder_norm")(x)
        return _sublayer_dropout(cfg)(x, deterministic=deterministic)


class Decoder(nn.Module):
    """Embedding, a stack of decoder layers sharing one causal bias, norm, logits."""

    config: T5Config
    token_embedder: Embed

    @nn.compact
    def __call__(
        self,
        encoded: Array,
        decoder_input_tokens: Array,
        self_attention_mask: Array,
        cross_attention_mask: Array,
        *,
        deterministic: bool,
    ) -> Array:
        """Returns float32 logits [batch, target_length, vocab]."""
        cfg = self.config
        length = decoder_input_tokens.shape[-1]
        relative_bias = _relative_position_bias(cfg, bidirectional=False)(length, length)
        y = self.token_embedder(decoder_input_tokens)
        y = _sublayer_dropout(cfg)(y, deterministic=deterministic)
        for i in range(cfg.num_decoder_layers):
            y = DecoderLayer(cfg, name=f"layers_{i}")(
                y,
                encoded,
                self_attention_mask,
                cross_attention_mask,
                relative_bias,
                deterministic=deterministic,
            )
        y = RMSNorm(dtype=cfg.dtype, name="decoder_norm")(y)
        y = _sublayer_dropout(cfg)(y, deterministic=deterministic)
        if cfg.logits_via_embedding:
            # The tied head is rescaled since the embedding has unit-variance entries.
            logits = self.token_embedder.attend(y) / math.sqrt(cfg.emb_dim)
        else:
            logits = DenseGeneral(
                cfg.vocab_size,
                kernel_axes=("embed", "vocab"),
                dtype=jnp.float32,
                name="logits_dense",
            )(y)
        return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))


# ------------------------------------------------------------------------------------
# Masks.
# ------------------------------------------------------------------------------------


def make_attention_mask(
    query_input: Array,
    key_input: Array,
    pairwise_fn: Callable[[Array, Array], Array] = jnp.logical_and,
) -> Array:
    """Boolean mask [batch, 1, q_len, kv_len] = pairwise_fn(query[:, :, None], key[:, None])."""
    mask = pairwise_fn(query_input[:, :, None], key_input[:, None, :])
    return mask[:, None].astype(jnp.bool_)


def make_decoder_mask(
    decoder_target_tokens: Array, decoder_segment_ids: Array | None = None
) -> Array:
    """Causal, padding (target id 0) and optional same-segment self-attention mask."""
    positions = jnp.arange(decoder_target_tokens.shape[-1])
    causal = (positions[:, None] >= positions[None, :])[None, None]
    not_padding = decoder_target_tokens > 0
    mask = jnp.logical_and(causal, make_attention_mask(not_padding, not_padding))
    if decoder_segment_ids is not None:
        same_segment = make_attention_mask(decoder_segment_ids, decoder_segment_ids, jnp.equal)
        mask = jnp.logical_and(mask, same_segment)
    return mask


# ------------------------------------------------------------------------------------
# The model.
# ------------------------------------------------------------------------------------


class Transformer(nn.Module):
    """T5.1.1 encoder-decoder (Raffel et al. 2020, T5.1.1), T5X feature names.

    Attributes:
        config: the hyper-parameters.
    """

    config: T5Config

    def setup(self):
        cfg = self.config
        self.token_embedder = Embed(cfg.vocab_size, cfg.emb_dim, dtype=cfg.dtype)
        self.encoder = Encoder(cfg, self.token_embedder)
        self.decoder = Decoder(cfg, self.token_embedder)

    def encode(
        self,
        encoder_input_tokens: Array,
        encoder_segment_ids: Array | None = None,
        *,
        enable_dropout: bool = True,
    ) -> Array:
        """Encodes `encoder_input_tokens` [batch, length] -> [batch, length, embed].

        Token id 0 is padding and is hidden from every query; with
        `encoder_segment_ids` (packed examples) a token sees only its own segment.
        """
        not_padding = encoder_input_tokens > 0
        mask = make_attention_mask(not_padding, not_padding)
        if encoder_segment_ids is not None:
            mask = jnp.logical_and(
                mask, make_attention_mask(encoder_segment_ids, encoder_segment_ids, jnp.equal)
            )
        return self.encoder(encoder_input_tokens, mask, deterministic=not enable_dropout)

    def decode(
        self,
        encoded: Array,
        encoder_input_tokens: Array,
        decoder_input_tokens: Array,
        decoder_target_tokens: Array,
        encoder_segment_ids: Array | None = None,
        decoder_segment_ids: Array | None = None,
        *,
        enable_dropout: bool = True,
    ) -> Array:
        """Teacher-forced decoder: float32 logits [batch, target_length, vocab].

        `encoder_input_tokens` and `decoder_target_tokens` are only used to build the
        padding masks; the segment ids (both or neither) keep packed examples apart.
        """
        if (encoder_segment_ids is None) != (decoder_segment_ids is None):
            raise ValueError(
                "Pass both `encoder_segment_ids` and `decoder_segment_ids` (packed "
                "examples) or neither."
            )
        self_attention_mask = make_decoder_mask(decoder_target_tokens, decoder_segment_ids)
        cross_attention_mask = make_attention_mask(
            decoder_target_tokens > 0, encoder_input_tokens > 0
        )
        if encoder_segment_ids is not None:
            cross_attention_mask = jnp.logical_and(
                cross_attention_mask,
                make_attention_mask(decoder_segment_ids, encoder_segment_ids, jnp.equal),
            )
        return self.decoder(
            encoded,
            decoder_input_tokens,
            self_attention_mask,
            cross_attention_mask,
            deterministic=not enable_dropout,
        )

    def __call__(
        self,
        encoder_input_tokens: Array,
        decoder_input_tokens: Array,
        decoder_target_tokens: Array,
        encoder_segment_ids: Array | None = None,
        decoder_segment_ids: Array | None = None,
        encoder_positions: Array | None = None,
        decoder_positions: Array | None = None,
        *,
        enable_dropout: bool = True,
    ) -> Array:
        """Teacher-forced forward pass on a batch of T5X `EncDecFeatureConverter` features.

        Args:
            encoder_input_tokens: int [batch, input_length]; 0 is padding.
            decoder_input_tokens: int [batch, target_length], the targets shifted right
                (per segment when packed).
            decoder_target_tokens: int [batch, target_length]; 0 is padding.
            encoder_segment_ids: int [batch, input_length] for packed examples.
            decoder_segment_ids: int [batch, target_length] for packed examples.
            encoder_positions: accepted for feature-converter compatibility and unused:
                relative position biases depend only on offsets, which packing leaves
                unchanged within a segment.
            decoder_positions: likewise.
            enable_dropout: apply dropout (needs a 'dropout' rng).

        Returns:
            float32 logits [batch, target_length, vocab_size].
        """
        del encoder_positions, decoder_positions  # See the docstring.
        encoded = self.encode(
            encoder_input_tokens, encoder_segment_ids, enable_dropout=enable_dropout
        )
        return self.decode(
            encoded,
            encoder_input_tokens,
            decoder_input_tokens,
            decoder_target_tokens,
            encoder_segment_ids,
            decoder_segment_ids,
            enable_dropout=enable_dropout,
        )


# ------------------------------------------------------------------------------------
# Loss and utilities.
# ------------------------------------------------------------------------------------


def per_example_cross_entropy(
    logits: Array,
    target_tokens: Array,
    loss_weights: Array,
    example_normalizer: float | Array | None = None,
    *,
    z_loss: float = 0.0,
) -> Array:
    """Per-example losses whose batch mean is the T5X training objective.

    With token losses c_{i,t} = -log softmax(logits_{i,t})[target_{i,t}]
    + z_loss * logsumexp(logits_{i,t})^2 and weights w_{i,t} (0 on padding),
    example i gets

        loss_i = sum_t w_{i,t} c_{i,t} / z,

    so that over a batch of N examples mean_i loss_i = sum_{i,t} w_{i,t} c_{i,t} / (N z),
    T5X's objective with `loss_normalizing_factor` Z = N z. Pass a constant
    `example_normalizer` z (e.g. the target length, or Z / N) so that an example's
    loss does not depend on the batch it is evaluated in: SAM evaluates the same
    examples in an ascent micro-batch and in the full batch, and δ-SAM compares
    losses across perturbations. With None, z is this batch's mean token weight per
    example (the token-mean loss), which does depend on the batch. z is a
    constant: no gradient flows through it. All-zero weights give zero losses.
    With packed inputs an "example" is a packed row.

    Args:
        logits: [batch, length, vocab], any float dtype; computed in float32.
        target_tokens: int [batch, length].
        loss_weights: [batch, length] token weights.
        example_normalizer: the constant z, or None for the batch's mean weight per
            example.
        z_loss: coefficient of the auxiliary log(Z_softmax)^2 term (0 disables it).

    Returns:
        float32 [batch] per-example losses.
    """
    logits = jnp.asarray(logits, jnp.float32)
    target_tokens = jnp.asarray(target_tokens)
    log_partition = jax.nn.logsumexp(logits, axis=-1)
    target_logits = jnp.take_along_axis(logits, target_tokens[..., None], axis=-1)[..., 0]
    token_loss = log_partition - target_logits + z_loss * jnp.square(log_partition)
    weights = jnp.asarray(loss_weights, jnp.float32)
    summed = jnp.sum(token_loss * weights, axis=-1)
    if example_normalizer is None:
        mean_weight = jax.lax.stop_gradient(jnp.mean(jnp.sum(weights, axis=-1)))
        example_normalizer = jnp.where(mean_weight > 0, mean_weight, 1.0)
    return summed / jnp.asarray(example_normalizer, jnp.float32)


def init_variables(
    config: T5Config,
    rng: Array,
    input_length: int = 1,
    target_length: int = 1,
) -> dict[str, Any]:
    """Initializes the model's variables (boxed with their logical axis names).

    Parameter shapes do not depend on the lengths; use under `jax.eval_shape` to get
    shapes and partition specs without allocating.

    Args:
        config: the hyper-parameters.
        rng: PRNG key for the initializers.
        input_length: length of the dummy encoder input.
        target_length: length of the dummy decoder input.

    Returns:
        The variables, {'params': ...}, with `nn.LogicallyPartitioned` leaves.
    """
    encoder_tokens = jnp.ones((1, input_length), jnp.int32)
    decoder_tokens = jnp.ones((1, target_length), jnp.int32)
    return Transformer(config).init(
        rng, encoder_tokens, decoder_tokens, decoder_tokens, enable_dropout=False
    )


def count_params(config: T5Config) -> int:
    """Number of parameters of the model, computed from shapes only (no allocation)."""
    shapes = jax.eval_shape(functools.partial(init_variables, config), jax.random.key(0))
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))


def from_pretrained(
    path: str, *, shardings: Any = None, **config_overrides
) -> tuple["Transformer", dict]:
    """(model, float32 params) of a T5X checkpoint or a Hugging Face T5 directory.

    See `sam_jax.models.t5_checkpoints.from_pretrained` (imported here on use, so
    that importing this module does not import Orbax). With `shardings` (a tree of
    `jax.sharding.Sharding`, or a function of the checkpoint's `T5Config` returning
    one) the params are `jax.Array`s read slice by slice into those shardings.

    Example::

      model, params = t5.from_pretrained("gs://t5-data/pretrained_models/t5x/"
                                         "t5_1_1_small/checkpoint_1000000")
      model, params = t5.from_pretrained(path, shardings=lambda config: param_shardings)
    """
    from sam_jax.models import t5_checkpoints  # noqa: PLC0415

    return t5_checkpoints.from_pretrained(path, shardings=shardings, **config_overrides)

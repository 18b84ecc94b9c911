"""BERT-family Transformer encoders in Flax Linen, loadable from Hugging Face checkpoints.

Four encoders share one post-layer-norm architecture:

* BERT (Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional Transformers
  for Language Understanding", NAACL): the sum of token, absolute position and
  segment (token type) embeddings, layer-normalized, then blocks of multi-head
  self-attention and a GELU feed-forward layer, each followed by dropout, a residual
  connection and a layer norm; an optional pooler tanh(W h_[CLS] + b).
* RoBERTa (Liu et al. 2019, "RoBERTa: A Robustly Optimized BERT Pretraining
  Approach", arXiv:1907.11692): BERT's network; positions start at padding_idx + 1
  and padding tokens take position padding_idx (`BertConfig.position_offset`).
* ELECTRA (Clark et al. 2020, "ELECTRA: Pre-training Text Encoders as Discriminators
  Rather Than Generators", ICLR), the discriminator: BERT's network with embeddings
  of width `embedding_size` projected linearly to `hidden_size` when they differ.
* ALBERT (Lan et al. 2020, "ALBERT: A Lite BERT for Self-supervised Learning of
  Language Representations", ICLR): factorized (projected) embeddings and layers
  shared across depth (`num_hidden_groups` distinct layers).

Parameters are float32 and carry logical axis names (`nn.with_logical_partitioning`,
as in `sam_jax.models.t5`) from `t5.DEFAULT_LOGICAL_AXIS_RULES`: ('vocab', 'embed')
for the token embedding, ('embed', 'heads', 'kv') for the query/key/value kernels,
('embed', 'mlp') for the feed-forward input, None for small replicated axes (the
position and token-type tables' rows, classifier labels). Activations are computed
in `BertConfig.dtype` (float32 or bfloat16); layer norms, the attention softmax and
the classifier logits are float32.

`from_pretrained` reads a Hugging Face directory (`config.json` + `model.safetensors`)
tensor by tensor and insists that every tensor is used with the right shape::

    model, params = from_pretrained(path)            # path holds config.json etc.
    hidden = model.apply({"params": params}, input_ids, attention_mask, token_type_ids)

    classifier = BertClassifier(model.config, num_labels=3)
    cls_params = init_head(classifier, params, jax.random.key(0))
    logits = classifier.apply({"params": cls_params}, input_ids, attention_mask)
"""

import dataclasses
import functools
import json
import math
import os
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from safetensors import safe_open

from sam_jax.models import tensor_matching

Array = jax.Array
DType = Any

# Added to attention logits of masked (padding) keys.
_MASKED_LOGIT = -1e10

_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": functools.partial(nn.gelu, approximate=False),
    "gelu_new": functools.partial(nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True),
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
}

# model_type -> (tensor name prefix in HF checkpoints, architecture class prefix).
_FAMILIES = {
    "bert": ("bert.", "Bert"),
    "roberta": ("roberta.", "Roberta"),
    "electra": ("electra.", "Electra"),
    "albert": ("albert.", "Albert"),
}
# Encoder-only HF architectures (heads other than the pooler are not loaded).
_ARCHITECTURE_SUFFIXES = (
    "Model",
    "ForMaskedLM",
    "ForPreTraining",
    "ForSequenceClassification",
    "ForTokenClassification",
    "ForQuestionAnswering",
    "ForMultipleChoice",
    "ForNextSentencePrediction",
)


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Hyper-parameters of a BERT-family encoder (defaults: BERT-base).

    Attributes:
        vocab_size: size of the token vocabulary.
        hidden_size: model width H.
        num_layers: Transformer blocks applied.
        num_heads: attention heads (H must be divisible by it).
        intermediate_size: hidden width of the feed-forward layers.
        hidden_act: feed-forward activation, a Hugging Face name: 'gelu' (exact erf),
            'gelu_new' / 'gelu_pytorch_tanh' (tanh approximation), 'relu', 'silu'.
        max_position_embeddings: rows of the position table (514 for RoBERTa: two
            rows below `position_offset`).
        type_vocab_size: rows of the token-type (segment) table; 0 for none.
        layer_norm_eps: added to the variance in every layer norm.
        hidden_dropout_rate: dropout after the embeddings and on both residual
            branches.
        attention_dropout_rate: dropout on the attention weights.
        classifier_dropout_rate: dropout before `BertClassifier`'s output layer;
            None means `hidden_dropout_rate`.
        pad_token_id: id of the padding token.
        position_offset: 0 for positions 0, 1, ... (BERT, ELECTRA, ALBERT); for
            RoBERTa pad_token_id + 1: non-padding tokens take positions offset,
            offset + 1, ... and padding tokens position offset - 1.
        embedding_size: width of the embedding tables; None means `hidden_size`.
        num_hidden_groups: distinct layers, shared across depth (ALBERT): layer i
            uses distinct layer i * num_hidden_groups // num_layers; None means
            `num_layers` (no sharing).
        initializer_range: standard deviation of the normal initializers.
        add_pooler: include the pooler tanh(dense(h_[CLS])).
        dtype: activation dtype (`jnp.float32` or `jnp.bfloat16`); parameters are
            always float32.
        model_type: 'bert', 'roberta', 'electra' or 'albert' (the checkpoint layout).
    """

    vocab_size: int
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.1
    classifier_dropout_rate: float | None = None
    pad_token_id: int = 0
    position_offset: int = 0
    embedding_size: int | None = None
    num_hidden_groups: int | None = None
    initializer_range: float = 0.02
    add_pooler: bool = True
    dtype: DType = jnp.float32
    model_type: str = "bert"

    def __post_init__(self):
        if self.model_type not in _FAMILIES:
            raise ValueError(
                f"Unsupported model_type {self.model_type!r}; supported: {sorted(_FAMILIES)}."
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"Unsupported hidden_act {self.hidden_act!r}; supported: {sorted(_ACTIVATIONS)}."
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}."
            )
        if not 1 <= self.layer_groups <= self.num_layers:
            raise ValueError(f"num_hidden_groups={self.num_hidden_groups} not in [1, num_layers].")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def embedding_width(self) -> int:
        return self.embedding_size or self.hidden_size

    @property
    def projects_embeddings(self) -> bool:
        """ALBERT always, ELECTRA when the embeddings are narrower, map them to H."""
        return self.model_type == "albert" or self.embedding_width != self.hidden_size

    @property
    def layer_groups(self) -> int:
        return self.num_hidden_groups or self.num_layers

    @classmethod
    def from_hf(cls, hf_config: Mapping[str, Any], **overrides: Any) -> "BertConfig":
        """Maps a Hugging Face `config.json` dictionary onto a `BertConfig`.

        Args:
            hf_config: the parsed `config.json`.
            **overrides: `BertConfig` fields to set instead, e.g. `dtype=jnp.bfloat16`.

        Returns:
            The configuration.

        Raises:
            ValueError: for a model type, architecture, activation or feature
                (decoder, relative positions, ALBERT inner groups) not supported here.
        """
        c = dict(hf_config)
        model_type = c.get("model_type")
        _check_hf_config(c, model_type)
        required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
        absent = [key for key in required + ("intermediate_size",) if key not in c]
        if absent:
            raise ValueError(f"config.json lacks {absent}.")
        pad = c.get("pad_token_id", 1 if model_type == "roberta" else 0)
        factorized = model_type in ("albert", "electra")  # HF's default embedding_size 128.
        fields = dict(
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            num_layers=c["num_hidden_layers"],
            num_heads=c["num_attention_heads"],
            intermediate_size=c["intermediate_size"],
            hidden_act=c.get("hidden_act", "gelu_new" if model_type == "albert" else "gelu"),
            max_position_embeddings=c.get("max_position_embeddings", 512),
            type_vocab_size=c.get("type_vocab_size", 2),
            layer_norm_eps=c.get("layer_norm_eps", 1e-12),
            hidden_dropout_rate=c.get("hidden_dropout_prob", 0.1),
            attention_dropout_rate=c.get("attention_probs_dropout_prob", 0.1),
            classifier_dropout_rate=c.get("classifier_dropout", c.get("classifier_dropout_prob")),
            pad_token_id=pad,
            position_offset=pad + 1 if model_type == "roberta" else 0,
            embedding_size=c.get("embedding_size", 128 if factorized else None),
            num_hidden_groups=c.get("num_hidden_groups", 1) if model_type == "albert" else None,
            initializer_range=c.get("initializer_range", 0.02),
            model_type=model_type,
        )
        return cls(**{**fields, **overrides})


def _check_hf_config(c: Mapping[str, Any], model_type: Any) -> None:
    """Raises a one-line ValueError for what `BertConfig.from_hf` cannot represent."""
    if model_type not in _FAMILIES:
        raise ValueError(
            f"Unsupported model_type {model_type!r} in config.json; supported: {sorted(_FAMILIES)}."
        )
    class_prefix = _FAMILIES[model_type][1]
    for arch in c.get("architectures") or ():
        if arch not in {class_prefix + suffix for suffix in _ARCHITECTURE_SUFFIXES}:
            raise ValueError(
                f"Unsupported architecture {arch!r} for model_type {model_type!r}; "
                f"supported: {class_prefix}{{{', '.join(_ARCHITECTURE_SUFFIXES)}}}."
            )
    if c.get("is_decoder") or c.get("add_cross_attention"):
        raise ValueError("Unsupported config: is_decoder/add_cross_attention (encoders only).")
    position_type = c.get("position_embedding_type", "absolute")
    if position_type != "absolute":
        raise ValueError(f"Unsupported position_embedding_type {position_type!r}.")
    if model_type == "albert" and c.get("inner_group_num", 1) != 1:
        raise ValueError(f"Unsupported ALBERT inner_group_num={c['inner_group_num']} (only 1).")


# ------------------------------------------------------------------------------------
# Layers.
# ------------------------------------------------------------------------------------


class DenseGeneral(nn.Module):
    """A linear map with bias contracting trailing input axes: y = x . kernel + bias.

    The float32 kernel has the full shape [*contracted dims, *features] (so that
    every axis has a logical name: flax's `nn.DenseGeneral` initializes a flattened
    2-D kernel and its boxed names then fail under a mesh).

    Attributes:
        features: output feature dimension(s).
        kernel_axes: logical names of the kernel axes (inputs, then features); the
            bias is named by the feature axes.
        axis: input axes to contract.
        dtype: computation dtype.
        stddev: standard deviation of the normal kernel initializer.
    """

    features: int | tuple[int, ...]
    kernel_axes: tuple[str | None, ...]
    axis: int | tuple[int, ...] = -1
    dtype: DType = jnp.float32
    stddev: float = 0.02

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        """Contracts `axis` of `inputs` with the kernel's leading axes; adds the bias."""
        features = self.features if isinstance(self.features, tuple) else (self.features,)
        axis = self.axis if isinstance(self.axis, tuple) else (self.axis,)
        axis = tuple(a % inputs.ndim for a in axis)
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.normal(self.stddev), self.kernel_axes),
            tuple(inputs.shape[a] for a in axis) + features,
            jnp.float32,
        )
        bias = self.param(
            "bias",
            nn.with_logical_partitioning(nn.initializers.zeros, self.kernel_axes[len(axis) :]),
            features,
            jnp.float32,
        )
        inputs = jnp.asarray(inputs, self.dtype)
        kernel = jnp.asarray(kernel, self.dtype)
        out = jax.lax.dot_general(inputs, kernel, ((axis, tuple(range(len(axis)))), ((), ())))
        return out + jnp.asarray(bias, self.dtype)


def _dense(
    config: BertConfig,
    features: int | tuple[int, ...],
    kernel_axes: tuple[str | None, ...],
    name: str,
    axis: int | tuple[int, ...] = -1,
    dtype: DType | None = None,
) -> DenseGeneral:
    return DenseGeneral(
        features,
        kernel_axes,
        axis=axis,
        dtype=dtype or config.dtype,
        stddev=config.initializer_range,
        name=name,
    )


def _pooler_dense(config: BertConfig) -> DenseGeneral:
    return _dense(config, config.hidden_size, ("embed", "mlp"), "pooler")


def _classifier_dense(config: BertConfig, num_labels: int) -> DenseGeneral:
    return _dense(config, num_labels, ("mlp", None), "classifier", dtype=jnp.float32)


class LayerNorm(nn.Module):
    """(x - mean) / sqrt(var + eps) * scale + bias over the last axis, in float32.

    Attributes:
        epsilon: added to the variance.
        dtype: output dtype.
    """

    epsilon: float
    dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Normalizes `x` (any float dtype; statistics in float32)."""
        x = jnp.asarray(x, jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        variance = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        normalized = (x - mean) * jax.lax.rsqrt(variance + self.epsilon)
        axes = ("embed",)
        width = (x.shape[-1],)
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, axes), width, jnp.float32
        )
        bias = self.param(
            "bias", nn.with_logical_partitioning(nn.initializers.zeros, axes), width, jnp.float32
        )
        return jnp.asarray(normalized * scale + bias, self.dtype)


class Embeddings(nn.Module):
    """Token + position (+ token type) embeddings, layer norm, dropout, projection to H.

    Attributes:
        config: the hyper-parameters.
    """

    config: BertConfig

    @nn.compact
    def __call__(
        self, input_ids: Array, token_type_ids: Array, position_ids: Array, *, deterministic: bool
    ) -> Array:
        """Embeds int [batch, length] ids -> [batch, length, hidden_size] in `dtype`."""
        cfg = self.config

        def table(rows: int, row_axis: str | None, name: str) -> nn.Embed:
            init = nn.initializers.normal(cfg.initializer_range)
            return nn.Embed(
                rows,
                cfg.embedding_width,
                dtype=jnp.float32,
                param_dtype=jnp.float32,
                embedding_init=nn.with_logical_partitioning(init, (row_axis, "embed")),
                name=name,
            )

        x = table(cfg.vocab_size, "vocab", "word_embeddings")(input_ids)
        x = x + table(cfg.max_position_embeddings, None, "position_embeddings")(position_ids)
        if cfg.type_vocab_size:
            x = x + table(cfg.type_vocab_size, None, "token_type_embeddings")(token_type_ids)
        x = LayerNorm(cfg.layer_norm_eps, dtype=cfg.dtype, name="layer_norm")(x)
        x = nn.Dropout(cfg.hidden_dropout_rate)(x, deterministic=deterministic)
        if cfg.projects_embeddings:
            x = _dense(cfg, cfg.hidden_size, (None, "embed"), "projection")(x)
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class SelfAttention(nn.Module):
    """Multi-head scaled dot-product self-attention with biases (Vaswani et al. 2017).

    Attributes:
        config: the hyper-parameters.
    """

    config: BertConfig

    @nn.compact
    def __call__(self, x: Array, mask: Array, *, deterministic: bool) -> Array:
        """Maps [batch, length, H] -> [batch, length, H]; `mask` [batch, 1, 1, length]."""
        cfg = self.config
        head_axes = ("batch", "length", "heads", "kv")

        def project(name: str) -> Array:
            layer = _dense(cfg, (cfg.num_heads, cfg.head_dim), ("embed", "heads", "kv"), name)
            return nn.with_logical_constraint(layer(x), head_axes)

        query, key, value = project("query"), project("key"), project("value")
        logits = jnp.einsum("bqhd,bkhd->bhqk", query, key).astype(jnp.float32)
        logits = logits / math.sqrt(cfg.head_dim) + jnp.where(mask, 0.0, _MASKED_LOGIT)
        weights = jax.nn.softmax(logits).astype(cfg.dtype)
        weights = nn.Dropout(cfg.attention_dropout_rate)(weights, deterministic=deterministic)
        context = jnp.einsum("bhqk,bkhd->bqhd", weights, value)
        context = nn.with_logical_constraint(context, head_axes)
        out = _dense(cfg, cfg.hidden_size, ("heads", "kv", "embed"), "output", axis=(-2, -1))
        return out(context)


class EncoderLayer(nn.Module):
    """Post-norm block: x = LN(x + attention(x)); x = LN(x + W2 act(W1 x)).

    Attributes:
        config: the hyper-parameters.
    """

    config: BertConfig

    @nn.compact
    def __call__(self, x: Array, mask: Array, *, deterministic: bool) -> Array:
        """Maps [batch, length, H] -> [batch, length, H]."""
        cfg = self.config

        def residual_norm(inputs: Array, update: Array, name: str) -> Array:
            update = nn.Dropout(cfg.hidden_dropout_rate)(update, deterministic=deterministic)
            summed = jnp.asarray(inputs, jnp.float32) + jnp.asarray(update, jnp.float32)
            return LayerNorm(cfg.layer_norm_eps, dtype=cfg.dtype, name=name)(summed)

        attended = SelfAttention(cfg, name="attention")(x, mask, deterministic=deterministic)
        x = residual_norm(x, attended, "attention_layer_norm")
        hidden = _dense(cfg, cfg.intermediate_size, ("embed", "mlp"), "intermediate")(x)
        hidden = _ACTIVATIONS[cfg.hidden_act](hidden)
        hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
        hidden = _dense(cfg, cfg.hidden_size, ("mlp", "embed"), "output")(hidden)
        x = residual_norm(x, hidden, "output_layer_norm")
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))


def position_ids_for(input_ids: Array, config: BertConfig) -> Array:
    """Absolute positions: 0, 1, ... (BERT); RoBERTa's padding-aware ids if offset > 0.

    RoBERTa (fairseq, and HF's `create_position_ids_from_input_ids`) numbers the
    non-padding tokens offset, offset + 1, ... and gives padding tokens offset - 1.
    """
    if config.position_offset == 0:
        return jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
    not_pad = (input_ids != config.pad_token_id).astype(jnp.int32)
    return (jnp.cumsum(not_pad, axis=-1) - 1 + config.position_offset) * not_pad + (
        config.position_offset - 1
    ) * (1 - not_pad)


class BertModel(nn.Module):
    """A BERT / RoBERTa / ELECTRA / ALBERT encoder (Devlin et al. 2019 and successors).

    Example::

        model = BertModel(BertConfig(vocab_size=30522))
        variables = model.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))
        hidden = model.apply(variables, input_ids, attention_mask, token_type_ids)

    Attributes:
        config: the hyper-parameters.
    """

    config: BertConfig

    @nn.compact
    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        token_type_ids: Array | None = None,
        position_ids: Array | None = None,
        *,
        enable_dropout: bool = False,
        return_pooled: bool = False,
    ) -> Array | tuple[Array, Array | None]:
        """Encodes a batch.

        Args:
            input_ids: int [batch, length] token ids.
            attention_mask: [batch, length], 1 for tokens, 0 for padding (hidden from
                every query); None attends to everything.
            token_type_ids: int [batch, length] segment ids; None means all 0.
            position_ids: int [batch, length]; None means `position_ids_for(input_ids)`.
            enable_dropout: apply dropout (needs a 'dropout' rng). Off by default.
            return_pooled: also return the pooler output (None without a pooler).

        Returns:
            The last hidden states [batch, length, hidden_size] in `config.dtype`, or
            (hidden states, pooled [batch, hidden_size]) with `return_pooled`.
        """
        cfg = self.config
        deterministic = not enable_dropout
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.bool_)
        if token_type_ids is None:
            token_type_ids = jnp.zeros(input_ids.shape, jnp.int32)
        if position_ids is None:
            position_ids = position_ids_for(input_ids, cfg)
        x = Embeddings(cfg, name="embeddings")(
            input_ids, token_type_ids, position_ids, deterministic=deterministic
        )
        mask = jnp.asarray(attention_mask, jnp.bool_)[:, None, None, :]
        layers = [EncoderLayer(cfg, name=f"layers_{g}") for g in range(cfg.layer_groups)]
        for i in range(cfg.num_layers):
            x = layers[i * cfg.layer_groups // cfg.num_layers](x, mask, deterministic=deterministic)
        pooled = None
        if cfg.add_pooler:
            pooled = jnp.tanh(_pooler_dense(cfg)(x[:, 0]))
        return (x, pooled) if return_pooled else x


class BertClassifier(nn.Module):
    """Sequence classification / regression on the pooled [CLS] state (Devlin et al. 2019).

    logits = W dropout(tanh(W_p h_[CLS] + b_p)) + b: BERT's GLUE head, used for every
    family here (a checkpoint without a pooler, e.g. ELECTRA, gets a fresh one from
    `init_head`). With `regression=True` (STS-B) `num_labels` must be 1 and the
    output is one float32 score per example.

    Example::

        classifier = BertClassifier(config, num_labels=1, regression=True)
        params = init_head(classifier, encoder_params, jax.random.key(0))
        scores = classifier.apply({"params": params}, input_ids, attention_mask)  # [B]

    Attributes:
        config: the encoder's hyper-parameters (`add_pooler` is forced on).
        num_labels: output classes (1 for regression).
        regression: return [batch] scores instead of [batch, num_labels] logits.
    """

    config: BertConfig
    num_labels: int = 2
    regression: bool = False

    @nn.compact
    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        token_type_ids: Array | None = None,
        *,
        enable_dropout: bool = False,
    ) -> Array:
        """Float32 logits [batch, num_labels], or scores [batch] with `regression`."""
        if self.regression != (self.num_labels == 1):
            raise ValueError(
                f"regression={self.regression} needs num_labels == 1 exactly when regressing; "
                f"got num_labels={self.num_labels}."
            )
        cfg = dataclasses.replace(self.config, add_pooler=True)
        _, pooled = BertModel(cfg, name="encoder")(
            input_ids,
            attention_mask,
            token_type_ids,
            enable_dropout=enable_dropout,
            return_pooled=True,
        )
        rate = cfg.hidden_dropout_rate
        if cfg.classifier_dropout_rate is not None:
            rate = cfg.classifier_dropout_rate
        pooled = nn.Dropout(rate)(pooled, deterministic=not enable_dropout)
        logits = _classifier_dense(cfg, self.num_labels)(pooled)
        return logits[:, 0] if self.regression else logits


# ------------------------------------------------------------------------------------
# Initialization and heads.
# ------------------------------------------------------------------------------------


def init_variables(model: nn.Module, rng: Array, length: int = 1) -> dict[str, Any]:
    """Initializes a `BertModel` or `BertClassifier` (boxed with logical axis names).

    Use under `jax.eval_shape` for shapes and partition specs without allocation.
    """
    return model.init(rng, jnp.ones((1, length), jnp.int32))


def abstract_params(model: nn.Module) -> Any:
    """Unboxed `jax.ShapeDtypeStruct`s of the model's parameters (nothing allocated)."""
    abstract = jax.eval_shape(functools.partial(init_variables, model), jax.random.key(0))
    return nn.meta.unbox(abstract["params"])


def init_head(classifier: BertClassifier, encoder_params: Mapping[str, Any], rng: Array) -> dict:
    """Classifier parameters: the (pretrained) encoder's plus a freshly initialized head.

    Only the head (and a pooler when `encoder_params` has none, e.g. ELECTRA) is
    initialized; the encoder's arrays are reused as they are.

    Args:
        classifier: the `BertClassifier`.
        encoder_params: `BertModel` parameters of `classifier.config`, e.g. from
            `from_pretrained`.
        rng: PRNG key for the head.

    Returns:
        {'encoder': ..., 'classifier': ...}, the tree of `classifier.init`'s params.

    Raises:
        ValueError: if the result does not match `classifier`'s parameter tree.
    """
    cfg = classifier.config
    encoder = dict(encoder_params)
    pooler, head = _init_head_params(cfg, classifier.num_labels, "pooler" not in encoder, rng)
    if pooler is not None:
        encoder["pooler"] = pooler
    params = {"encoder": encoder, "classifier": head}
    _check_same_tree(params, abstract_params(classifier), "init_head")
    return params


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _init_head_params(
    config: BertConfig, num_labels: int, with_pooler: bool, rng: Array
) -> tuple[Any, Any]:
    """Fresh (pooler or None, classifier) parameters, compiled as one program."""
    pooler_rng, head_rng = jax.random.split(rng)
    dummy = jnp.zeros((1, config.hidden_size), jnp.float32)
    pooler = None
    if with_pooler:
        pooler = nn.meta.unbox(_pooler_dense(config).init(pooler_rng, dummy)["params"])
    head = _classifier_dense(config, num_labels).init(head_rng, dummy)["params"]
    return pooler, nn.meta.unbox(head)


def _check_same_tree(params: Any, expected: Any, what: str) -> None:
    """Raises ValueError naming the paths whose presence or shape differ."""
    got = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree.leaves_with_path(params)}
    want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree.leaves_with_path(expected)}
    differ = sorted(k for k in got.keys() | want.keys() if got.get(k) != want.get(k))
    if differ:
        details = ", ".join(f"{k}: {got.get(k)} vs {want.get(k)}" for k in differ[:5])
        more = f" (and {len(differ) - 5} more)" if len(differ) > 5 else ""
        raise ValueError(
            f"{what}: parameters differ from the model's (got vs want): {details}{more}."
        )


def per_example_loss(outputs: Array, labels: Array, *, regression: bool = False) -> Array:
    """Float32 [batch] losses: softmax cross-entropy, or squared error with `regression`."""
    outputs = jnp.asarray(outputs, jnp.float32)
    if regression:
        return jnp.square(outputs - jnp.asarray(labels, jnp.float32))
    log_probs = jax.nn.log_softmax(outputs)
    return -jnp.take_along_axis(log_probs, jnp.asarray(labels)[:, None], axis=-1)[:, 0]


# ------------------------------------------------------------------------------------
# Hugging Face checkpoints.
# ------------------------------------------------------------------------------------


class _Tensor(NamedTuple):
    """Where an HF tensor goes: a parameter path and how to convert it.

    kind: 'table' (same shape), 'vector' (flat in HF) or 'linear' (PyTorch [out, in]
    weight; `inputs` leading axes of the Flax kernel are input axes).
    """

    path: tuple[str, ...]
    kind: str
    inputs: int = 1


def _layer_tensors(config: BertConfig, group: int) -> dict[str, _Tensor]:
    """HF names (without the model prefix) of one distinct layer's tensors."""
    layer = (f"layers_{group}",)
    if config.model_type == "albert":
        base = f"encoder.albert_layer_groups.{group}.albert_layers.0."
        names = ("attention.", "attention.dense", "attention.LayerNorm", "ffn", "ffn_output")
        names += ("full_layer_layer_norm",)
    else:
        base = f"encoder.layer.{group}."
        names = ("attention.self.", "attention.output.dense", "attention.output.LayerNorm")
        names += ("intermediate.dense", "output.dense", "output.LayerNorm")
    qkv, attention_out, attention_norm, ffn_in, ffn_out, output_norm = names
    targets = {attention_out: (layer + ("attention", "output"), 2)}
    targets |= {qkv + p: (layer + ("attention", p), 1) for p in ("query", "key", "value")}
    targets |= {ffn_in: (layer + ("intermediate",), 1), ffn_out: (layer + ("output",), 1)}
    tensors = {}
    for name, (path, inputs) in targets.items():
        tensors[f"{base}{name}.weight"] = _Tensor(path + ("kernel",), "linear", inputs)
        tensors[f"{base}{name}.bias"] = _Tensor(path + ("bias",), "vector")
    for name, norm in (
        (attention_norm, "attention_layer_norm"),
        (output_norm, "output_layer_norm"),
    ):
        tensors[f"{base}{name}.weight"] = _Tensor(layer + (norm, "scale"), "vector")
        tensors[f"{base}{name}.bias"] = _Tensor(layer + (norm, "bias"), "vector")
    return tensors


def hf_tensor_map(config: BertConfig) -> dict[str, _Tensor]:
    """HF tensor names (without 'bert.'-style prefix) -> parameter paths of `BertModel`."""
    emb = ("embeddings",)
    tensors = {
        "embeddings.word_embeddings.weight": _Tensor(
            emb + ("word_embeddings", "embedding"), "table"
        ),
        "embeddings.position_embeddings.weight": _Tensor(
            emb + ("position_embeddings", "embedding"), "table"
        ),
        "embeddings.LayerNorm.weight": _Tensor(emb + ("layer_norm", "scale"), "vector"),
        "embeddings.LayerNorm.bias": _Tensor(emb + ("layer_norm", "bias"), "vector"),
    }
    if config.type_vocab_size:
        tensors["embeddings.token_type_embeddings.weight"] = _Tensor(
            emb + ("token_type_embeddings", "embedding"), "table"
        )
    if config.projects_embeddings:
        name = {"albert": "encoder.embedding_hidden_mapping_in"}.get(
            config.model_type, "embeddings_project"
        )
        tensors[f"{name}.weight"] = _Tensor(emb + ("projection", "kernel"), "linear")
        tensors[f"{name}.bias"] = _Tensor(emb + ("projection", "bias"), "vector")
    for group in range(config.layer_groups):
        tensors |= _layer_tensors(config, group)
    if config.add_pooler:
        name = "pooler" if config.model_type == "albert" else "pooler.dense"
        tensors[f"{name}.weight"] = _Tensor(("pooler", "kernel"), "linear")
        tensors[f"{name}.bias"] = _Tensor(("pooler", "bias"), "vector")
    return tensors


# Non-parameter buffers some checkpoints persist: checked, then dropped.
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")


def _hf_shape(kind: str, inputs: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    if kind == "table":
        return shape
    if kind == "vector":
        return (math.prod(shape),)
    return (math.prod(shape[inputs:]), math.prod(shape[:inputs]))


def _to_flax(tensor: np.ndarray, kind: str, shape: tuple[int, ...]) -> np.ndarray:
    tensor = np.asarray(tensor, np.float32)
    if kind == "linear":
        tensor = tensor.T
    return np.ascontiguousarray(tensor.reshape(shape))


def _checkpoint_prefix(keys: set[str], config: BertConfig) -> str:
    """'bert.' (etc.) if the checkpoint's encoder tensors carry it, else ''."""
    prefix = _FAMILIES[config.model_type][0]
    return prefix if any(k.startswith(prefix) for k in keys) else ""


def _match_names(
    keys: set[str], expected: set[str], ignore_prefixes: Sequence[str], path: str
) -> None:
    """Raises ValueError naming unused or missing tensors (those under `ignore_prefixes` aside)."""
    kept = {k for k in keys if k in expected or not k.startswith(tuple(ignore_prefixes))}
    hint = " (pass ignore_prefixes=(...) to drop heads such as 'cls.')"
    tensor_matching.check_names(kept, expected, path, hint)


def _check_buffer(f: Any, name: str, config: BertConfig) -> None:
    """Persisted position/token-type id buffers must be the standard ones."""
    value = f.get_tensor(name)
    rows = np.arange(config.max_position_embeddings)[None]
    standard = rows if name.endswith("position_ids") else np.zeros_like(rows)
    if value.shape != standard.shape or not np.array_equal(value, standard):
        raise ValueError(f"Tensor {name!r} is not the standard buffer of shape {standard.shape}.")


def from_pretrained(
    model_dir: str | os.PathLike,
    *,
    ignore_prefixes: Sequence[str] = (),
    **overrides: Any,
) -> tuple[BertModel, dict[str, Any]]:
    """Loads a Hugging Face BERT / RoBERTa / ELECTRA / ALBERT encoder.

    Reads `config.json` and `model.safetensors` one tensor at a time (PyTorch
    [out, in] Linear weights are transposed). Every tensor must be used: a pooler
    ('pooler.dense.*') is loaded if present; the position/token-type id buffers are
    checked and dropped; tensors may carry the family's prefix ('bert.',
    'roberta.', 'electra.', 'albert.') or none.

    Example::

        model, params = from_pretrained("all-MiniLM-L6-v2/", dtype=jnp.bfloat16)
        hidden = model.apply({"params": params}, input_ids, attention_mask, token_type_ids)

    Args:
        model_dir: directory with `config.json` and `model.safetensors`.
        ignore_prefixes: tensor name prefixes to drop deliberately (e.g. 'cls.',
            'lm_head.', 'discriminator_predictions.').
        **overrides: `BertConfig` fields, e.g. `dtype` or dropout rates
            (`add_pooler` follows the checkpoint).

    Returns:
        (model, params): the `BertModel` and its float32 numpy parameters, the tree
        of `model.init(...)['params']` without the logical-axis boxes.

    Raises:
        ValueError: naming an unsupported config, an unused, missing or non-standard
            tensor, or a tensor whose shape differs (with both shapes).
    """
    model_dir = os.fspath(model_dir)
    with open(os.path.join(model_dir, "config.json")) as config_file:
        config = BertConfig.from_hf(json.load(config_file), **overrides)
    path = os.path.join(model_dir, "model.safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found (a single-file safetensors checkpoint).")
    with safe_open(path, framework="numpy") as f:
        keys = set(f.keys())
        prefix = _checkpoint_prefix(keys, config)
        pooler = "pooler." if config.model_type == "albert" else "pooler.dense."
        has_pooler = any(k.startswith(prefix + pooler) for k in keys)
        config = dataclasses.replace(config, add_pooler=has_pooler)
        model = BertModel(config)
        tensors = {prefix + name: t for name, t in hf_tensor_map(config).items()}
        buffers = {prefix + b for b in _BUFFERS} & keys
        _match_names(keys - buffers, set(tensors), ignore_prefixes, path)
        shapes = abstract_params(model)
        for name, t in tensors.items():
            want = _hf_shape(t.kind, t.inputs, tensor_matching.get_path(shapes, t.path).shape)
            got = tuple(f.get_slice(name).get_shape())
            if got != want:
                raise ValueError(f"Tensor {name!r} has shape {got}; the model needs {want}.")
        for name in sorted(buffers):
            _check_buffer(f, name, config)
        params: dict[str, Any] = {}
        for name, t in tensors.items():
            flax_shape = tensor_matching.get_path(shapes, t.path).shape
            tensor_matching.set_path(
                params, t.path, _to_flax(f.get_tensor(name), t.kind, flax_shape)
            )
    _check_same_tree(params, shapes, path)
    return model, params


def to_hf_state_dict(
    config: BertConfig, params: Mapping[str, Any], prefix: str = ""
) -> dict[str, np.ndarray]:
    """The inverse of `from_pretrained`'s mapping: HF-named float32 numpy tensors.

    Args:
        config: the encoder's hyper-parameters (`add_pooler` as in `params`).
        params: `BertModel` parameters.
        prefix: prepended to every name, e.g. 'bert.'.

    Returns:
        {name: array}, ready for `safetensors.numpy.save_file`.
    """
    state = {}
    for name, t in hf_tensor_map(config).items():
        value = np.asarray(tensor_matching.get_path(params, t.path), np.float32)
        hf_shape = _hf_shape(t.kind, t.inputs, value.shape)
        if t.kind == "linear":
            value = value.reshape(hf_shape[::-1]).T
        state[prefix + name] = np.ascontiguousarray(value.reshape(hf_shape))
    return state

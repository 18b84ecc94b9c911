"""Models as the trainer sees them: a network bound to its features, loss and predictions.

As T5X's `BaseModel` does, a task model owns everything that differs between an
encoder-decoder and an encoder classifier, so that `sam_jax.trainer` and
`sam_jax.train` have one step, one loop and one evaluation for both:

* `EncoderDecoderModel`: T5.1.1 (`sam_jax.models.t5`) on text-to-text tasks,
  fed by seqio's `EncDecFeatureConverter`; per-example token cross-entropy;
  greedy decoding for the metrics.
* `EncoderClassifierModel`: a BERT-family encoder with a classification or
  regression head (`sam_jax.models.bert.BertClassifier`) on sentence(-pair)
  tasks with a `label` (`sam_jax.tasks.local`, `sam_jax.tasks.glue_encoder`),
  fed by `sam_jax.encoder_features.EncoderFeatureConverter`; cross-entropy or
  squared error; argmax labels or scores for the metrics.

Both are frozen dataclasses (hashable, so they can be static arguments of a
jitted function) with the same methods, the `TaskModel` protocol.

Example::

  model = EncoderClassifierModel.from_checkpoint_config(minilm_dir)  # reads config.json
  model = model.for_task(seqio.get_mixture_or_task("local_sst2"))    # num_labels from the task
  params = model.load_pretrained(minilm_dir, jax.random.key(0))      # encoder + a fresh head
  losses = model.loss(params, batch, key)                            # float32 [batch]
"""

import dataclasses
import functools
import json
import os
from collections.abc import Mapping
from typing import Any
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
import seqio
import tensorflow as tf
from absl import logging
from flax import linen as nn

from sam_jax import checkpoints
from sam_jax import decoding
from sam_jax import encoder_features
from sam_jax import errors
from sam_jax.models import bert
from sam_jax.models import t5
from sam_jax.tasks import local

Batch = Mapping[str, jax.Array]
MixtureOrTask = seqio.Task | seqio.Mixture

# The T5Config fields a checkpoint fixes (the others are the run's choice).
T5_SHAPE_FIELDS = (
    "vocab_size",
    "emb_dim",
    "num_heads",
    "num_encoder_layers",
    "num_decoder_layers",
    "head_dim",
    "mlp_dim",
    "logits_via_embedding",
    "relative_attention_num_buckets",
)
# The BertConfig fields a checkpoint fixes.
BERT_SHAPE_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_heads",
    "intermediate_size",
    "max_position_embeddings",
    "type_vocab_size",
    "embedding_size",
    "num_hidden_groups",
)
# Pre-training heads of Hugging Face checkpoints (BERT, RoBERTa, ELECTRA, ALBERT), which
# fine-tuning a classifier drops.
PRETRAINING_HEADS = (
    "cls.",
    "lm_head.",
    "discriminator_predictions.",
    "predictions.",
    "sop_classifier.",
)


class TaskModel(Protocol):
    """What the trainer needs of a model (implemented by the two classes below).

    Attributes:
      features: the batch features `loss` and `predict` read (others are dropped).
      task_feature_lengths: the keys `sequence_length` must give.
    """

    features: tuple[str, ...]
    task_feature_lengths: tuple[str, ...]

    def for_task(self, mixture_or_task: MixtureOrTask) -> "TaskModel":
        """This model fitted to a task (e.g. its number of labels); ValueError if it can't be."""

    def feature_converter(
        self, mixture_or_task: MixtureOrTask, pack: bool
    ) -> seqio.FeatureConverter:
        """The converter from the task's features to `features`."""

    def init_params(self, rng: jax.Array) -> Any:
        """Freshly initialised parameters, boxed with logical axis names."""

    def load_pretrained(self, path: str, rng: jax.Array, shardings: Any = None) -> Any:
        """Unboxed parameters from a pre-trained checkpoint (ValueError/OSError if unusable).

        With `shardings` (the params' tree of `jax.sharding.Sharding`), a loader that
        can read slices (T5) returns `jax.Array`s read shard by shard, never the whole
        tensor on the host; others return numpy arrays for the caller to place.
        """

    def loss(self, params, batch: Batch, key: jax.Array | None) -> jax.Array:
        """Float32 per-example losses [N]; dropout on when `key` is given."""

    def predict(self, params, batch: Batch, sequence_length: Mapping[str, int]) -> jax.Array:
        """What the metrics are computed from, one row per example (jittable)."""

    def metric_predictions(self, outputs: np.ndarray, task: seqio.Task) -> list:
        """`predict`'s rows as the values `task.predict_metric_fns` take."""

    def count_tokens(self, batch: Mapping[str, np.ndarray]) -> int:
        """Non-padding tokens of a host batch (for throughput)."""


def _normalize_dtype(model) -> None:
    """Makes a frozen task model's `config.dtype` a numpy dtype (gin passes names: 'bfloat16')."""
    config = dataclasses.replace(model.config, dtype=jnp.dtype(model.config.dtype))
    object.__setattr__(model, "config", config)


def _tasks(mixture_or_task: MixtureOrTask) -> list[seqio.Task]:
    if isinstance(mixture_or_task, seqio.Mixture):
        return list(mixture_or_task.tasks)
    return [mixture_or_task]


def _mismatched(loaded: Any, wanted: Any, fields: tuple[str, ...]) -> list[str]:
    return [
        f"{name}={getattr(loaded, name)} (the run's model: {getattr(wanted, name)})"
        for name in fields
        if getattr(loaded, name) != getattr(wanted, name)
    ]


# --------------------------------------------------------------------------- #
# T5: encoder-decoder.
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class EncoderDecoderModel:
    """A T5.1.1 encoder-decoder on text-to-text tasks (T5X's `EncoderDecoderModel`).

    Attributes:
      config: the `T5Config`; `dtype` may be a name such as 'bfloat16'.
      z_loss: coefficient of T5X's auxiliary log(Z)² loss.
      num_valid_ids: decode only ids below this (the task vocabulary's size, set by
        `for_task`; None decodes every id of the model's padded vocabulary).

    Example::

      model = EncoderDecoderModel(t5.t5_1_1_config("small")).for_task(task)
      losses = model.loss(params, batch, None)   # [N], summed tokens / target length
    """

    config: t5.T5Config
    z_loss: float = 1e-4
    num_valid_ids: int | None = None

    features = (
        "encoder_input_tokens",
        "decoder_input_tokens",
        "decoder_target_tokens",
        "decoder_loss_weights",
        "encoder_segment_ids",
        "decoder_segment_ids",
    )
    task_feature_lengths = ("inputs", "targets")

    def __post_init__(self):
        _normalize_dtype(self)

    @functools.cached_property
    def module(self) -> t5.Transformer:
        return t5.Transformer(self.config)

    def for_task(self, mixture_or_task: MixtureOrTask) -> "EncoderDecoderModel":
        """Checks the task's `targets` vocabulary fits the model; decodes only its ids."""
        features = mixture_or_task.output_features
        if "targets" not in features:
            raise ValueError(
                f"{mixture_or_task.name} has no 'targets' feature (features: {sorted(features)}): "
                "a T5 model needs a text-to-text task; use an encoder model gin file "
                "(gin/models/bert/classifier.gin) for a classification task."
            )
        size = features["targets"].vocabulary.vocab_size
        if size > self.config.vocab_size:
            raise ValueError(
                f"{mixture_or_task.name}'s vocabulary has {size} ids but the model's vocab_size is "
                f"{self.config.vocab_size}: set VOCAB_SIZE ≥ {size}."
            )
        return dataclasses.replace(self, num_valid_ids=size)

    def feature_converter(
        self, mixture_or_task: MixtureOrTask, pack: bool
    ) -> seqio.FeatureConverter:
        del mixture_or_task
        return seqio.EncDecFeatureConverter(pack=pack)

    def init_params(self, rng: jax.Array):
        return t5.init_variables(self.config, rng)["params"]

    def load_pretrained(self, path: str, rng: jax.Array, shardings: Any = None):
        """The parameters of a T5X checkpoint, a Hugging Face T5 directory or a sam_jax run.

        With `shardings`, every parameter is read slice by slice into its sharding
        (`t5_checkpoints.from_pretrained`, or orbax for a run's MODEL_DIR, whose
        last checkpoint is taken whole: task transfer): T5.1.1 XL never exists
        whole on a host.

        Raises:
          ValueError: the checkpoint's shapes are not `config`'s (naming the fields),
            checked before any tensor is read.
        """
        if checkpoints.is_run(path):
            abstract = nn.meta.unbox(jax.eval_shape(self.init_params, rng))
            if shardings is not None:
                abstract = jax.tree.map(
                    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                    abstract,
                    shardings,
                )
            return _run_params(path, abstract)
        del rng

        def checked_shardings(loaded: t5.T5Config):
            mismatched = _mismatched(loaded, self.config, T5_SHAPE_FIELDS)
            if mismatched:
                raise ValueError(
                    f"{path} is another model: {', '.join(mismatched)}; use the model gin file "
                    "of its size."
                )
            return shardings

        _, params = t5.from_pretrained(
            path,
            shardings=checked_shardings,
            dtype=self.config.dtype,
            dropout_rate=self.config.dropout_rate,
            relative_attention_max_distance=self.config.relative_attention_max_distance,
        )
        return params

    def loss(self, params, batch: Batch, key: jax.Array | None) -> jax.Array:
        """Summed token cross-entropy / target length, per example.

        The normalizer is the (constant) target length, so an example's loss does
        not depend on the batch it is in and the batch mean is T5X's objective
        with `loss_normalizing_factor` = batch size × target length.
        """
        targets = batch["decoder_target_tokens"]
        logits = self.module.apply(
            {"params": params},
            batch["encoder_input_tokens"],
            batch["decoder_input_tokens"],
            targets,
            batch.get("encoder_segment_ids"),
            batch.get("decoder_segment_ids"),
            enable_dropout=key is not None,
            rngs=None if key is None else {"dropout": key},
        )
        return t5.per_example_cross_entropy(
            logits,
            targets,
            batch["decoder_loss_weights"],
            example_normalizer=targets.shape[-1],
            z_loss=self.z_loss,
        )

    def predict(self, params, batch: Batch, sequence_length: Mapping[str, int]) -> jax.Array:
        """Greedy decoding: int32 [N, targets length]."""
        return decoding.greedy_decode(
            self.module,
            params,
            batch["encoder_input_tokens"],
            sequence_length["targets"],
            num_valid_ids=self.num_valid_ids,
        )

    def metric_predictions(self, outputs: np.ndarray, task: seqio.Task) -> list:
        """Decoded, postprocessed texts (up to the first EOS)."""
        vocabulary = task.output_features["targets"].vocabulary
        return [
            task.postprocess_fn(vocabulary.decode(ids), example=None, is_target=False)
            for ids in decoding.strip_after_eos(outputs)
        ]

    def count_tokens(self, batch: Mapping[str, np.ndarray]) -> int:
        return int(
            (batch["encoder_input_tokens"] > 0).sum() + (batch["decoder_target_tokens"] > 0).sum()
        )


def encoder_decoder(config: t5.T5Config, z_loss: float = 1e-4) -> EncoderDecoderModel:
    """An `EncoderDecoderModel` (for gin: `train.model = @encoder_decoder()`)."""
    return EncoderDecoderModel(config, z_loss)


# --------------------------------------------------------------------------- #
# BERT family: encoder + classification or regression head.
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class EncoderClassifierModel:
    """A BERT-family encoder with BERT's GLUE head (Devlin et al. 2019, §4.1).

    Classification: softmax cross-entropy of the pooled [CLS] logits; regression
    (STS-B): squared error of one score. δ-SAM and FSAM fine-tune these.

    Attributes:
      config: the encoder's `BertConfig`.
      num_labels: classes (1 for regression); None until `for_task` reads the task's.
      regression: float labels and one score; None until `for_task`.
      tokenizer_file: the checkpoint's tokenizer.json, if any: `for_task` checks
        that the task tokenizes with it.

    Example::

      model = EncoderClassifierModel.from_checkpoint_config(path).for_task(task)
      params = model.load_pretrained(path, jax.random.key(0))
    """

    config: bert.BertConfig
    num_labels: int | None = None
    regression: bool | None = None
    tokenizer_file: str | None = None

    features = (*encoder_features.MODEL_TOKEN_FEATURES, encoder_features.LABEL)
    task_feature_lengths = ("inputs",)

    def __post_init__(self):
        _normalize_dtype(self)

    @classmethod
    def from_checkpoint_config(cls, model_dir: str, **overrides: Any) -> "EncoderClassifierModel":
        """The model of a Hugging Face directory's `config.json` (weights are not read).

        Args:
          model_dir: holds config.json (and model.safetensors, tokenizer.json).
          **overrides: `BertConfig` fields, e.g. dtype or dropout rates.

        Raises:
          OSError: no config.json; ValueError: an unsupported configuration.
        """
        path = os.path.join(model_dir, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{model_dir} has no config.json (a Hugging Face directory).")
        with open(path, encoding="utf-8") as f:
            config = bert.BertConfig.from_hf(json.load(f), **overrides)
        tokenizer = os.path.join(model_dir, local.TOKENIZER_FILE)
        return cls(config, tokenizer_file=tokenizer if os.path.isfile(tokenizer) else None)

    @functools.cached_property
    def module(self) -> bert.BertClassifier:
        if self.num_labels is None:
            raise ValueError("EncoderClassifierModel: num_labels is unknown; call for_task first.")
        return bert.BertClassifier(self.config, self.num_labels, bool(self.regression))

    def for_task(self, mixture_or_task: MixtureOrTask) -> "EncoderClassifierModel":
        """Takes the number of labels (or regression) from the task; checks its tokenizer."""
        heads = {_label_head(task) for task in _tasks(mixture_or_task)}
        if len(heads) != 1:
            raise ValueError(
                f"The tasks of {mixture_or_task.name} have different labels {sorted(heads)}: one "
                "classifier head needs one label set."
            )
        ((num_labels, regression),) = heads
        for name, value, wanted in (
            ("num_labels", self.num_labels, num_labels),
            ("regression", self.regression, regression),
        ):
            if value is not None and value != wanted:
                raise ValueError(
                    f"The model's {name}={value} but {mixture_or_task.name} has {name}={wanted}: "
                    f"leave {name} unset to take the task's."
                )
        for task in _tasks(mixture_or_task):
            self._check_vocabulary(task)
        return dataclasses.replace(self, num_labels=num_labels, regression=regression)

    def _check_vocabulary(self, task: seqio.Task) -> None:
        text = [f for f in task.output_features.values() if f.rank == 1]
        vocabulary = text[0].vocabulary
        if vocabulary.vocab_size > self.config.vocab_size:
            raise ValueError(
                f"{task.name}'s vocabulary has {vocabulary.vocab_size} ids but the encoder's "
                f"vocab_size is {self.config.vocab_size}: tokenize the task with the checkpoint's "
                f"{local.TOKENIZER_FILE}."
            )
        if self.tokenizer_file is None:
            return
        from sam_jax.tasks import hf_vocabulary  # noqa: PLC0415  (needs `tokenizers`)

        if vocabulary != hf_vocabulary.HfVocabulary(self.tokenizer_file):
            raise ValueError(
                f"{task.name} is tokenized with {vocabulary}, not the checkpoint's "
                f"{self.tokenizer_file}: register the task with that {local.TOKENIZER_FILE}."
            )

    def feature_converter(
        self, mixture_or_task: MixtureOrTask, pack: bool
    ) -> seqio.FeatureConverter:
        return encoder_features.EncoderFeatureConverter(mixture_or_task, pack=pack)

    def init_params(self, rng: jax.Array):
        return bert.init_variables(self.module, rng)["params"]

    def load_pretrained(self, path: str, rng: jax.Array, shardings: Any = None):
        """The checkpoint's encoder (and pooler) with a fresh head from `rng`, on the host.

        `path` is a Hugging Face directory, or a sam_jax run's MODEL_DIR: then the
        encoder and pooler it fine-tuned (its last checkpoint) start this task with
        a new head (task transfer, Zhong et al. 2022 Fig. 3). BERT-family
        checkpoints (≤ 1.4 GB for the large models) are read whole, as numpy;
        `shardings` is not used (the caller places the arrays).

        Raises:
          ValueError: the checkpoint's architecture is not `config`'s, or a tensor
            is missing, unused or of the wrong shape.
        """
        del shardings
        if checkpoints.is_run(path):
            abstract = bert.abstract_params(self.module)["encoder"]
            params = _run_params(path, {"encoder": abstract})
            return bert.init_head(self.module, params["encoder"], rng)
        encoder, params = bert.from_pretrained(
            path,
            ignore_prefixes=PRETRAINING_HEADS,
            dtype=self.config.dtype,
            hidden_dropout_rate=self.config.hidden_dropout_rate,
            attention_dropout_rate=self.config.attention_dropout_rate,
            classifier_dropout_rate=self.config.classifier_dropout_rate,
        )
        mismatched = _mismatched(encoder.config, self.config, BERT_SHAPE_FIELDS)
        if mismatched:
            raise ValueError(f"{path} is another encoder: {', '.join(mismatched)}.")
        return bert.init_head(self.module, params, rng)

    def loss(self, params, batch: Batch, key: jax.Array | None) -> jax.Array:
        outputs = self.module.apply(
            {"params": params},
            batch["input_ids"],
            batch["attention_mask"],
            batch["token_type_ids"],
            enable_dropout=key is not None,
            rngs=None if key is None else {"dropout": key},
        )
        return bert.per_example_loss(outputs, batch["label"], regression=bool(self.regression))

    def predict(self, params, batch: Batch, sequence_length: Mapping[str, int]) -> jax.Array:
        """int32 [N] labels (argmax), or float32 [N] scores for regression."""
        del sequence_length
        outputs = self.module.apply(
            {"params": params}, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
        )
        if self.regression:
            return outputs.astype(jnp.float32)
        return jnp.argmax(outputs, axis=-1).astype(jnp.int32)

    def metric_predictions(self, outputs: np.ndarray, task: seqio.Task) -> list:
        del task
        return np.asarray(outputs).tolist()

    def count_tokens(self, batch: Mapping[str, np.ndarray]) -> int:
        return int(np.sum(batch["attention_mask"]))


def _run_params(model_dir: str, abstract_params: Any) -> Any:
    """`checkpoints.restore_run_params`, saying which step of which run the model starts from."""
    params, step = checkpoints.restore_run_params(model_dir, abstract_params)
    logging.info("Starting from step %d of the run %s.", step, model_dir)
    return params


def _label_head(task: seqio.Task) -> tuple[int, bool]:
    """(num_labels, regression) of a task's rank-0 `label` feature."""
    label = task.output_features.get(encoder_features.LABEL)
    if label is None or label.rank != 0:
        raise ValueError(
            f"{task.name} has no scalar '{encoder_features.LABEL}' feature: an encoder classifier "
            "needs a classification or regression task (sam_jax.tasks.local, glue_encoder)."
        )
    if tf.as_dtype(label.dtype).is_floating:
        return 1, True
    return label.vocabulary.vocab_size, False


@errors.reporting_input_errors
def encoder_classifier(
    model_dir: str,
    num_labels: int | None = None,
    regression: bool | None = None,
    **config_overrides: Any,
) -> EncoderClassifierModel:
    """The classifier of a Hugging Face checkpoint's config.json (for gin).

    Bad input (no config.json, an unsupported architecture) is an
    `errors.ConfigError` whose one-line message starts with 'encoder_classifier: '.

    Example (gin)::

      train.model = @encoder_classifier()
      encoder_classifier.model_dir = %ENCODER
    """
    if not model_dir:
        raise ValueError(
            "encoder_classifier.model_dir is not set: an encoder is fine-tuned from a "
            "checkpoint; set INITIAL_CHECKPOINT_PATH to a Hugging Face directory."
        )
    if checkpoints.is_run(model_dir):
        raise ValueError(
            f"{model_dir} is a sam_jax run, not a Hugging Face directory: to start from it, "
            "set ENCODER to the directory it was fine-tuned from (its config.json and "
            "tokenizer.json)."
        )
    model = EncoderClassifierModel.from_checkpoint_config(model_dir, **config_overrides)
    return dataclasses.replace(model, num_labels=num_labels, regression=regression)

"""GLUE for BERT-family encoders: seqio Tasks over TFDS with token ids and labels.

The GLUE data of `glue.py` (TFDS `glue/<config>:2.0.0`, the same splits and
split sizes) in the feature layout of `local.py`, for
`sam_jax.encoder_features.EncoderFeatureConverter` (which adds [CLS]/[SEP]
and the token type ids):

* single sentences (cola, sst2): `inputs` -- int32 [None];
* pairs: `sentence1`, `sentence2` -- int32 [None] each, from the TFDS fields
  sentence1/sentence2 (mrpc, stsb, rte, wnli), question1/question2 (qqp),
  question/sentence (qnli), premise/hypothesis (mnli, premise first as BERT);
* `label` -- int32 [] (the TFDS class index) or float32 [] (STS-B's score);
* `idx` -- int32 [], the TFDS index; `<text feature>_pretokenized`, the text.

Token ids are the vocabulary's encoding WITHOUT special tokens and no EOS.

Tasks `glue_encoder_<config>` for cola, sst2, mrpc, qqp, stsb, mnli (splits
train, validation_matched, validation_mismatched), mnli_matched and
mnli_mismatched (evaluation-only: MNLI's validation sets as a 'validation'
split, as in glue.py), qnli, rte and wnli (which glue.py leaves out, as T5
does). Metrics are T5's GLUE metrics (`local.METRICS`, in percent): cola MCC;
sst2, mnli, qnli, rte, wnli accuracy; mrpc, qqp accuracy and F1; stsb Pearson
and Spearman correlation. They take label values (class indices or floats).

Registering reads no data (split sizes are known, `tfds_tasks.KnownSizeTfdsSource`);
TFDS is read when a dataset is built. `train_fraction` subsamples the training
splits as glue.py does (`subsampling.with_train_fraction`: exact count,
deterministic in `seed`, nested across fractions; validation is kept whole),
and the names then carry `subsampling.train_fraction_suffix`
('glue_encoder_rte_frac0.1'). Importing this module registers nothing.

Example:

  >>> from sam_jax.tasks.hf_vocabulary import HfVocabulary
  >>> vocab = HfVocabulary("/path/to/tokenizer.json")
  >>> names = register_glue_encoder_tasks(vocab, train_fraction=0.1)
  >>> names[:2]
  ['glue_encoder_cola_frac0.1', 'glue_encoder_sst2_frac0.1']
  >>> task = seqio.get_mixture_or_task("glue_encoder_rte_frac0.1")
  >>> ds = task.get_dataset({"inputs": 128}, split="train")
  >>> converter = EncoderFeatureConverter(task)
  >>> batches = converter(ds, {"inputs": 128}).batch(32)
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from collections.abc import Sequence

import seqio
import tensorflow as tf

from sam_jax.tasks import glue
from sam_jax.tasks import local
from sam_jax.tasks import registry
from sam_jax.tasks import subsampling
from sam_jax.tasks import tfds_tasks

PREFIX = "glue_encoder_"
_MAX_SHUFFLE_BUFFER = 100_000


@dataclasses.dataclass(frozen=True)
class GlueEncoderConfig:
    """One GLUE config as an encoder task.

    Attributes:
      config: the TFDS config name ('cola', 'mnli_matched', ...).
      split_sizes: seqio split -> number of TFDS examples (glue.py's).
      fields: the TFDS text fields, in the order of the task's token features
        (`inputs`, or `sentence1` and `sentence2`).
      num_classes: the number of classes; None for regression (STS-B).
      metrics: names from `local.METRICS`.
    """

    config: str
    split_sizes: Mapping[str, int]
    fields: tuple[str, ...]
    num_classes: int | None
    metrics: tuple[str, ...] = ("accuracy",)

    @property
    def name(self) -> str:
        return PREFIX + self.config

    @property
    def regression(self) -> bool:
        return self.num_classes is None

    @property
    def columns(self) -> tuple[str, ...]:
        """`local`'s column layout (it names the token features)."""
        return local.SINGLE_COLUMNS if len(self.fields) == 1 else local.PAIR_COLUMNS

    @property
    def tfds_name(self) -> str:
        return f"glue/{self.config}:{glue.TFDS_VERSION}"


def _split_sizes() -> dict[str, Mapping[str, int]]:
    """glue.py's split sizes, by TFDS config."""
    return {
        spec.tfds_name.split("/")[1].split(":")[0]: spec.split_sizes for spec in glue.GLUE_TASKS
    }


_SIZES = {
    **_split_sizes(),
    # Not in glue.py (T5 leaves WNLI out): the TFDS catalog of glue/wnli 2.0.0.
    "wnli": {"train": 635, "validation": 71},
}
_PAIR = ("sentence1", "sentence2")
_NLI = ("premise", "hypothesis")


def _config(config, fields, num_classes, metrics=("accuracy",)) -> GlueEncoderConfig:
    return GlueEncoderConfig(config, _SIZES[config], fields, num_classes, metrics)


CONFIGS = (
    _config("cola", ("sentence",), 2, ("mcc",)),
    _config("sst2", ("sentence",), 2),
    _config("mrpc", _PAIR, 2, ("accuracy", "f1")),
    _config("qqp", ("question1", "question2"), 2, ("accuracy", "f1")),
    _config("stsb", _PAIR, None, ("pearson", "spearman")),
    _config("mnli", _NLI, 3),
    _config("mnli_matched", _NLI, 3),
    _config("mnli_mismatched", _NLI, 3),
    _config("qnli", ("question", "sentence"), 2),
    _config("rte", _PAIR, 2),
    _config("wnli", _PAIR, 2),
)


@seqio.map_over_dataset
def glue_to_encoder(
    example, fields: Sequence[str], features: Sequence[str], regression: bool
) -> dict:
    """A TFDS GLUE example -> {token feature: text, 'label', 'idx'}.

    Args:
      example: a TFDS `glue/<config>` example.
      fields: its text fields, in order.
      features: the task's text features ('inputs', or 'sentence1' and
        'sentence2'), one per field.
      regression: a float32 label (STS-B) instead of an int32 class index.
    """
    out = {feature: example[field] for feature, field in zip(features, fields)}
    out[local.LABEL] = tf.cast(example["label"], tf.float32 if regression else tf.int32)
    out["idx"] = tf.cast(example["idx"], tf.int32)
    return out


def register_config(
    spec: GlueEncoderConfig,
    vocabulary: seqio.Vocabulary,
    train_fraction: float = 1.0,
    seed: int = 0,
) -> seqio.Task:
    """Registers one GLUE config as an encoder task (idempotent; reads no data).

    The task is `spec.name` plus `subsampling.train_fraction_suffix`.
    """
    source = tfds_tasks.KnownSizeTfdsSource(spec.tfds_name, spec.split_sizes)
    train_size = spec.split_sizes.get("train", 0)
    if train_size:
        source = subsampling.with_train_fraction(source, train_fraction, seed=seed)
        train_size = subsampling.num_train_examples(train_size, train_fraction)
    else:
        subsampling.validate_train_fraction(train_fraction)
    convert = functools.partial(
        glue_to_encoder,
        fields=spec.fields,
        features=local.TEXT_FEATURES[spec.columns],
        regression=spec.regression,
    )
    return registry.add_task(
        spec.name + subsampling.train_fraction_suffix(train_fraction, seed),
        source=source,
        preprocessors=[convert, local.tokenize_text, seqio.CacheDatasetPlaceholder()],
        output_features=local.output_features(
            vocabulary, spec.columns, spec.num_classes, spec.regression
        ),
        metric_fns=local.metric_fns(spec.metrics, spec.num_classes, spec.regression),
        shuffle_buffer_size=min(train_size, _MAX_SHUFFLE_BUFFER) or seqio.SHUFFLE_BUFFER_SIZE,
    )


def register_glue_encoder_tasks(
    vocabulary: seqio.Vocabulary | str | os.PathLike,
    *,
    train_fraction: float = 1.0,
    seed: int = 0,
    configs: Sequence[str] | None = None,
) -> list[str]:
    """Registers the GLUE encoder tasks (idempotent: re-registering replaces them).

    Args:
      vocabulary: any seqio Vocabulary (e.g. `HfVocabulary`), or the path of a
        Hugging Face tokenizer.json.
      train_fraction: in (0, 1]: keep this fraction of every training split
        (validation splits are never subsampled).
      seed: the subsampling seed.
      configs: the TFDS configs to register (default: all of `CONFIGS`).

    Returns:
      The registered task names, in `CONFIGS` order, e.g. 'glue_encoder_cola'
      (with the `train_fraction` suffix); remove them with
      `registry.remove(names)`.

    Example:
      >>> register_glue_encoder_tasks(vocab, configs=["rte"], train_fraction=0.5, seed=1)
      ['glue_encoder_rte_frac0.5_seed1']
    """
    subsampling.validate_train_fraction(train_fraction)
    known = {spec.config: spec for spec in CONFIGS}
    wanted = list(known) if configs is None else list(configs)
    unknown = [config for config in wanted if config not in known]
    if unknown:
        raise ValueError(f"unknown GLUE configs {unknown}; known: {', '.join(known)}")
    vocabulary = local.encoder_vocabulary(vocabulary)
    return [
        register_config(spec, vocabulary, train_fraction, seed).name
        for spec in CONFIGS
        if spec.config in wanted
    ]


def task(
    config: str,
    vocabulary: seqio.Vocabulary | str | os.PathLike,
    train_fraction: float = 1.0,
    seed: int = 0,
) -> str:
    """Registers one GLUE encoder task and returns its name (gin: `@glue_encoder.task()`).

    gin/tasks/glue_encoder.gin binds it with GLUE_CONFIG ('cola', 'sst2', ...),
    TOKENIZER, TRAIN_FRACTION and SEED, as `local.tsv_task` is for a local task.

    Example:
      >>> task("rte", "/models/bert-base/tokenizer.json", train_fraction=0.5)
      'glue_encoder_rte_frac0.5'
    """
    (name,) = register_glue_encoder_tasks(
        vocabulary, train_fraction=train_fraction, seed=seed, configs=[config]
    )
    return name

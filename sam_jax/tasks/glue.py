"""GLUE as T5's text-to-text seqio Tasks over TFDS, and the `glue` mixture.

The eight GLUE tasks of Bahri et al. (2022), Table 2 -- CoLA, SST-2, MRPC,
STS-B, QQP, MNLI (matched and mismatched validation), QNLI, RTE -- formatted and
scored as T5 does (Raffel et al., 2020; T5's `glue` and `stsb` preprocessors,
GLUE metrics and `glue_v002_proportional` mixture):

* inputs are "<task> <feature>: <text> <feature>: <text> ...", e.g.
  "cola sentence: The book fell." or "mnli hypothesis: ... premise: ...", with
  T5's feature order (alphabetical); targets are the TFDS label names
  ("acceptable" / "unacceptable", "entailment" / "neutral" / "contradiction",
  ...). STS-B targets are the score rounded to the nearest 0.2 and printed
  with one decimal ("3.8").
* postprocessors map the decoded text back to the label index (-1 if it is no
  label) or, for STS-B, to a float (-1.0 if it is no number).
* metrics: accuracy; F1 and accuracy (MRPC, QQP); Matthews correlation
  (CoLA); Pearson and Spearman correlation (STS-B), all in percent.

Tasks: glue_cola, glue_sst2, glue_mrpc, glue_stsb, glue_qqp, glue_mnli (train,
validation_matched, validation_mismatched), glue_mnli_matched and
glue_mnli_mismatched (evaluation-only: MNLI's two validation sets as a
'validation' split, like T5), glue_qnli, glue_rte; mixture `glue`, rate =
training examples. WNLI is left out, as in T5. TFDS: glue/<config>:2.0.0, read
only when a dataset is built (split sizes are known here, so registering needs
no data). `register_glue_tasks(train_fraction=..., seed=...)` registers
subsampled variants named like 'glue_cola_frac0.1' and 'glue_frac0.1'.

The vocabulary is a sentencepiece model given as `vocabulary_path` or, by
default, $SAM_JAX_SPM_PATH (`vocabularies.benchmark_vocabulary`). Importing
this module registers the full-data tasks only if that variable is set (the
model file is loaded lazily, on first use).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence

import seqio
import tensorflow as tf

from sam_jax.tasks import metrics
from sam_jax.tasks import tfds_tasks
from sam_jax.tasks import vocabularies

TFDS_VERSION = "2.0.0"
MIXTURE = "glue"


def glue_inputs(example, benchmark_name: str, feature_names: Sequence[str]) -> tf.Tensor:
    """T5's input text: '<benchmark> <name1>: <text1> <name2>: <text2> ...'."""
    parts = [benchmark_name]
    for name in feature_names:
        parts += [f"{name}:", example[name]]
    return tf.strings.join(parts, separator=" ")


@seqio.map_over_dataset
def glue_text(
    example, benchmark_name: str, feature_names: Sequence[str], label_names: Sequence[str]
):
    """T5's `glue` preprocessor (Raffel et al., 2020): the label becomes its name.

    Args:
      example: a TFDS GLUE/SuperGLUE example with an integer 'label' and 'idx'.
      benchmark_name: the first word of the input ('cola', 'mnli', ...).
      feature_names: the text features, in T5's (alphabetical) order.
      label_names: the TFDS class names, indexed by 'label'.

    Returns:
      {'inputs': '<benchmark> <name>: <text> ...', 'targets': the label's name,
      'idx': the TFDS index}.
    """
    return {
        "inputs": glue_inputs(example, benchmark_name, feature_names),
        "targets": tf.gather(tf.constant(label_names), example["label"]),
        "idx": example["idx"],
    }


@seqio.map_over_dataset
def stsb_text(example):
    """T5's `stsb` preprocessor: the score rounded to a multiple of 0.2, as text.

    `tf.round` rounds halves to even, as in T5: 2.5 becomes "2.4".
    """
    score = tf.round(example["label"] * 5) / 5
    return {
        "inputs": glue_inputs(example, "stsb", ("sentence1", "sentence2")),
        "targets": tf.strings.as_string(score, precision=1),
        "idx": example["idx"],
    }


def classification_task(
    name: str,
    tfds_name: str,
    split_sizes: Mapping[str, int],
    benchmark_name: str,
    feature_names: Sequence[str],
    label_names: Sequence[str],
    metric_fns: Sequence[Callable],
) -> tfds_tasks.TfdsTaskSpec:
    """A GLUE-style classification task: `glue_text` text, label-index postprocessor.

    Args:
      name: the task name.
      tfds_name: 'dataset/config:version'.
      split_sizes: seqio split -> number of TFDS examples.
      benchmark_name, feature_names, label_names: as in `glue_text`.
      metric_fns: T5's metrics for the task (`tasks.metrics`).
    """
    return tfds_tasks.TfdsTaskSpec(
        name=name,
        tfds_name=tfds_name,
        split_sizes=split_sizes,
        text_preprocessors=[
            functools.partial(
                glue_text,
                benchmark_name=benchmark_name,
                feature_names=tuple(feature_names),
                label_names=tuple(label_names),
            )
        ],
        metric_fns=metric_fns,
        postprocess_fn=functools.partial(
            metrics.string_label_to_class_id, label_classes=tuple(label_names)
        ),
    )


def _glue(
    config: str,
    split_sizes: Mapping[str, int],
    feature_names: Sequence[str],
    label_names: Sequence[str],
    metric_fns: Sequence[Callable] = (metrics.accuracy,),
    benchmark_name: str | None = None,
) -> tfds_tasks.TfdsTaskSpec:
    return classification_task(
        name=f"glue_{config}",
        tfds_name=f"glue/{config}:{TFDS_VERSION}",
        split_sizes=split_sizes,
        benchmark_name=benchmark_name or config,
        feature_names=feature_names,
        label_names=label_names,
        metric_fns=metric_fns,
    )


_NLI_LABELS = ("entailment", "neutral", "contradiction")
_MNLI_FEATURES = ("hypothesis", "premise")
_BINARY_F1_METRICS = (metrics.f1_score_with_invalid, metrics.accuracy)

# Split sizes (examples per TFDS split; the unlabelled test splits are left out): the
# TFDS catalog page of glue 2.0.0, https://www.tensorflow.org/datasets/catalog/glue
# (tensorflow/datasets docs/catalog/glue.md), builder tfds.text.Glue, VERSION 2.0.0 as
# in tensorflow-datasets 4.9.10. All checked against it, config by config, including
# mnli's validation_matched / validation_mismatched and the validation splits of the
# mnli_matched / mnli_mismatched configs.
GLUE_TASKS = (
    _glue(
        "cola",
        {"train": 8551, "validation": 1043},
        ("sentence",),
        ("unacceptable", "acceptable"),
        (metrics.matthews_corrcoef,),
    ),
    _glue("sst2", {"train": 67349, "validation": 872}, ("sentence",), ("negative", "positive")),
    _glue(
        "mrpc",
        {"train": 3668, "validation": 408},
        ("sentence1", "sentence2"),
        ("not_equivalent", "equivalent"),
        _BINARY_F1_METRICS,
    ),
    tfds_tasks.TfdsTaskSpec(
        name="glue_stsb",
        tfds_name=f"glue/stsb:{TFDS_VERSION}",
        split_sizes={"train": 5749, "validation": 1500},
        text_preprocessors=[stsb_text],
        metric_fns=(metrics.pearson_corrcoef, metrics.spearman_corrcoef),
        postprocess_fn=metrics.string_to_float,
    ),
    _glue(
        "qqp",
        {"train": 363846, "validation": 40430},
        ("question1", "question2"),
        ("not_duplicate", "duplicate"),
        _BINARY_F1_METRICS,
    ),
    _glue(
        "mnli",
        {"train": 392702, "validation_matched": 9815, "validation_mismatched": 9832},
        _MNLI_FEATURES,
        _NLI_LABELS,
    ),
    _glue("mnli_matched", {"validation": 9815}, _MNLI_FEATURES, _NLI_LABELS, benchmark_name="mnli"),
    _glue(
        "mnli_mismatched", {"validation": 9832}, _MNLI_FEATURES, _NLI_LABELS, benchmark_name="mnli"
    ),
    _glue(
        "qnli",
        {"train": 104743, "validation": 5463},
        ("question", "sentence"),
        ("entailment", "not_entailment"),
    ),
    _glue(
        "rte",
        {"train": 2490, "validation": 277},
        ("sentence1", "sentence2"),
        ("entailment", "not_entailment"),
    ),
)


def register_glue_tasks(
    train_fraction: float = 1.0,
    seed: int = 0,
    vocabulary: seqio.Vocabulary | None = None,
    vocabulary_path: str | None = None,
) -> dict[str, str]:
    """Registers the GLUE tasks and the `glue` mixture (idempotent).

    Args:
      train_fraction: in (0, 1]: keep this fraction of every training split
        (exact count, deterministic in `seed`, nested across fractions);
        validation splits are never subsampled.
      seed: the subsampling seed.
      vocabulary: a `seqio.Vocabulary`; by default a sentencepiece model read
        from `vocabulary_path` or $SAM_JAX_SPM_PATH (lazily).
      vocabulary_path: the sentencepiece model, if `vocabulary` is None.

    Returns:
      {'glue_cola': registered name, ..., 'glue': mixture name}; names carry
      `subsampling.train_fraction_suffix(train_fraction, seed)`. Remove them
      with `registry.remove(names.values())`.
    """
    return tfds_tasks.register_tfds_tasks(
        GLUE_TASKS,
        MIXTURE,
        vocabularies.benchmark_vocabulary(vocabulary, vocabulary_path),
        train_fraction,
        seed,
    )


if vocabularies.spm_path_from_env():
    register_glue_tasks()

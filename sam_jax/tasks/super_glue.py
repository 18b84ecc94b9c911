"""SuperGLUE as T5's text-to-text seqio Tasks over TFDS, and the `super_glue` mixture.

The eight SuperGLUE tasks of Bahri et al. (2022), Tables 1, 6 and 9 -- BoolQ,
CB, COPA, MultiRC, ReCoRD, RTE, WiC, WSC -- formatted and scored as in T5's
`super_glue_v102_proportional` mixture (Raffel et al., 2020):

* BoolQ, CB, COPA, RTE, WiC: T5's GLUE format (`glue.glue_text`), e.g.
  "cb hypothesis: ... premise: ..." -> "entailment", "copa choice1: ...
  choice2: ... premise: ... question: effect" -> "choice1", "wic sentence1: ...
  sentence2: ... word: ..." -> "True"; accuracy, and for CB also the mean F1
  over its 3 classes.
* MultiRC: "multirc question: ... answer: ... paragraph: ..." (HTML <br> and
  <b> removed) -> "True"/"False" per candidate answer; F1 over all answers
  (F1a) and exact match per question (EM).
* ReCoRD: "record query: ... entities: A, B, ... passage: ..." ('@highlight'
  lines joined into sentences) -> an answer entity, one example per answer;
  scored once per query, EM and F1 maximised over its answers.
* WSC, T5's "simple" form: "wsc: <text with the pronoun marked as *it*>" ->
  the candidate referent. Training (`super_glue_wsc_simple_train`) keeps the
  examples whose candidate is right; evaluation (`super_glue_wsc_simple_eval`)
  scores whether the predicted noun phrase names the candidate, against the
  label (`metrics.wsc_simple`), accuracy.

Tasks: super_glue_{boolq, cb, copa, multirc, record, rte, wic,
wsc_simple_train, wsc_simple_eval}; mixture `super_glue`, rate = training
examples after preprocessing (ReCoRD 138,854, WSC 259, as T5). T5's mixture
also trains on DPR (not part of SuperGLUE); it is left out here. TFDS:
super_glue/<config>:1.0.2 (WSC: wsc.fixed), read only when a dataset is built.
`register_super_glue_tasks(train_fraction=..., seed=...)` registers the
subsampled variants of Bahri et al.'s data-limited experiments (2 %-80 %).
Vocabulary and import-time registration: as in `tasks.glue`.
"""

from __future__ import annotations

import functools

import seqio
import tensorflow as tf

from sam_jax.tasks import glue
from sam_jax.tasks import metrics
from sam_jax.tasks import tfds_tasks
from sam_jax.tasks import vocabularies

TFDS_VERSION = "1.0.2"
MIXTURE = "super_glue"
_BOOLEAN_LABELS = ("False", "True")


@seqio.map_over_dataset
def multirc_text(example):
    """T5's MultiRC format: one example per (question, candidate answer)."""
    inputs = glue.glue_inputs(example, "multirc", ("question", "answer", "paragraph"))
    inputs = tf.strings.regex_replace(inputs, "<br>", " ")
    inputs = tf.strings.regex_replace(inputs, "<(/)?b>", "")
    return {
        "inputs": inputs,
        "targets": tf.gather(tf.constant(_BOOLEAN_LABELS), example["label"]),
        "idx/paragraph": example["idx"]["paragraph"],
        "idx/question": example["idx"]["question"],
        "idx/answer": example["idx"]["answer"],
    }


def _record_query(example):
    passage = tf.strings.regex_replace(
        example["passage"], r"(\.|\?|\!|\"|\')\n@highlight\n", r"\1 "
    )
    passage = tf.strings.regex_replace(passage, r"\n@highlight\n", ". ")
    inputs = tf.strings.join(
        [
            "record query:",
            example["query"],
            "entities:",
            tf.strings.reduce_join(example["entities"], separator=", "),
            "passage:",
            passage,
        ],
        separator=" ",
    )
    return {
        "inputs": inputs,
        "answers": example["answers"],
        "idx/passage": example["idx"]["passage"],
        "idx/query": example["idx"]["query"],
    }


def _one_example_per_answer(query):
    num_answers = tf.size(query["answers"])
    copies = {
        key: tf.repeat(value[tf.newaxis], num_answers, axis=0) for key, value in query.items()
    }
    copies["targets"] = query["answers"]
    return copies


def record_text(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """T5's ReCoRD format: each query repeated once per answer (the target).

    Every copy keeps the full 'answers' list and the query's 'idx/passage' and
    'idx/query', with which evaluation scores each query once, against all of
    its answers.
    """
    dataset = dataset.map(_record_query, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.map(_one_example_per_answer, num_parallel_calls=tf.data.AUTOTUNE).unbatch()


# Two WSC texts whose pronoun T5 marks by hand (as 'X'): in the first it is glued
# to punctuation ('him,"'), in the second span2_index points at "use", not "it".
_WSC_TEMPLATES_BY_HAND = {
    "The boy continued to whip the pony , and eventually the pony threw him over. "
    'John laughed out quite loud. "Good for him," he said. ': (
        "The boy continued to whip the pony , and eventually the pony threw him over. "
        'John laughed out quite loud. "Good for X ," he said.'
    ),
    "When they had eventually calmed down a bit , and had gotten home, Mr. Farley "
    "put the magic pebble in an iron safe . Some day they might want to use it , but "
    "really for now, what more could they wish for?": (
        "When they had eventually calmed down a bit , and had gotten home, Mr. Farley "
        "put the magic pebble in an iron safe . Some day they might want to use X , but "
        "really for now, what more could they wish for?"
    ),
}


def _wsc_template(example) -> tf.Tensor:
    """The text with the pronoun (word `span2_index`, space-split) replaced by 'X'."""
    words = tf.strings.split(example["text"], sep=" ")
    index = example["span2_index"]
    template = tf.strings.join(
        [
            tf.strings.reduce_join(words[:index], separator=" "),
            "X",
            tf.strings.reduce_join(words[index + 1 :], separator=" "),
        ],
        separator=" ",
    )
    for text, by_hand in _WSC_TEMPLATES_BY_HAND.items():
        template = tf.where(tf.equal(example["text"], text), by_hand, template)
    return template


def _wsc_simple_example(example):
    marked = tf.strings.join([" *", example["span2_text"], "* "])
    return {
        "inputs": tf.strings.join(
            ["wsc:", tf.strings.regex_replace(_wsc_template(example), " X ", marked)],
            separator=" ",
        ),
        "targets": example["span1_text"],
        "label": example["label"],
        "idx": example["idx"],
    }


def wsc_simple_text(dataset: tf.data.Dataset, correct_referent_only: bool) -> tf.data.Dataset:
    """T5's `wsc_simple`: "wsc: ... *pronoun* ..." -> the candidate referent.

    Args:
      dataset: TFDS super_glue/wsc.fixed examples.
      correct_referent_only: keep only the examples whose candidate is the
        pronoun's referent (label 1): the training targets.
    """
    if correct_referent_only:
        dataset = dataset.filter(lambda example: tf.equal(example["label"], 1))
    return dataset.map(_wsc_simple_example, num_parallel_calls=tf.data.AUTOTUNE)


def _super_glue(
    config: str, split_sizes, feature_names, label_names=_BOOLEAN_LABELS, metric_fns=None
) -> tfds_tasks.TfdsTaskSpec:
    return glue.classification_task(
        name=f"super_glue_{config}",
        tfds_name=f"super_glue/{config}:{TFDS_VERSION}",
        split_sizes=split_sizes,
        benchmark_name=config,
        feature_names=feature_names,
        label_names=label_names,
        metric_fns=metric_fns or (metrics.accuracy,),
    )


_WSC_TFDS_NAME = f"super_glue/wsc.fixed:{TFDS_VERSION}"

# Split sizes (examples per TFDS split; the unlabelled test splits are left out): the
# TFDS catalog page of super_glue 1.0.2, https://www.tensorflow.org/datasets/catalog/super_glue
# (tensorflow/datasets docs/catalog/super_glue.md), builder tfds.text.SuperGlue, VERSION
# 1.0.2 as in tensorflow-datasets 4.9.10; all checked against it (WSC: the wsc.fixed
# config). `train_examples` -- ReCoRD 138,854 (one example per answer) and WSC 259 (the
# training examples whose candidate is the referent) -- are counts after preprocessing,
# which no TFDS page gives: they are T5's (t5/data/glue_utils.py,
# SUPER_GLUE_WEIGHT_MAPPING) and were not recounted here.
SUPER_GLUE_TASKS = (
    _super_glue("boolq", {"train": 9427, "validation": 3270}, ("passage", "question")),
    _super_glue(
        "cb",
        {"train": 250, "validation": 56},
        ("hypothesis", "premise"),
        ("entailment", "contradiction", "neutral"),
        (metrics.mean_multiclass_f1(3), metrics.accuracy),
    ),
    _super_glue(
        "copa",
        {"train": 400, "validation": 100},
        ("choice1", "choice2", "premise", "question"),
        ("choice1", "choice2"),
    ),
    tfds_tasks.TfdsTaskSpec(
        name="super_glue_multirc",
        tfds_name=f"super_glue/multirc:{TFDS_VERSION}",
        split_sizes={"train": 27243, "validation": 4848},
        text_preprocessors=[multirc_text],
        metric_fns=(metrics.multirc_f1_over_all_answers, metrics.multirc_exact_match),
        postprocess_fn=metrics.multirc,
    ),
    tfds_tasks.TfdsTaskSpec(
        name="super_glue_record",
        tfds_name=f"super_glue/record:{TFDS_VERSION}",
        split_sizes={"train": 100730, "validation": 10000},
        text_preprocessors=[record_text],
        metric_fns=(metrics.record_em_f1,),
        postprocess_fn=metrics.record,
        train_examples=138854,
    ),
    _super_glue(
        "rte",
        {"train": 2490, "validation": 277},
        ("hypothesis", "premise"),
        ("entailment", "not_entailment"),
    ),
    _super_glue("wic", {"train": 5428, "validation": 638}, ("sentence1", "sentence2", "word")),
    tfds_tasks.TfdsTaskSpec(
        name="super_glue_wsc_simple_train",
        tfds_name=_WSC_TFDS_NAME,
        split_sizes={"train": 554},
        text_preprocessors=[functools.partial(wsc_simple_text, correct_referent_only=True)],
        train_examples=259,
    ),
    tfds_tasks.TfdsTaskSpec(
        name="super_glue_wsc_simple_eval",
        tfds_name=_WSC_TFDS_NAME,
        split_sizes={"validation": 104},
        text_preprocessors=[functools.partial(wsc_simple_text, correct_referent_only=False)],
        metric_fns=(metrics.accuracy,),
        postprocess_fn=metrics.wsc_simple,
    ),
)


def register_super_glue_tasks(
    train_fraction: float = 1.0,
    seed: int = 0,
    vocabulary: seqio.Vocabulary | None = None,
    vocabulary_path: str | None = None,
) -> dict[str, str]:
    """Registers the SuperGLUE tasks and the `super_glue` mixture (idempotent).

    Args and returns as `glue.register_glue_tasks`: e.g. train_fraction=0.05
    gives 'super_glue_boolq_frac0.05', ..., 'super_glue_frac0.05' (the 5 %
    setting of Bahri et al., 2022, Table 6).
    """
    return tfds_tasks.register_tfds_tasks(
        SUPER_GLUE_TASKS,
        MIXTURE,
        vocabularies.benchmark_vocabulary(vocabulary, vocabulary_path),
        train_fraction,
        seed,
    )


if vocabularies.spm_path_from_env():
    register_super_glue_tasks()

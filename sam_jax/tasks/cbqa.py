"""Closed-book QA as T5's seqio Tasks over TFDS, and the `cbqa` mixture.

The three closed-book QA tasks of Bahri et al. (2022), Tables 4, 5 and 7 and
Figure 1 -- Natural Questions (open), WebQuestions and TriviaQA -- as defined
for T5 by Roberts et al. (2020) (the `*_open` tasks and `closed_book_qa`
mixture of google-research/t5_closed_book_qa): the model sees only the question
and must produce the answer from its parameters (no context passage).

* inputs "nq question: <question>", "wq question: <question>" and
  "trivia_qa question: <question>"; the target is the first answer (TriviaQA:
  the answer's canonical value), and every acceptable answer ('answers', for
  TriviaQA its aliases) is kept for evaluation.
* postprocessor: predictions stay text, targets become the list of answers.
* metrics: exact match 'em' and token F1 'f1' in percent, each the maximum over
  the acceptable answers, after SQuAD normalisation (lower case, no
  punctuation, articles or extra spaces); TriviaQA uses its own normalisation
  (punctuation becomes spaces), as in Roberts et al.

Splits follow Roberts et al.: 'train' is the first ~90 % of the TFDS training
split, 'validation' the rest (for model selection), and 'test' the TFDS split
used as the open-domain test set (NQ and TriviaQA: TFDS 'validation'; WQ:
'test'), which is where Bahri et al. report.

Tasks: natural_questions_open, web_questions_open, trivia_qa_open; mixture
`cbqa`, rate = training examples. TFDS: natural_questions_open:1.0.0,
web_questions:1.0.0, trivia_qa/unfiltered.nocontext:1.1.0, read only when a
dataset is built. `register_cbqa_tasks(train_fraction=..., seed=...)` registers
the subsampled variants (2 %-80 % in Bahri et al.). Vocabulary and
import-time registration: as in `tasks.glue`.
"""

from __future__ import annotations

import seqio
import tensorflow as tf

from sam_jax.tasks import metrics
from sam_jax.tasks import tfds_tasks
from sam_jax.tasks import vocabularies

MIXTURE = "cbqa"


def _question_answers(prefix: str, question, answers, target):
    return {
        "inputs": tf.strings.join([prefix, question]),
        "targets": target,
        "answers": answers,
    }


@seqio.map_over_dataset
def natural_questions_open_text(example):
    """NQ-open: "nq question: ..." -> the first of the answers."""
    answers = example["answer"]
    return _question_answers("nq question: ", example["question"], answers, answers[0])


@seqio.map_over_dataset
def web_questions_open_text(example):
    """WebQuestions: "wq question: ..." -> the first of the answers."""
    answers = example["answers"]
    return _question_answers("wq question: ", example["question"], answers, answers[0])


@seqio.map_over_dataset
def trivia_qa_open_text(example):
    """TriviaQA: "trivia_qa question: ..." -> the answer; its aliases all count."""
    answer = example["answer"]
    return _question_answers(
        "trivia_qa question: ", example["question"], answer["aliases"], answer["value"]
    )


def _open_qa(name, tfds_name, tfds_splits, split_sizes, text_preprocessor, metric_fn):
    return tfds_tasks.TfdsTaskSpec(
        name=name,
        tfds_name=tfds_name,
        split_sizes=split_sizes,
        tfds_splits=tfds_splits,
        text_preprocessors=[text_preprocessor],
        metric_fns=(metric_fn,),
        postprocess_fn=metrics.qa,
    )


# Roberts et al.'s splits: the cut points 79168, 3417 and 78785 are those of
# google-research t5_closed_book_qa/t5_cbqa/tasks.py ("~90%, matches numbers used by
# ORQA"). TFDS split sizes, from the TFDS catalog pages
# (https://www.tensorflow.org/datasets/catalog/<name>; tensorflow/datasets
# docs/catalog/<name>.md) of the versions below, as in tensorflow-datasets 4.9.10:
#   natural_questions_open 1.0.0: train 87,925 (= 79,168 + 8,757), validation 3,610;
#   web_questions 1.0.0: train 3,778 (= 3,417 + 361), test 2,032;
#   trivia_qa/unfiltered.nocontext 1.1.0: train 87,622 (= 78,785 + 8,837),
#     validation 11,313 (test 10,832, unlabelled, unused).
CBQA_TASKS = (
    _open_qa(
        "natural_questions_open",
        "natural_questions_open:1.0.0",
        {"train": "train[:79168]", "validation": "train[79168:]", "test": "validation"},
        {"train": 79168, "validation": 8757, "test": 3610},
        natural_questions_open_text,
        metrics.squad,
    ),
    _open_qa(
        "web_questions_open",
        "web_questions:1.0.0",
        {"train": "train[:3417]", "validation": "train[3417:]", "test": "test"},
        {"train": 3417, "validation": 361, "test": 2032},
        web_questions_open_text,
        metrics.squad,
    ),
    _open_qa(
        "trivia_qa_open",
        "trivia_qa/unfiltered.nocontext:1.1.0",
        {"train": "train[:78785]", "validation": "train[78785:]", "test": "validation"},
        {"train": 78785, "validation": 8837, "test": 11313},
        trivia_qa_open_text,
        metrics.trivia_qa,
    ),
)


def register_cbqa_tasks(
    train_fraction: float = 1.0,
    seed: int = 0,
    vocabulary: seqio.Vocabulary | None = None,
    vocabulary_path: str | None = None,
) -> dict[str, str]:
    """Registers the closed-book QA tasks and the `cbqa` mixture (idempotent).

    Args and returns as `glue.register_glue_tasks`: e.g. train_fraction=0.2
    gives 'natural_questions_open_frac0.2', ..., 'cbqa_frac0.2'. Only the
    'train' split is subsampled; 'validation' and 'test' are kept whole.
    """
    return tfds_tasks.register_tfds_tasks(
        CBQA_TASKS,
        MIXTURE,
        vocabularies.benchmark_vocabulary(vocabulary, vocabulary_path),
        train_fraction,
        seed,
    )


if vocabularies.spm_path_from_env():
    register_cbqa_tasks()

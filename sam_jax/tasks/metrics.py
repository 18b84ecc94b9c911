"""T5's postprocessors and metrics, for every task of `sam_jax.tasks`.

Every task is scored as T5 scores it (Raffel et al., 2020,
t5/data/postprocessors.py and t5/evaluation/metrics.py; Roberts et al., 2020
for closed-book QA), so that the benchmark numbers compare with T5's and with
Bahri et al. (2022), Tables 1-9, and the demo tasks are on the same scale:

* Postprocessors map the decoded text back to what the metrics compare, called
  by seqio as `postprocess_fn(text, example=..., is_target=...)`. Text that is
  not a label becomes -1, which never equals a target and counts as wrong.
* Metrics are seqio metric functions `fn(targets, predictions) -> dict` and, as
  in T5, report percentages (0-100) under T5's keys: 'accuracy', 'f1',
  'matthews_corrcoef', 'pearson_corrcoef', 'spearman_corrcoef',
  'mean_3class_f1', 'exact_match' (MultiRC), 'em'/'f1' (question answering).

Only numpy and scipy are needed (no TensorFlow, no scikit-learn): MCC, F1 and
macro-F1 are computed here with scikit-learn's definitions.

Example:
  >>> accuracy(["entailment", "neutral"], ["entailment", "entailment"])
  {'accuracy': 50.0}
  >>> squad([["Paris", "City of Paris"]], ["the city of paris!"])
  {'em': 100.0, 'f1': 100.0}
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.stats

# --------------------------------------------------------------------------- #
# Postprocessors.
# --------------------------------------------------------------------------- #


def _text(value: Any) -> str:
    if isinstance(value, (bytes, bytearray, np.bytes_)):
        return bytes(value).decode("utf-8")
    return str(value)


def strip_text(
    output: Any, example: Mapping[str, Any] | None = None, is_target: bool = False
) -> str:
    """Decoded text (str or bytes) without surrounding whitespace (the demo tasks)."""
    del example, is_target
    return _text(output).strip()


def string_label_to_class_id(
    output: Any,
    label_classes: Sequence[str],
    example: Mapping[str, Any] | None = None,
    is_target: bool = False,
) -> int:
    """The index of `output` in `label_classes`, or -1 if it is not a label."""
    del example, is_target
    text = _text(output)
    return list(label_classes).index(text) if text in label_classes else -1


def string_to_float(
    output: Any, example: Mapping[str, Any] | None = None, is_target: bool = False
) -> float:
    """STS-B: the decoded number, or -1.0 if the text is not a number."""
    del example, is_target
    try:
        return float(_text(output))
    except ValueError:
        return -1.0


def multirc(output: Any, example: Mapping[str, Any] | None = None, is_target: bool = False):
    """{'value': 0/1/-1}; targets also get the question as 'group'.

    T5 groups by 'idx/question' alone; the group here is (paragraph, question),
    which is the same when question indices are unique across paragraphs and
    still correct when they are not.
    """
    out = {"value": string_label_to_class_id(output, ("False", "True"))}
    if is_target:
        out["group"] = (int(example["idx/paragraph"]), int(example["idx/question"]))
    return out


def record(output: Any, example: Mapping[str, Any] | None = None, is_target: bool = False):
    """Predictions {'value': text}; targets {'value': all answers, 'group': query}."""
    if is_target:
        return {
            "value": [_text(a) for a in example["answers"]],
            "group": (int(example["idx/passage"]), int(example["idx/query"])),
        }
    return {"value": _text(output)}


def qa(output: Any, example: Mapping[str, Any] | None = None, is_target: bool = False):
    """Closed-book QA: the predicted text, or every acceptable answer for targets."""
    if is_target:
        return [_text(a) for a in example["answers"]]
    return _text(output)


_WSC_DETERMINERS = frozenset(
    "a an few her his each every many much my our some that the their these this "
    "those which whose your".split()
)


def _wsc_clean(text: Any) -> str:
    words = _text(text).strip().lower().split(" ")
    return " ".join(w for w in words if w not in _WSC_DETERMINERS)


def wsc_simple(output: Any, example: Mapping[str, Any] | None = None, is_target: bool = False):
    """WSC as T5 scores it: did the model name the candidate referent?

    Targets are the example's 0/1 label (is the candidate, the task's target
    text, the pronoun's referent). A prediction is 1 if, ignoring case and
    determiners, its words are a subset or superset of the candidate's and
    both or neither are possessive ("Bob" is not "Bob's hat"), 0 otherwise,
    and -1 if empty.
    """
    if is_target:
        return int(example["label"])
    prediction = _wsc_clean(output)
    if not prediction:
        return -1
    referent = _wsc_clean(example["targets_pretokenized"])
    if ("'" in prediction) != ("'" in referent):
        return 0
    predicted, candidate = set(prediction.split(" ")), set(referent.split(" "))
    return int(predicted <= candidate or candidate <= predicted)


# --------------------------------------------------------------------------- #
# Classification and regression metrics (percentages).
# --------------------------------------------------------------------------- #


def _check_lengths(targets: Sequence[Any], predictions: Sequence[Any]) -> None:
    if len(targets) != len(predictions):
        raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions")


def _paired(targets: Sequence[Any], predictions: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    _check_lengths(targets, predictions)
    return np.asarray(targets), np.asarray(predictions)


def accuracy(targets: Sequence[Any], predictions: Sequence[Any]) -> dict:
    t, p = _paired(targets, predictions)
    return {"accuracy": 100 * float(np.mean(t == p))}


def _f1_of_class(t: np.ndarray, p: np.ndarray, label: int) -> float:
    """F1 of one class; 0 when the class is neither a target nor predicted."""
    true_positives = np.sum((p == label) & (t == label))
    errors = np.sum((p == label) != (t == label))
    denominator = 2 * true_positives + errors
    return float(2 * true_positives / denominator) if denominator else 0.0


def f1_score_with_invalid(targets: Sequence[int], predictions: Sequence[int]) -> dict:
    """Binary F1 of class 1 (MRPC, QQP); a prediction other than 0/1 is wrong.

    An invalid prediction is replaced by the opposite of its target, so it
    counts as a false negative or a false positive.
    """
    t, p = _paired(targets, predictions)
    p = np.where((p == 0) | (p == 1), p, 1 - t)
    return {"f1": 100 * _f1_of_class(t, p, 1)}


def matthews_corrcoef(targets: Sequence[int], predictions: Sequence[int]) -> dict:
    """Matthews correlation (CoLA), multiclass form over every value present.

    With labels {0, 1} this is the usual binary MCC; an invalid prediction -1
    is a class of its own (as when T5 passes it to scikit-learn). 0 if the
    targets or the predictions are constant.
    """
    t, p = _paired(targets, predictions)
    labels, codes = np.unique(np.concatenate([t, p]), return_inverse=True)
    t_codes, p_codes = codes[: len(t)], codes[len(t) :]
    true_counts = np.bincount(t_codes, minlength=len(labels)).astype(np.float64)
    pred_counts = np.bincount(p_codes, minlength=len(labels)).astype(np.float64)
    n, correct = float(len(t)), float(np.sum(t_codes == p_codes))
    covariance = correct * n - true_counts @ pred_counts
    variance = (n * n - pred_counts @ pred_counts) * (n * n - true_counts @ true_counts)
    mcc = covariance / np.sqrt(variance) if variance > 0 else 0.0
    return {"matthews_corrcoef": 100 * float(mcc)}


def pearson_corrcoef(targets: Sequence[float], predictions: Sequence[float]) -> dict:
    t, p = _paired(targets, predictions)
    return {"pearson_corrcoef": 100 * float(scipy.stats.pearsonr(t, p).statistic)}


def spearman_corrcoef(targets: Sequence[float], predictions: Sequence[float]) -> dict:
    t, p = _paired(targets, predictions)
    return {"spearman_corrcoef": 100 * float(scipy.stats.spearmanr(t, p).statistic)}


def mean_multiclass_f1(num_classes: int) -> Callable[[Sequence[int], Sequence[int]], dict]:
    """Unweighted mean of the per-class F1 over classes 0..num_classes-1 (CB)."""

    def mean_f1(targets: Sequence[int], predictions: Sequence[int]) -> dict:
        t, p = _paired(targets, predictions)
        scores = [_f1_of_class(t, p, label) for label in range(num_classes)]
        return {f"mean_{num_classes}class_f1": 100 * float(np.mean(scores))}

    return mean_f1


def multirc_f1_over_all_answers(targets: Sequence[dict], predictions: Sequence[dict]) -> dict:
    """MultiRC F1a: binary F1 over every (question, answer) pair."""
    return f1_score_with_invalid([t["value"] for t in targets], [p["value"] for p in predictions])


def multirc_exact_match(targets: Sequence[dict], predictions: Sequence[dict]) -> dict:
    """MultiRC EM: the share of questions whose answers are all labelled right."""
    _check_lengths(targets, predictions)
    groups = collections.defaultdict(list)
    for target, prediction in zip(targets, predictions):
        groups[target["group"]].append(target["value"] == prediction["value"])
    return {"exact_match": 100 * float(np.mean([all(hits) for hits in groups.values()]))}


# --------------------------------------------------------------------------- #
# Question answering: exact match and token F1, maximised over the answers.
# --------------------------------------------------------------------------- #

_SQUAD_PUNCTUATION = frozenset(string.punctuation)
_TRIVIA_QA_PUNCTUATION = frozenset(string.punctuation + "‘’´`_")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _normalize(text: Any, punctuation: frozenset[str], replacement: str) -> str:
    """Lower case, `punctuation` replaced, articles and extra whitespace removed."""
    text = "".join(replacement if c in punctuation else c for c in _text(text).lower())
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalize_squad(text: Any) -> str:
    """SQuAD's normalisation: lower case, no punctuation, articles or extra spaces.

    Example:
      >>> normalize_squad("The Jean-Paul  Sartre!")
      'jeanpaul sartre'
    """
    return _normalize(text, _SQUAD_PUNCTUATION, "")


def normalize_trivia_qa(text: Any) -> str:
    """TriviaQA's normalisation: like SQuAD's, but punctuation becomes spaces.

    Both are needed, as in T5: Roberts et al. score TriviaQA with this one and
    the other QA tasks with SQuAD's, and they differ on punctuation inside
    words ("Jean-Paul" is "jean paul" here, "jeanpaul" for SQuAD).

    Example:
      >>> normalize_trivia_qa("The Jean-Paul  Sartre!")
      'jean paul sartre'
    """
    return _normalize(text, _TRIVIA_QA_PUNCTUATION, " ")


def _token_f1(target: str, prediction: str) -> float:
    """SQuAD token F1 of normalised strings (0 when nothing overlaps)."""
    target_tokens, prediction_tokens = target.split(), prediction.split()
    overlap = sum(
        (collections.Counter(target_tokens) & collections.Counter(prediction_tokens)).values()
    )
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(prediction_tokens), overlap / len(target_tokens)
    return 2 * precision * recall / (precision + recall)


def _qa_scores(
    targets: Sequence[str | Sequence[str]],
    predictions: Sequence[str],
    normalize: Callable[[Any], str],
) -> dict:
    _check_lengths(targets, predictions)
    exact, f1 = [], []
    for answers, prediction in zip(targets, predictions):
        if isinstance(answers, (str, bytes)):
            answers = [answers]
        answers, prediction = [normalize(a) for a in answers], normalize(prediction)
        exact.append(max(float(a == prediction) for a in answers))
        f1.append(max(_token_f1(a, prediction) for a in answers))
    return {"em": 100 * float(np.mean(exact)), "f1": 100 * float(np.mean(f1))}


def squad(targets: Sequence[str | Sequence[str]], predictions: Sequence[str]) -> dict:
    """EM and F1 after SQuAD normalisation, each the best over a target's answers.

    A target is the list of acceptable answers, or a single answer (str).
    """
    return _qa_scores(targets, predictions, normalize_squad)


def trivia_qa(targets: Sequence[str | Sequence[str]], predictions: Sequence[str]) -> dict:
    """EM and F1 after TriviaQA normalisation, the best over a target's answers."""
    return _qa_scores(targets, predictions, normalize_trivia_qa)


def record_em_f1(targets: Sequence[dict], predictions: Sequence[dict]) -> dict:
    """ReCoRD: SQuAD EM/F1 over every answer, one prediction per query.

    Preprocessing repeats a query once per answer; only the first copy of each
    query (its 'group') counts, and it is scored against all of its answers.
    """
    _check_lengths(targets, predictions)
    answers, kept = [], []
    seen = set()
    for target, prediction in zip(targets, predictions):
        if target["group"] not in seen:
            seen.add(target["group"])
            answers.append(target["value"])
            kept.append(prediction["value"])
    return squad(answers, kept)

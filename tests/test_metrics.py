"""Tests of sam_jax/tasks/metrics.py: T5's postprocessors and metrics, in percent.

Every expected value is worked out by hand in the test (counts, deviations,
ranks), not computed with the code under test.
"""

import math

import numpy as np
import pytest

pytest.importorskip("seqio")  # `sam_jax.tasks` registers seqio tasks on import

from sam_jax.tasks import metrics  # noqa: E402

# --------------------------------------------------------------------------- #
# Classification and regression.
# --------------------------------------------------------------------------- #


def test_accuracy_and_binary_f1_with_invalid_predictions():
    assert metrics.accuracy([0, 1, 2, 1], [0, 1, 1, -1]) == {"accuracy": 50.0}
    # Text labels (demo_nli): 2 of 3 right.
    assert metrics.accuracy(
        ["entailment", "neutral", "contradiction"], ["entailment", "neutral", "neutral"]
    ) == {"accuracy": pytest.approx(200 / 3)}
    # Invalid -1 becomes the opposite of the target: [1, 0, 0, 1]; TP 1, FP 1, FN 1.
    assert metrics.f1_score_with_invalid([1, 1, 0, 0], [1, -1, 0, -1]) == {"f1": 50.0}
    assert metrics.f1_score_with_invalid([0, 0], [0, 0]) == {"f1": 0.0}
    with pytest.raises(ValueError, match="2 targets but 1 predictions"):
        metrics.accuracy([0, 1], [0])


def test_matthews_correlation():
    assert metrics.matthews_corrcoef([1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 1]) == {
        "matthews_corrcoef": pytest.approx(100 / 3)
    }
    # An invalid prediction is a third class: counts t = (0, 2, 2), p = (1, 2, 1)
    # for (-1, 0, 1), 3 of 4 right: (3*4 - 6) / sqrt((16 - 6) * (16 - 8)).
    assert metrics.matthews_corrcoef([1, 0, 1, 0], [1, 0, -1, 0]) == {
        "matthews_corrcoef": pytest.approx(100 * 6 / math.sqrt(80))
    }
    assert metrics.matthews_corrcoef([1, 0, 1], [1, 1, 1]) == {"matthews_corrcoef": 0.0}
    assert metrics.matthews_corrcoef([1, 0, 1], [0, 1, 0]) == {"matthews_corrcoef": -100.0}


def test_pearson_and_spearman():
    targets = [1.0, 2.0, 3.0, 4.0]
    assert metrics.pearson_corrcoef(targets, [2.0, 4.0, 6.0, 8.0])["pearson_corrcoef"] == (
        pytest.approx(100.0)
    )
    # Deviations (-1.5, -.5, .5, 1.5) and (-.75, -.75, .25, 1.25): 3.5 / sqrt(5 * 2.75).
    assert metrics.pearson_corrcoef(targets, [1.0, 1.0, 2.0, 3.0]) == {
        "pearson_corrcoef": pytest.approx(100 * 3.5 / math.sqrt(5 * 2.75))
    }
    # Tied ranks (1.5, 1.5, 3, 4): 4.5 / sqrt(5 * 4.5).
    assert metrics.spearman_corrcoef(targets, [1.0, 1.0, 2.0, 3.0]) == {
        "spearman_corrcoef": pytest.approx(100 * 4.5 / math.sqrt(5 * 4.5))
    }
    assert metrics.spearman_corrcoef(targets, [10.0, 20.0, 30.0, 400.0]) == {
        "spearman_corrcoef": pytest.approx(100.0)
    }


def test_cb_mean_f1_over_three_classes():
    # Class 0: TP 1, FN 1 -> 2/3; class 1: TP 1, FP 1 -> 2/3; class 2: FN 1 -> 0.
    mean_f1 = metrics.mean_multiclass_f1(3)
    assert mean_f1([0, 0, 1, 2], [0, 1, 1, -1]) == {"mean_3class_f1": pytest.approx(100 * 4 / 9)}
    assert mean_f1([0, 1, 2], [0, 1, 2]) == {"mean_3class_f1": 100.0}


# --------------------------------------------------------------------------- #
# Question answering.
# --------------------------------------------------------------------------- #


def test_squad_and_trivia_qa_scores():
    assert metrics.squad([["Paris", "City of Paris"]], ["the city of paris!"]) == {
        "em": 100.0,
        "f1": 100.0,
    }
    assert metrics.squad([["William Shakespeare"]], ["Shakespeare"]) == {
        "em": 0.0,
        "f1": pytest.approx(100 * 2 / 3),
    }
    assert metrics.squad([["Jean-Paul Sartre"]], ["jean paul sartre"])["em"] == 0.0
    assert metrics.trivia_qa([["Jean-Paul Sartre"]], ["jean paul sartre"])["em"] == 100.0
    # As in T5: an answer that normalises to nothing matches an empty prediction
    # exactly, but has no tokens in common with it (F1 0).
    assert metrics.squad([["The"]], [""]) == {"em": 100.0, "f1": 0.0}
    with pytest.raises(ValueError, match="1 targets but 0 predictions"):
        metrics.squad([["a"]], [])


def test_squad_takes_one_answer_or_a_list_of_answers():
    """demo_cbqa's targets are single answers (str), the benchmarks' lists."""
    assert metrics.squad(["Karvel"], ["Karvel"]) == {"em": 100.0, "f1": 100.0}
    assert metrics.squad(["Karvel"], ["Zorbia"]) == {"em": 0.0, "f1": 0.0}
    # "the karvel." normalises to "karvel": 1 of 2 exact, and "x" shares no token.
    assert metrics.squad(["Karvel", "Zorbia"], ["the karvel.", "x"]) == {"em": 50.0, "f1": 50.0}
    assert metrics.squad([["Karvel", "Karvel City"]], ["karvel city"])["em"] == 100.0
    # Precision 1/1, recall 1/2: F1 = 2 * 1 * 1/2 / (1 + 1/2) = 2/3.
    assert metrics.squad(["Tavo Merkil"], ["Tavo"]) == {"em": 0.0, "f1": pytest.approx(200 / 3)}
    # The article "a" is dropped: "b" against "c".
    assert metrics.squad(["a b"], ["c"]) == {"em": 0.0, "f1": 0.0}
    assert metrics.squad([b"Lima"], ["lima"]) == {"em": 100.0, "f1": 100.0}


def test_squad_and_trivia_qa_normalisations():
    # SQuAD drops punctuation, TriviaQA turns it (and ‘’´`_) into spaces; both
    # lower-case and drop articles and extra whitespace.
    assert metrics.normalize_squad("The Jean-Paul  Sartre!") == "jeanpaul sartre"
    assert metrics.normalize_trivia_qa("The Jean-Paul  Sartre!") == "jean paul sartre"
    assert metrics.normalize_squad(b"An apple, a day") == "apple day"
    assert metrics.normalize_trivia_qa("  The ‘Great’ Gatsby_ ") == "great gatsby"


def test_record_scores_each_query_once_at_its_best_answer():
    targets = [
        {"value": ["Barack Obama", "Obama"], "group": (0, 0)},
        {"value": ["Barack Obama", "Obama"], "group": (0, 0)},
        {"value": ["New York City"], "group": (1, 1)},
    ]
    predictions = [{"value": "obama"}, {"value": "nonsense"}, {"value": "New York"}]
    assert metrics.record_em_f1(targets, predictions) == {
        "em": pytest.approx(50.0),
        "f1": pytest.approx(90.0),
    }


def test_multirc_groups_by_question():
    def t(value, question):
        return {"value": value, "group": (0, question)}

    targets = [t(1, 0), t(0, 0), t(1, 0), t(0, 1), t(1, 1)]
    predictions = [{"value": v} for v in (1, 0, 0, 0, 1)]
    assert metrics.multirc_f1_over_all_answers(targets, predictions) == {"f1": pytest.approx(80.0)}
    assert metrics.multirc_exact_match(targets, predictions) == {"exact_match": 50.0}
    # The same question index under another paragraph is another question.
    other = [t(1, 0), {"value": 0, "group": (1, 0)}]
    assert metrics.multirc_exact_match(other, [{"value": 1}, {"value": 1}]) == {"exact_match": 50.0}
    assert metrics.multirc(
        "True", example={"idx/paragraph": 2, "idx/question": 7}, is_target=True
    ) == {
        "value": 1,
        "group": (2, 7),
    }
    assert metrics.multirc("Maybe") == {"value": -1}


# --------------------------------------------------------------------------- #
# Postprocessors.
# --------------------------------------------------------------------------- #


def test_strip_text():
    assert metrics.strip_text(b" Lima \n") == "Lima"
    assert metrics.strip_text("entailment ", example={}, is_target=True) == "entailment"


def test_wsc_simple_postprocessor():
    example = {"targets_pretokenized": b"The tall man", "label": 1}
    assert metrics.wsc_simple("the tall man", example) == 1
    assert metrics.wsc_simple("Man", example) == 1  # a subset of the candidate
    assert metrics.wsc_simple("that tall old man", example) == 1  # a superset
    assert metrics.wsc_simple("the man's hat", example) == 0  # possessive
    assert metrics.wsc_simple("woman", example) == 0
    assert metrics.wsc_simple("the", example) == -1  # nothing left
    assert metrics.wsc_simple("anything", example, is_target=True) == 1


def test_label_and_number_postprocessors():
    labels = ("unacceptable", "acceptable")
    assert metrics.string_label_to_class_id(b"acceptable", labels) == 1
    assert metrics.string_label_to_class_id("acceptable ", labels) == -1
    assert metrics.string_to_float("2.4") == pytest.approx(2.4)
    assert metrics.string_to_float("") == -1.0
    example = {"answers": np.array([b"Paris", b"City of Paris"], dtype=object)}
    assert metrics.qa("Paris", example, is_target=True) == ["Paris", "City of Paris"]
    assert metrics.qa(b"paris", example) == "paris"

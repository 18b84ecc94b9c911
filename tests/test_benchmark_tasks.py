"""Tests for the benchmark tasks: sam_jax/tasks/{glue,super_glue,cbqa}.py, end to end
through sam_jax/tasks/tfds_tasks.py and T5's metrics (sam_jax/tasks/metrics.py).

Nothing is downloaded: `tfds.testing.mock_data` serves examples written here
(`FakeTfds`), so the T5 text each task must produce is known. Run with the
seqio environment: `/work/venv-seqio/bin/python -m pytest -q
tests/test_benchmark_tasks.py`; without seqio/TFDS the file is skipped.
"""

import contextlib
import functools
import importlib
import importlib.resources

import pytest

seqio = pytest.importorskip("seqio")
tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")

from fake_tfds import FakeTfds  # noqa: E402

from sam_jax.tasks import cbqa  # noqa: E402
from sam_jax.tasks import glue  # noqa: E402
from sam_jax.tasks import registry as task_registry  # noqa: E402
from sam_jax.tasks import subsampling  # noqa: E402
from sam_jax.tasks import super_glue  # noqa: E402
from sam_jax.tasks import vocabularies  # noqa: E402

VOCAB = seqio.ByteVocabulary()
SEQ = {"inputs": 512, "targets": 64}
TEST_SPM = str(
    importlib.resources.files("seqio") / "test_data" / "sentencepiece" / "sentencepiece.model"
)


# --------------------------------------------------------------------------- #
# Reading fake TFDS data, and registry hygiene.
# --------------------------------------------------------------------------- #


def read(task_name, split, data):
    """All examples of a task's split, unshuffled, read from `data`."""
    with FakeTfds(data).mocked():
        ds = seqio.get_mixture_or_task(task_name).get_dataset(
            SEQ, split=split, shuffle=False, use_cached=False, try_in_mem_cache=False
        )
        return list(ds.as_numpy_iterator())


def texts(examples):
    return [
        (ex["inputs_pretokenized"].decode(), ex["targets_pretokenized"].decode()) for ex in examples
    ]


@pytest.fixture
def registry():
    """Restores seqio's global registries after the test.

    Yields `register(register_fn, **kwargs)`, which registers with the byte
    vocabulary unless told otherwise. Tasks registered by the test are removed;
    any it replaced (e.g. registered at import through $SAM_JAX_SPM_PATH) come
    back.
    """
    tasks_before = {n: seqio.TaskRegistry.get(n) for n in seqio.TaskRegistry.names()}
    mixtures_before = {n: seqio.MixtureRegistry.get(n) for n in seqio.MixtureRegistry.names()}

    def register(register_fn, **kwargs):
        if "vocabulary_path" not in kwargs:
            kwargs.setdefault("vocabulary", VOCAB)
        return register_fn(**kwargs)

    yield register
    task_registry.remove(set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names()))
    for name, task in tasks_before.items():
        seqio.TaskRegistry.add_provider(name, task)
    for name, mixture in mixtures_before.items():
        seqio.MixtureRegistry.add_provider(name, mixture)


@contextlib.contextmanager
def evaluator(name, data, split="validation"):
    """seqio's Evaluator on a task or mixture; yields `score(predict)`.

    `predict(index, inputs_text)` gives the decoded prediction for an example;
    it is encoded as a model would output it (ids, EOS, padding). `score`
    returns {task name: {metric: value}}.
    """

    def predict_fn(predict, ds):
        outputs = []
        for index, features in ds.as_numpy_iterator():
            text = predict(int(index), VOCAB.decode(features["encoder_input_tokens"].tolist()))
            tokens = VOCAB.encode(text) + [VOCAB.eos_id]
            outputs.append((int(index), tokens + [0] * (SEQ["targets"] - len(tokens))))
        return outputs

    with FakeTfds(data).mocked():
        seqio_evaluator = seqio.Evaluator(
            mixture_or_task_name=name,
            feature_converter=seqio.EncDecFeatureConverter(pack=False),
            eval_split=split,
            sequence_length=SEQ,
            async_compute_metrics=False,
        )

        def score(predict):
            scores, _ = seqio_evaluator.evaluate(
                compute_metrics=True, predict_fn=functools.partial(predict_fn, predict)
            )
            return scores.result()

        yield score


def by_index(predictions):
    return lambda index, unused_inputs: predictions[index]


# --------------------------------------------------------------------------- #
# Vocabulary and registration.
# --------------------------------------------------------------------------- #


def test_import_registers_only_when_the_environment_names_a_model(monkeypatch, registry):
    monkeypatch.delenv(vocabularies.SPM_PATH_ENV, raising=False)
    before = set(seqio.TaskRegistry.names())
    for module in (glue, super_glue, cbqa):
        importlib.reload(module)
    assert set(seqio.TaskRegistry.names()) == before
    # A path that does not exist: importing still works (nothing is read).
    monkeypatch.setenv(vocabularies.SPM_PATH_ENV, "/no/such/dir/spm.model")
    for module in (glue, super_glue, cbqa):
        importlib.reload(module)
    for name in ("glue_cola", "super_glue_record", "trivia_qa_open"):
        vocabulary = seqio.get_mixture_or_task(name).output_features["inputs"].vocabulary
        assert vocabulary.sentencepiece_model_file == "/no/such/dir/spm.model"
    assert {"glue", "super_glue", "cbqa"} <= set(seqio.MixtureRegistry.names())


EXPECTED_TASKS = {
    "glue": [
        "glue_cola",
        "glue_sst2",
        "glue_mrpc",
        "glue_stsb",
        "glue_qqp",
        "glue_mnli",
        "glue_mnli_matched",
        "glue_mnli_mismatched",
        "glue_qnli",
        "glue_rte",
    ],
    "super_glue": [
        "super_glue_boolq",
        "super_glue_cb",
        "super_glue_copa",
        "super_glue_multirc",
        "super_glue_record",
        "super_glue_rte",
        "super_glue_wic",
        "super_glue_wsc_simple_train",
        "super_glue_wsc_simple_eval",
    ],
    "cbqa": ["natural_questions_open", "web_questions_open", "trivia_qa_open"],
}
# Proportional rates: training examples (ReCoRD one per answer, WSC positives only).
EXPECTED_RATES = {
    "glue_cola": 8551,
    "glue_sst2": 67349,
    "glue_mrpc": 3668,
    "glue_stsb": 5749,
    "glue_qqp": 363846,
    "glue_mnli": 392702,
    "glue_mnli_matched": 0,
    "glue_mnli_mismatched": 0,
    "glue_qnli": 104743,
    "glue_rte": 2490,
    "super_glue_boolq": 9427,
    "super_glue_cb": 250,
    "super_glue_copa": 400,
    "super_glue_multirc": 27243,
    "super_glue_record": 138854,
    "super_glue_rte": 2490,
    "super_glue_wic": 5428,
    "super_glue_wsc_simple_train": 259,
    "super_glue_wsc_simple_eval": 0,
    "natural_questions_open": 79168,
    "web_questions_open": 3417,
    "trivia_qa_open": 78785,
}
REGISTER_FNS = {
    "glue": glue.register_glue_tasks,
    "super_glue": super_glue.register_super_glue_tasks,
    "cbqa": cbqa.register_cbqa_tasks,
}


@pytest.mark.parametrize("mixture", ["glue", "super_glue", "cbqa"])
def test_tasks_mixtures_and_rates_are_registered(registry, mixture):
    names = registry(REGISTER_FNS[mixture])
    assert names == {n: n for n in EXPECTED_TASKS[mixture] + [mixture]}
    mix = seqio.get_mixture_or_task(mixture)
    assert sorted(t.name for t in mix.tasks) == sorted(EXPECTED_TASKS[mixture])
    for name in EXPECTED_TASKS[mixture]:
        task = seqio.get_mixture_or_task(name)
        assert mix.get_rate(task) == EXPECTED_RATES[name]
        assert ("train" in task.splits) == (EXPECTED_RATES[name] > 0)
        for feature in task.output_features.values():
            assert feature.vocabulary is VOCAB and feature.add_eos
        if name != "super_glue_wsc_simple_train":
            assert task.metric_fns and task.postprocess_fn is not None


def test_task_splits_and_tfds_versions(registry):
    for register_fn in REGISTER_FNS.values():
        registry(register_fn)
    mnli = seqio.get_mixture_or_task("glue_mnli")
    assert mnli.splits == ("train", "validation_matched", "validation_mismatched")
    assert mnli.source.tfds_dataset.name == "glue/mnli:2.0.0"
    assert seqio.get_mixture_or_task("glue_mnli_matched").splits == ("validation",)
    assert seqio.get_mixture_or_task("super_glue_wsc_simple_train").splits == ("train",)
    wsc = seqio.get_mixture_or_task("super_glue_wsc_simple_eval")
    assert wsc.source.tfds_dataset.name == "super_glue/wsc.fixed:1.0.2"
    tqa = seqio.get_mixture_or_task("trivia_qa_open")
    assert tqa.splits == ("train", "validation", "test")
    assert tqa.source.tfds_dataset.name == "trivia_qa/unfiltered.nocontext:1.1.0"
    assert tqa.num_input_examples("test") == 11313
    for name in ("natural_questions_open", "web_questions_open"):
        assert seqio.get_mixture_or_task(name).splits == ("train", "validation", "test")


@pytest.mark.parametrize("bad", [0, -0.5, 1.5, float("nan"), "0.1"])
def test_bad_train_fraction_raises(registry, bad):
    for register_fn in REGISTER_FNS.values():
        with pytest.raises(ValueError, match="train_fraction"):
            registry(register_fn, train_fraction=bad)


# --------------------------------------------------------------------------- #
# GLUE text (T5's `glue` and `stsb` preprocessors).
# --------------------------------------------------------------------------- #

GLUE_CASES = [
    (
        "glue_cola",
        ("glue", "cola"),
        "validation",
        [{"sentence": "The book fell.", "label": 1}, {"sentence": "Book the fell.", "label": 0}],
        [
            ("cola sentence: The book fell.", "acceptable"),
            ("cola sentence: Book the fell.", "unacceptable"),
        ],
    ),
    (
        "glue_sst2",
        ("glue", "sst2"),
        "train",
        [{"sentence": "a gripping film", "label": 1}],
        [("sst2 sentence: a gripping film", "positive")],
    ),
    (
        "glue_mrpc",
        ("glue", "mrpc"),
        "validation",
        [{"sentence1": "He left.", "sentence2": "He went away.", "label": 1}],
        [("mrpc sentence1: He left. sentence2: He went away.", "equivalent")],
    ),
    (
        "glue_qqp",
        ("glue", "qqp"),
        "validation",
        [{"question1": "Why?", "question2": "How?", "label": 0}],
        [("qqp question1: Why? question2: How?", "not_duplicate")],
    ),
    (
        "glue_stsb",
        ("glue", "stsb"),
        "validation",
        # Rounded to a multiple of 0.2, halves to even: 2.5 -> 12.5 / 5 -> 12 / 5.
        [{"sentence1": "A.", "sentence2": "B.", "label": s} for s in (2.5, 3.75, 0.6, 5.0, 0.0)],
        [("stsb sentence1: A. sentence2: B.", t) for t in ("2.4", "3.8", "0.6", "5.0", "0.0")],
    ),
    (
        "glue_mnli",
        ("glue", "mnli"),
        "validation_mismatched",
        [{"premise": "It rains.", "hypothesis": "It is dry.", "label": 2}],
        [("mnli hypothesis: It is dry. premise: It rains.", "contradiction")],
    ),
    (
        "glue_mnli_matched",
        ("glue", "mnli_matched"),
        "validation",
        [{"premise": "It rains.", "hypothesis": "It is wet.", "label": 0}],
        [("mnli hypothesis: It is wet. premise: It rains.", "entailment")],
    ),
    (
        "glue_mnli_mismatched",
        ("glue", "mnli_mismatched"),
        "validation",
        [{"premise": "It rains.", "hypothesis": "Jo is out.", "label": 1}],
        [("mnli hypothesis: Jo is out. premise: It rains.", "neutral")],
    ),
    (
        "glue_qnli",
        ("glue", "qnli"),
        "validation",
        [{"question": "Who ran?", "sentence": "Jo ran.", "label": 0}],
        [("qnli question: Who ran? sentence: Jo ran.", "entailment")],
    ),
    (
        "glue_rte",
        ("glue", "rte"),
        "validation",
        [{"sentence1": "Jo ran.", "sentence2": "Jo sat.", "label": 1}],
        [("rte sentence1: Jo ran. sentence2: Jo sat.", "not_entailment")],
    ),
]


@pytest.mark.parametrize(
    "name,key,split,examples,expected", GLUE_CASES, ids=[case[0] for case in GLUE_CASES]
)
def test_glue_text_is_t5s(registry, name, key, split, examples, expected):
    registry(glue.register_glue_tasks)
    examples = [{**ex, "idx": 10 + i} for i, ex in enumerate(examples)]
    got = read(name, split, {key: {split: examples}})
    assert texts(got) == expected
    assert [int(ex["idx"]) for ex in got] == [10 + i for i in range(len(examples))]
    for ex, (inputs, targets) in zip(got, expected):
        assert ex["inputs"].tolist() == VOCAB.encode(inputs) + [1]
        assert ex["targets"].tolist() == VOCAB.encode(targets) + [1]


def test_glue_postprocessors_map_text_to_labels(registry):
    registry(glue.register_glue_tasks)
    cola = seqio.get_mixture_or_task("glue_cola")
    assert [cola.postprocess_fn(t) for t in ("unacceptable", "acceptable", "Acceptable", "")] == [
        0,
        1,
        -1,
        -1,
    ]
    assert cola.postprocess_fn("acceptable", example={}, is_target=True) == 1
    mnli = seqio.get_mixture_or_task("glue_mnli")
    assert [mnli.postprocess_fn(t) for t in ("entailment", "neutral", "contradiction")] == [0, 1, 2]
    stsb = seqio.get_mixture_or_task("glue_stsb")
    assert stsb.postprocess_fn("3.8") == pytest.approx(3.8)
    assert stsb.postprocess_fn("three") == -1.0


def test_glue_cola_end_to_end_matthews_correlation(registry):
    registry(glue.register_glue_tasks)
    labels = [1, 1, 1, 0, 0, 0]
    data = {
        ("glue", "cola"): {
            "validation": [
                {"sentence": f"s{i}", "label": y, "idx": i} for i, y in enumerate(labels)
            ]
        }
    }
    names = ("unacceptable", "acceptable")
    guesses = [names[1], names[1], names[0], names[0], names[0], names[1]]
    # TP 2, FN 1, TN 2, FP 1: MCC = (2 * 2 - 1 * 1) / sqrt(3 ** 4) = 1/3.
    with evaluator("glue_cola", data) as score:
        assert score(by_index(guesses)) == {
            "glue_cola": {"matthews_corrcoef": pytest.approx(100 / 3)}
        }
        perfect = score(by_index([names[y] for y in labels]))
        assert perfect == {"glue_cola": {"matthews_corrcoef": 100.0}}


# --------------------------------------------------------------------------- #
# SuperGLUE text (T5's super_glue preprocessing).
# --------------------------------------------------------------------------- #

SUPER_GLUE_CASES = [
    (
        "super_glue_boolq",
        "boolq",
        [{"question": "is it wet", "passage": "It rains.", "label": 1}],
        [("boolq passage: It rains. question: is it wet", "True")],
    ),
    (
        "super_glue_cb",
        "cb",
        [{"premise": "It rains.", "hypothesis": "Jo is out.", "label": 2}],
        [("cb hypothesis: Jo is out. premise: It rains.", "neutral")],
    ),
    (
        "super_glue_copa",
        "copa",
        [
            {
                "premise": "The man broke his toe.",
                "choice1": "He dropped a hammer.",
                "choice2": "He wore socks.",
                "question": "cause",
                "label": 0,
            }
        ],
        [
            (
                "copa choice1: He dropped a hammer. choice2: He wore socks. "
                "premise: The man broke his toe. question: cause",
                "choice1",
            )
        ],
    ),
    (
        "super_glue_rte",
        "rte",
        [{"premise": "Jo ran.", "hypothesis": "Jo moved.", "label": 0}],
        [("rte hypothesis: Jo moved. premise: Jo ran.", "entailment")],
    ),
    (
        "super_glue_wic",
        "wic",
        [
            {
                "word": "bank",
                "sentence1": "The river bank.",
                "sentence2": "The bank lent money.",
                "start1": 10,
                "label": 0,
            }
        ],
        [("wic sentence1: The river bank. sentence2: The bank lent money. word: bank", "False")],
    ),
]


@pytest.mark.parametrize(
    "name,config,examples,expected", SUPER_GLUE_CASES, ids=[case[0] for case in SUPER_GLUE_CASES]
)
def test_super_glue_glue_style_text_is_t5s(registry, name, config, examples, expected):
    registry(super_glue.register_super_glue_tasks)
    examples = [{**ex, "idx": i} for i, ex in enumerate(examples)]
    got = read(name, "validation", {("super_glue", config): {"validation": examples}})
    assert texts(got) == expected


MULTIRC_PARAGRAPH = "<b>Sent 1: </b>Tom ran.<br><b>Sent 2: </b>He won.<br>"
MULTIRC = [
    # (question, answer, label, (paragraph, question, answer) indices)
    ("Who won?", "Tom", 1, (0, 0, 0)),
    ("Who won?", "Ann", 0, (0, 0, 1)),
    ("Who won?", "He", 1, (0, 0, 2)),
    ("Did Tom run?", "Yes", 1, (0, 1, 3)),
    ("Did Tom run?", "No", 0, (0, 1, 4)),
]


def _multirc_data():
    return {
        ("super_glue", "multirc"): {
            "validation": [
                {
                    "paragraph": MULTIRC_PARAGRAPH,
                    "question": q,
                    "answer": a,
                    "label": y,
                    "idx": {"paragraph": p, "question": qi, "answer": ai},
                }
                for q, a, y, (p, qi, ai) in MULTIRC
            ]
        }
    }


def test_multirc_text_and_grouped_scores(registry):
    registry(super_glue.register_super_glue_tasks)
    got = read("super_glue_multirc", "validation", _multirc_data())
    assert texts(got)[0] == (
        "multirc question: Who won? answer: Tom paragraph: Sent 1: Tom ran. Sent 2: He won. ",
        "True",
    )
    assert [(ex["idx/question"], ex["idx/answer"]) for ex in got] == [
        (0, 0),
        (0, 1),
        (0, 2),
        (1, 3),
        (1, 4),
    ]
    # Question 0: one answer wrong ("He" called False); question 1: all right.
    # F1a over answers: TP 2, FN 1, FP 0 -> 4/5; EM over questions: 1/2.
    with evaluator("super_glue_multirc", _multirc_data()) as score:
        scores = score(by_index(["True", "False", "False", "True", "False"]))
        assert scores["super_glue_multirc"] == {"f1": pytest.approx(80.0), "exact_match": 50.0}
        # An answer that is not "True"/"False" is wrong: question 1 fails too.
        scores = score(by_index(["True", "False", "True", "True", "maybe"]))
        assert scores["super_glue_multirc"] == {
            "f1": pytest.approx(100 * 6 / 7),
            "exact_match": 50.0,
        }


RECORD_PASSAGE = "Jo Smith won.\n@highlight\nA big day\n@highlight\nSmith cheered"


def _record_data():
    return {
        ("super_glue", "record"): {
            "validation": [
                {
                    "passage": RECORD_PASSAGE,
                    "query": "@placeholder was happy.",
                    "entities": ["Jo Smith", "Smith"],
                    "answers": ["Jo Smith", "Smith"],
                    "idx": {"passage": 4, "query": 9},
                },
                {
                    "passage": "New York City is big.",
                    "query": "@placeholder is big.",
                    "entities": ["New York City"],
                    "answers": ["New York City"],
                    "idx": {"passage": 5, "query": 10},
                },
            ]
        }
    }


def test_record_text_one_example_per_answer_and_max_over_answers(registry):
    registry(super_glue.register_super_glue_tasks)
    got = read("super_glue_record", "validation", _record_data())
    query = (
        "record query: @placeholder was happy. entities: Jo Smith, Smith "
        "passage: Jo Smith won. A big day. Smith cheered"
    )
    assert texts(got) == [
        (query, "Jo Smith"),
        (query, "Smith"),
        (
            "record query: @placeholder is big. entities: New York City "
            "passage: New York City is big.",
            "New York City",
        ),
    ]
    assert [a.tolist() for a in (got[0]["answers"], got[1]["answers"])] == [
        [b"Jo Smith", b"Smith"]
    ] * 2
    assert [(ex["idx/passage"], ex["idx/query"]) for ex in got] == [(4, 9), (4, 9), (5, 10)]
    # Query 9 counts once (its first copy, "smith" matches the answer "Smith");
    # query 10: "New York" vs "New York City", EM 0, F1 2 * 1 * (2/3) / (1 + 2/3) = 0.8.
    with evaluator("super_glue_record", _record_data()) as score:
        scores = score(by_index(["smith", "wrong", "New York"]))
    assert scores == {"super_glue_record": {"em": 50.0, "f1": pytest.approx(90.0)}}


WSC_TEXT = "Mark told Pete many lies about himself , which Pete included in his book ."
WSC_BY_HAND = (
    "When they had eventually calmed down a bit , and had gotten home, Mr. Farley put the "
    "magic pebble in an iron safe . Some day they might want to use it , but really for now, "
    "what more could they wish for?"
)


def _wsc_data(split):
    his = WSC_TEXT.split(" ").index("his")
    use = WSC_BY_HAND.split(" ").index("use")  # T5 marks "it", the next word, by hand
    examples = [
        {
            "text": WSC_TEXT,
            "span1_text": "Pete",
            "span2_text": "his",
            "span2_index": his,
            "label": 1,
        },
        {
            "text": WSC_TEXT,
            "span1_text": "Mark",
            "span2_text": "his",
            "span2_index": his,
            "label": 0,
        },
        {
            "text": WSC_BY_HAND,
            "span1_text": "the magic pebble",
            "span2_text": "it",
            "span2_index": use,
            "label": 1,
        },
    ]
    return {
        ("super_glue", "wsc.fixed"): {split: [{**ex, "idx": i} for i, ex in enumerate(examples)]}
    }


def test_wsc_simple_text_train_keeps_correct_referents(registry):
    registry(super_glue.register_super_glue_tasks)
    marked = "wsc: Mark told Pete many lies about himself , which Pete included in *his* book ."
    by_hand = "wsc: " + WSC_BY_HAND.replace("use it ,", "use *it* ,")
    evaluation = read("super_glue_wsc_simple_eval", "validation", _wsc_data("validation"))
    assert texts(evaluation) == [(marked, "Pete"), (marked, "Mark"), (by_hand, "the magic pebble")]
    assert [int(ex["label"]) for ex in evaluation] == [1, 0, 1]
    train = read("super_glue_wsc_simple_train", "train", _wsc_data("train"))
    assert texts(train) == [(marked, "Pete"), (by_hand, "the magic pebble")]


def test_wsc_simple_scoring_end_to_end(registry):
    registry(super_glue.register_super_glue_tasks)
    # Predicting the candidate scores 1, anything else 0: correct where that
    # agrees with the label (examples 1 and 2 right; example 3: "pebble" is a
    # subset of "magic pebble" after determiners go -> 1, label 1: right).
    with evaluator("super_glue_wsc_simple_eval", _wsc_data("validation")) as score:
        scores = score(by_index(["Pete", "Pete", "pebble"]))
        assert scores == {"super_glue_wsc_simple_eval": {"accuracy": 100.0}}
        # Wrong, right (another name, possessive), wrong (empty: -1).
        scores = score(by_index(["Mark", "Pete's book", ""]))
        assert scores == {"super_glue_wsc_simple_eval": {"accuracy": pytest.approx(100 / 3)}}


# --------------------------------------------------------------------------- #
# Closed-book QA text (Roberts et al., 2020).
# --------------------------------------------------------------------------- #


def _cbqa_data(split_of):
    return {
        ("natural_questions_open", None): {
            split_of["natural_questions_open"]: [
                {"question": "who wrote hamlet", "answer": ["William Shakespeare", "Shakespeare"]}
            ]
        },
        ("web_questions", None): {
            split_of["web_questions_open"]: [
                {
                    "url": "http://x",
                    "question": "what is the capital of france?",
                    "answers": ["Paris"],
                }
            ]
        },
        ("trivia_qa", "unfiltered.nocontext"): {
            split_of["trivia_qa_open"]: [
                {
                    "question": "Who wrote Nausea?",
                    "answer": {
                        "value": "Jean-Paul Sartre",
                        "aliases": ["Jean-Paul Sartre", "Sartre"],
                    },
                }
            ]
        },
    }


CBQA_TFDS_SPLITS = {
    "train": {
        "natural_questions_open": "train[:79168]",
        "web_questions_open": "train[:3417]",
        "trivia_qa_open": "train[:78785]",
    },
    "validation": {
        "natural_questions_open": "train[79168:]",
        "web_questions_open": "train[3417:]",
        "trivia_qa_open": "train[78785:]",
    },
    "test": {
        "natural_questions_open": "validation",
        "web_questions_open": "test",
        "trivia_qa_open": "validation",
    },
}
CBQA_EXPECTED = {
    "natural_questions_open": (
        ("nq question: who wrote hamlet", "William Shakespeare"),
        [b"William Shakespeare", b"Shakespeare"],
    ),
    "web_questions_open": (("wq question: what is the capital of france?", "Paris"), [b"Paris"]),
    "trivia_qa_open": (
        ("trivia_qa question: Who wrote Nausea?", "Jean-Paul Sartre"),
        [b"Jean-Paul Sartre", b"Sartre"],
    ),
}


@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_cbqa_text_and_roberts_splits(registry, split):
    registry(cbqa.register_cbqa_tasks)
    fake = FakeTfds(_cbqa_data(CBQA_TFDS_SPLITS[split]))
    for name, (text, answers) in CBQA_EXPECTED.items():
        with fake.mocked():
            ds = seqio.get_mixture_or_task(name).get_dataset(
                SEQ, split=split, shuffle=False, use_cached=False, try_in_mem_cache=False
            )
            (example,) = list(ds.as_numpy_iterator())
        assert texts([example]) == [text]
        assert example["answers"].tolist() == answers
    assert [r[2] for r in fake.requested] == list(CBQA_TFDS_SPLITS[split].values())


def test_cbqa_mixture_end_to_end_em_f1_over_answers(registry):
    registry(cbqa.register_cbqa_tasks)
    answers = {
        # One of the answers: EM and F1 100 (not 0 and 2/3 against the first).
        "nq question: who wrote hamlet": "Shakespeare",
        "wq question: what is the capital of france?": "the city of Paris",
        # TriviaQA's normalisation turns the hyphen into a space (SQuAD's drops it).
        "trivia_qa question: Who wrote Nausea?": "jean paul sartre",
    }
    with evaluator("cbqa", _cbqa_data(CBQA_TFDS_SPLITS["test"]), "test") as score:
        scores = score(lambda unused_index, inputs: answers[inputs])
    assert scores == {
        "natural_questions_open": {"em": 100.0, "f1": 100.0},
        # "city of paris" vs "paris": precision 1/3, recall 1.
        "web_questions_open": {"em": 0.0, "f1": pytest.approx(100 * 2 * (1 / 3) / (1 + 1 / 3))},
        "trivia_qa_open": {"em": 100.0, "f1": 100.0},
    }


def test_sentencepiece_vocabulary_from_the_environment_tokenizes(registry, monkeypatch):
    monkeypatch.setenv(vocabularies.SPM_PATH_ENV, TEST_SPM)
    registry(cbqa.register_cbqa_tasks, vocabulary_path=None)
    data = _cbqa_data(CBQA_TFDS_SPLITS["test"])
    (example,) = read("web_questions_open", "test", data)
    vocabulary = (
        seqio.get_mixture_or_task("web_questions_open").output_features["inputs"].vocabulary
    )
    assert vocabulary.sentencepiece_model_file == TEST_SPM
    text = "wq question: what is the capital of france?"
    assert example["inputs"].tolist() == vocabulary.encode(text) + [vocabulary.eos_id]
    assert vocabulary.vocab_size == 26 and example["inputs"].max() < 26


# --------------------------------------------------------------------------- #
# train_fraction (Bahri et al., 2022: 2 %-80 % of the training split).
# --------------------------------------------------------------------------- #


def test_train_fraction_subsamples_train_only_and_scales_rates(registry):
    names = registry(glue.register_glue_tasks, train_fraction=0.1, seed=3)
    assert names["glue_rte"] == "glue_rte_frac0.1_seed3"
    assert names["glue"] == "glue_frac0.1_seed3"
    n = 2490
    train = [
        {"sentence1": f"p{i}", "sentence2": f"h{i}", "label": i % 2, "idx": i} for i in range(n)
    ]
    validation = train[:277]
    data = {("glue", "rte"): {"train": train, "validation": validation}}
    got = read(names["glue_rte"], "train", data)
    kept = subsampling.train_fraction_indices(n, 0.1, seed=3)
    assert len(got) == len(kept) == 249
    assert [ex["idx"] for ex in got] == kept.tolist()
    assert texts(got)[0] == (
        f"rte sentence1: p{kept[0]} sentence2: h{kept[0]}",
        ("entailment", "not_entailment")[kept[0] % 2],
    )
    assert len(read(names["glue_rte"], "validation", data)) == 277
    task = seqio.get_mixture_or_task(names["glue_rte"])
    assert task.num_input_examples("train") == 249
    mixture = seqio.get_mixture_or_task(names["glue"])
    for spec in glue.GLUE_TASKS:
        task = seqio.get_mixture_or_task(names[spec.name])
        full = EXPECTED_RATES[spec.name]
        expected = subsampling.num_train_examples(full, 0.1) if full else 0
        assert mixture.get_rate(task) == expected


def test_train_fraction_rates_scale_preprocessed_counts(registry):
    names = registry(super_glue.register_super_glue_tasks, train_fraction=0.05)
    mixture = seqio.get_mixture_or_task(names["super_glue"])
    record = seqio.get_mixture_or_task(names["super_glue_record"])
    kept = subsampling.num_train_examples(100730, 0.05)
    assert mixture.get_rate(record) == pytest.approx(138854 * kept / 100730)
    cb = seqio.get_mixture_or_task(names["super_glue_cb"])
    # 5 % of 250 is 12.5, rounded half up: 13.
    assert mixture.get_rate(cb) == cb.num_input_examples("train") == 13


def test_train_fraction_subsets_are_nested_and_deterministic(registry):
    n = 400  # COPA's training split
    copa = {
        "premise": "p",
        "choice1": "a",
        "choice2": "b",
        "question": "cause",
        "label": 0,
    }
    data = {("super_glue", "copa"): {"train": [{**copa, "idx": i} for i in range(n)]}}

    def kept(fraction, seed=0):
        names = registry(super_glue.register_super_glue_tasks, train_fraction=fraction, seed=seed)
        return [int(ex["idx"]) for ex in read(names["super_glue_copa"], "train", data)]

    small, large = kept(0.02), kept(0.2)
    assert len(small) == 8 and len(large) == 80
    assert set(small) < set(large)
    assert large == subsampling.train_fraction_indices(n, 0.2).tolist()
    assert kept(0.02) == small
    assert set(kept(0.02, seed=1)) != set(small)


def test_train_fraction_of_a_sliced_cbqa_split(registry):
    names = registry(cbqa.register_cbqa_tasks, train_fraction=0.02)
    assert names["cbqa"] == "cbqa_frac0.02"
    n = 3417
    examples = [{"question": f"q{i}", "answers": [f"a{i}"]} for i in range(n)]
    fake = FakeTfds({("web_questions", None): {"train[:3417]": examples}})
    with fake.mocked():
        ds = seqio.get_mixture_or_task(names["web_questions_open"]).get_dataset(
            SEQ, split="train", shuffle=False, use_cached=False, try_in_mem_cache=False
        )
        got = texts(ds.as_numpy_iterator())
    assert fake.requested == [("web_questions", None, "train[:3417]")]
    assert got == [
        (f"wq question: q{i}", f"a{i}") for i in subsampling.train_fraction_indices(n, 0.02)
    ]
    assert len(got) == 68
    mixture = seqio.get_mixture_or_task(names["cbqa"])
    for name in EXPECTED_TASKS["cbqa"]:
        task = seqio.get_mixture_or_task(names[name])
        assert mixture.get_rate(task) == subsampling.num_train_examples(EXPECTED_RATES[name], 0.02)

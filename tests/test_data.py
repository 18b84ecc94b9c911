"""Tests of sam_jax.data (seqio input pipeline) on the offline demo tasks."""

import itertools
import math

import numpy as np
import pytest

seqio = pytest.importorskip("seqio")

import tensorflow as tf  # noqa: E402

from sam_jax import data  # noqa: E402
from sam_jax import tasks  # noqa: E402, F401  (registers the demo tasks)
from sam_jax.tasks import demo  # noqa: E402
from sam_jax.tasks import registry  # noqa: E402

SEQ = demo.SEQUENCE_LENGTH  # {"inputs": 24, "targets": 4}


def _take(iterator, n):
    return list(itertools.islice(iterator, n))


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def _decode(ids):
    return demo.VOCABULARY.decode([int(i) for i in ids])


SMALL_TASK_SIZE = 40


def _small_task_inputs(prefix):
    return [f"{prefix} example {i}" for i in range(SMALL_TASK_SIZE)]


@pytest.fixture(scope="module")
def small_mixture():
    """Two 40-example tasks with a small shuffle buffer, and their mixture (fast to read).

    The demo tasks shuffle with a buffer larger than their splits, which costs
    seconds per pipeline; these tasks exercise the same code quickly.
    """
    names = {"alpha": "test_data_alpha", "beta": "test_data_beta"}
    for prefix, name in names.items():

        def dataset_fn(split, shuffle_files, seed=None, prefix=prefix):
            del split, shuffle_files, seed
            inputs = _small_task_inputs(prefix)
            return tf.data.Dataset.from_tensor_slices(
                {"inputs": inputs, "targets": [f"{prefix} {i}" for i in range(len(inputs))]}
            )

        source = seqio.FunctionDataSource(
            dataset_fn, splits=["train"], num_input_examples={"train": SMALL_TASK_SIZE}
        )
        registry.add_task(
            name,
            source=source,
            output_features=demo.OUTPUT_FEATURES,
            preprocessors=list(demo.PREPROCESSORS),
            shuffle_buffer_size=16,
        )
    registry.add_mixture("test_data_mixture", list(names.values()), default_rate=1.0)
    yield "test_data_mixture"
    registry.remove(["test_data_mixture", *names.values()])


# --- Names -----------------------------------------------------------------------------


def test_get_mixture_or_task_finds_registered_names():
    assert isinstance(data.get_mixture_or_task("demo_mixture"), seqio.Mixture)
    assert data.get_mixture_or_task("demo_nli").name == "demo_nli"


def test_unknown_name_lists_the_registered_ones():
    with pytest.raises(ValueError, match="^[^\n]+$") as error:
        data.get_mixture_or_task("demo_mixtur")
    message = str(error.value)
    assert "Unknown seqio task or mixture 'demo_mixtur'" in message
    assert "Did you mean 'demo_mixture'" in message
    for name in ("demo_cbqa", "demo_mixture", "demo_nli"):
        assert name in message.split("Registered")[1]


def test_a_long_list_of_names_is_truncated(monkeypatch):
    names = [f"task_{i:03d}" for i in range(100)]
    monkeypatch.setattr(data, "registered_names", lambda: names)
    with pytest.raises(
        ValueError, match=r"Registered \(100\): task_000, .*task_039, \.\.\. \(60 more\)"
    ):
        data.get_mixture_or_task("nothing_like_it")


# --- Training batches ------------------------------------------------------------------


def _batches(name, **kwargs):
    kwargs = {"sequence_length": SEQ, "global_batch_size": 8, "seed": 0, **kwargs}
    return data.train_batches(name, **kwargs)


def test_train_batches_of_the_demo_mixture_have_the_enc_dec_features():
    batch = next(_batches("demo_mixture"))
    assert tuple(sorted(batch)) == tuple(sorted(data.ENC_DEC_FEATURES))
    assert batch["encoder_input_tokens"].shape == (8, 24)
    for key in ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights"):
        assert batch[key].shape == (8, 4)
    assert {v.dtype for v in batch.values()} == {np.dtype(np.int32)}
    targets = batch["decoder_target_tokens"]
    np.testing.assert_array_equal(batch["decoder_loss_weights"], targets > 0)
    np.testing.assert_array_equal(batch["decoder_input_tokens"][:, 1:], targets[:, :-1])


def test_train_batches_are_deterministic_in_the_seed_and_resume_exactly(small_mixture):
    # Separately built pipelines agree: batches 4.. of a fresh iterator are the
    # batches of an iterator resumed at step 4 (past the first epoch of a task).
    fresh = _take(_batches(small_mixture), 30)
    _assert_same_batches(fresh[4:], _take(_batches(small_mixture, start_step=4), 26))
    _assert_same_batches(fresh, _take(_batches(small_mixture), 30))
    other_seed = _take(_batches(small_mixture, seed=1), 1)
    for key in ("encoder_input_tokens", "decoder_target_tokens"):
        assert not np.array_equal(other_seed[0][key], fresh[0][key])
    # Both tasks are sampled, and the data repeats forever (30 x 8 = 3 x 2 x 40 examples).
    inputs = {_decode(row) for b in fresh for row in b["encoder_input_tokens"]}
    assert inputs == set(_small_task_inputs("alpha")) | set(_small_task_inputs("beta"))


@pytest.fixture(scope="module")
def counted_task():
    """(name, reads): a 40-example task; `reads` lists every example its source yields."""
    reads = []

    def count(inputs):
        reads.append(inputs)
        return inputs

    def dataset_fn(split, shuffle_files, seed=None):
        del split, shuffle_files, seed
        inputs = _small_task_inputs("counted")
        ds = tf.data.Dataset.from_tensor_slices({"inputs": inputs, "targets": inputs})
        return ds.map(
            lambda ex: {
                **ex,
                "inputs": tf.ensure_shape(
                    tf.numpy_function(count, [ex["inputs"]], tf.string, stateful=False), []
                ),
            }
        )

    # Without `num_input_examples` seqio does not cache the small split in memory: every
    # epoch reads the source again.
    source = seqio.FunctionDataSource(dataset_fn, splits=["train"])
    registry.add_task(
        "test_data_counted",
        source=source,
        output_features=demo.OUTPUT_FEATURES,
        preprocessors=list(demo.PREPROCESSORS),
        shuffle_buffer_size=16,
    )
    yield "test_data_counted", reads
    registry.remove(["test_data_counted"])


def test_a_restored_iterator_continues_without_reading_the_data_again(counted_task, tmp_path):
    name, reads = counted_task
    fresh = _take(_batches(name), 25)
    saved = _batches(name)
    _take(saved, 20)
    saved.save(str(tmp_path))

    reads.clear()
    resumed = _batches(name)
    resumed.restore(str(tmp_path))
    _assert_same_batches(_take(resumed, 5), fresh[20:])
    # The restored shuffle and prefetch buffers hold the next examples: the source is read
    # only to refill them (the 5 batches read here and the 2 prefetched), not for the 160
    # examples of the first 20 batches.
    assert len(reads) <= 7 * 8
    reads.clear()
    skipped = _batches(name, start_step=20)  # the fallback for positions never saved
    _assert_same_batches(_take(skipped, 5), fresh[20:])
    assert len(reads) >= 25 * 8


def test_a_position_saved_after_a_skip_restores_into_a_pipeline_without_one(
    small_mixture, tmp_path
):
    """A run resumed by skipping (an old checkpoint) saves positions the next resume restores."""
    fresh = _take(_batches(small_mixture), 9)
    skipped = _batches(small_mixture, start_step=4)
    _take(skipped, 2)
    skipped.save(str(tmp_path))
    resumed = _batches(small_mixture)
    resumed.restore(str(tmp_path))
    _assert_same_batches(_take(resumed, 3), fresh[6:])
    with pytest.raises(tf.errors.NotFoundError):
        _batches(small_mixture).restore(str(tmp_path / "missing"))


def test_packed_batches_hold_several_examples_per_row(small_mixture):
    # Rows long enough for several of these examples (their words are byte pieces).
    batch = next(
        _batches(
            small_mixture,
            feature_converter=seqio.EncDecFeatureConverter(pack=True),
            sequence_length={"inputs": 64, "targets": 16},
        )
    )
    assert set(batch) == set(data.ENC_DEC_FEATURES) | set(data.PACKING_FEATURES)
    segments, positions = batch["decoder_segment_ids"], batch["decoder_positions"]
    assert segments.max() >= 2  # packing happened
    starts = (positions == 0) & (segments > 0)
    np.testing.assert_array_equal(batch["decoder_input_tokens"][starts], 0)  # shifted per segment
    assert np.all(batch["encoder_segment_ids"].max(axis=1) == segments.max(axis=1))


def test_input_shards_are_disjoint_halves_of_the_split(small_mixture):
    examples = _small_task_inputs("alpha")
    seen = []
    for shard_id in (0, 1):
        batches = _take(
            _batches("test_data_alpha", global_batch_size=8, shard_id=shard_id, num_shards=2), 20
        )
        assert batches[0]["encoder_input_tokens"].shape == (4, 24)  # the local batch
        inputs = {_decode(row) for b in batches for row in b["encoder_input_tokens"]}
        assert inputs == set(examples[shard_id::2])  # seqio shards examples round-robin
        seen.append(inputs)
    assert not seen[0] & seen[1]


def test_batch_size_must_split_over_the_shards():
    with pytest.raises(ValueError, match="global batch size 9 .* input shards \\(processes\\) 2"):
        _batches("demo_nli", global_batch_size=9, num_shards=2, shard_id=0)


# --- Evaluation ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixture_eval():
    return data.eval_tasks("demo_mixture", sequence_length=SEQ, batch_size=64)


def test_eval_tasks_expand_the_mixture_into_its_tasks(mixture_eval):
    sizes = {"demo_cbqa": demo.CBQA_SIZES["validation"], "demo_nli": demo.NLI_SIZES["validation"]}
    assert [t.name for t in mixture_eval] == ["demo_cbqa", "demo_nli"]
    for eval_task in mixture_eval:
        count = sizes[eval_task.name]
        assert eval_task.task is seqio.get_mixture_or_task(eval_task.name)
        assert len(eval_task.targets) == len(eval_task.inputs_text) == count
        assert len(eval_task.batches) == math.ceil(count / 64)
        masks = np.concatenate([b[data.EXAMPLE_MASK] for b in eval_task.batches])
        assert masks.sum() == count and masks[:count].all()
        for batch in eval_task.batches:
            assert set(batch) == set(data.ENC_DEC_FEATURES) | {data.EXAMPLE_MASK}
            assert {v.shape[0] for v in batch.values()} == {64}
        last = eval_task.batches[-1]
        padding = last[data.EXAMPLE_MASK] == 0
        assert padding.any() and not last["encoder_input_tokens"][padding].any()


def test_eval_targets_and_inputs_are_the_examples_in_order(mixture_eval):
    cbqa, nli = mixture_eval
    for eval_task, examples in (
        (cbqa, demo.cbqa_examples()["validation"]),
        (nli, demo.nli_examples()["validation"]),
    ):
        assert eval_task.targets == [ex["targets"] for ex in examples]
        assert eval_task.inputs_text == [ex["inputs"] for ex in examples]
        first = eval_task.batches[0]
        assert _decode(first["decoder_target_tokens"][0]) == examples[0]["targets"]
        assert _decode(first["encoder_input_tokens"][63]) == examples[63]["inputs"]
    (squad,) = cbqa.task.metric_fns
    assert squad(cbqa.targets, cbqa.targets) == {"em": 100.0, "f1": 100.0}


def test_eval_tasks_of_one_task_with_max_examples():
    (nli,) = data.eval_tasks("demo_nli", sequence_length=SEQ, batch_size=4, max_examples=10)
    assert len(nli.targets) == 10 and len(nli.batches) == 3
    assert nli.batches[-1][data.EXAMPLE_MASK].tolist() == [1, 1, 0, 0]


def test_eval_tasks_need_a_task_with_the_split():
    with pytest.raises(ValueError, match="No task of 'demo_mixture' has metric_fns and a 'test'"):
        data.eval_tasks("demo_mixture", sequence_length=SEQ, batch_size=8, split="test")

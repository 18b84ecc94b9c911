"""Tests of the training and evaluation steps (sam_jax.trainer) on a one-layer T5."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import sam_jax
from sam_jax import data
from sam_jax import partitioning
from sam_jax import trainer as trainer_lib
from sam_jax.models import t5
from sam_jax.models import task_models

VOCAB = 128
INPUT_LENGTH, TARGET_LENGTH = 12, 6
# One layer each way: the steps are the same code as with more, and compile faster.
CONFIG = t5.t5_1_1_config(
    "tiny", vocab_size=VOCAB, dropout_rate=0.0, num_encoder_layers=1, num_decoder_layers=1
)
# XLA's CPU backend compiles twice as fast with cheaper code generation (same functions).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def make_batch(num_examples=8, seed=0):
    """EncDecFeatureConverter features with padded inputs and targets."""
    rng = np.random.default_rng(seed)
    inputs = rng.integers(2, VOCAB, (num_examples, INPUT_LENGTH)).astype(np.int32)
    targets = rng.integers(2, VOCAB, (num_examples, TARGET_LENGTH)).astype(np.int32)
    for i in range(num_examples):
        inputs[i, rng.integers(4, INPUT_LENGTH) :] = 0
        targets[i, rng.integers(2, TARGET_LENGTH) :] = 0
    return {
        "encoder_input_tokens": inputs,
        "decoder_target_tokens": targets,
        "decoder_input_tokens": np.pad(targets[:, :-1], ((0, 0), (1, 0))),
        "decoder_loss_weights": (targets > 0).astype(np.float32),
    }


def make_trainer(
    optimizer=optax.sgd, learning_rate=0.5, sam=None, config=CONFIG, z_loss=1e-4, **kwargs
):
    model = task_models.EncoderDecoderModel(config, z_loss=z_loss)
    return trainer_lib.Trainer(model, optimizer, learning_rate, sam, **kwargs)


def init_state(trainer):
    return jax.jit(trainer.init_state, compiler_options=FAST_COMPILE)(jax.random.key(0))


def run_steps(trainer, num_steps=1, batch=None, state=None):
    """`num_steps` jitted train steps (from a fresh state unless given), dropout key 1."""
    step = jax.jit(trainer.train_step, compiler_options=FAST_COMPILE)
    state = init_state(trainer) if state is None else state
    batch = make_batch() if batch is None else batch
    for _ in range(num_steps):
        state, metrics = step(state, batch, jax.random.key(1))
    return state, metrics


def max_difference(a, b):
    return max(
        float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def test_loss_of_an_example_does_not_depend_on_its_batch():
    trainer = make_trainer(z_loss=0.0)
    params = init_state(trainer).params
    batch = make_batch()
    loss_fn = jax.jit(lambda params, batch: trainer.loss_fn(params, batch, None))
    losses = loss_fn(params, batch)
    alone = loss_fn(params, {k: v[3:4] for k, v in batch.items()})
    np.testing.assert_allclose(alone[0], losses[3], rtol=1e-5)
    # Summed token cross-entropy over the constant target length.
    logits = jax.jit(t5.Transformer(CONFIG).apply, static_argnames="enable_dropout")(
        {"params": params},
        batch["encoder_input_tokens"],
        batch["decoder_input_tokens"],
        batch["decoder_target_tokens"],
        enable_dropout=False,
    )
    token_loss = -jnp.take_along_axis(
        jax.nn.log_softmax(logits), batch["decoder_target_tokens"][..., None], axis=-1
    )[..., 0]
    expected = jnp.sum(token_loss * batch["decoder_loss_weights"], -1) / TARGET_LENGTH
    np.testing.assert_allclose(losses, expected, rtol=1e-5)


def test_plain_step_is_an_sgd_step_on_the_mean_loss():
    trainer = make_trainer(learning_rate=0.5)
    state = init_state(trainer)
    batch = make_batch()
    mean_loss = jax.jit(lambda p: jnp.mean(trainer.loss_fn(p, batch, None)))
    loss, grads = jax.jit(jax.value_and_grad(mean_loss))(state.params)
    new_state, metrics = run_steps(trainer, state=state, batch=batch)
    expected = jax.tree.map(lambda w, g: w - 0.5 * g, state.params, grads)
    assert max_difference(new_state.params, expected) < 1e-6
    assert int(new_state.step) == 1
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(grads), rtol=1e-5)
    assert float(metrics["lr"]) == 0.5


SAM = functools.partial(sam_jax.sam, rho=0.05)


@pytest.fixture(scope="module")
def sam_steps():
    """One SAM step with the whole batch, and with two microbatches."""
    return run_steps(make_trainer(sam=SAM)), run_steps(make_trainer(sam=SAM, num_microbatches=2))


def test_two_microbatches_give_the_step_of_one_batch():
    one, _ = run_steps(make_trainer())
    two, _ = run_steps(make_trainer(num_microbatches=2))
    moved = max_difference(one.params, init_state(make_trainer()).params)
    assert moved > 1e-3  # the step did something
    assert max_difference(one.params, two.params) < 1e-6


def test_two_microbatches_give_the_sam_step_of_one_batch(sam_steps):
    """Ascent on the whole batch (2 microbatches of it), descent on 2 microbatches."""
    (one, one_metrics), (two, two_metrics) = sam_steps
    assert max_difference(one.params, init_state(make_trainer()).params) > 1e-3
    assert max_difference(one.params, two.params) < 1e-6
    np.testing.assert_allclose(one_metrics["loss"], two_metrics["loss"], rtol=1e-6)


def test_sam_step_reports_every_sam_metric(sam_steps):
    (_, metrics), _ = sam_steps
    for field in sam_jax.SamMetrics._fields:
        assert metrics[f"sam/{field}"].dtype == jnp.float32
    assert metrics["loss"] == metrics["sam/clean_loss"]
    assert float(metrics["sam/rho"]) == pytest.approx(0.05)
    assert float(metrics["sam/perturbation_norm"]) == pytest.approx(0.05, rel=1e-4)
    assert "grad_norm" not in metrics


def test_per_instance_sam_does_not_accumulate_microbatches():
    per_instance = functools.partial(sam_jax.per_instance_sam, rho=0.05)
    with pytest.raises(ValueError, match="does not accumulate gradients.*num_microbatches=1"):
        make_trainer(sam=per_instance, num_microbatches=2)
    sam = trainer_lib.make_optimizer(optax.sgd, 0.1, per_instance)
    assert isinstance(sam, optax.GradientTransformationExtraArgs)


def test_dropout_key_is_the_run_key_folded_with_the_step():
    trainer = make_trainer(config=dataclasses.replace(CONFIG, dropout_rate=0.3))
    state = init_state(trainer)
    first, _ = run_steps(trainer, state=state)
    again, _ = run_steps(trainer, state=state)
    assert max_difference(first.params, again.params) == 0.0  # bit for bit
    later, _ = run_steps(trainer, state=state._replace(step=jnp.int32(5)))
    assert max_difference(first.params, later.params) > 1e-6  # another dropout mask


def test_rsqrt_schedule_is_constant_then_decays():
    schedule = trainer_lib.rsqrt_schedule(1.0, warmup_steps=100)
    np.testing.assert_allclose(
        [schedule(0), schedule(100), schedule(400)], [0.1, 0.1, 0.05], rtol=1e-6
    )
    ramped = trainer_lib.rsqrt_schedule(1.0, warmup_steps=100, linear_warmup_steps=10)
    np.testing.assert_allclose([ramped(0), ramped(9), ramped(400)], [0.01, 0.1, 0.05], rtol=1e-6)


def test_bfloat16_activations_keep_float32_params():
    config = dataclasses.replace(CONFIG, dtype=jnp.bfloat16)
    trainer = make_trainer(optax.adamw, 1e-3, config=config)
    state, metrics = run_steps(trainer, num_steps=2)
    assert {leaf.dtype for leaf in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    assert np.isfinite(float(metrics["loss"]))


def test_eval_step_ignores_padding_rows():
    trainer = make_trainer()
    params = init_state(trainer).params
    batch = make_batch()
    batch[data.EXAMPLE_MASK] = np.ones(len(batch["encoder_input_tokens"]), np.int32)
    padded = {k: np.concatenate([v, np.zeros_like(v[:2])]) for k, v in batch.items()}
    sums = jax.jit(trainer.eval_step)(params, padded)
    assert float(sums["examples"]) == 8
    losses = jax.jit(trainer.loss_fn)(params, batch, None)
    np.testing.assert_allclose(sums["loss_sum"], jnp.sum(losses), rtol=1e-5)


def test_logical_state_names_params_and_param_shaped_optimizer_leaves():
    adafactor = functools.partial(optax.adafactor, min_dim_size_to_factor=32)
    trainer = make_trainer(adafactor, 1e-3, sam=functools.partial(sam_jax.sam, rho=0.05))
    logical = trainer.logical_state()
    is_box = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
    kernel = logical.params["decoder"]["logits_dense"]["kernel"]
    assert is_box(kernel) and kernel.names == ("embed", "vocab")
    factored = logical.opt_state.inner_state[0]  # adafactor's FactoredState
    v_row = factored.v_row["decoder"]["logits_dense"]["kernel"]
    assert not is_box(v_row) and v_row.shape == (CONFIG.emb_dim,)
    leaves = jax.tree.leaves(logical, is_leaf=is_box)
    assert all(leaf.value.ndim == len(leaf.names) for leaf in leaves if is_box(leaf))


def test_sharded_steps_equal_single_device_steps():
    """Three SAM steps on a (data 4, model 2) mesh of 8 devices equal them on one device.

    Adafactor (factored second moments, sharded and replicated optimizer leaves)
    agrees to ~5e-7. AdamW is not used here: it divides near-zero gradients by
    their own magnitude, which turns summation-order noise into 1e-4 differences.
    """
    optimizer = functools.partial(optax.adafactor, min_dim_size_to_factor=32)
    sam = functools.partial(sam_jax.sam, rho=0.05)
    assert jax.device_count() == 8
    batch = make_batch(16)
    single, _ = run_steps(make_trainer(optimizer, 1e-2, sam), num_steps=3, batch=batch)
    assert len(jax.tree.leaves(single.params)[0].devices()) == 1

    partitioner = partitioning.Partitioner(num_partitions=2)
    trainer = make_trainer(optimizer, 1e-2, sam, num_data_shards=partitioner.data_axis_size)
    shardings = partitioner.shardings(trainer.logical_state())
    init = partitioner.partition(
        lambda: trainer.init_state(jax.random.key(0)), in_shardings=(), out_shardings=shardings
    )
    step = partitioner.partition(
        trainer.train_step,
        in_shardings=(shardings, partitioner.data_sharding(), partitioner.replicated()),
        out_shardings=(shardings, partitioner.replicated()),
        donate_argnums=(0,),
    )
    state = init()
    for _ in range(3):
        state, _ = step(state, partitioner.global_batch(batch), jax.random.key(1))
    kernel = state.params["decoder"]["logits_dense"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "model")
    assert max_difference(jax.device_get(state.params), jax.device_get(single.params)) < 1e-5

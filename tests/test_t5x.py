"""Tests for sam_jax.t5x: SamTrainer and FisherMaskOptimizer inside T5X.

Run with the T5X environment: `/work/venv-t5x/bin/python -m pytest -q
tests/test_t5x.py`; without T5X the whole file is skipped.

A tiny T5.1.1 encoder–decoder (T5X's `examples.t5.network`, one layer each,
dropout 0.1) trains on packed batches of the offline `demo_cbqa` task, on a
mesh of 4 data shards × 2 model shards of the 8 simulated CPU devices.
"""

import importlib
import os
import subprocess
import sys

import numpy as np
import pytest

t5x = pytest.importorskip("t5x")
seqio = pytest.importorskip("seqio")

import gin  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from t5x import adafactor  # noqa: E402
from t5x import checkpoints  # noqa: E402
from t5x import gin_utils  # noqa: E402
from t5x import models  # noqa: E402
from t5x import optimizers  # noqa: E402
from t5x import partitioning  # noqa: E402
from t5x import train as t5x_train  # noqa: E402
from t5x import train_state as train_state_lib  # noqa: E402
from t5x.examples.t5 import network  # noqa: E402

import __main__  # noqa: E402  (T5X's gin files bind `__main__.train`)
import sam_jax  # noqa: E402
import sam_jax.t5x  # noqa: E402
import tasks  # noqa: E402, F401  (registers demo_cbqa)
from sam_jax.t5x import per_example  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FEATURE_LENGTHS = {"inputs": 128, "targets": 32}  # packs up to 3 examples per row
BATCH_SIZE = 32
DATA_SHARDS = 4
LEARNING_RATE = 1e-2
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
TINY_CONFIG = network.T5Config(
    vocab_size=320,  # ≥ the 259 ids of seqio.ByteVocabulary
    dtype="float32",
    emb_dim=8,
    num_heads=2,
    num_encoder_layers=1,
    num_decoder_layers=1,
    head_dim=4,
    mlp_dim=16,
    mlp_activations=("gelu", "linear"),
    dropout_rate=0.1,
    logits_via_embedding=False,
)


class DataMeshPartitioner(partitioning.PjitPartitioner):
    """T5X's partitioner on a (data 4, model 2) mesh (on CPU T5X puts every device on 'model').

    It compiles without XLA's expensive optimisations, which take most of a
    tiny model's time here.
    """

    @property
    def mesh(self):
        devices = np.asarray(jax.devices()[: 2 * DATA_SHARDS]).reshape(DATA_SHARDS, 2)
        return jax.sharding.Mesh(devices, ("data", "model"))

    def compile(self, partitioned_fn, *args):
        return partitioned_fn.lower(*args).compile(compiler_options=FAST_COMPILE)


def adafactor_optimizer():
    return adafactor.Adafactor(
        decay_rate=0.8,
        step_offset=0,
        logical_factor_rules=adafactor.standard_logical_factor_rules(),
    )


def adamw_optimizer():
    """T5X's OptaxWrapper around optax.adamw."""
    return optimizers.adamw(LEARNING_RATE)


def make_model(optimizer_def, loss_normalizing_factor=None):
    vocabulary = seqio.ByteVocabulary()
    return models.EncoderDecoderModel(
        module=network.Transformer(TINY_CONFIG),
        input_vocabulary=vocabulary,
        output_vocabulary=vocabulary,
        optimizer_def=optimizer_def,
        loss_normalizing_factor=loss_normalizing_factor,
    )


def cbqa_dataset(pack, num_examples=None):
    converter = seqio.EncDecFeatureConverter(pack=pack)
    task = seqio.get_mixture_or_task("demo_cbqa")
    examples = task.get_dataset(FEATURE_LENGTHS, split="train", shuffle=False, use_cached=False)
    if num_examples is not None:
        examples = examples.take(num_examples)
    return converter(examples, FEATURE_LENGTHS)


@pytest.fixture(scope="module")
def batches():
    """Three packed batches of demo_cbqa."""
    dataset = cbqa_dataset(pack=True).batch(BATCH_SIZE, drop_remainder=True).take(3)
    result = [{k: np.asarray(v) for k, v in b.items()} for b in dataset.as_numpy_iterator()]
    assert result[0]["decoder_segment_ids"].max() >= 2, "the batches should be packed"
    return result


@pytest.fixture(scope="module")
def partitioner():
    return DataMeshPartitioner(num_partitions=2)


@pytest.fixture(scope="module")
def initialize(batches, partitioner):
    """initialize(optimizer_def) -> (model, sharded train state, train state axes).

    The model's variables are initialised once; each optimizer's state is then
    created from them and placed on the mesh, as T5X's TrainStateInitializer
    would (without compiling an initialiser per optimizer).
    """
    shapes = {k: v.shape for k, v in batches[0].items()}
    dtypes = {k: v.dtype for k, v in batches[0].items()}
    model = make_model(adafactor_optimizer())
    variables = jax.jit(lambda rng: model.get_initial_variables(rng, shapes, dtypes))(
        jax.random.PRNGKey(0)
    )

    def init(optimizer_def):
        state = train_state_lib.FlaxOptimTrainState.create(optimizer_def, variables)
        axes = partitioner.get_mesh_axes(state)
        place = partitioner.partition(lambda s: s, in_axis_resources=None, out_axis_resources=axes)
        return make_model(optimizer_def), place(state), axes

    return init


def make_trainer(trainer_cls, model, state, axes, partitioner, **kwargs):
    return trainer_cls(
        model=model,
        train_state=state,
        partitioner=partitioner,
        eval_names=[],
        summary_dir=None,
        train_state_axes=axes,
        rng=jax.random.PRNGKey(1),
        **kwargs,
    )


def train(trainer, batches):
    """Compiles the train step and trains on `batches`; returns the summary {name: float}."""
    trainer.compile_train(batches[0])
    summary = trainer.train(iter(batches), len(batches)).result()
    return {name: float(np.asarray(value.value)) for name, value in summary.items()}


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


SAM_METRICS = (
    "sam/clean_loss",
    "sam/perturbed_loss",
    "sam/grad_norm",
    "sam/perturbation_norm",
    "sam/rho",
    "sam/weight_min",
    "sam/weight_max",
    "sam/weight_entropy",
    "sam/mask_density",
)


# --------------------------------------------------------------------------- #
# Lazy import.
# --------------------------------------------------------------------------- #


def test_import_sam_jax_does_not_import_t5x():
    code = "import sys, sam_jax; assert 't5x' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_sam_jax_t5x_without_t5x_says_how_to_install(monkeypatch):
    for name in [n for n in sys.modules if n == "t5x" or n.startswith(("t5x.", "sam_jax.t5x"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "t5x", None)  # `import t5x` now raises ImportError
    with pytest.raises(
        ImportError, match="pip install git\\+https://github.com/google-research/t5x"
    ):
        importlib.import_module("sam_jax.t5x")


# --------------------------------------------------------------------------- #
# Per-example losses from the gradient with respect to decoder_loss_weights.
# --------------------------------------------------------------------------- #


def test_packed_example_losses_equal_the_unpacked_examples_losses(initialize):
    model, state, _ = initialize(adafactor_optimizer())
    params = host(state.params)
    num_examples = 12
    packed = next(cbqa_dataset(pack=True, num_examples=num_examples).batch(64).as_numpy_iterator())
    padded = next(cbqa_dataset(pack=False, num_examples=num_examples).batch(64).as_numpy_iterator())
    assert packed["decoder_segment_ids"].max() >= 2

    losses_of = jax.jit(lambda p, b: per_example.example_losses(model, p, b, None))
    packed_losses = np.asarray(losses_of(params, packed))
    padded_losses = np.asarray(losses_of(params, padded))
    present = np.asarray(per_example.example_token_counts(packed)) > 0

    assert present.sum() == num_examples
    np.testing.assert_allclose(
        np.sort(packed_losses[present]), np.sort(padded_losses), rtol=2e-5, atol=1e-5
    )
    model_loss = float(jax.jit(lambda p, b: model.loss_fn(p, b, None)[0])(params, packed))
    np.testing.assert_allclose(packed_losses.sum(), model_loss, rtol=1e-5)


# --------------------------------------------------------------------------- #
# SAM through gin: one include, and the first step is the hand-computed one.
# --------------------------------------------------------------------------- #

FINETUNE_LIKE_GIN = """
from __gin__ import dynamic_registration

import __main__ as train_script
from t5x import trainer
from t5x import utils

train_script.train.trainer_cls = @trainer.Trainer
trainer.Trainer:
  num_microbatches = None
  learning_rate_fn = @utils.create_learning_rate_scheduler()
utils.create_learning_rate_scheduler:
  factors = 'constant'
  base_learning_rate = {learning_rate}
"""


@pytest.fixture
def gin_config(monkeypatch):
    """Gin as T5X's train.py sees it (`__main__.train`); cleared afterwards."""
    monkeypatch.setattr(__main__, "train", t5x_train.train, raising=False)
    gin.clear_config()
    yield
    gin.clear_config()


MODEL_LIKE_GIN = """
from __gin__ import dynamic_registration

from t5x import adafactor
from t5x import models

OPTIMIZER = @adafactor.Adafactor()
models.EncoderDecoderModel.optimizer_def = %OPTIMIZER
"""


@pytest.mark.parametrize("gin_file", ["sam.gin", "delta_sam.gin", "fsam.gin"])
def test_each_gin_file_is_one_include_for_a_finetune_run(gin_config, tmp_path, gin_file):
    (tmp_path / "model_like.gin").write_text(MODEL_LIKE_GIN)
    (tmp_path / "finetune_like.gin").write_text(
        FINETUNE_LIKE_GIN.format(learning_rate=LEARNING_RATE)
    )
    gin_utils.parse_gin_flags(
        [str(tmp_path), REPO],
        ["model_like.gin", "finetune_like.gin", f"gin/t5x/{gin_file}"],
        ["SamTrainer.rho = 0.123", "SamTrainer.num_microbatches = 2"],
    )

    trainer_cls = gin.query_parameter("train_script.train.trainer_cls")
    assert trainer_cls.configurable.wrapped is sam_jax.t5x.SamTrainer
    assert gin.query_parameter("SamTrainer.rho") == 0.123
    assert gin.query_parameter("SamTrainer.num_microbatches") == 2
    learning_rate_fn = gin.query_parameter("SamTrainer.learning_rate_fn")
    assert learning_rate_fn.scoped_configurable_fn()(0) == pytest.approx(LEARNING_RATE)
    reweight = gin.query_parameter("SamTrainer.reweight")
    optimizer_def = gin.query_parameter("models.EncoderDecoderModel.optimizer_def")
    if gin_file == "delta_sam.gin":
        assert reweight.scoped_configurable_fn().name == "delta_sam"
    else:
        assert reweight is None
    if gin_file == "fsam.gin":
        wrapper = optimizer_def.scoped_configurable_fn()
        assert isinstance(wrapper, sam_jax.t5x.FisherMaskOptimizer)
        assert isinstance(wrapper.optimizer, adafactor.Adafactor)
        transformations = gin.query_parameter(
            "utils.RestoreCheckpointConfig.state_transformation_fns"
        )
        assert [t.configurable.wrapped for t in transformations] == [
            sam_jax.t5x.fill_missing_fisher_mask
        ]
    else:
        assert isinstance(optimizer_def.scoped_configurable_fn(), adafactor.Adafactor)


def ascent_rows(batch, fraction):
    """The first `fraction` of each data shard's rows, by hand."""
    per_shard = BATCH_SIZE // DATA_SHARDS
    take = int(fraction * per_shard)
    rows = np.concatenate([np.arange(d * per_shard, d * per_shard + take) for d in range(4)])
    return {k: v[rows] for k, v in batch.items()}


def test_gin_include_trains_sam_and_first_step_is_hand_computed_sam(
    gin_config, tmp_path, initialize, partitioner, batches
):
    (tmp_path / "finetune_like.gin").write_text(
        FINETUNE_LIKE_GIN.format(learning_rate=LEARNING_RATE)
    )
    rho = 0.3
    gin_utils.parse_gin_flags(
        [str(tmp_path), REPO],
        ["finetune_like.gin", "gin/t5x/sam.gin"],
        [f"SamTrainer.rho = {rho}"],
    )
    trainer_cls = gin.query_parameter("train_script.train.trainer_cls")
    assert trainer_cls.configurable.wrapped is sam_jax.t5x.SamTrainer

    model, state, axes = initialize(adafactor_optimizer())
    initial = host(state)
    with make_trainer(
        trainer_cls.scoped_configurable_fn, model, state, axes, partitioner
    ) as trainer:
        metrics = train(trainer, batches[:1])
        trained = host(trainer.train_state.params)

    # Reference: plain jax.grad on the model's loss, with the step's dropout key.
    batch = batches[0]
    dropout_rng = jax.random.fold_in(jax.random.PRNGKey(1), 0)

    def loss(params, examples):
        return model.loss_fn(params, examples, dropout_rng)[0]

    def reference_step(state, batch, ascent_batch):
        ascent_grads = jax.grad(loss)(state.params, ascent_batch)
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(ascent_grads)))
        adversarial = jax.tree.map(lambda w, g: w + rho * g / grad_norm, state.params, ascent_grads)
        descent_grads = jax.grad(loss)(adversarial, batch)
        return state.apply_gradient(descent_grads, learning_rate=LEARNING_RATE).params, grad_norm

    # sam.gin's ascent micro-batch: ¼ of every data shard.
    arguments = (initial, batch, ascent_rows(batch, 0.25))
    compiled = jax.jit(reference_step).lower(*arguments).compile(compiler_options=FAST_COMPILE)
    expected, grad_norm = host(compiled(*arguments))

    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), trained, expected
    )
    assert metrics["sam/rho"] == pytest.approx(rho)
    assert metrics["sam/grad_norm"] == pytest.approx(grad_norm, rel=1e-4)
    assert metrics["sam/perturbation_norm"] == pytest.approx(rho, rel=1e-4)
    assert metrics["learning_rate"] == pytest.approx(LEARNING_RATE)
    assert metrics["sam/weight_min"] == pytest.approx(1 / 8)  # uniform over 8 rows
    assert all(name in metrics for name in SAM_METRICS)


# --------------------------------------------------------------------------- #
# Every variant, with T5X's Adafactor and with an OptaxWrapper.
# --------------------------------------------------------------------------- #

VARIANTS = {
    "sam": (adamw_optimizer, dict(rho=0.05, num_microbatches=2)),
    # Packed batches; the ascent half (16 rows) is accumulated over 2 microbatches of 8.
    "delta_sam": (
        adafactor_optimizer,
        dict(rho=0.05, ascent_fraction=0.5, reweight=sam_jax.delta_sam(), num_microbatches=4),
    ),
    "asam": (adafactor_optimizer, dict(rho=0.5, adaptive=True)),
    "m_sharpness": (adamw_optimizer, dict(rho=0.05, sharpness_m=2, num_microbatches=2)),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_trains(variant, initialize, partitioner, batches):
    make_optimizer, options = VARIANTS[variant]
    model, state, axes = initialize(make_optimizer())
    initial = host(state.params)
    options = dict(options)
    num_microbatches = options.pop("num_microbatches", None)
    with make_trainer(
        sam_jax.t5x.SamTrainer,
        model,
        state,
        axes,
        partitioner,
        learning_rate_fn=lambda step: LEARNING_RATE,
        num_microbatches=num_microbatches,
        **options,
    ) as trainer:
        metrics = train(trainer, batches)
        trained = host(trainer.train_state.params)

    assert all(np.isfinite(metrics[name]) for name in SAM_METRICS + ("loss",))
    assert np.isfinite(sum(np.sum(w) for w in jax.tree.leaves(trained)))
    assert any(
        not np.allclose(a, b) for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(initial))
    )
    assert metrics["sam/rho"] == pytest.approx(options["rho"])
    if options.get("reweight") is not None:
        assert metrics["sam/weight_max"] > metrics["sam/weight_min"] >= 0
    elif options.get("adaptive"):
        assert metrics["sam/perturbation_norm"] != pytest.approx(options["rho"], rel=1e-3)
    else:
        assert metrics["sam/perturbation_norm"] == pytest.approx(options["rho"], rel=1e-4)


def test_delta_sam_draft_rejects_packed_batches(initialize, partitioner, batches):
    model, state, axes = initialize(adafactor_optimizer())
    trainer = make_trainer(
        sam_jax.t5x.SamTrainer,
        model,
        state,
        axes,
        partitioner,
        learning_rate_fn=lambda step: LEARNING_RATE,
        num_microbatches=None,
        reweight=sam_jax.delta_sam_draft(beta=3),
    )
    with trainer, pytest.raises(ValueError, match="packed"):
        train(trainer, batches[:1])


def test_delta_sam_rejects_a_loss_normalizer_that_depends_on_the_weights(initialize, partitioner):
    _, state, axes = initialize(adafactor_optimizer())
    model = make_model(adafactor_optimizer(), loss_normalizing_factor="AVERAGE_PER_SEQUENCE")
    with pytest.raises(ValueError, match="loss_normalizing_factor"):
        make_trainer(
            sam_jax.t5x.SamTrainer,
            model,
            state,
            axes,
            partitioner,
            learning_rate_fn=lambda step: LEARNING_RATE,
            num_microbatches=None,
            reweight=sam_jax.delta_sam(),
        )


# --------------------------------------------------------------------------- #
# FSAM: the Fisher mask is refreshed, perturbs its share, and is checkpointed.
# --------------------------------------------------------------------------- #


def test_fisher_mask_trains_and_round_trips_through_the_checkpointer(
    initialize, partitioner, batches, tmp_path
):
    sparsity = 0.75
    mask = sam_jax.fisher_mask(sparsity=sparsity, interval=2, num_samples=4)
    optimizer_def = sam_jax.t5x.FisherMaskOptimizer(adafactor_optimizer(), mask)
    model, state, axes = initialize(optimizer_def)
    initial_dict = host(state.state_dict())
    assert initial_dict["state"]["fisher_mask"]["density"] == 1.0

    with make_trainer(
        sam_jax.t5x.SamTrainer,
        model,
        state,
        axes,
        partitioner,
        learning_rate_fn=lambda step: LEARNING_RATE,
        num_microbatches=None,
        rho=0.05,
    ) as trainer:
        metrics = train(trainer, batches)
        trained_state = trainer.train_state

    assert metrics["sam/mask_density"] == pytest.approx(1 - sparsity, abs=1e-3)
    assert metrics["sam/perturbation_norm"] < 0.05
    saved = host(trained_state.state_dict())
    assert saved["state"]["fisher_step"] == 3
    kept = sum(int(m.sum()) for m in jax.tree.leaves(saved["state"]["fisher_mask"]["mask"]))
    total = sum(m.size for m in jax.tree.leaves(saved["state"]["fisher_mask"]["mask"]))
    assert kept == round((1 - sparsity) * total)

    _, fresh_state, _ = initialize(optimizer_def)
    checkpointer = checkpoints.Checkpointer(fresh_state, partitioner, str(tmp_path))
    checkpointer.save(trained_state)
    restored = host(checkpointer.restore(step=3).state_dict())

    jax.tree.map(np.testing.assert_array_equal, restored["state"], saved["state"])
    jax.tree.map(np.testing.assert_array_equal, restored["target"], saved["target"])


def test_a_checkpoint_without_mask_restores_with_a_fresh_mask(initialize, partitioner, tmp_path):
    _, plain_state, _ = initialize(adamw_optimizer())
    checkpoints.Checkpointer(plain_state, partitioner, str(tmp_path)).save(plain_state)

    mask = sam_jax.fisher_mask(sparsity=0.9, interval=100)
    _, fsam_state, _ = initialize(sam_jax.t5x.FisherMaskOptimizer(adamw_optimizer(), mask))
    restored = checkpoints.Checkpointer(fsam_state, partitioner, str(tmp_path)).restore(
        step=0, state_transformation_fns=[sam_jax.t5x.fill_missing_fisher_mask]
    )
    restored_dict = host(restored.state_dict())

    assert restored_dict["state"]["fisher_step"] == 0
    assert restored_dict["state"]["fisher_mask"]["density"] == 1.0
    assert all(m.all() for m in jax.tree.leaves(restored_dict["state"]["fisher_mask"]["mask"]))
    expected_params = host(plain_state.state_dict()["target"])
    jax.tree.map(np.testing.assert_array_equal, restored_dict["target"], expected_params)

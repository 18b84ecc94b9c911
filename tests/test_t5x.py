"""Tests for sam_jax.t5x: SamTrainer and FisherMaskOptimizer inside T5X.

Run in an environment where T5X is installed (README, "Inside T5X"). Without
the `t5x` package the whole file is skipped; with a partial T5X install (a
missing dependency of T5X's) it fails to import, loudly.

A tiny T5.1.1 encoder–decoder (T5X's `examples.t5.network`, one layer each,
dropout 0.1, the task's vocabulary) trains on packed batches of the offline
`demo_cbqa` task, on a mesh of 4 data shards × 2 model shards of the 8
simulated CPU devices. The last tests run T5X's own training loop
(`t5x.train.train` through T5X's gin files and ours) with Orbax checkpoints.
"""

import dataclasses
import importlib
import importlib.util
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

if importlib.util.find_spec("t5x") is None:  # only T5X's absence skips
    pytest.skip("T5X is not installed (not on PyPI; see the README)", allow_module_level=True)

import flax.linen as flax_linen  # noqa: E402
import gin  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import seqio  # noqa: E402
from flax.linen import partitioning as flax_partitioning  # noqa: E402
from t5x import adafactor  # noqa: E402
from t5x import checkpoints  # noqa: E402
from t5x import gin_utils  # noqa: E402
from t5x import models  # noqa: E402
from t5x import optimizers  # noqa: E402
from t5x import partitioning  # noqa: E402
from t5x import train as t5x_train  # noqa: E402
from t5x import train_state as train_state_lib  # noqa: E402
from t5x import trainer as trainer_lib  # noqa: E402
from t5x import utils as t5x_utils  # noqa: E402
from t5x.examples.t5 import network  # noqa: E402

import __main__  # noqa: E402  (T5X's gin files bind `__main__.train`)
import sam_jax  # noqa: E402
import sam_jax.t5x  # noqa: E402
from sam_jax import tasks  # noqa: E402, F401  (registers demo_cbqa)
from sam_jax.t5x import per_example  # noqa: E402
from sam_jax.t5x import trainer as sam_trainer  # noqa: E402

# T5X's partitioner enters its mesh with `with mesh:`, which JAX deprecates; that
# warning is T5X's, not ours (a mark overrides `-W error::DeprecationWarning`).
pytestmark = pytest.mark.filterwarnings(
    "ignore:`with mesh.` context manager has been deprecated:DeprecationWarning"
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = "demo_cbqa"
FEATURE_LENGTHS = {"inputs": 64, "targets": 16}  # packs several examples per row
BATCH_SIZE = 32
DATA_SHARDS = 4
LEARNING_RATE = 1e-2
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
VOCABULARY = seqio.get_mixture_or_task(TASK).output_features["targets"].vocabulary
TINY_CONFIG = network.T5Config(
    vocab_size=-(-VOCABULARY.vocab_size // 64) * 64,  # ≥ the task's ids
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


def vocabulary_gin():
    """Gin bindings of T5X's `VOCABULARY` macro to the task's vocabulary."""
    if isinstance(VOCABULARY, seqio.SentencePieceVocabulary):
        return (
            "VOCABULARY = @seqio.SentencePieceVocabulary()\n"
            f"seqio.SentencePieceVocabulary.sentencepiece_model_file = "
            f"'{VOCABULARY.sentencepiece_model_file}'\n"
            f"seqio.SentencePieceVocabulary.extra_ids = {VOCABULARY.extra_ids}"
        )
    assert isinstance(VOCABULARY, seqio.ByteVocabulary), VOCABULARY
    return "VOCABULARY = @seqio.ByteVocabulary()"


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


def make_model(optimizer_def, loss_normalizing_factor=None, dropout_rate=None):
    """The tiny model; `dropout_rate=0.0` for runs compared across batch layouts."""
    config = TINY_CONFIG
    if dropout_rate is not None:
        config = dataclasses.replace(config, dropout_rate=dropout_rate)
    return models.EncoderDecoderModel(
        module=network.Transformer(config),
        input_vocabulary=VOCABULARY,
        output_vocabulary=VOCABULARY,
        optimizer_def=optimizer_def,
        loss_normalizing_factor=loss_normalizing_factor,
    )


def cbqa_dataset(pack, num_examples=None):
    converter = seqio.EncDecFeatureConverter(pack=pack)
    task = seqio.get_mixture_or_task(TASK)
    examples = task.get_dataset(FEATURE_LENGTHS, split="train", shuffle=False, use_cached=False)
    if num_examples is not None:
        examples = examples.take(num_examples)
    return converter(examples, FEATURE_LENGTHS)


@pytest.fixture(scope="module")
def batches():
    """Three packed batches of demo_cbqa (repeating it if it packs into fewer rows)."""
    dataset = cbqa_dataset(pack=True).repeat().batch(BATCH_SIZE, drop_remainder=True).take(3)
    result = [{k: np.asarray(v) for k, v in b.items()} for b in dataset.as_numpy_iterator()]
    assert len(result) == 3
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


def compile_fast(fn, *args):
    """`jax.jit(fn)` compiled for `args` without XLA's expensive optimisations."""
    return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)


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

    losses_of = jax.jit(lambda p, b: per_example.example_losses(model, p, b, None)[0])
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


@pytest.mark.parametrize(
    "gin_file", ["sam.gin", "delta_sam.gin", "fsam.gin", "gsam.gin", "esam.gin"]
)
def test_each_gin_file_is_one_include_for_a_finetune_run(gin_config, tmp_path, gin_file):
    (tmp_path / "model_like.gin").write_text(MODEL_LIKE_GIN)
    (tmp_path / "finetune_like.gin").write_text(
        FINETUNE_LIKE_GIN.format(learning_rate=LEARNING_RATE)
    )
    gin_utils.parse_gin_flags(
        [str(tmp_path), REPO],
        ["model_like.gin", "finetune_like.gin", f"gin/t5x/{gin_file}"],
        ["SamTrainer.rho = 0.123", "trainer.Trainer.num_microbatches = 2"],
    )

    trainer_cls = gin.query_parameter("train_script.train.trainer_cls")
    assert trainer_cls.configurable.wrapped is sam_jax.t5x.SamTrainer
    assert gin.query_parameter("SamTrainer.rho") == 0.123
    # T5X's bindings on trainer.Trainer reach SamTrainer.
    inherited = sam_trainer.carried_over(
        sam_jax.t5x.SamTrainer, dict.fromkeys(sam_trainer.CARRIED_OVER)
    )
    assert inherited["num_microbatches"] == 2
    assert inherited["learning_rate_fn"](0) == pytest.approx(LEARNING_RATE)
    reweight = gin.query_parameter("SamTrainer.reweight")
    optimizer_def = gin.query_parameter("models.EncoderDecoderModel.optimizer_def")
    if gin_file == "delta_sam.gin":
        assert reweight.scoped_configurable_fn().name == "delta_sam"
    else:
        assert reweight is None
    if gin_file == "fsam.gin":
        assert gin.query_parameter("SamTrainer.fisher_mask_required")
        for model_class in ("EncoderDecoderModel", "DecoderOnlyModel"):
            wrapped = gin.query_parameter(f"models.{model_class}.optimizer_def")
            wrapper = wrapped.scoped_configurable_fn()
            assert isinstance(wrapper, sam_jax.t5x.FisherMaskOptimizer)
            assert isinstance(wrapper.optimizer, adafactor.Adafactor)
        restore = gin.query_parameter("utils.CheckpointConfig.restore")
        assert restore.configurable.wrapped is sam_jax.t5x.restore_config_with_fisher_mask
        with pytest.raises(ValueError, match="no .*bound"):  # the list is left to the user
            gin.query_parameter("utils.RestoreCheckpointConfig.state_transformation_fns")
    else:
        assert isinstance(optimizer_def.scoped_configurable_fn(), adafactor.Adafactor)


def test_trainer_bindings_carry_over_and_a_conflict_or_no_learning_rate_fails(gin_config, tmp_path):
    (tmp_path / "finetune_like.gin").write_text(
        FINETUNE_LIKE_GIN.format(learning_rate=LEARNING_RATE)
    )
    (tmp_path / "weight_metrics.gin").write_text(
        "from __gin__ import dynamic_registration\n"
        "from t5x import trainer\n"
        "trainer.Trainer.weight_metrics_computer = @trainer.WeightMetricsComputer()\n"
    )
    unset = dict.fromkeys(sam_trainer.CARRIED_OVER)
    gin_utils.parse_gin_flags(
        [str(tmp_path), REPO],
        ["finetune_like.gin", "weight_metrics.gin", "gin/t5x/sam.gin"],
        ["trainer.Trainer.num_microbatches = 4"],
    )
    inherited = sam_trainer.carried_over(sam_jax.t5x.SamTrainer, unset)
    assert inherited["num_microbatches"] == 4
    assert isinstance(inherited["weight_metrics_computer"], trainer_lib.WeightMetricsComputer)
    gin.clear_config()
    gin_utils.parse_gin_flags(
        [str(tmp_path), REPO],
        ["finetune_like.gin", "gin/t5x/sam.gin"],
        ["trainer.Trainer.num_microbatches = 4", "SamTrainer.num_microbatches = 2"],
    )
    with pytest.raises(ValueError, match="are both bound"):
        sam_trainer.carried_over(sam_jax.t5x.SamTrainer, {**unset, "num_microbatches": 2})
    gin.clear_config()
    gin_utils.parse_gin_flags([REPO], ["gin/t5x/sam.gin"], [])
    with pytest.raises(ValueError, match="needs a learning rate"):
        sam_trainer.carried_over(sam_jax.t5x.SamTrainer, unset)


def test_fsam_without_the_mask_optimizer_is_an_error(initialize, partitioner):
    """fsam.gin wraps two model classes' optimizers; on any other, FSAM must not become SAM."""
    model, state, axes = initialize(adafactor_optimizer())
    with pytest.raises(ValueError, match=r"EncoderDecoderModel.optimizer_def = @sam_jax"):
        make_trainer(
            sam_jax.t5x.SamTrainer,
            model,
            state,
            axes,
            partitioner,
            learning_rate_fn=lambda step: LEARNING_RATE,
            fisher_mask_required=True,
        )


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
    # The examples are the packed segments of the 8 ascent rows; sam/grad_norm is
    # the norm of their mean loss's gradient, and their weights are uniform.
    segments = arguments[2]["decoder_segment_ids"]
    num_examples = sum(len(set(row[row > 0])) for row in segments)
    assert num_examples > 8
    assert metrics["sam/grad_norm"] == pytest.approx(grad_norm / num_examples, rel=1e-4)
    assert metrics["sam/perturbation_norm"] == pytest.approx(rho, rel=1e-4)
    assert metrics["learning_rate"] == pytest.approx(LEARNING_RATE)
    assert metrics["sam/weight_min"] == pytest.approx(1 / num_examples)
    assert metrics["sam/weight_max"] == pytest.approx(1 / num_examples)
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
    # ESAM's data selection of packed rows, then GSAM's direction.
    "esam_gsam": (
        adamw_optimizer,
        dict(
            rho=0.05,
            esam=sam_jax.esam(beta=1.0, gamma=0.5),
            surrogate_gap=sam_jax.gsam(0.3),
            num_microbatches=2,
        ),
    ),
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


def pad_rows(batch, multiple):
    """Appends all-zero rows (no example) up to a multiple of `multiple` rows."""
    rows = len(next(iter(batch.values())))
    missing = -rows % multiple
    return {
        k: np.concatenate([v, np.zeros((missing,) + v.shape[1:], v.dtype)])
        for k, v in batch.items()
    }


def assert_trees_close(actual, expected, rtol, atol_fraction):
    """Leaf by leaf, with atol = atol_fraction × the leaf's largest |expected|."""
    for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol_fraction * np.abs(b).max())


def first_step(trainer_options, optimizer_def, initialize, partitioner, batch):
    """One SamTrainer step with dropout off.

    Returns:
      (metrics, params after the step − initial params, the new state's state dict).
    """
    _, state, axes = initialize(optimizer_def)
    model = make_model(optimizer_def, dropout_rate=0.0)
    initial = host(state.params)
    with make_trainer(
        sam_jax.t5x.SamTrainer,
        model,
        state,
        axes,
        partitioner,
        learning_rate_fn=lambda step: LEARNING_RATE,
        **trainer_options,
    ) as trainer:
        metrics = train(trainer, [batch])
        trained = host(trainer.train_state.params)
        state_dict = host(trainer.train_state.state_dict())
    return metrics, jax.tree.map(np.subtract, trained, initial), state_dict


def test_delta_sam_draft_on_packed_batches_equals_the_unpacked_examples(initialize, partitioner):
    """The empty segment slots of a packed batch are not examples for the draft rule's 1/N."""
    num_examples = 12
    packed = next(cbqa_dataset(pack=True, num_examples=num_examples).batch(64).as_numpy_iterator())
    unpacked = next(
        cbqa_dataset(pack=False, num_examples=num_examples).batch(64).as_numpy_iterator()
    )
    packed = pad_rows(packed, DATA_SHARDS)
    assert packed["decoder_segment_ids"].max() >= 2 and len(packed["decoder_loss_weights"]) < 12
    options = dict(rho=0.5, reweight=sam_jax.delta_sam_draft(beta=3), num_microbatches=None)

    packed_metrics, packed_step, _ = first_step(
        options, optimizers.sgd(1.0), initialize, partitioner, packed
    )
    unpacked_metrics, unpacked_step, _ = first_step(
        options, optimizers.sgd(1.0), initialize, partitioner, unpacked
    )

    # SGD with learning rate 1: the steps are the (negated) SAM gradients. Without
    # the mask of present examples they differ by tens of percent (38% measured);
    # what remains (~5e-5 of a leaf's largest entry) is float32 rounding in the
    # rule's a_j = l_j(w + r) − l_j(w), a small difference of two large losses,
    # computed on differently laid out batches.
    assert_trees_close(packed_step, unpacked_step, rtol=0, atol_fraction=1e-3)
    assert unpacked_metrics["sam/weight_max"] > 2 * unpacked_metrics["sam/weight_min"]
    for name in SAM_METRICS + ("loss",):
        if name.startswith("sam/weight_"):  # the weights sum to 1
            assert packed_metrics[name] == pytest.approx(unpacked_metrics[name], abs=1e-4), name
        else:
            assert packed_metrics[name] == pytest.approx(unpacked_metrics[name], rel=1e-4), name


def _unpacked_batch(num_rows):
    batch = next(
        cbqa_dataset(pack=False, num_examples=num_rows).batch(num_rows).as_numpy_iterator()
    )
    return {k: np.asarray(v) for k, v in batch.items()}


@pytest.mark.parametrize("variant", ["delta_sam", "asam"])
def test_delta_sam_and_asam_first_steps_are_hand_computed(initialize, partitioner, variant):
    """One SGD step (lr 1) against the paper's formulas on the model's own per-row losses."""
    rho, eta, adaptive_eta = 0.5, 1e-4, 0.01
    batch = _unpacked_batch(16)  # rows are examples; 4 per data shard
    if variant == "delta_sam":
        options = dict(rho=rho, reweight=sam_jax.delta_sam(eta))  # forward-mode probe
    else:
        options = dict(rho=rho, adaptive=True, adaptive_eta=adaptive_eta)
    metrics, step, _ = first_step(
        dict(options, num_microbatches=None), optimizers.sgd(1.0), initialize, partitioner, batch
    )
    _, state, _ = initialize(optimizers.sgd(1.0))
    model = make_model(optimizers.sgd(1.0), dropout_rate=0.0)
    params = host(state.params)

    def row_loss(params, row):  # l_i: the model's summed loss on row i alone
        return model.loss_fn(params, {k: v[row : row + 1] for k, v in batch.items()}, None)[0]

    rows = range(16)
    # The step's random direction r (drawn by sam_jax.perturbation, tested on its own).
    dropout_rng = jax.random.fold_in(jax.random.PRNGKey(1), 0)
    r = sam_jax.perturbation.random_perturbation(
        sam_jax.core.reweight_key(dropout_rng), params, jnp.float32(rho)
    )

    def reference_gradient(params, r):
        if (
            variant == "delta_sam"
        ):  # Eq. 5 with l(w+r) + l(w−r) − 2l(w) → rᵀHr, l(w+r) − l(w−r) → 2∇l·r
            with per_example.forward_differentiable_cross_entropy():  # jvp through T5X's loss

                def slope(params, i):
                    return jax.jvp(lambda p: row_loss(p, i), (params,), (r,))[1]

                derivatives = [jax.jvp(lambda p, i=i: slope(p, i), (params,), (r,)) for i in rows]
            first, second = (jnp.stack(d) for d in zip(*derivatives, strict=True))
            scores = jnp.abs(second) / jnp.maximum(jnp.abs(2 * first), eta)
            weights = scores / jnp.sum(scores)
        else:
            weights = jnp.full(16, 1 / 16)

        def weighted(params):
            return sum(weights[i] * row_loss(params, i) for i in rows)

        g = jax.grad(weighted)(params)
        if variant == "delta_sam":
            norm = jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(g)))
            eps = jax.tree.map(lambda x: rho * x / norm, g)
        else:  # ASAM: ε = ρ T² g / ‖T g‖, T = |w| + η
            t = jax.tree.map(lambda w: jnp.abs(w) + adaptive_eta, params)
            norm = jnp.sqrt(
                sum(jnp.sum((a * b) ** 2) for a, b in zip(*map(jax.tree.leaves, (t, g))))
            )
            eps = jax.tree.map(lambda a, x: rho * a * a * x / norm, t, g)
        adversarial = jax.tree.map(jnp.add, params, eps)
        descent = jax.grad(lambda p: sum(row_loss(p, i) for i in rows))(adversarial)
        return descent, weights

    descent, weights = host(compile_fast(reference_gradient, params, r)(params, r))
    assert_trees_close(step, jax.tree.map(np.negative, descent), rtol=0, atol_fraction=1e-5)
    assert metrics["sam/weight_min"] == pytest.approx(weights.min(), rel=1e-4)
    assert metrics["sam/weight_max"] == pytest.approx(weights.max(), rel=1e-4)
    if variant == "delta_sam":
        assert weights.max() > 2 * weights.min()  # not uniform: the rule acts


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


def group_rows(num_groups, fraction):
    """Rows of each m-sharpness group and of its ascent micro-batch, by hand.

    Group k takes the k-th 1/m of every data shard's rows; its ascent
    micro-batch the first `fraction` of the group's rows in every shard.
    """
    per_shard = BATCH_SIZE // DATA_SHARDS
    per_group = per_shard // num_groups
    take = max(1, round(fraction * per_group))
    starts = [d * per_shard + k * per_group for k in range(num_groups) for d in range(DATA_SHARDS)]
    groups = np.asarray(starts).reshape(num_groups, DATA_SHARDS, 1) + np.arange(per_group)
    return groups.reshape(num_groups, -1), groups[:, :, :take].reshape(num_groups, -1)


@pytest.mark.parametrize(
    "sharpness_m, num_microbatches, ascent_fraction", [(1, 2, 1.0), (2, None, 0.5)]
)
def test_fisher_mask_with_microbatches_and_m_sharpness_is_hand_computed_fsam(
    initialize, partitioner, batches, sharpness_m, num_microbatches, ascent_fraction
):
    sparsity, rho, num_samples = 0.75, 0.5, 4
    mask = sam_jax.fisher_mask(sparsity=sparsity, interval=100, num_samples=num_samples)
    optimizer_def = sam_jax.t5x.FisherMaskOptimizer(optimizers.sgd(1.0), mask)
    batch = batches[0]
    metrics, step, trained = first_step(
        dict(
            rho=rho,
            ascent_fraction=ascent_fraction,
            sharpness_m=sharpness_m,
            num_microbatches=num_microbatches,
        ),
        optimizer_def,
        initialize,
        partitioner,
        batch,
    )
    _, state, _ = initialize(optimizer_def)
    model = make_model(optimizer_def, dropout_rate=0.0)
    params = host(state.params)

    def loss(params, rows):
        rows = np.asarray(rows)
        return model.loss_fn(params, {k: v[rows] for k, v in batch.items()}, None)[0]

    # The mask, by hand: the top 25% of the mean squared per-row gradient on
    # `num_samples` rows, the first num_samples / DATA_SHARDS of every data shard,
    # over all parameters at once.
    per_shard = BATCH_SIZE // DATA_SHARDS
    fisher_rows = [
        d * per_shard + i for d in range(DATA_SHARDS) for i in range(num_samples // DATA_SHARDS)
    ]

    def fisher(params):
        squares = [jax.tree.map(jnp.square, jax.grad(loss)(params, [i])) for i in fisher_rows]
        return jax.tree.map(lambda *s: sum(s) / num_samples, *squares)

    total = sum(w.size for w in jax.tree.leaves(params))
    keep = round((1 - sparsity) * total)
    expected_mask = host(sam_jax.fisher.top_k_mask(compile_fast(fisher, params)(params), keep))
    trained_mask = trained["state"]["fisher_mask"]["mask"]
    mismatched = sum(
        int(np.sum(a != b))
        for a, b in zip(jax.tree.leaves(trained_mask), jax.tree.leaves(expected_mask))
    )
    assert mismatched <= 1e-3 * total, f"{mismatched} of {total} mask entries differ"
    assert trained["state"]["fisher_step"] == 1

    groups, ascents = group_rows(sharpness_m, ascent_fraction)

    def perturbed(params, grads, mask):
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        return jax.tree.map(lambda w, g, m: w + rho * g * m / norm, params, grads, mask)

    def reference_gradient(params, mask):
        grads = jax.tree.map(jnp.zeros_like, params)
        for group, ascent in zip(groups, ascents):
            adversarial = perturbed(params, jax.grad(loss)(params, ascent), mask)
            grads = jax.tree.map(jnp.add, grads, jax.grad(loss)(adversarial, group))
        return grads

    trained_mask = jax.tree.unflatten(jax.tree.structure(params), jax.tree.leaves(trained_mask))
    reference = compile_fast(reference_gradient, params, trained_mask)
    expected = host(reference(params, trained_mask))
    unmasked = host(reference(params, jax.tree.map(np.ones_like, trained_mask)))

    # SGD with learning rate 1: the step is minus the summed group gradients.
    assert_trees_close(step, jax.tree.map(np.negative, expected), rtol=0, atol_fraction=1e-5)
    with pytest.raises(AssertionError):  # the mask matters at this tolerance
        assert_trees_close(expected, unmasked, rtol=0, atol_fraction=1e-5)
    assert metrics["sam/mask_density"] == pytest.approx(keep / total)
    assert sum(int(m.sum()) for m in jax.tree.leaves(trained_mask)) == keep
    assert metrics["sam/perturbation_norm"] < rho


def restore_from_t5x_checkpoint(state, template, partitioner, directory, use_orbax, **kwargs):
    """Saves `state` and restores it into `template`'s structure with T5X's checkpointing.

    `use_orbax` uses the Orbax manager T5X's train.py builds by default (and
    its float32 restore dtype), else T5X's legacy `Checkpointer`.
    """
    step = int(host(state.step))
    os.makedirs(directory, exist_ok=True)
    if use_orbax:

        def manager(train_state):
            return t5x_utils.create_orbax_checkpoint_manager(
                save_cfg=t5x_utils.SaveCheckpointConfig(dtype="float32", period=1),
                restore_cfg=t5x_utils.RestoreCheckpointConfig(path=directory, dtype="float32"),
                train_state=train_state,
                partitioner=partitioner,
                model_dir=directory,
            )

        saver = manager(state)
        saver.save(state)
        saver.wait_until_finished()
        assert os.path.isdir(os.path.join(directory, f"checkpoint_{step}", "state"))
        return manager(template).restore(step=step, **kwargs)
    checkpoints.Checkpointer(state, partitioner, directory).save(state)
    return checkpoints.Checkpointer(template, partitioner, directory).restore(step=step, **kwargs)


def assert_state_dicts_equal(actual, expected):
    """Equal values; T5X's Orbax restore casts unsharded scalars (the steps) to float32."""
    jax.tree.map(np.testing.assert_array_equal, actual, expected)
    for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert a.dtype == b.dtype or (a.shape == () and a.dtype == np.float32), (a.dtype, b.dtype)


def test_fisher_mask_trains_and_round_trips_through_t5x_checkpoints(
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
    assert kept < total

    for use_orbax in (False, True):
        _, fresh_state, _ = initialize(optimizer_def)
        directory = str(tmp_path / ("orbax" if use_orbax else "legacy"))
        restored = restore_from_t5x_checkpoint(
            trained_state, fresh_state, partitioner, directory, use_orbax
        )
        assert_state_dicts_equal(host(restored.state_dict()), saved)


@pytest.mark.parametrize("use_orbax", [False, True], ids=["legacy", "orbax"])
def test_a_checkpoint_without_mask_restores_with_a_fresh_mask(
    initialize, partitioner, tmp_path, use_orbax
):
    _, plain_state, _ = initialize(adamw_optimizer())
    mask = sam_jax.fisher_mask(sparsity=0.9, interval=100)
    _, fsam_state, _ = initialize(sam_jax.t5x.FisherMaskOptimizer(adamw_optimizer(), mask))
    restored = restore_from_t5x_checkpoint(
        plain_state,
        fsam_state,
        partitioner,
        str(tmp_path),
        use_orbax,
        state_transformation_fns=[sam_jax.t5x.fill_missing_fisher_mask],
    )
    restored_dict = host(restored.state_dict())

    assert restored_dict["state"]["fisher_step"] == 0
    assert restored_dict["state"]["fisher_mask"]["density"] == 1.0
    masks = jax.tree.leaves(restored_dict["state"]["fisher_mask"]["mask"])
    assert all(m.dtype == np.bool_ and m.all() for m in masks)
    expected_params = host(plain_state.state_dict()["target"])
    jax.tree.map(np.testing.assert_array_equal, restored_dict["target"], expected_params)


RESTORE_TRANSFORMATION_CALLS = []


def record_restore_transformation(state_dict, target_state_dict, *, is_resuming=False):
    """A user's restore transformation: records (had a Fisher mask, is_resuming)."""
    del target_state_dict
    RESTORE_TRANSFORMATION_CALLS.append(("fisher_mask" in state_dict["state"], is_resuming))
    return state_dict


def test_the_wrapped_restore_config_runs_its_transformations_then_fills_the_mask():
    config = t5x_utils.RestoreCheckpointConfig(
        path="/checkpoint",
        assignment_map=[("new/(.*)", r"old/\1")],
        state_transformation_fns=[record_restore_transformation],
    )
    assignment = config.state_transformation_fns[0]

    wrapped = sam_jax.t5x.restore_config_with_fisher_mask(config)

    assert wrapped.state_transformation_fns == (
        assignment,  # once: __post_init__ is not run again
        record_restore_transformation,
        sam_jax.t5x.fill_missing_fisher_mask,
    )
    assert config.state_transformation_fns == (assignment, record_restore_transformation)
    assert (wrapped.path, wrapped.assignment_map) == (config.path, config.assignment_map)


# --------------------------------------------------------------------------- #
# T5X's own training loop: `t5x.train.train` configured by T5X's gin files plus
# one of ours, fine-tuning from a T5X checkpoint, checkpoints with Orbax.
# --------------------------------------------------------------------------- #

T5X_RUN_GIN = """
from __gin__ import dynamic_registration

import __main__ as train_script
import sam_jax
import seqio
from t5x import utils
from t5x.examples.t5 import network

include 't5x/examples/t5/t5_1_1/tiny.gin'
include 't5x/configs/runs/finetune.gin'
{before_gin}
include 'gin/t5x/{sam_gin}'

MODEL_DIR = '{model_dir}'
INITIAL_CHECKPOINT_PATH = {initial_checkpoint!r}
MIXTURE_OR_TASK_NAME = '{task}'
TASK_FEATURE_LENGTHS = {feature_lengths}
TRAIN_STEPS = 2
BATCH_SIZE = 8
USE_CACHED_TASKS = False
RANDOM_SEED = 0
{vocabulary}

# TINY_CONFIG's shapes (the initial checkpoint's).
network.T5Config:
  vocab_size = {vocab_size}
  dtype = 'float32'
  num_encoder_layers = 1
  num_decoder_layers = 1
  num_heads = 2
  head_dim = 4

train_script.train:
  train_eval_dataset_cfg = None
  infer_eval_dataset_cfg = None
train/utils.DatasetConfig.seed = 0
utils.SaveCheckpointConfig:
  period = {checkpoint_period}
  save_dataset = {save_dataset}
{extra_gin}
"""


@pytest.fixture(scope="module")
def initial_checkpoint(initialize, partitioner, tmp_path_factory):
    """An Orbax T5X checkpoint of the tiny model with Adafactor and no mask ("pre-trained")."""
    _, state, _ = initialize(adafactor_optimizer())
    directory = str(tmp_path_factory.mktemp("pretrained"))
    manager = t5x_utils.create_orbax_checkpoint_manager(
        save_cfg=t5x_utils.SaveCheckpointConfig(period=1),
        train_state=state,
        partitioner=partitioner,
        model_dir=directory,
    )
    manager.save(state)
    manager.wait_until_finished()
    return os.path.join(directory, "checkpoint_0"), host(state.params)


def run_t5x_train(
    tmp_path,
    sam_gin,
    model_dir,
    initial_checkpoint,
    checkpoint_period,
    extra_gin="",
    before_gin="",
):
    """Runs T5X's `train` as its train.py would, with our gin file included last.

    `before_gin` is bound before our include, `extra_gin` after it.

    Only the partitioner is passed in (the tests' data × model mesh, compiling
    fast); everything else comes from gin. With no initial checkpoint the run
    starts from scratch and checkpoints its dataset position too (T5X would
    look for one in a pre-trained checkpoint as well).

    Returns:
      (last step, train state).
    """
    gin.clear_config()
    train_using_gin = gin.configurable(t5x_train.train)
    (tmp_path / "run.gin").write_text(
        T5X_RUN_GIN.format(
            sam_gin=sam_gin,
            model_dir=model_dir,
            initial_checkpoint=initial_checkpoint or [],
            task=TASK,
            feature_lengths=FEATURE_LENGTHS,
            vocabulary=vocabulary_gin(),
            vocab_size=TINY_CONFIG.vocab_size,
            checkpoint_period=checkpoint_period,
            save_dataset=initial_checkpoint is None,
            extra_gin=extra_gin,
            before_gin=before_gin,
        )
    )
    # An absolute path: gin's search paths are global and accumulate across tests.
    search_paths = [REPO, *t5x_train._DEFAULT_GIN_SEARCH_PATHS]
    gin_utils.parse_gin_flags(search_paths, [str(tmp_path / "run.gin")], [])
    return train_using_gin(partitioner=DataMeshPartitioner(num_partitions=2))


def train_summaries(model_dir, skip=()):
    """{step: {tag: value}} of the scalars T5X wrote to `model_dir/train`.

    Args:
      model_dir: the run's model directory.
      skip: event files to leave out (those of an earlier run).

    Returns:
      The scalars, and the event files read.
    """
    import tensorflow as tf  # noqa: PLC0415  (seqio's dependency)

    summaries = {}
    paths = set(tf.io.gfile.glob(os.path.join(model_dir, "train", "events.out.tfevents.*")))
    for path in paths - set(skip):
        for record in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                if value.HasField("tensor") and not value.tensor.string_val:
                    scalar = float(tf.make_ndarray(value.tensor))
                    summaries.setdefault(event.step, {})[value.tag] = scalar
    return summaries, paths


@pytest.mark.parametrize("sam_gin, rho", [("sam.gin", 0.05), ("delta_sam.gin", 0.02)])
def test_t5x_train_finetunes_with_a_sam_include(
    gin_config, tmp_path, initial_checkpoint, sam_gin, rho
):
    checkpoint_path, initial_params = initial_checkpoint
    model_dir = str(tmp_path / "model")
    step, state = run_t5x_train(tmp_path, sam_gin, model_dir, checkpoint_path, 2)

    assert step == 2 and int(host(state.step)) == 2
    assert os.path.isdir(os.path.join(model_dir, "checkpoint_2", "state"))
    trained = host(state.params)
    assert all(np.isfinite(w).all() for w in jax.tree.leaves(trained))
    assert any(
        not np.allclose(a, b)
        for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(initial_params))
    )
    summary = train_summaries(model_dir)[0][2]  # one summary per checkpoint period
    assert all(name in summary for name in SAM_METRICS), sorted(summary)
    assert np.isfinite(summary["loss"]) and summary["sam/perturbed_loss"] > 0
    assert summary["sam/rho"] == pytest.approx(rho)
    assert summary["sam/mask_density"] == 1.0
    if sam_gin == "sam.gin":  # ¼ of each shard's 2 rows: 4 packed rows' examples, uniform
        assert summary["sam/weight_min"] == pytest.approx(summary["sam/weight_max"])
        examples = 1 / summary["sam/weight_max"]
        assert examples == pytest.approx(round(examples)) and round(examples) >= 4
    else:  # every packed example weighted on its own
        assert summary["sam/weight_max"] > summary["sam/weight_min"] >= 0


def test_t5x_train_with_fsam_resumes_exactly_from_its_orbax_checkpoint(gin_config, tmp_path):
    model_dir = str(tmp_path / "model")
    # The authors' cheaper Fisher estimator halves the compile time; the default
    # one is checked in SamTrainer above. The rest are fsam.gin's defaults.
    estimator = "sam_jax.fisher_mask.fisher = 'squared_batch_gradient'"
    step, state = run_t5x_train(tmp_path, "fsam.gin", model_dir, None, 1, estimator)
    first_run = host(state.state_dict())
    first_summaries, first_files = train_summaries(model_dir)

    # fsam.gin's defaults: sparsity 0.9, refreshed every 100 steps (so on step 0 only).
    masks = jax.tree.leaves(first_run["state"]["fisher_mask"]["mask"])
    total = sum(m.size for m in masks)
    assert step == 2 and first_run["state"]["fisher_step"] == 2
    assert sum(int(m.sum()) for m in masks) == round(0.1 * total)
    assert first_summaries[2]["sam/mask_density"] == pytest.approx(round(0.1 * total) / total)
    assert os.path.isdir(os.path.join(model_dir, "checkpoint_1", "state"))

    # Resume from step 1's checkpoint (state, mask and dataset position): step 2 uses
    # the restored mask of step 0 and must repeat the first run's step 2 exactly.
    shutil.rmtree(os.path.join(model_dir, "checkpoint_2"))
    step, state = run_t5x_train(tmp_path, "fsam.gin", model_dir, None, 1, estimator)
    assert step == 2
    assert_state_dicts_equal(host(state.state_dict()), first_run)
    resumed_summaries, _ = train_summaries(model_dir, skip=first_files)
    assert max(resumed_summaries) == 2
    for name in SAM_METRICS + ("loss",):
        assert resumed_summaries[2][name] == first_summaries[2][name], name


@pytest.mark.parametrize("where", ["before", "after"])
def test_t5x_train_with_fsam_from_a_checkpoint_without_mask_keeps_the_users_transformations(
    gin_config, tmp_path, initial_checkpoint, where
):
    checkpoint_path, _ = initial_checkpoint
    functions = [f"@{__name__}.record_restore_transformation"]
    if where == "before":  # with the function fsam.gin appends too, as listed before: runs twice
        functions.append("@sam_jax.t5x.fill_missing_fisher_mask")
    user = (
        f"import {__name__}\n"
        f"utils.RestoreCheckpointConfig.state_transformation_fns = [{', '.join(functions)}]\n"
    )
    estimator = "sam_jax.fisher_mask.fisher = 'squared_batch_gradient'\n"
    if where == "before":
        gin_text = {"before_gin": user, "extra_gin": estimator}
    else:
        gin_text = {"extra_gin": estimator + user}
    RESTORE_TRANSFORMATION_CALLS.clear()

    step, state = run_t5x_train(
        tmp_path, "fsam.gin", str(tmp_path / "model"), checkpoint_path, 2, **gin_text
    )

    # The user's transformation ran on the pre-trained checkpoint, before the mask was filled.
    assert RESTORE_TRANSFORMATION_CALLS == [(False, False)]
    trained = host(state.state_dict())
    masks = jax.tree.leaves(trained["state"]["fisher_mask"]["mask"])
    total = sum(m.size for m in masks)
    assert step == 2 and trained["state"]["fisher_step"] == 2  # restored at 0: refreshed
    assert sum(int(m.sum()) for m in masks) == round(0.1 * total)


# --------------------------------------------------------------------------- #
# Decoder-only models (T5X's DecoderOnlyModel), packed prefix-LM batches.
# --------------------------------------------------------------------------- #


class TinyDecoder(flax_linen.Module):
    """A causal bag-of-prefix language model: position t sees the mean embedding of ≤ t."""

    vocab_size: int
    width: int = 8

    @flax_linen.compact
    def __call__(
        self,
        decoder_input_tokens,
        decoder_target_tokens,
        decoder_segment_ids=None,
        decoder_positions=None,
        decoder_causal_attention=None,
        enable_dropout=True,
        decode=False,
        **unused,
    ):
        del decoder_target_tokens, decoder_positions, decoder_causal_attention, decode, unused
        init = flax_linen.initializers.normal(0.5)
        embedding = flax_partitioning.param_with_axes(
            "embedding", init, (self.vocab_size, self.width), axes=("vocab", "embed")
        )
        output = flax_partitioning.param_with_axes(
            "output", init, (self.width, self.vocab_size), axes=("embed", "vocab")
        )
        x = embedding[decoder_input_tokens.astype(jnp.int32)]
        if decoder_segment_ids is None:
            decoder_segment_ids = jnp.ones(decoder_input_tokens.shape, jnp.int32)
        # A token sees the earlier tokens of its own packed segment.
        same = decoder_segment_ids[:, :, None] == decoder_segment_ids[:, None, :]
        length = decoder_input_tokens.shape[1]
        visible = same & (jnp.arange(length)[None, :, None] >= jnp.arange(length)[None, None, :])
        mixed = jnp.einsum("bts,bsd->btd", visible, x) / jnp.maximum(
            jnp.sum(visible, -1, keepdims=True), 1
        )
        mixed = flax_linen.Dropout(0.1)(mixed, deterministic=not enable_dropout)
        return mixed @ output


def test_a_decoder_only_model_takes_the_hand_computed_sam_step(partitioner):
    converter = seqio.PrefixLMFeatureConverter(pack=True)
    task = seqio.get_mixture_or_task(TASK)
    examples = task.get_dataset(FEATURE_LENGTHS, split="train", shuffle=False, use_cached=False)
    lengths = {"inputs": FEATURE_LENGTHS["inputs"], "targets": FEATURE_LENGTHS["targets"]}
    rows = converter(examples, lengths).repeat().batch(BATCH_SIZE, drop_remainder=True)
    batch = {k: np.asarray(v) for k, v in next(rows.as_numpy_iterator()).items()}
    assert batch["decoder_segment_ids"].max() >= 2, "the batch should be packed"
    model = models.DecoderOnlyModel(
        module=TinyDecoder(TINY_CONFIG.vocab_size),
        vocabulary=VOCABULARY,
        optimizer_def=optimizers.sgd(1.0),
    )
    shapes = {k: v.shape for k, v in batch.items()}
    variables = model.get_initial_variables(jax.random.PRNGKey(0), shapes)
    state = train_state_lib.FlaxOptimTrainState.create(model.optimizer_def, variables)
    axes = partitioner.get_mesh_axes(state)
    initial = host(state)
    state = partitioner.partition(lambda s: s, in_axis_resources=None, out_axis_resources=axes)(
        state
    )
    rho = 0.3
    with make_trainer(
        sam_jax.t5x.SamTrainer,
        model,
        state,
        axes,
        partitioner,
        learning_rate_fn=lambda step: LEARNING_RATE,
        rho=rho,
        ascent_fraction=0.25,
    ) as trainer:
        metrics = train(trainer, [batch])
        trained = host(trainer.train_state.params)

    dropout_rng = jax.random.fold_in(jax.random.PRNGKey(1), 0)

    def loss(params, examples):
        return model.loss_fn(params, examples, dropout_rng)[0]

    ascent_grads = jax.grad(loss)(initial.params, ascent_rows(batch, 0.25))
    grad_norm = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(ascent_grads)))
    adversarial = jax.tree.map(lambda w, g: w + rho * g / grad_norm, initial.params, ascent_grads)
    descent_grads = jax.grad(loss)(adversarial, batch)
    expected = host(initial.apply_gradient(descent_grads, learning_rate=LEARNING_RATE).params)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), trained, expected
    )
    assert metrics["sam/perturbation_norm"] == pytest.approx(rho, rel=1e-4)
    assert all(name in metrics for name in SAM_METRICS)


# --------------------------------------------------------------------------- #
# The README's T5X command, as pasted.
# --------------------------------------------------------------------------- #

DEMO_COMMAND = """python -m t5x.train \\
  --gin_search_paths="$(python -c 'import os, sam_jax; print(os.path.dirname(sam_jax.__file__))')" \\
  --gin_file=t5x/examples/t5/t5_1_1/tiny.gin \\
  --gin_file=t5x/configs/runs/finetune.gin \\
  --gin_file=gin/t5x/demo.gin \\
  --gin_file=gin/t5x/sam.gin \\
  --gin.MODEL_DIR="'/tmp/sam_t5x_demo'\""""  # noqa: E501


def test_the_readme_t5x_demo_command_runs_as_pasted(tmp_path):
    """From the repository root, with this environment's python first on PATH."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as readme:
        assert DEMO_COMMAND in readme.read()
    with open(os.path.join(REPO, "gin", "t5x", "demo.gin"), encoding="utf-8") as demo:
        header = "".join(line[2:] for line in demo if line.startswith("#   "))
    assert " ".join(DEMO_COMMAND.split()) in " ".join(header.split())
    # Only MODEL_DIR changes (the last binding of a macro wins).
    command = f"{DEMO_COMMAND} --gin.MODEL_DIR=\"'{tmp_path}'\""
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    env["PATH"] = f"{os.path.dirname(sys.executable)}{os.pathsep}{env['PATH']}"
    result = subprocess.run(
        ["bash", "-c", command],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.path.isdir(tmp_path / "checkpoint_20")
    summaries, _ = train_summaries(str(tmp_path))
    assert summaries[20]["sam/rho"] == pytest.approx(0.05)
    assert summaries[20]["sam/perturbation_norm"] == pytest.approx(0.05, rel=1e-3)
    assert np.isfinite(summaries[20]["loss"])


REAL_CHECKPOINT_COMMAND = """python -m t5x.train \\
  --gin_search_paths="$(python -c 'import os, sam_jax; print(os.path.dirname(sam_jax.__file__))')" \\
  --gin_file=t5x/examples/t5/t5_1_1/base.gin \\
  --gin_file=t5x/configs/runs/finetune.gin \\
  --gin_file=gin/t5x/sam.gin \\
  --gin.MODEL_DIR="'/tmp/t5_1_1_base_sam'" \\
  --gin.MIXTURE_OR_TASK_MODULE="'t5.data.mixtures'" \\
  --gin.MIXTURE_OR_TASK_NAME="'glue_cola_v002'" \\
  --gin.TASK_FEATURE_LENGTHS="{'inputs': 512, 'targets': 8}" \\
  --gin.TRAIN_STEPS=1_010_000 \\
  --gin.INITIAL_CHECKPOINT_PATH="'gs://t5-data/pretrained_models/t5x/t5_1_1_base/checkpoint_1000000'" \\
  --gin.SamTrainer.rho=0.15"""  # noqa: E501


def shell_arguments(command: str) -> list[str]:
    """The arguments bash passes to the command's program (quotes and $(...) expanded)."""
    program = "python -m t5x.train"
    assert command.startswith(program)
    env = {
        **os.environ,
        "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}",
    }
    printed = subprocess.run(
        ["bash", "-c", "printf '%s\\0' " + command[len(program) :]],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return printed.split("\0")[:-1]


def test_the_readme_real_checkpoint_command_parses_into_a_sam_run(gin_config):
    """It needs gs://t5-data, so it is parsed as t5x.train would, not run."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as readme:
        assert REAL_CHECKPOINT_COMMAND in readme.read()
    arguments = gin_utils.rewrite_gin_args(shell_arguments(REAL_CHECKPOINT_COMMAND))
    values = {}
    for argument in arguments:
        name, value = argument[2:].split("=", 1)
        values.setdefault(name, []).append(value)
    gin_utils.parse_gin_flags(
        values["gin_search_paths"] + t5x_train._DEFAULT_GIN_SEARCH_PATHS,
        values["gin_file"],
        values["gin_bindings"],
    )
    # By the function: an earlier test may have registered it under another name.
    trainer_cls = gin.get_bindings(t5x_train.train, resolve_references=False)["trainer_cls"]
    assert trainer_cls.configurable.wrapped is sam_jax.t5x.SamTrainer
    assert gin.query_parameter("SamTrainer.rho") == 0.15
    assert gin.query_parameter("SamTrainer.ascent_fraction") == 0.25
    assert gin.query_parameter("%INITIAL_CHECKPOINT_PATH").endswith(
        "t5_1_1_base/checkpoint_1000000"
    )
    assert gin.query_parameter("%MIXTURE_OR_TASK_MODULE") == "t5.data.mixtures"
    # finetune.gin's learning rate reaches SamTrainer.
    inherited = sam_trainer.carried_over(
        sam_jax.t5x.SamTrainer, dict.fromkeys(sam_trainer.CARRIED_OVER)
    )
    assert callable(inherited["learning_rate_fn"])

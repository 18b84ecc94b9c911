"""Tests of sam_jax.partitioning on 8 simulated CPU devices, and in 2 processes."""

import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P
from multiprocess_harness import process_env
from multiprocess_harness import run_in_processes

import sam_jax
from sam_jax.models import t5
from sam_jax.partitioning import DataLayout
from sam_jax.partitioning import Partitioner
from sam_jax.partitioning import data_layout_of
from sam_jax.partitioning import initialize_distributed

T5_CONFIG = t5.t5_1_1_config("tiny", vocab_size=128, dropout_rate=0.0)
# XLA's CPU backend spends most of the T5 test compiling; its cheaper code generation
# computes the same functions in a third of the time.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


# --- The mesh --------------------------------------------------------------------------


def test_mesh_has_data_and_model_axes_of_auto_type():
    partitioner = Partitioner(num_partitions=2)
    assert partitioner.mesh.axis_names == ("data", "model")
    assert dict(partitioner.mesh.shape) == {"data": 4, "model": 2}
    assert partitioner.mesh.axis_types == (jax.sharding.AxisType.Auto,) * 2
    assert (partitioner.data_axis_size, partitioner.model_axis_size) == (4, 2)
    assert dict(Partitioner().mesh.shape) == {"data": 8, "model": 1}


@pytest.mark.parametrize(
    "num_partitions, message",
    [
        (0, "num_partitions must be an integer ≥ 1, got 0 (device count 8)"),
        (16, "num_partitions=16 is larger than the device count 8"),
        (3, "num_partitions=3 does not divide the device count 8"),
    ],
)
def test_bad_num_partitions_is_a_one_line_error(num_partitions, message):
    with pytest.raises(ValueError, match="^[^\n]+$") as error:
        Partitioner(num_partitions=num_partitions)
    assert message in str(error.value)


def test_rules_must_name_mesh_axes():
    with pytest.raises(ValueError, match=r"unknown mesh axes \['tensor'\]"):
        Partitioner(logical_axis_rules=[("mlp", "tensor")])
    with pytest.raises(ValueError, match=r"unknown mesh axes \['tensor'\]"):
        Partitioner(logical_axis_rules=[("mlp", ["data", "tensor"])])


# --- Shardings -------------------------------------------------------------------------


def _abstract_t5_variables():
    return jax.eval_shape(lambda key: t5.init_variables(T5_CONFIG, key), jax.random.key(0))


def test_shardings_of_abstract_t5_params_follow_the_logical_rules():
    partitioner = Partitioner(num_partitions=2)
    shardings = flax.traverse_util.flatten_dict(
        partitioner.shardings(_abstract_t5_variables())["params"], sep="/"
    )
    specs = {name: s.spec for name, s in shardings.items()}
    assert specs["encoder/layers_0/mlp/wi_0/kernel"] == P(None, "model")  # (embed, mlp)
    assert specs["encoder/layers_0/mlp/wo/kernel"] == P("model", None)  # (mlp, embed)
    assert specs["encoder/layers_0/attention/query/kernel"] == P(None, "model")  # joined_kv
    assert specs["token_embedder/embedding"] == P("model", None)  # (vocab, embed)
    assert specs["decoder/logits_dense/kernel"] == P(None, "model")  # (embed, vocab)
    assert specs["encoder/encoder_norm/scale"] == P(None)  # embed: replicated
    assert all(s.mesh == partitioner.mesh for s in shardings.values())


def test_shardings_follow_custom_rules_and_replicate_unboxed_leaves():
    rules = [("mlp", None), ("vocab", ["data", "model"]), ("embed", None), ("joined_kv", None)]
    partitioner = Partitioner(num_partitions=2, logical_axis_rules=rules)
    tree = {"variables": _abstract_t5_variables(), "step": jax.ShapeDtypeStruct((), jnp.int32)}
    shardings = partitioner.shardings(tree)
    params = shardings["variables"]["params"]
    assert params["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"].spec == P(None, None)
    assert params["token_embedder"]["embedding"].spec == P(("data", "model"), None)
    assert shardings["step"].spec == P()


def _t5_batch(num_examples=8, input_length=12, target_length=6):
    rng = np.random.default_rng(0)
    inputs = rng.integers(2, T5_CONFIG.vocab_size, (num_examples, input_length))
    targets = rng.integers(2, T5_CONFIG.vocab_size, (num_examples, target_length))
    inputs[:, -3:] = 0  # padding
    targets[::2, -2:] = 0
    decoder_inputs = np.concatenate([np.zeros_like(targets[:, :1]), targets[:, :-1]], axis=1)
    return {
        "encoder_input_tokens": inputs.astype(np.int32),
        "decoder_input_tokens": decoder_inputs.astype(np.int32),
        "decoder_target_tokens": targets.astype(np.int32),
        "decoder_loss_weights": (targets > 0).astype(np.int32),
    }


def _t5_loss_and_grad(params, batch):
    def loss_fn(p):
        logits = t5.Transformer(T5_CONFIG).apply(
            {"params": p},
            batch["encoder_input_tokens"],
            batch["decoder_input_tokens"],
            batch["decoder_target_tokens"],
            enable_dropout=False,
        )
        losses = t5.per_example_cross_entropy(
            logits, batch["decoder_target_tokens"], batch["decoder_loss_weights"], 6.0
        )
        return jnp.mean(losses)

    return jax.value_and_grad(loss_fn)(params)


def test_partitioned_t5_loss_and_grad_equal_the_unsharded_ones():
    variables = _abstract_t5_variables()  # random values below: no slow initialization
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda s: (0.2 * rng.normal(size=s.shape)).astype(s.dtype), nn.meta.unbox(variables)
    )["params"]
    batch = _t5_batch()
    expected_loss, expected_grad = jax.jit(_t5_loss_and_grad, compiler_options=FAST_COMPILE)(
        params, batch
    )

    partitioner = Partitioner(num_partitions=2)
    param_shardings = partitioner.shardings(variables)["params"]
    batch_shardings = jax.tree.map(lambda _: partitioner.data_sharding(), batch)
    step = partitioner.partition(
        _t5_loss_and_grad,
        in_shardings=(param_shardings, batch_shardings),
        out_shardings=(partitioner.replicated(), param_shardings),
    )
    sharded_params = jax.device_put(params, param_shardings)
    sharded_batch = partitioner.global_batch(batch)
    compiled = step.lower(sharded_params, sharded_batch).compile(FAST_COMPILE)
    loss, grad = compiled(sharded_params, sharded_batch)

    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(grad), jax.tree.leaves(expected_grad), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    wi = grad["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
    assert wi.sharding.spec == P(None, "model") and len(wi.sharding.device_set) == 8
    assert wi.addressable_shards[0].data.shape == (T5_CONFIG.emb_dim, T5_CONFIG.mlp_dim // 2)


def test_partition_traces_under_the_mesh_and_rules_and_donates():
    partitioner = Partitioner(num_partitions=2)
    seen = {}

    def fn(x):
        seen["mesh"] = jax.sharding.get_abstract_mesh().axis_names
        # Resolves only under the logical axis rules: 'mlp' -> 'model'.
        return nn.with_logical_constraint(x * 2, ("batch", "mlp"))

    sharding = partitioner.data_sharding()
    double = partitioner.partition(fn, sharding, sharding, donate_argnums=0)
    x = partitioner.global_batch(np.arange(32.0, dtype=np.float32).reshape(8, 4))
    lowered_text = double.lower(x).as_text()
    y = double(x)
    assert seen["mesh"] == ("data", "model")
    assert 'sharding_constraint %1 <@mesh, [{"data"}, {"model"}]>' in lowered_text
    np.testing.assert_array_equal(y, np.arange(32.0).reshape(8, 4) * 2)
    assert x.is_deleted()  # donated


# --- Batches ---------------------------------------------------------------------------


def test_check_batch_size_names_the_sizes():
    partitioner = Partitioner(num_partitions=2)
    partitioner.check_batch_size(12)
    with pytest.raises(ValueError, match="^[^\n]+$") as error:
        partitioner.check_batch_size(10)
    message = str(error.value)
    assert "global batch size 10" in message and "data axis size 4" in message
    assert "divide" in message
    with pytest.raises(ValueError, match="global batch size 10"):
        partitioner.local_batch_size(10)


def test_global_batch_on_one_process_is_sharded_over_data():
    partitioner = Partitioner(num_partitions=2)
    assert partitioner.local_batch_size(16) == 16
    assert partitioner.data_layout == DataLayout(0, 1, (0, 1, 2, 3), 4)
    local = {
        "tokens": np.arange(16 * 5, dtype=np.int32).reshape(16, 5),
        "weights": np.ones((16,), np.float32),
    }
    batch = partitioner.global_batch(local)
    tokens = batch["tokens"]
    assert tokens.shape == (16, 5) and tokens.dtype == np.int32
    assert tokens.sharding == partitioner.data_sharding()
    assert {s.data.shape for s in tokens.addressable_shards} == {(4, 5)}
    np.testing.assert_array_equal(tokens, local["tokens"])
    with pytest.raises(ValueError, match="global batch size 6"):
        partitioner.global_batch({"x": np.zeros((6, 2))})


@pytest.mark.parametrize(
    "grid, process, layout",
    [
        ([[0, 0], [0, 0], [1, 1], [1, 1]], 1, DataLayout(1, 2, (2, 3), 4)),
        ([[0, 1]], 1, DataLayout(0, 1, (0,), 1)),  # the model axis spans the processes
        ([[0, 1], [0, 1], [2, 3], [2, 3]], 3, DataLayout(1, 2, (2, 3), 4)),
        ([[0, 0], [1, 1], [0, 0], [1, 1]], 0, DataLayout(0, 2, (0, 2), 4)),  # interleaved
    ],
)
def test_data_layout_of_process_grids(grid, process, layout):
    assert data_layout_of(np.array(grid), process) == layout


def test_data_layout_local_indices_and_uneven_layouts():
    layout = data_layout_of(np.array([[0, 0], [1, 1], [0, 0], [1, 1]]), 0)
    np.testing.assert_array_equal(layout.local_indices(8), [0, 1, 4, 5])
    with pytest.raises(ValueError, match="not split evenly"):
        data_layout_of(np.array([[0, 1], [1, 1]]), 0)


# --- Multi-process ---------------------------------------------------------------------


def test_initialize_distributed_is_a_no_op_for_one_process():
    initialize_distributed(num_processes=1)  # after JAX started: still fine
    initialize_distributed("localhost:1", num_processes=1, process_id=0)
    assert jax.process_count() == 1 and not jax.distributed.is_initialized()


def test_initialize_distributed_without_arguments_on_a_single_host():
    code = (
        "from sam_jax.partitioning import initialize_distributed\n"
        "try:\n"  # explicit arguments go to JAX, which finds no cluster to complete them
        "    initialize_distributed('localhost:1', process_id=0)\n"
        "except ValueError as e:\n"
        "    print('ValueError', 'Number of processes must be defined' in str(e))\n"
        "initialize_distributed(); initialize_distributed()\n"
        "import jax; print(jax.process_count(), jax.distributed.is_initialized())\n"
        "try:\n"
        "    initialize_distributed('localhost:1', 2, 0)\n"
        "except RuntimeError as e:\n"
        "    print('RuntimeError', 'before any other JAX call' in str(e))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=process_env(1),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[:3] == ["ValueError True", "1 False", "RuntimeError True"]


class _Mlp(nn.Module):
    """A two-layer perceptron with logical axis names: hidden units on 'mlp'."""

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.lecun_normal()
        hidden = nn.Dense(
            16, use_bias=False, kernel_init=nn.with_logical_partitioning(init, ("embed", "mlp"))
        )(x)
        out = nn.Dense(
            1, use_bias=False, kernel_init=nn.with_logical_partitioning(init, ("mlp", "embed"))
        )(jnp.tanh(hidden))
        return out[:, 0]


def _mlp_loss(params, batch, key):
    del key
    return (_Mlp().apply({"params": params}, batch["x"]) - batch["y"]) ** 2


def _place(value: np.ndarray, sharding) -> jax.Array:
    """A global array of a value every process holds: each device takes its part."""
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def _sam_steps(num_partitions: int, num_steps: int = 3) -> dict:
    """A few SAM steps of the MLP on a (data, model) mesh, fed by process-local batches."""
    partitioner = Partitioner(num_partitions=num_partitions)
    rng = np.random.default_rng(0)
    global_batch = {
        "x": rng.normal(size=(16, 6)).astype(np.float32),
        "y": rng.normal(size=(16,)).astype(np.float32),
    }
    layout = partitioner.data_layout
    local = {k: v[layout.local_indices(16)] for k, v in global_batch.items()}
    assert len(local["x"]) == partitioner.local_batch_size(16)

    tx = sam_jax.sam(
        optax.adamw(1e-2), ascent_fraction=0.5, num_data_shards=partitioner.data_axis_size
    )
    boxed_params = jax.eval_shape(_Mlp().init, jax.random.key(0), jnp.zeros((1, 6)))["params"]
    param_shardings = partitioner.shardings(boxed_params)
    state_shardings = partitioner.shardings(jax.eval_shape(tx.init, boxed_params))
    values = jax.tree.map(
        lambda s: (0.5 * rng.normal(size=s.shape)).astype(s.dtype), nn.meta.unbox(boxed_params)
    )
    params = jax.tree.map(_place, values, param_shardings)
    state = partitioner.partition(tx.init, (param_shardings,), state_shardings)(params)

    def step(params, state, batch):
        updates, state = tx.update(
            sam_jax.pending_gradient(params),
            state,
            params,
            loss_fn=_mlp_loss,
            batch=batch,
            key=None,
        )
        return optax.apply_updates(params, updates), state

    batch_sharding = jax.tree.map(lambda _: partitioner.data_sharding(), local)
    step = partitioner.partition(
        step,
        in_shardings=(param_shardings, state_shardings, batch_sharding),
        out_shardings=(param_shardings, state_shardings),
        donate_argnums=(0, 1),
    )
    batch = partitioner.global_batch(local)
    for _ in range(num_steps):
        params, state = step(params, state, batch)
    gather = multihost_utils.process_allgather
    return {
        "process_count": jax.process_count(),
        "layout": [layout.shard_id, layout.num_shards],
        "params": jax.tree.map(np.asarray, gather(params, tiled=True)),
        "clean_loss": np.asarray(gather(state.metrics.clean_loss, tiled=True)),
    }


def distributed_sam_worker(num_partitions: list[int]) -> dict:
    """The 2-process test's worker: SAM steps for each model-parallel degree."""
    return {str(n): _sam_steps(n) for n in num_partitions}


def test_two_processes_train_like_one_process_with_eight_devices():
    num_partitions = [2, 8]  # the model axis within each process, then spanning both
    results = run_in_processes(
        "test_partitioning:distributed_sam_worker",
        num_processes=2,
        kwargs={"num_partitions": num_partitions},
    )
    expected = distributed_sam_worker(num_partitions)
    layouts = {"2": [[0, 2], [1, 2]], "8": [[0, 1], [0, 1]]}
    for n, want in expected.items():
        assert [r[n]["layout"] for r in results] == layouts[n]
        for result in results:
            assert result[n]["process_count"] == 2
            np.testing.assert_allclose(result[n]["clean_loss"], want["clean_loss"], rtol=1e-5)
            got_leaves = jax.tree.leaves(result[n]["params"], is_leaf=lambda x: isinstance(x, list))
            for got, ref in zip(got_leaves, jax.tree.leaves(want["params"]), strict=True):
                np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-6)
    # Training moved the parameters: the comparison is not of two initializations.
    assert expected["2"]["clean_loss"] > 0

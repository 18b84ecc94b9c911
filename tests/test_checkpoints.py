"""Tests of sam_jax.checkpoints: sharded NamedTuple round trips, retention, best steps, damage."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import linen as nn

import sam_jax
from sam_jax.checkpoints import BEST_CHECKPOINTS_FILE
from sam_jax.checkpoints import Best
from sam_jax.checkpoints import Checkpointer
from sam_jax.checkpoints import DamagedCheckpointError
from sam_jax.partitioning import Partitioner


def _boxed_params():
    """Abstract boxed parameters: a hidden layer sharded over 'model'."""
    return {
        "hidden": nn.LogicallyPartitioned(
            jax.ShapeDtypeStruct((6, 8), jnp.float32), ("embed", "mlp")
        ),
        "out": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((8,), jnp.float32), ("mlp",)),
    }


def _loss(params, batch, key):
    del key
    x, y = batch
    return (jnp.tanh(x @ params["hidden"]) @ params["out"] - y) ** 2


@pytest.fixture(scope="module")
def sharded():
    """(abstract_state, state): a FSAM state after two steps, sharded on a (4, 2) mesh."""
    partitioner = Partitioner(num_partitions=2)
    tx = sam_jax.sam(optax.adamw(1e-2), mask=sam_jax.fisher_mask(sparsity=0.5, interval=1))
    boxed = _boxed_params()
    param_shardings = partitioner.shardings(boxed)
    state_shardings = partitioner.shardings(jax.eval_shape(tx.init, boxed))
    rng = np.random.default_rng(0)
    params = jax.device_put(
        jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), nn.meta.unbox(boxed)),
        param_shardings,
    )
    batch = (rng.normal(size=(8, 6)).astype(np.float32), rng.normal(size=(8,)).astype(np.float32))

    def train(params):
        state = tx.init(params)
        for _ in range(2):
            updates, state = tx.update(
                sam_jax.pending_gradient(params), state, params, loss_fn=_loss, batch=batch
            )
            params = optax.apply_updates(params, updates)
        return {"params": params, "opt_state": state, "step": jnp.int32(2)}

    train_state_shardings = {
        "params": param_shardings,
        "opt_state": state_shardings,
        "step": partitioner.replicated(),
    }
    state = partitioner.partition(train, (param_shardings,), train_state_shardings)(params)
    abstract = jax.tree.map(
        lambda x, sharding: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
        state,
        train_state_shardings,
    )
    return abstract, state


def _assert_identical(restored, state):
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        assert got.dtype == want.dtype
        assert got.sharding == want.sharding
        np.testing.assert_array_equal(got, want)


def _steps_on_disk(directory):
    return sorted(int(p) for p in os.listdir(directory) if p.isdigit())


def test_sharded_named_tuple_state_round_trips_exactly(tmp_path, sharded):
    abstract, state = sharded
    with Checkpointer(tmp_path / "ckpt") as checkpointer:
        assert checkpointer.latest_step() is None
        checkpointer.save(2, state)  # asynchronous
        checkpointer.wait_until_finished()
        assert checkpointer.latest_step() == 2
        restored = checkpointer.restore(abstract)
    opt_state = restored["opt_state"]
    assert isinstance(opt_state, sam_jax.SamState)
    assert isinstance(opt_state.mask_state, sam_jax.FisherMaskState)
    assert isinstance(opt_state.inner_state[0], optax.ScaleByAdamState)
    assert restored["params"]["hidden"].sharding.spec == jax.sharding.PartitionSpec(None, "model")
    _assert_identical(restored, state)


def test_a_new_checkpointer_resumes_from_the_latest_step(tmp_path, sharded):
    abstract, state = sharded
    with Checkpointer(tmp_path, async_save=False) as checkpointer:
        checkpointer.save(1, state)
        checkpointer.save(7, jax.tree.map(lambda x: x + 1, state))
    with Checkpointer(tmp_path) as reopened:
        assert reopened.latest_step() == 7
        _assert_identical(reopened.restore(abstract, step=1), state)
        restored = reopened.restore(abstract)
    np.testing.assert_array_equal(restored["step"], 3)


def test_max_to_keep_keeps_the_latest_steps(tmp_path, sharded):
    _, state = sharded
    with Checkpointer(tmp_path, max_to_keep=2) as checkpointer:
        for step in range(1, 6):
            checkpointer.save(step, state)
        checkpointer.save(5, state)  # an existing step: skipped, not an error
        with pytest.raises(ValueError, match="already exists"):
            checkpointer.save(5, state, force=True)  # never overwritten
        checkpointer.wait_until_finished()
        assert checkpointer.latest_step() == 5
    assert _steps_on_disk(tmp_path) == [4, 5]


def test_restore_without_a_checkpoint_is_a_clear_error(tmp_path, sharded):
    abstract, state = sharded
    with Checkpointer(tmp_path / "empty") as checkpointer:
        with pytest.raises(FileNotFoundError, match="No checkpoint to restore in .*empty"):
            checkpointer.restore(abstract)
        checkpointer.save(3, state)
        with pytest.raises(FileNotFoundError, match=r"step 4 .* saved steps: \[3\]"):
            checkpointer.restore(abstract, step=4)


def test_boxed_states_and_unsharded_targets_are_rejected(tmp_path, sharded):
    abstract, _ = sharded
    with Checkpointer(tmp_path) as checkpointer:
        with pytest.raises(TypeError, match="unbox it first"):
            checkpointer.save(1, {"params": _boxed_params()})
        no_sharding = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), abstract)
        with pytest.raises(ValueError, match=r"leaf \['opt_state'\].* has no sharding"):
            checkpointer.restore(no_sharding)


def test_best_steps_are_recorded_and_survive_garbage_collection(tmp_path, sharded):
    abstract, state = sharded
    evals = {  # step -> metrics; the loss is better when lower
        1: {"nli/accuracy": 0.9, "nli/loss": 1.0},
        2: {"nli/accuracy": 0.5, "nli/loss": 0.5},
        3: {"nli/accuracy": 0.6, "nli/loss": 0.7},
        4: {"nli/accuracy": 0.9, "nli/loss": 0.6},  # a tie keeps step 1
    }
    with Checkpointer(tmp_path, max_to_keep=1, async_save=False) as checkpointer:
        for step, metrics in evals.items():
            checkpointer.save(step, state)
            table = checkpointer.record_eval(step, metrics)
        checkpointer.save(5, state)
        assert table == {"nli/accuracy": (0.9, 1), "nli/loss": (0.5, 2)}
        assert table == checkpointer.best()
        assert _steps_on_disk(tmp_path) == [1, 2, 5]
    with open(tmp_path / BEST_CHECKPOINTS_FILE) as f:
        assert json.load(f) == {
            "nli/accuracy": {"value": 0.9, "step": 1},
            "nli/loss": {"value": 0.5, "step": 2},
        }
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]  # written atomically

    # A restarted run reads the table: step 1 stays until its accuracy is beaten.
    with Checkpointer(tmp_path, max_to_keep=1, async_save=False) as checkpointer:
        assert checkpointer.best() == {"nli/accuracy": Best(0.9, 1), "nli/loss": Best(0.5, 2)}
        checkpointer.save(6, state)
        assert _steps_on_disk(tmp_path) == [1, 2, 6]
        checkpointer.record_eval(6, {"nli/accuracy": 0.95, "demo/f1": float("nan")})
        checkpointer.save(7, state)
        assert _steps_on_disk(tmp_path) == [2, 6, 7]
        assert "demo/f1" not in checkpointer.best()  # NaN is never a best value
        _assert_identical(checkpointer.restore(abstract, step=2), state)


def test_an_interrupted_save_leaves_the_previous_checkpoint(tmp_path, sharded, monkeypatch):
    abstract, state = sharded
    with Checkpointer(tmp_path, async_save=False) as checkpointer:
        checkpointer.save(1, state)

    # The process dies after writing step 2's files, before orbax's atomic rename.
    def crash(self, *args, **kwargs):
        raise KeyboardInterrupt("killed before the commit")

    monkeypatch.setattr(ocp.path.atomicity.AtomicRenameTemporaryPath, "finalize", crash)
    checkpointer = Checkpointer(tmp_path, async_save=False)
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save(2, jax.tree.map(lambda x: x + 1, state))
    monkeypatch.undo()
    checkpointer.close()
    leftovers = [p for p in os.listdir(tmp_path) if "orbax-checkpoint-tmp" in p]
    assert leftovers and leftovers[0].startswith("2.")
    assert _steps_on_disk(tmp_path) == [1]

    with Checkpointer(tmp_path, async_save=False) as restarted:
        assert restarted.latest_step() == 1
        _assert_identical(restarted.restore(abstract), state)
        restarted.save(2, state)  # the step can be saved again
        assert restarted.latest_step() == 2
    assert not [p for p in os.listdir(tmp_path) if "orbax-checkpoint-tmp" in p]


# --- Input-iterator positions -----------------------------------------------------------


class CountingIterator:
    """A `SavableIterator` over 0, 1, 2, ... whose position is a JSON file."""

    def __init__(self):
        self.position = 0

    def __next__(self):
        self.position += 1
        return self.position - 1

    def save(self, directory):
        with open(os.path.join(directory, "position.json"), "w") as f:
            json.dump(self.position, f)

    def restore(self, directory):
        with open(os.path.join(directory, "position.json")) as f:
            self.position = json.load(f)


def test_the_iterator_position_is_saved_with_its_step_and_collected_with_it(tmp_path, sharded):
    abstract, state = sharded
    iterator = CountingIterator()
    with Checkpointer(tmp_path, max_to_keep=2) as checkpointer:  # asynchronous saves
        for step in (1, 2, 3):
            next(iterator)
            checkpointer.save(step, state, iterator=iterator)
            next(iterator)  # read right after `save` returns: not in the saved position
        checkpointer.wait_until_finished()
        assert [checkpointer.has_iterator(step) for step in (1, 2, 3)] == [False, True, True]
        resumed = CountingIterator()
        checkpointer.restore_iterator(resumed, 2)
        assert next(resumed) == 3
        _assert_identical(checkpointer.restore(abstract, step=2), state)
    assert _steps_on_disk(tmp_path) == [2, 3]
    assert os.path.isdir(tmp_path / "3" / "train_ds" / "process_0-of-1")
    assert os.path.isdir(tmp_path / "3" / "default")  # the state, where earlier versions put it


def test_a_checkpoint_without_an_iterator_position_restores_its_state_only(tmp_path, sharded):
    """A step saved by an earlier version (state only, as orbax's single item) still restores."""
    abstract, state = sharded
    with ocp.CheckpointManager(tmp_path) as manager:
        manager.save(4, args=ocp.args.StandardSave(state))
    with Checkpointer(tmp_path) as checkpointer:
        assert checkpointer.latest_step() == 4 and not checkpointer.has_iterator(4)
        _assert_identical(checkpointer.restore(abstract), state)
        with pytest.raises(FileNotFoundError, match="step 4 .* no input-iterator position"):
            checkpointer.restore_iterator(CountingIterator(), 4)
        iterator = CountingIterator()
        next(iterator)
        checkpointer.save(5, state, iterator=iterator)  # new steps in the same directory
        checkpointer.wait_until_finished()
        resumed = CountingIterator()
        checkpointer.restore_iterator(resumed, 5)
        assert resumed.position == 1


# --- Damaged checkpoints ------------------------------------------------------------------


def _truncate_data_chunks(step_dir):
    chunks = [p for p in step_dir.glob("default/**/d/*") if p.stat().st_size > 1]
    assert chunks
    for chunk in chunks:
        os.truncate(chunk, chunk.stat().st_size // 2)


def _empty(step_dir):
    shutil.rmtree(step_dir)
    step_dir.mkdir()


def _tree(directory):
    """{relative path: size} of everything under `directory`."""
    return {str(p.relative_to(directory)): p.stat().st_size for p in directory.rglob("*")}


DAMAGE = {
    "truncated_data": (_truncate_data_chunks, "(?i)error reading|error while reading"),
    "no_metadata": (lambda d: os.remove(d / "default" / "_METADATA"), "pytree structure"),
    "emptied_step": (_empty, 'Item "default" was not found'),
    "no_state_item": (lambda d: shutil.rmtree(d / "default"), 'Item "default" was not found'),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_step_is_one_error_type_and_is_set_aside_not_deleted(tmp_path, sharded, damage):
    abstract, state = sharded
    with Checkpointer(tmp_path, async_save=False) as checkpointer:
        checkpointer.save(1, state)
        checkpointer.save(2, jax.tree.map(lambda x: x + 1, state))
    make, reason = DAMAGE[damage]
    make(tmp_path / "2")
    files = _tree(tmp_path / "2")
    with Checkpointer(tmp_path, async_save=False) as checkpointer:
        assert checkpointer.all_steps() == [1, 2]  # orbax still lists it
        with pytest.raises(DamagedCheckpointError, match=reason) as error:
            checkpointer.restore(abstract, step=2)
        assert error.value.step == 2 and "\n" not in str(error.value)
        assert str(error.value).startswith(f"The checkpoint of step 2 in {tmp_path} cannot be read")
        assert checkpointer.set_aside(2) == str(tmp_path / "2.damaged")
        assert checkpointer.all_steps() == [1] and checkpointer.latest_step() == 1
        _assert_identical(checkpointer.restore(abstract), state)
        checkpointer.save(2, state)  # the step can be saved again
    assert _tree(tmp_path / "2.damaged") == files  # moved whole, nothing deleted
    with Checkpointer(tmp_path) as reopened:
        assert reopened.all_steps() == [1, 2]
        _assert_identical(reopened.restore(abstract, step=2), state)
        reopened.wait_until_finished()
        os.remove(tmp_path / "2" / "default" / "_METADATA")
        assert reopened.set_aside(2) == str(tmp_path / "2.damaged-2")  # never over the first


def test_an_unreadable_iterator_position_is_a_damaged_checkpoint(tmp_path, sharded):
    _, state = sharded
    with Checkpointer(tmp_path, async_save=False) as checkpointer:
        checkpointer.save(1, state, iterator=CountingIterator())
    with open(tmp_path / "1" / "train_ds" / "process_0-of-1" / "position.json", "w") as f:
        f.write("{truncated")
    with Checkpointer(tmp_path) as checkpointer:
        with pytest.raises(DamagedCheckpointError, match="JSONDecodeError") as error:
            checkpointer.restore_iterator(CountingIterator(), 1)
    assert error.value.step == 1


def test_an_invalid_best_table_is_kept_aside_and_rebuilt(tmp_path, sharded, caplog):
    _, state = sharded
    with Checkpointer(tmp_path, async_save=False) as checkpointer:
        checkpointer.save(1, state)
        checkpointer.record_eval(1, {"nli/accuracy": 0.5})
    invalid = '{"nli/accuracy": {"value": 0.5,'
    (tmp_path / BEST_CHECKPOINTS_FILE).write_text(invalid)
    with Checkpointer(tmp_path, async_save=False) as checkpointer:
        assert checkpointer.best_was_damaged and checkpointer.best() == {}
        assert (tmp_path / f"{BEST_CHECKPOINTS_FILE}.damaged").read_text() == invalid
        assert f"{tmp_path / BEST_CHECKPOINTS_FILE} is not a valid best-checkpoint table" in (
            caplog.text
        )
        evals = [(1, {"nli/accuracy": 0.5, "nli/loss": 2.0}), (2, {"nli/accuracy": 0.4})]
        evals.append((3, {"nli/accuracy": 0.7, "nli/loss": 2.5}))
        assert checkpointer.rebuild_best(evals) == {
            "nli/accuracy": Best(0.7, 3),
            "nli/loss": Best(2.0, 1),
        }
    with Checkpointer(tmp_path) as reopened:
        assert not reopened.best_was_damaged
        assert reopened.best() == {"nli/accuracy": Best(0.7, 3), "nli/loss": Best(2.0, 1)}


# --------------------------------------------------------------------------- #
# Another run's parameters (task transfer).
# --------------------------------------------------------------------------- #


def _run_with_steps(model_dir, state, steps):
    with Checkpointer(model_dir / "checkpoints", async_save=False) as checkpointer:
        for step in steps:
            checkpointer.save(step, jax.tree.map(lambda x, s=step: x + s, state))


def test_a_runs_last_parameters_restore_in_part_sharded_or_on_the_host(tmp_path, sharded):
    abstract, state = sharded
    _run_with_steps(tmp_path, state, [1, 3])
    files = _tree(tmp_path)
    wanted = {"hidden": abstract["params"]["hidden"]}
    params, step = sam_jax.checkpoints.restore_run_params(str(tmp_path), wanted)
    assert step == 3 and set(params) == {"hidden"}  # 'out' left out
    np.testing.assert_array_equal(params["hidden"], state["params"]["hidden"] + 3)
    assert params["hidden"].sharding == wanted["hidden"].sharding
    on_host = {"out": jax.ShapeDtypeStruct((8,), jnp.float32)}
    params, _ = sam_jax.checkpoints.restore_run_params(str(tmp_path), on_host)
    assert isinstance(params["out"], np.ndarray)
    np.testing.assert_array_equal(params["out"], state["params"]["out"] + 3)
    assert _tree(tmp_path) == files  # the other run's directory is only read


def test_another_model_a_missing_run_or_a_damaged_last_step_is_one_line(tmp_path, sharded):
    abstract, state = sharded
    restore = sam_jax.checkpoints.restore_run_params
    with pytest.raises(ValueError, match="has no checkpoint in checkpoints/"):
        restore(str(tmp_path), abstract["params"])
    _run_with_steps(tmp_path, state, [1, 2])
    other = {
        "hidden": jax.ShapeDtypeStruct((6, 4), jnp.float32),
        "head": jax.ShapeDtypeStruct((2,), jnp.float32),
    }
    with pytest.raises(
        ValueError,
        match=r"a run of another model: no \['head'\]; "
        r"\['hidden'\] \(6, 8\) \(wanted \(6, 4\)\)\.$",
    ):
        restore(str(tmp_path), other)  # checked before any tensor is read
    _truncate_data_chunks(tmp_path / "checkpoints" / "2")
    with pytest.raises(ValueError, match="step 2 in .* cannot be read") as error:
        restore(str(tmp_path), abstract["params"])  # not step 1: it is not the run's result
    assert "\n" not in str(error.value)

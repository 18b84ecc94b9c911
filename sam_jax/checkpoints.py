"""Checkpoints of a training state with orbax, and the best step of every eval metric.

`Checkpointer` wraps `orbax.checkpoint.CheckpointManager` (the stable API, with
`ocp.args.StandardSave` / `StandardRestore`):

* saves are asynchronous by default and atomic: orbax writes a step into a
  temporary directory and renames it when complete, so an interrupted save
  leaves the previous checkpoints intact and is never listed; leftover
  temporary directories are removed when a `Checkpointer` opens the directory;
* restores go into an abstract target (`jax.ShapeDtypeStruct`s with
  shardings), so arrays come back sharded and NamedTuple states keep their types;
* the latest `max_to_keep` steps are kept, plus every step that holds the best
  value of some eval metric: `record_eval` maintains that table in
  `<directory>/best_checkpoints.json` (the papers report best-checkpoint scores)
  and an orbax preservation policy keeps those steps through garbage collection;
* a step may also hold each process's input-iterator position (T5X's
  `train_ds`), saved synchronously with the state so that it is exactly the
  position after the step's batches, and kept or deleted with the step.

A step directory holds `default/` (the state: orbax's single-item name, so
checkpoints written before iterator positions were saved still restore) and,
if saved with an iterator, `train_ds/process_<i>-of-<n>/`.

A step that cannot be read (truncated data, a missing `_METADATA` or item,
an emptied directory, an unreadable iterator position) raises
`DamagedCheckpointError` on restore; `set_aside` renames it to
`<step>.damaged` (never deleting it) so that a run can go on from an older step.

Example::

  checkpointer = Checkpointer("/tmp/run1/checkpoints", max_to_keep=3)
  step = checkpointer.latest_step()
  if step is not None:
      state = checkpointer.restore(abstract_state)
      if checkpointer.has_iterator(step):
          checkpointer.restore_iterator(batches, step)
  ...
  checkpointer.save(step, state, iterator=batches)
  checkpointer.record_eval(step, {"demo_nli/accuracy": 81.0, "demo_nli/loss": 0.52})
  checkpointer.close()
"""

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple
from typing import Protocol

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import linen as nn
from jax.experimental import multihost_utils

BEST_CHECKPOINTS_FILE = "best_checkpoints.json"
# Where a run keeps its checkpoints: `<MODEL_DIR>/checkpoints`.
RUN_SUBDIR = "checkpoints"
# What a damaged step directory (or best-checkpoint table) is renamed to: not a step for orbax.
DAMAGED_SUFFIX = ".damaged"
# The orbax items of a step: the state (orbax's name for a single item, as
# earlier versions saved it alone) and the processes' input-iterator positions.
STATE_ITEM = "default"
ITERATOR_ITEM = "train_ds"


class DamagedCheckpointError(Exception):
    """A saved step that cannot be restored (its files are damaged or incomplete).

    Attributes:
      step: the step.
      reason: what failed, on one line.
    """

    def __init__(self, directory: str, step: int, reason: str):
        super().__init__(f"The checkpoint of step {step} in {directory} cannot be read: {reason}")
        self.step = step
        self.reason = reason


@contextlib.contextmanager
def reporting_damage(directory: str, step: int):
    """Turns any error of reading `step` (orbax, TensorStore, tf.data) into one type."""
    try:
        yield
    except Exception as error:  # orbax raises many types, some a bare Exception
        reason = " ".join(f"{type(error).__name__}: {error}".split())
        reason = reason.split(" See full TensorStore details")[0]  # a repr of its spec follows
        raise DamagedCheckpointError(directory, step, reason[:200]) from error


class Best(NamedTuple):
    """The best value of one metric and the step that reached it."""

    value: float
    step: int


def higher_is_better(metric: str) -> bool:
    """Whether larger values of `metric` are better: all but losses (names with 'loss')."""
    return "loss" not in metric.lower()


def improves(metric: str, value: float, best: Best | None) -> bool:
    """Whether `value` strictly beats `best` (ties keep the earlier step)."""
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value > best.value if higher_is_better(metric) else value < best.value


class PreserveSteps(ocp.checkpoint_managers.PreservationPolicy):
    """An orbax preservation policy: keeps the steps that `steps_fn()` returns now.

    The set is read at every garbage collection, so steps leave it (and become
    deletable) when their metrics are beaten.
    """

    def __init__(self, steps_fn):
        self._steps_fn = steps_fn

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> Sequence[bool]:
        del context
        steps = self._steps_fn()
        return [info.step in steps for info in checkpoints]


class SavableIterator(Protocol):
    """An iterator whose position can be written to and read from a directory.

    `sam_jax.data.TrainBatches` is one.
    """

    def save(self, directory: str) -> None: ...

    def restore(self, directory: str) -> None: ...


def process_directory_name() -> str:
    """This process's sub-directory of an iterator item: 'process_<i>-of-<n>'."""
    return f"process_{jax.process_index()}-of-{jax.process_count()}"


class IteratorHandler(ocp.CheckpointHandler):
    """An orbax handler that saves every process's iterator position, each in its directory.

    Synchronous: `save` returns once the position is written, so the iterator may
    advance right after `CheckpointManager.save` returns.
    """

    def save(self, directory: epath.Path, args: "IteratorArgs") -> None:
        path = directory / process_directory_name()
        path.mkdir(parents=True, exist_ok=False)
        args.iterator.save(path.as_posix())

    def restore(self, directory: epath.Path, args: "IteratorArgs") -> SavableIterator:
        args.iterator.restore((directory / process_directory_name()).as_posix())
        return args.iterator

    def metadata(self, directory: epath.Path) -> None:
        del directory


@ocp.args.register_with_handler(IteratorHandler, for_save=True, for_restore=True)
@dataclasses.dataclass
class IteratorArgs(ocp.args.CheckpointArgs):
    """The iterator to save, or to restore into (in place)."""

    iterator: SavableIterator


def _check_unboxed(tree: Any, name: str) -> None:
    boxed = [
        leaf
        for leaf in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
        if isinstance(leaf, nn.meta.AxisMetadata)
    ]
    if boxed:
        raise TypeError(
            f"{name} has {len(boxed)} boxed leaves ({type(boxed[0]).__name__}); "
            "unbox it first with flax.linen.meta.unbox."
        )


def _check_abstract(abstract_state: Any) -> None:
    _check_unboxed(abstract_state, "abstract_state")
    leaves = jax.tree.leaves_with_path(abstract_state)
    unsharded = [
        jax.tree_util.keystr(path)
        for path, leaf in leaves
        if isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is None
    ]
    if unsharded:
        raise ValueError(
            f"abstract_state leaf {unsharded[0]} (and {len(unsharded) - 1} more) has no "
            "sharding; build it with jax.ShapeDtypeStruct(shape, dtype, sharding=...), "
            "e.g. from Partitioner.shardings."
        )


class Checkpointer:
    """Saves and restores training states in a directory; tracks the best eval steps.

    Attributes:
      directory: the absolute checkpoint directory (one sub-directory per step).
      best_was_damaged: the best-checkpoint table on disk could not be read (it is
        kept as `best_checkpoints.json.damaged`; `rebuild_best` makes a new one).
    """

    def __init__(self, directory: str, max_to_keep: int | None = 3, async_save: bool = True):
        """Opens (or creates) a checkpoint directory.

        Args:
          directory: where the step directories and the best-checkpoint table live.
          max_to_keep: how many of the latest steps to keep (None: all); steps
            holding a best eval value are kept in addition.
          async_save: write checkpoints in a background thread (`save` returns
            once the arrays are copied to host memory).

        Raises:
          ValueError: if `max_to_keep` is not None or ≥ 1.
        """
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be ≥ 1 or None, got {max_to_keep}.")
        self.directory = os.path.abspath(os.fspath(directory))
        self._best = self._read_best()
        policy = ocp.checkpoint_managers.AnyPreservationPolicy(
            [
                ocp.checkpoint_managers.LatestN(n=max_to_keep),
                PreserveSteps(lambda: {best.step for best in self._best.values()}),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                STATE_ITEM: ocp.StandardCheckpointHandler(),
                ITERATOR_ITEM: IteratorHandler(),
            },
        )

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def latest_step(self) -> int | None:
        """The latest complete checkpoint's step, or None if there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """The saved steps, oldest first."""
        return sorted(self._manager.all_steps())

    def set_aside(self, step: int) -> str:
        """Renames a damaged step's directory to `<step>.damaged` (`-<n>` if taken); never deletes.

        The step is then no longer a checkpoint (orbax ignores the name), so a run
        can save that step again. Process 0 renames; every process must call it.

        Returns:
          The new path.
        """
        self.wait_until_finished()
        source = os.path.join(self.directory, str(step))
        target = _free_path(source + DAMAGED_SUFFIX)
        if jax.process_index() == 0:
            os.rename(source, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"sam_jax set aside step {step}")
        self._manager.reload()
        return target

    def save(
        self,
        step: int,
        state: Any,
        *,
        force: bool = False,
        iterator: SavableIterator | None = None,
    ) -> None:
        """Saves `state` as `step` (asynchronously unless `async_save=False`).

        A step at or before the latest saved one is skipped unless `force`; an
        existing step is never overwritten. Every process must call it.

        Args:
          step: the training step.
          state: a pytree of arrays (NamedTuples, dicts, optax states), unboxed.
          force: save even if orbax's save decision would skip this step.
          iterator: this process's input iterator, whose position is saved before
            `save` returns (call it at the same step on every process).

        Raises:
          TypeError: if `state` still has Flax `LogicallyPartitioned` boxes.
          ValueError: (orbax's `StepAlreadyExistsError`) with `force`, if `step`
            is already saved.
        """
        _check_unboxed(state, "state")
        items = {STATE_ITEM: ocp.args.StandardSave(state)}
        if iterator is not None:
            items[ITERATOR_ITEM] = IteratorArgs(iterator)
        self._manager.save(int(step), args=ocp.args.Composite(**items), force=force)

    def restore(self, abstract_state: Any, step: int | None = None) -> Any:
        """Restores a saved state into the structure, dtypes and shardings of a target.

        Args:
          abstract_state: a tree of `jax.ShapeDtypeStruct`s with shardings (or
            arrays), e.g. `jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape,
            s.dtype, sharding=sh), jax.eval_shape(init), shardings)`.
          step: the step to restore; None for the latest.

        Returns:
          The state, with `abstract_state`'s tree types and shardings.

        Raises:
          FileNotFoundError: if there is no checkpoint, or none at `step`.
          DamagedCheckpointError: if the step's files cannot be read into the target.
        """
        _check_abstract(abstract_state)
        self.wait_until_finished()
        steps = self._manager.all_steps()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"No checkpoint to restore in {self.directory}.")
        elif step not in steps:
            raise FileNotFoundError(
                f"No checkpoint for step {step} in {self.directory}; saved steps: {sorted(steps)}."
            )
        restore = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(abstract_state)})
        with reporting_damage(self.directory, step):
            return self._manager.restore(step, args=restore)[STATE_ITEM]

    def has_iterator(self, step: int) -> bool:
        """Whether `step` holds this process's iterator position.

        False for checkpoints saved without an iterator (e.g. by earlier versions)
        or by a run with another number of processes.
        """
        return os.path.isdir(self.iterator_directory(step))

    def iterator_directory(self, step: int) -> str:
        """Where `step` holds this process's iterator position (if it has one)."""
        return os.path.join(self.directory, str(step), ITERATOR_ITEM, process_directory_name())

    def restore_iterator(self, iterator: SavableIterator, step: int) -> None:
        """Moves `iterator` to its position saved at `step` (every process must call it).

        Args:
          iterator: this process's iterator, built as the saved one was.
          step: a saved step.

        Raises:
          FileNotFoundError: if `step` holds no position of this process
            (`has_iterator(step)` is False).
          DamagedCheckpointError: if the saved position cannot be read.
        """
        self.wait_until_finished()
        if not self.has_iterator(step):
            raise FileNotFoundError(
                f"The checkpoint of step {step} in {self.directory} holds no input-iterator "
                f"position of {process_directory_name()}."
            )
        restore = ocp.args.Composite(**{ITERATOR_ITEM: IteratorArgs(iterator)})
        with reporting_damage(self.directory, step):
            self._manager.restore(step, args=restore)

    def record_eval(self, step: int, metrics: Mapping[str, float]) -> dict[str, Best]:
        """Records eval metrics of `step`; keeps the best value of each one.

        Larger is better except for metrics whose name contains 'loss'. The table
        is written atomically to `<directory>/best_checkpoints.json` (by process 0).
        The checkpoint of every best step survives `max_to_keep` garbage
        collection: record a step's metrics before saving a later step.

        Args:
          step: the step whose checkpoint was evaluated.
          metrics: {'task/metric': value}.

        Returns:
          The table {'task/metric': Best(value, step)} after this update.
        """
        if self._improve(step, metrics) and jax.process_index() == 0:
            self._write_best()
        return self.best()

    def _improve(self, step: int, metrics: Mapping[str, float]) -> bool:
        """Records the values of `metrics` that beat the table; whether any did."""
        changed = False
        for metric, value in metrics.items():
            value = float(value)
            if improves(metric, value, self._best.get(metric)):
                self._best[metric] = Best(value, int(step))
                changed = True
        return changed

    def best(self) -> dict[str, Best]:
        """The table {'task/metric': Best(value, step)} of best eval values."""
        return dict(sorted(self._best.items()))

    def wait_until_finished(self) -> None:
        """Blocks until a pending asynchronous save is complete on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finishes pending saves and releases orbax's resources."""
        self._manager.close()

    @property
    def _best_path(self) -> str:
        return os.path.join(self.directory, BEST_CHECKPOINTS_FILE)

    def rebuild_best(self, evals: Iterable[tuple[int, Mapping[str, float]]]) -> dict[str, Best]:
        """Replaces the best-checkpoint table by the best of `evals`, (step, metrics) pairs.

        For a table that was unreadable (`best_was_damaged`) or that names steps a
        run went back before (a fallback to an older checkpoint): the run's eval
        history up to its step rebuilds it.
        """
        self._best = {}
        for step, metrics in evals:
            self._improve(step, metrics)
        if jax.process_index() == 0:
            self._write_best()
        return self.best()

    def _read_best(self) -> dict[str, Best]:
        """The saved table; an unreadable one is renamed `*.damaged` (warned) and read as empty."""
        self.best_was_damaged = False
        if not os.path.exists(self._best_path):
            return {}
        try:
            with open(self._best_path, encoding="utf-8") as f:
                table = json.load(f)
            return {metric: Best(float(e["value"]), int(e["step"])) for metric, e in table.items()}
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            self.best_was_damaged = True
            kept = self._best_path + DAMAGED_SUFFIX
            if jax.process_index() == 0:
                kept = _free_path(kept)
                os.rename(self._best_path, kept)
            logging.warning(
                "%s is not a valid best-checkpoint table (%s): kept as %s; rebuilding it.",
                self._best_path,
                " ".join(f"{type(error).__name__}: {error}".split()),
                kept,
            )
            return {}

    def _write_best(self) -> None:
        """Writes the table atomically: a synced temporary file renamed over the old one."""
        table = {metric: best._asdict() for metric, best in self.best().items()}
        os.makedirs(self.directory, exist_ok=True)
        tmp_path = f"{self._best_path}.tmp-{os.getpid()}"
        with open(tmp_path, "w", encoding="utf-8") as f:
            json.dump(table, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, self._best_path)


def is_run(path: str) -> bool:
    """Whether `path` is a sam_jax run's MODEL_DIR (it has a `checkpoints` directory)."""
    return os.path.isdir(os.path.join(path, RUN_SUBDIR))


def restore_run_params(model_dir: str, abstract_params: Any) -> tuple[Any, int]:
    """Parameters of a finished run's last checkpoint, to start another run from (task transfer).

    Reads `<model_dir>/checkpoints/<latest step>` without opening a
    `CheckpointManager` (nothing in the other run's directory is written or
    cleaned up), and only the parameters `abstract_params` names: a subtree of
    the run's `params` leaves the rest out, e.g. a classifier's head.

    Args:
      model_dir: the run's MODEL_DIR.
      abstract_params: the parameters wanted, `jax.ShapeDtypeStruct`s. Leaves with
        a sharding come back as `jax.Array`s read into it, the others as numpy.

    Returns:
      (params, step): the parameters, in `abstract_params`' tree and dtypes, and
      the step they were saved at.

    Raises:
      ValueError: the run has no checkpoint, its latest step cannot be read (an
        older step is not taken in its place: it is not the run's result), or it
        lacks a wanted parameter or has it in another shape (named).

    Example::

      encoder, step = restore_run_params("/runs/qnli/fsam", {"encoder": abstract["encoder"]})
    """
    directory = os.path.join(model_dir, RUN_SUBDIR)
    steps = (
        sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if is_run(model_dir) else []
    )
    if not steps:
        raise ValueError(f"{model_dir} has no checkpoint in {RUN_SUBDIR}/ to start from.")
    step = steps[-1]
    path = os.path.join(directory, str(step), STATE_ITEM)
    try:
        with ocp.PyTreeCheckpointer() as checkpointer:
            with reporting_damage(directory, step):
                saved = checkpointer.metadata(path).item_metadata.tree["params"]
            _check_saved_shapes(saved, abstract_params, f"{model_dir} (step {step})")
            with reporting_damage(directory, step):
                restored = checkpointer.restore(
                    path,
                    args=ocp.args.PyTreeRestore(
                        item={"params": abstract_params},
                        restore_args={"params": jax.tree.map(_restore_args, abstract_params)},
                        partial_restore=True,
                    ),
                )
    except DamagedCheckpointError as error:
        raise ValueError(str(error)) from error
    return restored["params"], step


def _restore_args(leaf: jax.ShapeDtypeStruct) -> ocp.RestoreArgs:
    if leaf.sharding is None:
        return ocp.RestoreArgs(restore_type=np.ndarray, dtype=leaf.dtype)
    return ocp.ArrayRestoreArgs(sharding=leaf.sharding, global_shape=leaf.shape, dtype=leaf.dtype)


def _check_saved_shapes(saved: Any, wanted: Any, name: str) -> None:
    """ValueError naming the wanted parameters `saved` (metadata) lacks or shapes otherwise."""
    shapes = {jax.tree_util.keystr(p): tuple(m.shape) for p, m in jax.tree.leaves_with_path(saved)}
    missing, reshaped = [], []
    for path, leaf in jax.tree.leaves_with_path(wanted):
        key = jax.tree_util.keystr(path)
        if key not in shapes:
            missing.append(key)
        elif shapes[key] != tuple(leaf.shape):
            reshaped.append(f"{key} {shapes[key]} (wanted {tuple(leaf.shape)})")
    problems = [f"no {key}" for key in missing] + reshaped
    if problems:
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise ValueError(f"{name} is a run of another model: {'; '.join(problems[:3])}{more}.")


def _free_path(path: str) -> str:
    """`path`, or `path-<n>` with the smallest n ≥ 2 that does not exist."""
    candidate, n = path, 2
    while os.path.exists(candidate):
        candidate, n = f"{path}-{n}", n + 1
    return candidate

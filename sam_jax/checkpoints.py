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
  and an orbax preservation policy keeps those steps through garbage collection.

Example::

  checkpointer = Checkpointer("/tmp/run1/checkpoints", max_to_keep=3)
  if checkpointer.latest_step() is not None:
      state = checkpointer.restore(abstract_state)
  ...
  checkpointer.save(step, state)
  checkpointer.record_eval(step, {"demo_nli/accuracy": 0.81, "demo_nli/loss": 0.52})
  checkpointer.close()
"""

import json
import math
import os
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import orbax.checkpoint as ocp
from flax import linen as nn

BEST_CHECKPOINTS_FILE = "best_checkpoints.json"


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
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def latest_step(self) -> int | None:
        """The latest complete checkpoint's step, or None if there is none."""
        return self._manager.latest_step()

    def save(self, step: int, state: Any, *, force: bool = False) -> None:
        """Saves `state` as `step` (asynchronously unless `async_save=False`).

        A step at or before the latest saved one is skipped unless `force`; an
        existing step is never overwritten.

        Args:
          step: the training step.
          state: a pytree of arrays (NamedTuples, dicts, optax states), unboxed.
          force: save even if orbax's save decision would skip this step.

        Raises:
          TypeError: if `state` still has Flax `LogicallyPartitioned` boxes.
          ValueError: (orbax's `StepAlreadyExistsError`) with `force`, if `step`
            is already saved.
        """
        _check_unboxed(state, "state")
        self._manager.save(int(step), args=ocp.args.StandardSave(state), force=force)

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
        return self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

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
        changed = False
        for metric, value in metrics.items():
            value = float(value)
            if improves(metric, value, self._best.get(metric)):
                self._best[metric] = Best(value, int(step))
                changed = True
        if changed and jax.process_index() == 0:
            self._write_best()
        return self.best()

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

    def _read_best(self) -> dict[str, Best]:
        if not os.path.exists(self._best_path):
            return {}
        with open(self._best_path, encoding="utf-8") as f:
            table = json.load(f)
        return {metric: Best(float(e["value"]), int(e["step"])) for metric, e in table.items()}

    def _write_best(self) -> None:
        table = {metric: best._asdict() for metric, best in self.best().items()}
        os.makedirs(self.directory, exist_ok=True)
        tmp_path = f"{self._best_path}.tmp-{os.getpid()}"
        with open(tmp_path, "w", encoding="utf-8") as f:
            json.dump(table, f, indent=2)
            f.write("\n")
        os.replace(tmp_path, self._best_path)

"""A partitioner owns the device mesh: shardings, partitioned functions and global batches.

The design follows T5X's `PjitPartitioner` with today's JAX APIs: a 2-D
`("data", "model")` mesh from `jax.make_mesh` with `Auto` axes (Flax Linen's
logical partitioning does not work on `Explicit` axes), `jax.jit` with
`NamedSharding` in/out shardings instead of the deprecated `pjit`, and
`jax.make_array_from_process_local_data` to assemble a global batch from what
each process's input pipeline produced.

Parameters carry logical axis names (`nn.with_logical_partitioning`); the
partitioner's logical axis rules map them onto the mesh axes::

  partitioner = Partitioner(num_partitions=2)              # mesh (devices // 2, 2)
  abstract = jax.eval_shape(init_fn, key)                  # boxed, logical names
  state_shardings = partitioner.shardings(abstract)
  train_step = partitioner.partition(
      step_fn,
      in_shardings=(state_shardings, partitioner.data_sharding()),
      out_shardings=state_shardings,
      donate_argnums=(0,),
  )
  state = train_step(state, partitioner.global_batch(local_batch))

Multi-host runs call `initialize_distributed()` first thing in `main`.
"""

import contextlib
import functools
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sam_jax.models.t5 import DEFAULT_LOGICAL_AXIS_RULES

DATA_AXIS = "data"
MODEL_AXIS = "model"
MESH_AXES = (DATA_AXIS, MODEL_AXIS)

# (logical axis name, mesh axis | mesh axes | None), e.g. ("mlp", "model").
LogicalAxisRules = Sequence[tuple[str, str | Sequence[str] | None]]


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Joins the processes of a multi-host run (`jax.distributed.initialize`).

    Explicit arguments go to JAX (GPU clusters, or several processes on one
    machine), which detects any it is not given; `num_processes=1` is a
    single-process run and a no-op. With no arguments JAX detects the cluster
    itself (Cloud TPU, Slurm, Open MPI); on a plain single host it finds none and
    nothing happens. Calling it again once initialized does nothing.

    Call it before any other JAX call: JAX cannot join a cluster after its
    backend has started.

    Args:
      coordinator_address: 'host:port' of process 0's coordinator service.
      num_processes: the number of processes.
      process_id: this process's id, in [0, num_processes).

    Raises:
      RuntimeError: if JAX's backend was already initialized.
      ValueError: (from JAX) if explicit arguments are incomplete and no
        detected cluster supplies the rest.

    Example::

      initialize_distributed("10.0.0.1:1234", num_processes=2, process_id=0)
    """
    if jax.distributed.is_initialized() or (num_processes is not None and num_processes <= 1):
        return
    if (coordinator_address, num_processes, process_id) != (None, None, None):
        _initialize(coordinator_address, num_processes, process_id)
        return
    try:
        _initialize()
    except ValueError as error:
        # No cluster detected: JAX says the coordinator or process count is not defined.
        if "defined" not in str(error):
            raise


def _initialize(*args) -> None:
    try:
        jax.distributed.initialize(*args)
    except RuntimeError as error:
        raise RuntimeError(
            f"initialize_distributed() must run before any other JAX call ({error})"
        ) from error


class DataLayout(NamedTuple):
    """How one process feeds the mesh's data axis.

    Processes whose devices hold the same rows of the data axis (the model axis
    spans them) form one replica set: they read the same input shard and pass
    identical local batches.

    Attributes:
      shard_id: this process's input shard, in [0, num_shards) (seqio's
        `ShardInfo.index`).
      num_shards: the number of distinct input shards (`ShardInfo.num_shards`);
        the process count unless the model axis spans processes.
      rows: the indices along the data axis this process's devices hold, sorted.
      data_axis_size: the size of the mesh's data axis.
    """

    shard_id: int
    num_shards: int
    rows: tuple[int, ...]
    data_axis_size: int

    def local_indices(self, global_batch_size: int) -> np.ndarray:
        """Indices of the examples of a global batch that this process holds, in order.

        `global_batch[layout.local_indices(n)]` is what this process passes to
        `Partitioner.global_batch` when every process holds the whole batch (e.g.
        evaluation batches).
        """
        per_row = global_batch_size // self.data_axis_size
        return np.concatenate([np.arange(r * per_row, (r + 1) * per_row) for r in self.rows])


def data_layout_of(process_grid: np.ndarray, process_index: int) -> DataLayout:
    """The `DataLayout` of a process, from the process index of every mesh device.

    Args:
      process_grid: int array [data, model]: the process owning each device.
      process_index: the process to describe.

    Returns:
      Its `DataLayout`. Shards are numbered by their first row.

    Raises:
      ValueError: if two processes share some rows of the data axis but not all,
        or hold different numbers of rows (no equal split of the batch exists).
    """
    process_grid = np.asarray(process_grid)
    rows_of = {
        int(p): tuple(int(r) for r in np.flatnonzero((process_grid == p).any(axis=1)))
        for p in np.unique(process_grid)
    }
    blocks = sorted(set(rows_of.values()))
    covered = [r for block in blocks for r in block]
    if len(covered) != len(set(covered)) or len({len(block) for block in blocks}) != 1:
        raise ValueError(
            "The mesh's data axis is not split evenly between processes: rows held "
            f"per process {rows_of}; use a num_partitions that divides the local device count."
        )
    return DataLayout(
        shard_id=blocks.index(rows_of[process_index]),
        num_shards=len(blocks),
        rows=rows_of[process_index],
        data_axis_size=process_grid.shape[0],
    )


def _check_num_partitions(num_partitions: int, device_count: int) -> None:
    if not isinstance(num_partitions, int) or num_partitions < 1:
        raise ValueError(
            f"num_partitions must be an integer ≥ 1, got {num_partitions!r} "
            f"(device count {device_count})."
        )
    if num_partitions > device_count:
        raise ValueError(
            f"num_partitions={num_partitions} is larger than the device count {device_count}."
        )
    if device_count % num_partitions:
        raise ValueError(
            f"num_partitions={num_partitions} does not divide the device count "
            f"{device_count}: the mesh is (device_count // num_partitions, num_partitions)."
        )


def _mesh_axes(target: str | Sequence[str] | None) -> tuple[str, ...]:
    """The mesh axes of a rule's target: None, one axis, or several."""
    if target is None:
        return ()
    return (target,) if isinstance(target, str) else tuple(target)


def _check_rules(rules: LogicalAxisRules) -> tuple[tuple[str, Any], ...]:
    rules = tuple(
        (str(logical), target if target is None or isinstance(target, str) else tuple(target))
        for logical, target in rules
    )
    unknown = {axis for _, target in rules for axis in _mesh_axes(target) if axis not in MESH_AXES}
    if unknown:
        raise ValueError(
            f"Logical axis rules map onto unknown mesh axes {sorted(unknown)}; "
            f"the mesh axes are {MESH_AXES} (or None to replicate)."
        )
    return rules


class PartitionedFunction:
    """A `jax.jit`-compiled function that runs under its partitioner's mesh and rules."""

    def __init__(self, jitted: Callable, partitioner: "Partitioner"):
        self._jitted = jitted
        self._partitioner = partitioner
        functools.update_wrapper(self, jitted)

    def __call__(self, *args, **kwargs):
        with self._partitioner.context():
            return self._jitted(*args, **kwargs)

    def lower(self, *args, **kwargs) -> jax.stages.Lowered:
        """`jax.jit(...).lower` under the mesh (e.g. `.compile().memory_analysis()`)."""
        with self._partitioner.context():
            return self._jitted.lower(*args, **kwargs)


class Partitioner:
    """Owns a ("data", "model") device mesh and the logical axis rules.

    Attributes:
      mesh: the `jax.sharding.Mesh`, shape (device_count // num_partitions,
        num_partitions), both axes `AxisType.Auto`.
      num_partitions: the model-parallel degree (size of the "model" axis).
      data_axis_size: size of the "data" axis (data-parallel degree).
      model_axis_size: size of the "model" axis.
      logical_axis_rules: (logical name, mesh axis or None) pairs, first match wins.

    Example::

      partitioner = Partitioner(num_partitions=2)
      partitioner.mesh.shape  # {'data': 4, 'model': 2} on 8 devices
    """

    def __init__(
        self,
        num_partitions: int = 1,
        logical_axis_rules: LogicalAxisRules = DEFAULT_LOGICAL_AXIS_RULES,
    ):
        """Builds the mesh over all devices of all processes.

        Args:
          num_partitions: devices per model replica; must divide the device count.
          logical_axis_rules: maps the model's logical axis names onto "data",
            "model" or None (replicated).

        Raises:
          ValueError: for a `num_partitions` that is < 1, larger than the device
            count or not a divisor of it, or rules naming another mesh axis.
        """
        device_count = jax.device_count()
        _check_num_partitions(num_partitions, device_count)
        self.logical_axis_rules = _check_rules(logical_axis_rules)
        self.num_partitions = num_partitions
        self.mesh = jax.make_mesh(
            (device_count // num_partitions, num_partitions),
            MESH_AXES,
            axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
        )
        self.data_axis_size = self.mesh.shape[DATA_AXIS]
        self.model_axis_size = self.mesh.shape[MODEL_AXIS]

    def __repr__(self) -> str:
        return (
            f"Partitioner(num_partitions={self.num_partitions}, "
            f"mesh={dict(self.mesh.shape)}, processes={jax.process_count()})"
        )

    @contextlib.contextmanager
    def context(self):
        """Makes the mesh current and activates the logical axis rules.

        `partition`ed functions run inside it; use it directly for model code
        that calls `nn.with_logical_constraint` outside them.
        """
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.logical_axis_rules):
            yield

    def shardings(self, boxed_tree: Any) -> Any:
        """`NamedSharding`s for a tree whose leaves carry logical axis names.

        Args:
          boxed_tree: a pytree with `nn.LogicallyPartitioned` leaves (e.g. model
            variables or an optimizer state built from them, concrete or abstract
            from `jax.eval_shape`); other leaves are replicated.

        Returns:
          A tree of the same structure (boxes removed) of `NamedSharding`s.
        """
        specs = nn.get_partition_spec(boxed_tree)
        return nn.logical_to_mesh_sharding(specs, self.mesh, self.logical_axis_rules)

    def data_sharding(self) -> NamedSharding:
        """Shards the leading (example) axis over "data", replicated over "model"."""
        return NamedSharding(self.mesh, P(DATA_AXIS))

    def replicated(self) -> NamedSharding:
        """A full copy on every device (scalars, keys, small constants)."""
        return NamedSharding(self.mesh, P())

    def partition(
        self,
        fn: Callable,
        in_shardings: Any,
        out_shardings: Any,
        donate_argnums: int | Sequence[int] = (),
        static_argnums: int | Sequence[int] = (),
    ) -> PartitionedFunction:
        """Compiles `fn` for the mesh: `jax.jit` with shardings and donation.

        Tracing and every call happen under `context()`, so the model's
        `nn.with_logical_constraint` annotations resolve through the rules.

        Args:
          fn: the function to compile.
          in_shardings: shardings of the (non-static) arguments, as for `jax.jit`.
          out_shardings: shardings of the outputs.
          donate_argnums: arguments whose buffers the outputs may reuse.
          static_argnums: arguments that are compile-time constants.

        Returns:
          A callable with `fn`'s signature (and a `lower` method).
        """
        jitted = jax.jit(
            fn,
            in_shardings=in_shardings,
            out_shardings=out_shardings,
            donate_argnums=donate_argnums,
            static_argnums=static_argnums,
        )
        return PartitionedFunction(jitted, self)

    @functools.cached_property
    def data_layout(self) -> DataLayout:
        """Which input shard this process reads and which data-axis rows it feeds."""
        process_grid = np.vectorize(lambda d: d.process_index)(self.mesh.devices)
        return data_layout_of(process_grid, jax.process_index())

    def check_batch_size(self, global_batch_size: int) -> None:
        """Raises ValueError unless the data axis size divides `global_batch_size`."""
        if global_batch_size < 1 or global_batch_size % self.data_axis_size:
            raise ValueError(
                f"The global batch size {global_batch_size} must be a positive multiple of "
                f"the mesh's data axis size {self.data_axis_size} (device count "
                f"{jax.device_count()} / num_partitions {self.num_partitions}): it must divide."
            )

    def local_batch_size(self, global_batch_size: int) -> int:
        """Examples per global batch that this process's input pipeline produces.

        `global_batch_size // jax.process_count()` unless the model axis spans
        processes (then replicas of a shard read the same examples).
        """
        self.check_batch_size(global_batch_size)
        return global_batch_size // self.data_layout.num_shards

    def global_batch(self, local_batch: Any) -> Any:
        """Assembles global arrays, sharded over "data", from this process's examples.

        Args:
          local_batch: a pytree (e.g. a dict of features) of numpy arrays whose
            leading axis holds this process's `local_batch_size(N)` examples.

        Returns:
          The same tree of `jax.Array`s of leading size N, sharded by `data_sharding()`.
        """
        num_shards = self.data_layout.num_shards

        def to_global(x):
            x = np.asarray(x)
            global_shape = (x.shape[0] * num_shards,) + x.shape[1:]
            self.check_batch_size(global_shape[0])
            return jax.make_array_from_process_local_data(self.data_sharding(), x, global_shape)

        return jax.tree.map(to_global, local_batch)

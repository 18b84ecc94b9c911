r"""Fine-tunes a T5.1.1 model or a BERT-family encoder on a seqio task or mixture, with gin.

  python -m sam_jax.train --gin_file=gin/runs/finetune.gin \
      --gin_file=gin/models/t5_1_1/tiny.gin --gin_file=gin/sam/delta_sam.gin \
      --gin.MIXTURE_OR_TASK_NAME="'demo_mixture'" --gin.MODEL_DIR="'/tmp/run1'" \
      --gin.TRAIN_STEPS=300

(or the console script `sam_jax_train` with the same flags). A BERT-family encoder
fine-tunes from a Hugging Face directory on a local TSV task the same way:

  python -m sam_jax.train --gin_file=gin/runs/finetune_encoder.gin \
      --gin_file=gin/sam/sam.gin --gin.INITIAL_CHECKPOINT_PATH="'/path/to/all-MiniLM-L6-v2'" \
      --gin.TASK_DIR="'/path/to/sst2'" --gin.MODEL_DIR="'/tmp/minilm'" --gin.TRAIN_STEPS=200

Flags:

  --gin_file          gin files, parsed in order (searched in --gin_search_paths).
  --gin_bindings      extra bindings, e.g. --gin_bindings="RHO = 0.15"; T5X's
                      --gin.RHO=0.15 is the same.
  --gin_search_paths  where gin files and their `include`s are looked up;
                      default: the package's gin configs (the repository's
                      gin/ directory, installed as sam_jax/gin), the directory
                      above them (for 'gin/runs/...' paths) and the cwd.
  --module_import     modules that register seqio tasks (default: `sam_jax.tasks`).
  --allow_config_change
                      resume even if the config changes the optimizer state or
                      the data order (see `check_restart`).
  --coordinator_address, --num_processes, --process_id
                      a multi-process run on machines JAX does not detect.

The run writes checkpoints, TensorBoard summaries, `metrics.jsonl`,
`curves.png` and `config.gin` in MODEL_DIR, evaluates every task of the
mixture with its seqio metrics every EVAL_PERIOD steps and records the best
checkpoint per task-metric. Rerunning the same command resumes from the newest
checkpoint that can be read (and the input position saved with it; a damaged
newer one is renamed `<step>.damaged`, never deleted), once its config matches
the saved one (`check_restart`). SIGTERM or SIGINT saves a checkpoint and stops
(in a multi-process run, a signal to any process stops all of them at the same
step: see `StopSignals`). Invalid input stops with a one-line error before
anything is written.

Exit status: 0 when the run finished (or evaluated); 1 for invalid input
(nothing written); 128 + N when signal N stopped it after saving a checkpoint
(SIGTERM 143, SIGINT 130): rerun the same command to resume.
"""

if __name__ == "__main__":  # python -m sam_jax.train: as the console script sam_jax_train
    from sam_jax import errors

    errors.train_script()  # checks the flags, imports this module as sam_jax.train, runs main

import importlib
import itertools
import os
import re
import signal
import sys
import threading
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import gin
import jax
import numpy as np
import optax
from absl import app
from absl import flags
from absl import logging
from jax.experimental import multihost_utils

from sam_jax import checkpoints
from sam_jax import config
from sam_jax import data
from sam_jax import evaluation
from sam_jax import partitioning
from sam_jax import summaries
from sam_jax import trainer as trainer_lib
from sam_jax.models import t5
from sam_jax.models import task_models
from sam_jax.quiet import QuietLibraries
from sam_jax.quiet import QuietNativeLogs

CONFIG_FILE = "config.gin"
CHECKPOINTS_SUBDIR = checkpoints.RUN_SUBDIR

_MODULE_IMPORTS = flags.DEFINE_multi_string(
    "module_import", ["sam_jax.tasks"], "Modules to import first (they register seqio tasks)."
)
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change",
    False,
    "Resume even if the config changes the optimizer state or the data order (see README).",
)
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for multi-process runs."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes of the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's id.")


class TrainResult(NamedTuple):
    """What `train` returns.

    Attributes:
      step: the step the run stopped at.
      eval: the last evaluation, {'<task>/<metric>': value} (eval loss as '<task>/loss').
      best: {'<task>/<metric>': Best(value, step)}, the best value of every
        task-metric so far (lowest for losses) and the step of its checkpoint.
      seconds_per_step: mean training step time of this invocation, after the
        first (compiling) step, evaluations excluded; NaN if it ran < 2 steps.
      stopped_by: the name of the signal that stopped the run early, or None.
    """

    step: int
    eval: dict[str, float]
    best: dict[str, checkpoints.Best]
    seconds_per_step: float
    stopped_by: str | None


# --------------------------------------------------------------------------- #
# Stopping on signals.
# --------------------------------------------------------------------------- #


class StopSignals:
    """Turns SIGTERM and SIGINT into a request to checkpoint and stop (a context manager).

    One process: either signal sets a flag that `stop_requested` reads (no
    collective); a second SIGINT interrupts at once.

    Several processes: SIGTERM is JAX's preemption notice. The notifier that
    `jax.distributed.initialize` installs catches it on any process, the
    processes agree in the background on the next step all of them will reach,
    and `stop_requested` (`multihost_utils.reached_preemption_sync_point`) is
    True at that step on every process. No Python SIGTERM handler is installed
    (it would replace JAX's). SIGINT (Ctrl-C) on any process is forwarded to that
    process as a SIGTERM, so it stops all of them the same way; a second SIGINT
    interrupts that process at once (the others fail once JAX notices it is
    gone). This needs JAX's preemption service (`jax_enable_preemption_service`,
    on by default); without it `stop_requested` raises JAX's RuntimeError.

    Example::

      with StopSignals() as stop:
          for step in range(start + 1, end + 1):
              state = train_step(state)
              if stop.stop_requested(step):
                  save(step, state)
                  break
    """

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    @staticmethod
    def multi_process() -> bool:
        """Whether the run has several processes (stops go through JAX's preemption sync)."""
        return jax.process_count() > 1

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            signums = (signal.SIGINT,) if self.multi_process() else (signal.SIGTERM, signal.SIGINT)
            for signum in signums:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        del frame
        self.received = signum
        if signum == signal.SIGINT:
            signal.signal(signum, self._previous.get(signum, signal.default_int_handler))
        logging.warning(
            "Received %s: saving a checkpoint, then stopping.", signal.Signals(signum).name
        )
        if self.multi_process():
            os.kill(os.getpid(), signal.SIGTERM)  # JAX's preemption notifier takes it from here

    def stop_requested(self, step: int) -> bool:
        """Whether to checkpoint and stop after `step`; True at the same step on every process.

        Call it after every step, on every process, with consecutive steps.
        """
        if not self.multi_process():
            return self.received is not None
        if not multihost_utils.reached_preemption_sync_point(step):
            return False
        self.received = self.received or signal.SIGTERM  # a notice on some process
        return True

    @property
    def name(self) -> str | None:
        """The signal's name ('SIGTERM' for a preemption notice another process received)."""
        return None if self.received is None else signal.Signals(self.received).name


# --------------------------------------------------------------------------- #
# Input.
# --------------------------------------------------------------------------- #


def resume_batches(
    checkpointer: checkpoints.Checkpointer, step: int, **kwargs
) -> data.TrainBatches:
    """This process's training batches from `step` on: `data.train_batches(**kwargs)`.

    From a checkpoint, the iterator continues from its saved position (O(1)). A
    checkpoint without the position of this process's input shard (saved before
    positions were saved, or by a run with another number of processes or another
    data layout) is resumed by skipping `step` batches, O(step), with a warning:
    the data never restarts from the beginning.

    Example::

      batches = resume_batches(checkpointer, 120, mixture_or_task_name="demo_mixture",
                               sequence_length=..., global_batch_size=8, seed=0)
    """
    if step == 0:
        return data.train_batches(**kwargs)
    shard = data.input_shard(kwargs.get("shard_id"), kwargs.get("num_shards"))
    saved = data.TrainBatches.saved_shard(checkpointer.iterator_directory(step))
    if saved == shard:
        batches = data.train_batches(**kwargs)
        checkpointer.restore_iterator(batches, step)
        return batches
    logging.warning(
        "The checkpoint of step %d has no input position of this process's %s (it has %s: "
        "an older checkpoint, another process count or data layout): skipping %d batches.",
        step,
        shard,
        saved,
        step,
    )
    return data.train_batches(**kwargs, start_step=step)


# --------------------------------------------------------------------------- #
# Evaluation.
# --------------------------------------------------------------------------- #


# --------------------------------------------------------------------------- #
# The run.
# --------------------------------------------------------------------------- #


def pretrained_state(setup: "TrainSetup", path: str, rng: jax.Array):
    """The step-0 `TrainState` of a pre-trained model (INITIAL_CHECKPOINT_PATH), on the mesh.

    Args:
      setup: the run's `TrainSetup` (its model must have the checkpoint's shapes).
      path: a T5X checkpoint (`.../checkpoint_<step>`), a Hugging Face T5 or
        BERT-family directory, or the MODEL_DIR of a sam_jax run of the same model
        (its last checkpoint's parameters: task transfer).
      rng: initialises what the checkpoint does not have (a classifier's head,
        new for every task).

    Raises:
      config.ConfigError: the checkpoint cannot be read, or is another model.
    """
    try:
        params = setup.trainer.model.load_pretrained(
            path, rng, shardings=setup.state_shardings.params
        )
    except (OSError, ValueError) as error:
        raise config.ConfigError(f"INITIAL_CHECKPOINT_PATH: {config.one_line(error)}") from error
    shardings = setup.state_shardings
    start = setup.partitioner.partition(
        setup.trainer.state_from_params,
        in_shardings=(shardings.params,),
        out_shardings=shardings,
    )
    return start(jax.device_put(params, shardings.params))  # no copy of placed arrays


class TrainSetup(NamedTuple):
    """The trainer of a run and its partitioned functions, as `train` builds them.

    Attributes:
      trainer: the `sam_jax.trainer.Trainer` (model, optimizer, loss).
      partitioner: the device mesh and logical axis rules.
      state_shardings: the `NamedSharding`s of the `TrainState`.
      abstract_state: the `TrainState` as `jax.ShapeDtypeStruct`s with those
        shardings (the target a checkpoint is restored into).
      init_state: `init_state()`, a fresh sharded `TrainState` (partitioned).
      train_step: `train_step(state, global_batch, dropout_key) -> (state, metrics)`,
        partitioned, the state donated; the step the run calls.
      init_key: initialises the parameters (or a pre-trained classifier's head).
      dropout_key: the run's dropout key (derived from `seed`).
    """

    trainer: trainer_lib.Trainer
    partitioner: partitioning.Partitioner
    state_shardings: Any
    abstract_state: Any
    init_state: partitioning.PartitionedFunction
    train_step: partitioning.PartitionedFunction
    init_key: jax.Array
    dropout_key: jax.Array


def setup_training(
    *,
    model: task_models.TaskModel,
    optimizer: Callable[..., optax.GradientTransformation],
    learning_rate: trainer_lib.LearningRate,
    sam: trainer_lib.SamFactory | None,
    batch_size: int,
    num_microbatches: int,
    num_partitions: int,
    logical_axis_rules: Sequence[tuple[str, str | None]],
    seed: int,
) -> TrainSetup:
    """The mesh, the trainer and its partitioned init and train steps of a run.

    `train` trains with these; benchmarks/trainer.py times the same `train_step`.
    Nothing is compiled yet: that happens at the first call (or `.lower().compile()`).

    Example::

      setup = setup_training(**arguments)  # the `train` arguments of these names
      state = setup.init_state()
      state, metrics = setup.train_step(
          state, setup.partitioner.global_batch(local_batch), setup.dropout_key
      )

    Args:
      model: the task model (`task_models.EncoderDecoderModel`, ...), fitted to
        the task (`for_task`).
      optimizer: an Optax optimizer factory called with `learning_rate=`.
      learning_rate: a float or an Optax schedule.
      sam: a SAM factory, or None for the optimizer alone.
      batch_size: global examples per step.
      num_microbatches: gradient accumulation steps.
      num_partitions: model-parallel degree (mesh (devices / n, n)).
      logical_axis_rules: logical to mesh axis rules.
      seed: parameter initialisation and dropout.

    Returns:
      A `TrainSetup`.

    Raises:
      ValueError: for a batch size the mesh or `num_microbatches` does not divide,
        a bad `num_partitions`, or arguments the trainer or the SAM factory rejects.
    """
    partitioner = checked_mesh(batch_size, num_microbatches, num_partitions, logical_axis_rules)
    trainer = trainer_lib.Trainer(
        model,
        optimizer,
        learning_rate,
        sam,
        num_microbatches=num_microbatches,
        num_data_shards=partitioner.data_axis_size,
    )
    state_shardings = partitioner.shardings(trainer.logical_state())
    init_key, dropout_key = jax.random.split(jax.random.key(seed))
    init_state = partitioner.partition(
        lambda: trainer.init_state(init_key), in_shardings=(), out_shardings=state_shardings
    )
    train_step = partitioner.partition(
        trainer.train_step,
        in_shardings=(state_shardings, partitioner.data_sharding(), partitioner.replicated()),
        out_shardings=(state_shardings, partitioner.replicated()),
        donate_argnums=(0,),
    )
    return TrainSetup(
        trainer=trainer,
        partitioner=partitioner,
        state_shardings=state_shardings,
        abstract_state=abstract_state(trainer, state_shardings),
        init_state=init_state,
        train_step=train_step,
        init_key=init_key,
        dropout_key=dropout_key,
    )


def checked_mesh(
    batch_size: int,
    num_microbatches: int,
    num_partitions: int,
    logical_axis_rules: Sequence[tuple[str, str | None]],
) -> partitioning.Partitioner:
    """The run's (data, model) mesh, once its data axis and `num_microbatches` divide the batch.

    Raises:
      ValueError: a bad `num_partitions` or batch size (`config.ConfigError` for the
        microbatches).
    """
    partitioner = partitioning.Partitioner(num_partitions, logical_axis_rules)
    partitioner.check_batch_size(batch_size)
    config.check(
        batch_size % (num_microbatches * partitioner.data_axis_size) == 0,
        f"The batch size {batch_size} must be a multiple of num_microbatches "
        f"({num_microbatches}) × the data axis size ({partitioner.data_axis_size}).",
    )
    return partitioner


def abstract_state(trainer: trainer_lib.Trainer, state_shardings: Any) -> Any:
    """The `TrainState` as `jax.ShapeDtypeStruct`s with its shardings (a restore's target)."""
    return jax.tree.map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        jax.eval_shape(trainer.init_state, jax.random.key(0)),
        state_shardings,
    )


@gin.configurable(denylist=["allow_config_change"])  # the flag --allow_config_change
def train(
    *,
    model_dir: str | None = None,
    mixture_or_task_name: str | None = None,
    train_steps: int | None = None,
    batch_size: int = 128,
    sequence_length: Mapping[str, int] | None = None,
    model: task_models.TaskModel | None = None,
    optimizer: Callable[..., optax.GradientTransformation] = optax.adafactor,
    learning_rate: trainer_lib.LearningRate = 1e-3,
    sam: trainer_lib.SamFactory | None = None,
    num_microbatches: int = 1,
    num_partitions: int = 1,
    logical_axis_rules: Sequence[tuple[str, str | None]] = t5.DEFAULT_LOGICAL_AXIS_RULES,
    seed: int = 0,
    pack: bool = False,
    initial_checkpoint_path: str | None = None,
    checkpoint_period: int = 200,
    keep_checkpoints: int = 3,
    eval_period: int = 200,
    eval_batch_size: int = 128,
    eval_split: str = "validation",
    max_eval_examples: int | None = None,
    eval_only: bool = False,
    log_period: int = 10,
    progress_bar: bool = True,
    allow_config_change: bool = False,
) -> TrainResult:
    """Trains (or, with `eval_only`, evaluates) a task model; resumes from MODEL_DIR.

    Every argument is bound by gin (see gin/runs/finetune.gin).

    Args:
      model_dir: where checkpoints and summaries go (MODEL_DIR).
      mixture_or_task_name: a registered seqio task or mixture.
      train_steps: the step to train to (TRAIN_STEPS).
      batch_size: global examples per step; a multiple of the data axis size
        (times `num_microbatches`).
      sequence_length: {'inputs': ..., 'targets': ...} (TASK_FEATURE_LENGTHS; an
        encoder takes {'inputs': ...}, its total length with [CLS] and [SEP]).
      model: the task model, from a gin/models file: `task_models.EncoderDecoderModel`
        (T5.1.1) or `task_models.EncoderClassifierModel` (BERT family; its number
        of labels comes from the task).
      optimizer: an Optax optimizer factory called with `learning_rate=`.
      learning_rate: a float or an Optax schedule.
      sam: a SAM factory (`@sam_jax.sam`, from a gin/sam file), or None.
      num_microbatches: gradient accumulation steps.
      num_partitions: model-parallel degree (mesh (devices / n, n)).
      logical_axis_rules: logical to mesh axis rules.
      seed: parameter initialisation, dropout and data order.
      pack: pack training examples (EncDecFeatureConverter(pack=True); T5 only).
      initial_checkpoint_path: a pre-trained model to start from when MODEL_DIR has
        no checkpoint (INITIAL_CHECKPOINT_PATH): a T5X checkpoint directory
        (`.../checkpoint_<step>`, Orbax or legacy), or a Hugging Face T5 or
        BERT-family directory (`config.json` + `model.safetensors`). Only its
        parameters are read (a classifier's head is initialised from `seed`); the
        optimizer starts fresh. None starts from a random initialisation.
      checkpoint_period: save every this many steps (and at evals and the end).
      keep_checkpoints: recent checkpoints to keep (best ones are kept too).
      eval_period: evaluate every this many steps and at the end.
      eval_batch_size: examples per eval batch (a multiple of the data axis size).
      eval_split: the split to evaluate.
      max_eval_examples: evaluate at most this many examples per task.
      eval_only: evaluate the latest checkpoint and stop (gin/runs/eval.gin).
      log_period: write training summaries every this many steps.
      progress_bar: show the tqdm progress bar.
      allow_config_change: resume even if the config differs from the run's
        saved one in a binding that changes the optimizer state or the data order
        (`check_restart`); the CLI's --allow_config_change.

    Returns:
      A `TrainResult`.

    Raises:
      config.ConfigError: for invalid input, before anything is written to `model_dir`.
    """
    _check_arguments(
        model_dir=model_dir,
        mixture_or_task_name=mixture_or_task_name,
        model=model,
        train_steps=train_steps,
        sequence_length=sequence_length,
        initial_checkpoint_path=initial_checkpoint_path,
        checkpoint_period=checkpoint_period,
        eval_period=eval_period,
        log_period=log_period,
        keep_checkpoints=keep_checkpoints,
        num_microbatches=num_microbatches,
    )
    checkpoint_dir = os.path.join(model_dir, CHECKPOINTS_SUBDIR)
    config.check(
        not eval_only or os.path.isdir(checkpoint_dir),
        f"eval_only: no checkpoint in {model_dir} to evaluate.",
    )
    # Opening a checkpoint directory creates it: a new run opens it once its input is checked.
    checkpointer = None
    if os.path.isdir(checkpoint_dir):
        checkpointer = checkpoints.Checkpointer(checkpoint_dir, max_to_keep=keep_checkpoints)
    try:
        run = prepare_run(
            mixture_or_task_name,
            model,
            sequence_length=sequence_length,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            eval_split=eval_split,
            max_eval_examples=max_eval_examples,
            pack=pack,
            setup_arguments=dict(
                optimizer=optimizer,
                learning_rate=learning_rate,
                sam=sam,
                num_microbatches=num_microbatches,
                num_partitions=num_partitions,
                logical_axis_rules=logical_axis_rules,
                seed=seed,
            ),
        )
        restart = check_restart(
            model_dir,
            checkpointer and checkpointer.latest_step(),
            train_steps=train_steps,
            eval_only=eval_only,
            allow_config_change=allow_config_change,
        )
        start = start_state(
            run.setup,
            checkpointer,
            initial_checkpoint_path,
            model_dir,
            batch_arguments=None if eval_only else run.batch_arguments,
        )
        first_batch = None if eval_only else checked_first_batch(run.setup, start.batches)
        if checkpointer is None:
            checkpointer = checkpoints.Checkpointer(checkpoint_dir, max_to_keep=keep_checkpoints)
        record_start(checkpointer, start, restart, model_dir, eval_only=eval_only)
        result = run_from(
            start,
            first_batch,
            run,
            checkpointer,
            model_dir=model_dir,
            final_step=start.step if eval_only else max(train_steps, start.step),
            summaries_arguments=dict(log_period=log_period, progress_bar=progress_bar),
            loop_arguments=dict(
                batch_size=batch_size,
                eval_period=eval_period,
                checkpoint_period=checkpoint_period,
            ),
        )
        checkpointer.wait_until_finished()
    finally:
        if checkpointer is not None:
            checkpointer.close()
    if jax.process_index() == 0:
        summaries.plot_history(
            summaries.read_history(model_dir),
            os.path.join(model_dir, summaries.CURVES_FILE),
            title=f"{mixture_or_task_name} ({model_dir})",
        )
    return result


class PreparedRun(NamedTuple):
    """What `train` builds from its arguments before it reads MODEL_DIR.

    Attributes:
      setup: the `TrainSetup` (the model fitted to the task).
      evaluate: `evaluate(params) -> {'<task>/<metric>': value}`.
      batch_arguments: the keyword arguments of `data.train_batches` for this process.
    """

    setup: TrainSetup
    evaluate: Callable[[Any], dict[str, float]]
    batch_arguments: dict[str, Any]


def prepare_run(
    mixture_or_task_name: str,
    model: task_models.TaskModel,
    *,
    sequence_length: Mapping[str, int],
    batch_size: int,
    eval_batch_size: int,
    eval_split: str,
    max_eval_examples: int | None,
    pack: bool,
    setup_arguments: Mapping[str, Any],
) -> PreparedRun:
    """The task's model, its `TrainSetup`, evaluator and input arguments (`train`'s names).

    `setup_arguments` are `setup_training`'s other arguments. Nothing is read or
    written in MODEL_DIR; nothing is compiled.

    Raises:
      config.ConfigError: the task, the model, the mesh or a batch size rejects the
        arguments (their ValueError or TypeError, on one line).
    """
    try:
        mixture_or_task = data.get_mixture_or_task(mixture_or_task_name)
        model = model.for_task(mixture_or_task)
        setup = setup_training(model=model, batch_size=batch_size, **setup_arguments)
        setup.partitioner.check_batch_size(eval_batch_size)
        evaluate = evaluation.make_evaluator(
            setup.trainer,
            setup.partitioner,
            setup.state_shardings.params,
            data.eval_tasks(
                mixture_or_task_name,
                sequence_length=sequence_length,
                batch_size=eval_batch_size,
                split=eval_split,
                max_examples=max_eval_examples,
                feature_converter=model.feature_converter(mixture_or_task, pack=False),
            ),
            sequence_length,
        )
        batch_arguments = dict(
            mixture_or_task_name=mixture_or_task_name,
            sequence_length=sequence_length,
            global_batch_size=batch_size,
            seed=setup_arguments["seed"],
            feature_converter=model.feature_converter(mixture_or_task, pack),
            shard_id=setup.partitioner.data_layout.shard_id,
            num_shards=setup.partitioner.data_layout.num_shards,
        )
    except (ValueError, TypeError) as error:
        raise config.ConfigError(config.one_line(error)) from error
    logging.info("%s; %s", setup.partitioner, model)
    return PreparedRun(setup, evaluate, batch_arguments)


def run_from(
    start: "Start",
    first_batch: dict[str, Any] | None,
    run: PreparedRun,
    checkpointer: checkpoints.Checkpointer,
    *,
    model_dir: str,
    final_step: int,
    summaries_arguments: Mapping[str, Any],
    loop_arguments: Mapping[str, Any],
) -> TrainResult:
    """Trains from `start` to `final_step`, or evaluates it (without `first_batch`).

    Opens the run's summaries (`summaries.Summaries(model_dir, ...,
    **summaries_arguments)`, written by process 0), stops on SIGTERM or SIGINT
    (`StopSignals`) and runs the `TrainLoop(..., **loop_arguments)`.
    """
    with (
        summaries.Summaries(
            model_dir,
            total_steps=final_step,
            start_step=start.step,
            enabled=jax.process_index() == 0,
            **summaries_arguments,
        ) as writer,
        StopSignals() as stop,
    ):
        loop = TrainLoop(run.setup, checkpointer, writer, run.evaluate, **loop_arguments)
        step = start.step
        if first_batch is None:
            loop.evaluate(step, start.state)
        else:
            batches = itertools.chain([first_batch], start.batches)
            _, step = loop.run(start.state, step, final_step, batches, start.batches, stop)
    return TrainResult(
        step=step,
        eval=loop.last_eval,
        best=loop.best,
        seconds_per_step=writer.seconds_per_step(),
        stopped_by=stop.name,
    )


def record_start(
    checkpointer: checkpoints.Checkpointer,
    start: "Start",
    restart: "Restart",
    model_dir: str,
    *,
    eval_only: bool,
) -> None:
    """What a checked start writes: damaged steps set aside, the best table, the config.

    After a fallback (or with an unreadable best table) the best-checkpoint table is
    rebuilt from the eval history up to the step restored; process 0 writes the
    start's config file (`Restart.write`).
    """
    set_aside_damaged(checkpointer, start, training=not eval_only)
    if start.damaged or checkpointer.best_was_damaged:
        checkpointer.rebuild_best(eval_history(model_dir, start.step))
    if jax.process_index() == 0:
        restart.write(start.step)


def _check_arguments(
    *,
    model_dir,
    mixture_or_task_name,
    model,
    train_steps,
    sequence_length,
    initial_checkpoint_path,
    **positive_integers,
) -> None:
    """`train`'s checks of its arguments alone (ConfigError), before anything is read."""
    config.check(bool(model_dir), "MODEL_DIR is not set: pass --gin.MODEL_DIR=\"'/path/to/run'\".")
    config.check_model_dir(model_dir)
    config.check(bool(mixture_or_task_name), "MIXTURE_OR_TASK_NAME is not set.")
    config.check(
        model is not None, "No model: add a model gin file, e.g. gin/models/t5_1_1/tiny.gin."
    )
    config.check(
        isinstance(train_steps, int) and train_steps >= 0,
        f"TRAIN_STEPS must be an integer ≥ 0, got {train_steps!r}.",
    )
    for name, value in positive_integers.items():
        config.check(
            isinstance(value, int) and value >= 1, f"{name} must be an integer ≥ 1, got {value!r}."
        )
    required_lengths = set(model.task_feature_lengths)
    config.check(
        sequence_length is not None and required_lengths <= set(sequence_length),
        f"TASK_FEATURE_LENGTHS must give {sorted(required_lengths)} for "
        f"{type(model).__name__}, got {sequence_length!r}.",
    )
    config.check(
        not initial_checkpoint_path
        or "://" in initial_checkpoint_path
        or os.path.exists(initial_checkpoint_path),
        f"INITIAL_CHECKPOINT_PATH {initial_checkpoint_path} does not exist.",
    )


# `train` arguments a resumed run may change: what is evaluated, logged and kept, how
# far to train, where the run and the mesh are. Any other binding (optimizer, SAM,
# batch size, task, seed, feature lengths, model, ...) changes the optimizer state's
# structure, the data order or the training itself.
RESTART_FREE_ARGUMENTS = frozenset(
    {
        "model_dir",
        "train_steps",
        "checkpoint_period",
        "keep_checkpoints",
        "eval_period",
        "eval_batch_size",
        "eval_split",
        "max_eval_examples",
        "eval_only",
        "log_period",
        "progress_bar",
        "initial_checkpoint_path",
        "num_partitions",
        "logical_axis_rules",
    }
)


class Restart(NamedTuple):
    """What a start of the run in `model_dir` writes: its config (`gin.config_str()`), if any.

    Attributes:
      model_dir: the run's directory.
      name: the config file's name, `{step}` standing for the step the run starts
        from (the checkpoint restored, older than the latest after a fallback):
        `config.gin` for a new run, `config_resume_{step}.gin` for a resumed run
        whose config changed, `config_eval_{step}.gin` for an evaluation, or None
        (a resumed run with the same config).
      text: the config.
    """

    model_dir: str
    name: str | None
    text: str

    def write(self, step: int) -> None:
        """Writes the config of a start from `step`."""
        if self.name is not None:
            path = os.path.join(self.model_dir, self.name.format(step=step))
            with open(path, "w", encoding="utf-8") as f:
                f.write(self.text)


def saved_config(model_dir: str, step: int) -> str | None:
    """The config the run in `model_dir` trained up to `step` with: its latest (re)start's file.

    `config.gin` (the first start) or `config_resume_<s>.gin` with the largest s ≤ `step`.
    """
    starts = {0: CONFIG_FILE} if os.path.isfile(os.path.join(model_dir, CONFIG_FILE)) else {}
    for name in os.listdir(model_dir):
        match = re.fullmatch(r"config_resume_(\d+)\.gin", name)
        if match and int(match.group(1)) <= step:
            starts[int(match.group(1))] = name
    return os.path.join(model_dir, starts[max(starts)]) if starts else None


def check_restart(
    model_dir: str,
    step: int | None,
    *,
    train_steps: int,
    eval_only: bool,
    allow_config_change: bool,
) -> Restart:
    """Checks a start of the run in `model_dir` whose latest checkpoint is `step` (or None).

    It runs before the checkpoint is restored (a changed optimizer or model would
    make the restore fail, less clearly). A resumed run (or an evaluation)
    compares its config with the one the run trained with (`saved_config`): a
    changed binding other than a `RESTART_FREE_ARGUMENTS` one is refused unless
    `allow_config_change`; the changes are logged. TRAIN_STEPS below `step` is
    refused. Nothing is written.

    Returns:
      The `Restart`, whose config file the run writes once its input is checked,
      named after the step it restored (`Restart.write`).

    Raises:
      config.ConfigError: a refused change (with the diff) or TRAIN_STEPS below `step`.
    """
    current = gin.config_str()
    if step is None:
        return Restart(model_dir, CONFIG_FILE, current)
    config.check(
        eval_only or train_steps >= step,
        f"TRAIN_STEPS={train_steps} is below the step {step} of the checkpoint in {model_dir}: "
        f"pass TRAIN_STEPS ≥ {step} to train on (or gin/runs/eval.gin to evaluate); "
        "nothing was changed.",
    )
    saved_path = saved_config(model_dir, step)
    if saved_path is None:
        logging.warning("%s has no %s: the config is not compared.", model_dir, CONFIG_FILE)
        changes = []
    else:
        with open(saved_path, encoding="utf-8") as f:
            changes = config.config_changes(f.read(), current)
    refused = [
        change
        for change in changes
        if change.binding.removeprefix("train.") not in RESTART_FREE_ARGUMENTS
    ]
    config.check(
        not refused or allow_config_change,
        f"The run in {model_dir} was trained up to step {step} with another config "
        f"({saved_path}): {_listed(refused)}. That changes the optimizer state or the data "
        "order: use a new MODEL_DIR, or pass --allow_config_change to resume anyway.",
    )
    if changes:
        logging.warning("Config changes since %s: %s.", saved_path, _listed(changes))
    name = "config_eval_{step}.gin" if eval_only else "config_resume_{step}.gin"
    return Restart(model_dir, name if eval_only or changes else None, current)


def _listed(changes: Sequence[config.ConfigChange], limit: int = 4) -> str:
    listed = "; ".join(map(str, changes[:limit]))
    return listed + (f"; and {len(changes) - limit} more" if len(changes) > limit else "")


def eval_history(model_dir: str, last_step: int) -> list[tuple[int, dict[str, float]]]:
    """(step, {"<task>/<metric>": value}) of the evaluations in `metrics.jsonl` to `last_step`."""
    return [
        (record["step"], {k.removeprefix("eval/"): v for k, v in record["eval"].items()})
        for record in summaries.read_history(model_dir)
        if "eval" in record and record["step"] <= last_step
    ]


class Start(NamedTuple):
    """Where a run starts.

    Attributes:
      state: the `TrainState`.
      step: its step.
      batches: the training batches from `step` on (None for an evaluation).
      damaged: the newer checkpoints that could not be read, newest first (still
        in place: `set_aside_damaged`).
    """

    state: trainer_lib.TrainState
    step: int
    batches: data.TrainBatches | None
    damaged: tuple[checkpoints.DamagedCheckpointError, ...] = ()


def start_state(
    setup: TrainSetup,
    checkpointer: checkpoints.Checkpointer | None,
    initial_checkpoint_path: str | None,
    model_dir: str,
    batch_arguments: Mapping[str, Any] | None,
) -> Start:
    """The newest intact checkpoint of the run, else the pre-trained or a fresh state.

    Checkpoints are tried newest first: the state, and with `batch_arguments` (a
    training run) the input position (`resume_batches`). Nothing is written: the
    steps that cannot be read are in `Start.damaged`.

    Raises:
      config.ConfigError: no saved step can be read, an evaluation without a
        checkpoint, or a bad pre-trained checkpoint.
    """
    damaged: list[checkpoints.DamagedCheckpointError] = []
    for step in reversed(checkpointer.all_steps() if checkpointer else []):
        error = None
        try:
            logging.info("Restoring the checkpoint of step %d from %s.", step, model_dir)
            state = checkpointer.restore(setup.abstract_state, step=step)
            batches = None
            if batch_arguments is not None:
                batches = resume_batches(checkpointer, step, **batch_arguments)
        except checkpoints.DamagedCheckpointError as damage:
            error = damage
        if _on_every_process(error is None):  # each process reads its own shards
            return Start(state, step, batches, tuple(damaged))
        damaged.append(
            error
            or checkpoints.DamagedCheckpointError(
                checkpointer.directory, step, "another process cannot read it"
            )
        )
    config.check(
        not damaged,
        f"No checkpoint in {checkpointer and checkpointer.directory} can be restored ("
        + "; ".join(f"step {error.step}: {error.reason}" for error in damaged)
        + "). Nothing was moved or deleted.",
    )
    config.check(
        batch_arguments is not None, f"eval_only: no checkpoint in {model_dir} to evaluate."
    )
    state = initial_state(setup, initial_checkpoint_path)
    return Start(state, 0, data.train_batches(**batch_arguments))


def set_aside_damaged(checkpointer: checkpoints.Checkpointer, start: Start, training: bool) -> None:
    """Reports each of `start.damaged` in one line; a training run moves it aside.

    A training run renames a damaged step (`Checkpointer.set_aside`: never deleted)
    to save that step again; an evaluation leaves it in place.
    """
    for error in start.damaged:
        kept = f"kept as {checkpointer.set_aside(error.step)}" if training else "kept in place"
        logging.warning("%s; resuming from step %d instead (%s).", error, start.step, kept)


def initial_state(setup: TrainSetup, initial_checkpoint_path: str | None):
    """The step-0 state of a run: the pre-trained model (INITIAL_CHECKPOINT_PATH) or a fresh one."""
    if initial_checkpoint_path:
        logging.info("Starting from the pre-trained %s.", initial_checkpoint_path)
        return pretrained_state(setup, initial_checkpoint_path, setup.init_key)
    return setup.init_state()


def _on_every_process(condition: bool) -> bool:
    """Whether `condition` holds on every process (a collective when there are several)."""
    if jax.process_count() == 1:
        return condition
    return bool(np.all(multihost_utils.process_allgather(np.asarray(condition))))


def checked_first_batch(setup: TrainSetup, batches: data.TrainBatches) -> dict[str, Any]:
    """The run's first local batch, once the train step has been traced with it.

    Tracing checks the step's shapes (a batch SHARPNESS_M or the microbatches do
    not divide, ...) before anything is written; the call reuses the trace.

    Raises:
      config.ConfigError: the step rejects the batch.
    """
    local_batch = next(batches)
    global_batch = setup.partitioner.global_batch(local_batch)
    try:
        setup.train_step.lower(setup.abstract_state, global_batch, setup.dropout_key)
    except (ValueError, TypeError) as error:
        raise config.ConfigError(f"The train step: {config.one_line(error)}") from error
    return local_batch


class TrainLoop:
    """The training loop of a run: steps, summaries, checkpoints, evaluations, stops.

    Attributes:
      last_eval: the latest evaluation ({'<task>/<metric>': value}).
      best: the best value of every task-metric and its step (`Checkpointer.best`).
    """

    def __init__(
        self,
        setup: TrainSetup,
        checkpointer: checkpoints.Checkpointer,
        writer: summaries.Summaries,
        evaluate: Callable[[Any], dict[str, float]],
        *,
        batch_size: int,
        eval_period: int,
        checkpoint_period: int,
    ):
        """Args: the run's setup, checkpointer and summaries; `evaluate(params)`
        (`evaluation.make_evaluator`); global examples per step; the periods."""
        self.setup, self.checkpointer, self.writer = setup, checkpointer, writer
        self._evaluate = evaluate
        self.batch_size = batch_size
        self.eval_period, self.checkpoint_period = eval_period, checkpoint_period
        self.last_eval: dict[str, float] = {}
        self.best = checkpointer.best()

    def evaluate(self, step: int, state: trainer_lib.TrainState) -> None:
        """Evaluates `state` (summaries paused), records it and the best checkpoints."""
        with self.writer.paused():
            self.last_eval = self._evaluate(state.params)
            self.writer.eval(step, self.last_eval)
            logging.info("Step %d eval: %s", step, self.last_eval)
            self.best = self.checkpointer.record_eval(step, self.last_eval)

    def run(
        self,
        state: trainer_lib.TrainState,
        step: int,
        final_step: int,
        batches: Iterator[dict[str, Any]],
        position: checkpoints.SavableIterator,
        stop: StopSignals,
    ) -> tuple[trainer_lib.TrainState, int]:
        """Trains from `step` to `final_step` (or a stop signal); returns (state, step).

        Saves a checkpoint, with the input position of `position` (the iterator
        `batches` draws from), every checkpoint period, at every evaluation
        (every eval period and the last step) and at a stop.
        """
        eval_period, checkpoint_period = self.eval_period, self.checkpoint_period
        setup, checkpointer = self.setup, self.checkpointer
        partitioner, model = setup.partitioner, setup.trainer.model
        saved_step = step
        while step < final_step:
            local_batch = next(batches)
            state, metrics = setup.train_step(
                state, partitioner.global_batch(local_batch), setup.dropout_key
            )
            step += 1
            tokens = model.count_tokens(local_batch) * partitioner.data_layout.num_shards
            self.writer.train_step(step, metrics, examples=self.batch_size, tokens=tokens)
            stopping = stop.stop_requested(step)
            evaluating = (step % eval_period == 0 or step == final_step) and not stopping
            if evaluating or stopping or step % checkpoint_period == 0:
                self.writer.flush(step)
                checkpointer.save(step, state, force=True, iterator=position)
                saved_step = step
            if evaluating:
                self.evaluate(step, state)
            if stopping:
                logging.warning(
                    "Stopped by %s at step %d; the checkpoint is saved: rerun the same command "
                    "to resume.",
                    stop.name,
                    step,
                )
                break
        self.writer.flush(step)
        if saved_step != step:
            checkpointer.save(step, state, force=True, iterator=position)
        return state, step


def final_table(result: TrainResult) -> str:
    """The table printed at the end of a run: every eval task-metric, last and best."""
    rows = []
    for name in sorted(set(result.eval) | set(result.best)):
        best_value, best_step = result.best.get(name, (float("nan"), "-"))
        rows.append([name, result.eval.get(name, float("nan")), best_value, best_step])
    title = f"step {result.step}, {1e3 * result.seconds_per_step:.1f} ms/step" + (
        f", stopped by {result.stopped_by}" if result.stopped_by else ""
    )
    return summaries.format_table(["task/metric", "last", "best", "best step"], rows, title=title)


# --------------------------------------------------------------------------- #
# Entry points.
# --------------------------------------------------------------------------- #


def run(argv: Sequence[str]) -> TrainResult:
    """The body of `main` after flag parsing and `initialize_distributed`.

    Imports the task modules, parses gin, runs `train` and prints its final table.
    """
    if len(argv) > 1:
        raise config.ConfigError(f"Unexpected arguments: {' '.join(argv[1:])}")
    logging.get_absl_handler().addFilter(QuietLibraries())
    if jax.process_index() != 0:
        logging.set_verbosity(logging.WARNING)
    for module in _MODULE_IMPORTS.value:
        importlib.import_module(module)
    config.parse_gin(
        config.GIN_FILES.value, config.GIN_BINDINGS.value, config.GIN_SEARCH_PATHS.value
    )
    result = train(allow_config_change=_ALLOW_CONFIG_CHANGE.value)
    if jax.process_index() == 0:
        print(final_table(result), flush=True)
    return result


def exit_status(result: TrainResult) -> int:
    """The command's exit status: 0 when the run finished; 128 + N when signal N stopped it.

    A stopped run saved a checkpoint: rerun the same command to resume (SIGTERM
    gives 143, SIGINT 130, as a shell reports a process a signal ended). Invalid
    input exits with 1 before anything is written.
    """
    return 0 if result.stopped_by is None else 128 + signal.Signals[result.stopped_by].value


def _main(argv: Sequence[str]) -> None:
    # Before anything else touches JAX: joining a cluster needs an uninitialized backend.
    partitioning.initialize_distributed(
        _COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value, _PROCESS_ID.value
    )
    try:
        result = run(argv)
    except config.ConfigError as error:
        sys.exit(f"error: {error.message}")
    sys.exit(exit_status(result))


def flags_parser(usage: str) -> Callable[[Sequence[str]], list[str]]:
    """absl's flag parsing after `--gin.NAME=VALUE` rewriting, for `app.run`.

    --help prints `usage` and the gin flags (`sam_jax.config`) and this module's
    run flags, which sam_jax.train and sam_jax.reproduce share, and exits 0.
    """

    def parse(argv: Sequence[str]) -> list[str]:
        if any(arg in config.HELP_FLAGS for arg in argv[1:]):
            modules = (config, sys.modules[__name__])
            print("\n".join([usage, *(flags.FLAGS.module_help(m) for m in modules)]))
            sys.exit(0)
        try:
            return app.parse_flags_with_usage(config.rewrite_gin_args(argv))
        except config.ConfigError as error:
            sys.exit(f"error: {error.message}")

    return parse


def main() -> None:
    """The console script `sam_jax_train`: `python -m sam_jax.train` with the same flags."""
    with QuietNativeLogs():  # absl's initialisation already starts TensorFlow's devices
        app.run(_main, flags_parser=flags_parser(__doc__))


if __name__ == "__main__":
    main()

"""Landscapes and sharpness of a finished run's final checkpoint (`reproduce` analyses).

`analyze(run, analyses)` rebuilds the run's trainer from its gin files and
bindings, restores its latest checkpoint (θ₁) and its starting point θ₀ (the
pre-trained model of INITIAL_CHECKPOINT_PATH with the classifier head the
run's seed initialised, or the seed's random initialisation: what `train`
started from), and measures on a fixed evaluation set, the first
`num_examples` examples of every evaluated task's eval split (no dropout):

* 'landscape' (FSAM, Zhong et al. 2022, Figs. 4 and 5; `sam_jax.landscape`):
  the loss along θ₁ + α(θ₁ − θ₀), α ∈ linspace(−1, 1, 41) (α = −1 is θ₀,
  α = 0 is θ₁), and on a `grid_points` × `grid_points` grid of [−1, 1]²
  around θ₁ along two random filter-normalised directions (Li et al. 2018)
  drawn with `jax.random.fold_in(jax.random.key(SEED), DIRECTION_KEY_DATA)`.
  The numbers go to `landscape.json`, the plots to `landscape_interpolation.png`
  and `landscape_surface.png` (contours) in the run's directory.
* 'sharpness' (δ-SAM, Zhou et al. 2022, §4.1, §5.5 and Table 4;
  `sam_jax.sharpness`, first-order inner maxima): at θ₁,
  `clean_loss` = 1/N Σ l_i(w),
  `adversarial_loss` = L_adv = 1/N Σ_i max_{‖ε_i‖≤ρ} l_i(w + ε_i),
  `instance_sharpness` = R_inst = L_adv − clean_loss, and
  `batch_sharpness` = R_batch = max_{‖ε‖≤ρ} 1/N Σ_i (l_i(w + ε) − l_i(w)),
  one ε shared by the N examples of the evaluation set (R_batch shrinks as N
  grows; R_inst ≥ R_batch). ρ is the run's (the RHO of its SAM) unless given;
  a run without SAM, or with ASAM (whose ρ is relative to the weights), gets
  `DEFAULT_RHO`, the ρ of δ-SAM's Table 4 (which uses 0.05 for every method:
  pass `rho=0.05` to match it). `rho_source` says which.

Everything is evaluated on the run's mesh: the parameters keep their
checkpoint shardings and the evaluation set is sharded over the data axis
(replicated when the data axis does not divide its size).

Example::

  run = reproduce.grid(protocol)[0]
  reproduce.train_run(run)
  analysis.analyze(run, ("landscape", "sharpness"))
  # {'landscape': {'step': 800, 'examples': 128, 'interpolation': [...41 losses],
  #                'surface_min': ..., 'surface_at_center': ..., 'files': [...]},
  #  'sharpness': {'step': 800, 'rho': 0.05, 'rho_source': '...', 'clean_loss': ...,
  #                'adversarial_loss': ..., 'batch_sharpness': ..., 'instance_sharpness': ...,
  #                'examples': 128}}
"""

import functools
import inspect
import json
import os
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import gin
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from sam_jax import batching
from sam_jax import checkpoints
from sam_jax import config
from sam_jax import data
from sam_jax import landscape
from sam_jax import reproduce
from sam_jax import sharpness
from sam_jax import train as train_lib

DEFAULT_NUM_EXAMPLES = 64  # per evaluated task
DEFAULT_RHO = 0.05  # δ-SAM Table 4
DIRECTION_KEY_DATA = 1  # the surface's directions: fold_in(key(SEED), DIRECTION_KEY_DATA)
LANDSCAPE_FILE = "landscape.json"
INTERPOLATION_PLOT = "landscape_interpolation.png"
SURFACE_PLOT = "landscape_surface.png"


class RunParams(NamedTuple):
    """A finished run's trainer and its parameters at the start and at the end.

    Attributes:
      setup: the run's `train.TrainSetup` (trainer, mesh, shardings).
      arguments: the run's `train` arguments ({name: value}, gin's and the defaults).
      initial: θ₀, the parameters the run started from, sharded on the mesh.
      final: θ₁, the parameters of its latest checkpoint, sharded on the mesh.
      step: the step of that checkpoint.
    """

    setup: train_lib.TrainSetup
    arguments: dict[str, Any]
    initial: Any
    final: Any
    step: int


class EvaluationSet(NamedTuple):
    """The fixed examples the analyses average over.

    Attributes:
      batch: {feature: array [N, ...]}, the model's features, placed on the mesh.
      tasks: the names of the evaluated tasks it holds examples of, in order.
    """

    batch: dict[str, jax.Array]
    tasks: tuple[str, ...]


def train_arguments() -> dict[str, Any]:
    """The arguments `train.train()` gets from the current gin config: its bindings and defaults.

    Example::

      config.parse_gin(run.gin_files, run.bindings)
      train_arguments()["batch_size"]  # BATCH_SIZE
    """
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(train_lib.train).parameters.items()
    }
    return {**defaults, **gin.get_bindings(train_lib.train)}


def restore_run(run: reproduce.Run) -> RunParams:
    """Rebuilds a finished run's trainer from its gin config and restores θ₀ and θ₁.

    Raises:
      ConfigError: the run has no checkpoint (it was not trained), or its
        pre-trained checkpoint cannot be read.
    """
    config.parse_gin(run.gin_files, run.bindings)
    arguments = train_arguments()
    checkpoint_dir = os.path.join(run.model_dir, train_lib.CHECKPOINTS_SUBDIR)
    config.check(
        os.path.isdir(checkpoint_dir),
        f"{run.key}: no checkpoint in {run.model_dir}: train the run first (reproduce.train_run).",
    )
    mixture_or_task = data.get_mixture_or_task(arguments["mixture_or_task_name"])
    setup = train_lib.setup_training(
        model=arguments["model"].for_task(mixture_or_task),
        **{
            name: arguments[name]
            for name in inspect.signature(train_lib.setup_training).parameters
            if name != "model"
        },
    )
    with checkpoints.Checkpointer(checkpoint_dir, async_save=False) as checkpointer:
        step = checkpointer.latest_step()
        config.check(step is not None, f"{run.key}: no complete checkpoint in {checkpoint_dir}.")
        final = checkpointer.restore(setup.abstract_state, step=step).params
    initial = train_lib.initial_state(setup, arguments["initial_checkpoint_path"]).params
    return RunParams(setup=setup, arguments=arguments, initial=initial, final=final, step=step)


def evaluation_set(
    setup: train_lib.TrainSetup, arguments: Mapping[str, Any], num_examples: int
) -> EvaluationSet:
    """The first `num_examples` examples of every evaluated task's eval split, in one batch.

    The tasks and features are those of the run's evaluation (`data.eval_tasks`
    with the model's feature converter, `eval_split`), without the padding rows.

    Args:
      setup: the run's `train.TrainSetup` (its model and mesh).
      arguments: the run's `train_arguments()`.
      num_examples: examples per evaluated task (fewer if its split is smaller).

    Returns:
      An `EvaluationSet`, sharded over the data axis when its size allows.
    """
    name = arguments["mixture_or_task_name"]
    model = setup.trainer.model
    tasks = data.eval_tasks(
        name,
        sequence_length=arguments["sequence_length"],
        batch_size=num_examples,
        split=arguments["eval_split"],
        max_examples=num_examples,
        feature_converter=model.feature_converter(data.get_mixture_or_task(name), pack=False),
    )
    rows = [
        {feature: value[batch[data.EXAMPLE_MASK] > 0] for feature, value in batch.items()}
        for task in tasks
        for batch in task.batches
    ]
    batch = {
        feature: np.concatenate([row[feature] for row in rows])
        for feature in rows[0]
        if feature in model.features
    }
    partitioner = setup.partitioner
    size = batching.batch_size(batch)
    sharding = (
        partitioner.data_sharding()
        if size % partitioner.data_axis_size == 0
        else partitioner.replicated()
    )
    placed = {
        feature: jax.make_array_from_callback(
            value.shape, sharding, lambda index, v=value: v[index]
        )
        for feature, value in batch.items()
    }
    return EvaluationSet(batch=placed, tasks=tuple(task.name for task in tasks))


def run_rho(arguments: Mapping[str, Any], step: int) -> tuple[float, str]:
    """(ρ, where it comes from): the RHO of the run's SAM at `step`, else `DEFAULT_RHO`."""
    sam = arguments["sam"]
    if sam is None:
        return DEFAULT_RHO, "default: the run has no SAM"
    name = getattr(sam, "__name__", repr(sam))
    bound = {
        **{n: p.default for n, p in inspect.signature(sam).parameters.items()},
        **gin.get_bindings(sam),
    }
    if bound.get("adaptive"):
        return DEFAULT_RHO, f"default: the run's {name} is adaptive (ASAM), its ρ is not a radius"
    config.check("rho" in bound, f"the run's SAM {name} has no rho: pass analyze(..., rho=...).")
    rho = bound["rho"]
    rho = float(rho(step)) if callable(rho) else float(rho)
    return rho, f"run: {name}.rho"


class SharpnessMeasures(NamedTuple):
    """δ-SAM's sharpness measures at some parameters (float32 scalars; see the module)."""

    clean_loss: jax.Array
    adversarial_loss: jax.Array
    batch_sharpness: jax.Array
    instance_sharpness: jax.Array


@functools.partial(jax.jit, static_argnames=("loss_fn", "chunk_size"))
def sharpness_measures(loss_fn, params, batch, rho, chunk_size: int) -> SharpnessMeasures:
    """L_adv, R_batch and R_inst (`sam_jax.sharpness`) without dropout.

    The per-instance measures run `chunk_size` examples at a time (memory:
    `chunk_size` gradients); they equal `sharpness.adversarial_risk` and
    `sharpness.instance_sharpness` on the whole batch.

    Example::

      measures = sharpness_measures(trainer.loss_fn, params, batch, 0.05, chunk_size=16)
    """

    def example_losses(example):
        one = batching.single_example(example)
        clean = batching.per_example_losses(loss_fn, params, one, None)[0]
        return clean, sharpness.adversarial_risk(loss_fn, params, one, rho)

    size = batching.batch_size(batch)
    clean, adversarial = jax.lax.map(example_losses, batch, batch_size=min(chunk_size, size))
    clean, adversarial = clean.astype(jnp.float32), adversarial.astype(jnp.float32)
    return SharpnessMeasures(
        clean_loss=jnp.mean(clean),
        adversarial_loss=jnp.mean(adversarial),
        batch_sharpness=sharpness.batch_sharpness(loss_fn, params, batch, rho),
        instance_sharpness=jnp.mean(adversarial - clean),
    )


def _landscape(
    run: reproduce.Run,
    restored: RunParams,
    evaluation: EvaluationSet,
    grid_points: int,
    chunk_size: int,
) -> dict[str, Any]:
    """Computes, saves and plots the interpolation and the surface; returns the record."""
    loss_fn, batch = restored.setup.trainer.loss_fn, evaluation.batch
    grid = np.linspace(-1.0, 1.0, grid_points)
    direction_key = jax.random.fold_in(
        jax.random.key(restored.arguments["seed"]), DIRECTION_KEY_DATA
    )
    with restored.setup.partitioner.context():
        curve = landscape.interpolation(
            loss_fn, restored.initial, restored.final, batch, chunk_size=chunk_size
        )
        surface = landscape.surface(
            loss_fn,
            restored.final,
            batch,
            direction_key,
            xs=grid,
            ys=grid,
            chunk_size=chunk_size,
        )
    curve, surface = jax.device_get((curve, surface))
    centre = grid_points // 2
    numbers = {
        "run": run.key,
        "step": restored.step,
        "examples": batching.batch_size(batch),
        "tasks": list(evaluation.tasks),
        "alphas": curve.alphas.tolist(),
        "interpolation": curve.losses.tolist(),
        "xs": surface.xs.tolist(),
        "ys": surface.ys.tolist(),
        "surface": surface.losses.tolist(),  # [y][x]
    }
    if jax.process_index() == 0:
        with open(os.path.join(run.model_dir, LANDSCAPE_FILE), "w", encoding="utf-8") as f:
            json.dump(numbers, f)
        title = f"{run.key}, step {restored.step}"
        landscape.plot_interpolation(
            curve, os.path.join(run.model_dir, INTERPOLATION_PLOT), title=title
        )
        landscape.plot_surface(surface, os.path.join(run.model_dir, SURFACE_PLOT), title=title)
    return {
        "step": restored.step,
        "examples": numbers["examples"],
        "interpolation": numbers["interpolation"],
        "surface_min": float(surface.losses.min()),
        "surface_at_center": float(surface.losses[centre, centre]),
        "files": [LANDSCAPE_FILE, INTERPOLATION_PLOT, SURFACE_PLOT],
    }


def _sharpness(
    restored: RunParams, evaluation: EvaluationSet, rho: float | None, chunk_size: int
) -> dict[str, Any]:
    """δ-SAM's measures of θ₁ on the evaluation set; returns the record."""
    if rho is None:
        rho, source = run_rho(restored.arguments, restored.step)
    else:
        rho, source = float(rho), "argument"
    setup = restored.setup
    with setup.partitioner.context():
        measures = sharpness_measures(
            setup.trainer.loss_fn, restored.final, evaluation.batch, rho, chunk_size=chunk_size
        )
    return {
        "step": restored.step,
        "rho": rho,
        "rho_source": source,
        **{name: float(value) for name, value in measures._asdict().items()},
        "examples": batching.batch_size(evaluation.batch),
    }


def analyze(
    run: reproduce.Run,
    analyses: Sequence[str],
    *,
    num_examples: int = DEFAULT_NUM_EXAMPLES,
    grid_points: int = landscape.DEFAULT_GRID_SIZE,
    rho: float | None = None,
    chunk_size: int = landscape.DEFAULT_CHUNK_SIZE,
) -> dict[str, Any]:
    """The analyses of a finished run's final checkpoint, as a record to merge into its records.

    Args:
      run: a `reproduce.Run` that `reproduce.train_run` finished.
      analyses: any of 'landscape' and 'sharpness' (see the module docstring).
      num_examples: the evaluation set: the first `num_examples` examples of
        every evaluated task's eval split.
      grid_points: the surface's grid, `grid_points` × `grid_points` points of
        [−1, 1]² (odd, so that θ₁ is its centre; FSAM Fig. 4 uses 25).
      rho: the sharpness radius; None for the run's (see `run_rho`).
      chunk_size: landscape points, or examples of the per-instance measures,
        evaluated at once (memory: `chunk_size` copies of the parameters).

    Returns:
      {'landscape': {'step', 'examples', 'interpolation' (the losses at
      α = linspace(−1, 1, 41)), 'surface_min', 'surface_at_center', 'files'
      (written in the run's directory)}, 'sharpness': {'step', 'rho',
      'rho_source', 'clean_loss', 'adversarial_loss', 'batch_sharpness',
      'instance_sharpness', 'examples'}}, with the analyses asked for.

    Raises:
      ConfigError: an unknown analysis, a bad `num_examples` or `grid_points`,
        or a run without a checkpoint.
    """
    unknown = sorted(set(analyses) - set(reproduce.ANALYSES))
    config.check(
        not unknown, f"unknown analyses {unknown}; choose from {list(reproduce.ANALYSES)}."
    )
    config.check(
        isinstance(num_examples, int) and num_examples >= 1,
        f"num_examples must be an integer ≥ 1, got {num_examples!r}.",
    )
    config.check(
        isinstance(grid_points, int) and grid_points >= 3 and grid_points % 2 == 1,
        f"grid_points must be an odd integer ≥ 3 (θ₁ at the centre), got {grid_points!r}.",
    )
    if not analyses:
        return {}
    restored = restore_run(run)
    evaluation = evaluation_set(restored.setup, restored.arguments, num_examples)
    logging.info(
        "%s: analysing step %d on %d examples of %s.",
        run.key,
        restored.step,
        batching.batch_size(evaluation.batch),
        ", ".join(evaluation.tasks),
    )
    record = {}
    if "landscape" in analyses:
        record["landscape"] = _landscape(run, restored, evaluation, grid_points, chunk_size)
    if "sharpness" in analyses:
        record["sharpness"] = _sharpness(restored, evaluation, rho, chunk_size)
    return record

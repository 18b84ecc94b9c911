"""Experiment grids: SAM variants × seeds × data fractions × tasks, each an ordinary run.

  python -m sam_jax.reproduce                                  # the default: reproduce/demo.gin
  python -m sam_jax.reproduce --gin_file=reproduce/local.gin \\
    --gin.MODEL="'/path/to/all-MiniLM-L6-v2'" --gin.TASK_DIR="'/data/sst2'" \\
    --gin.VARIANTS="['plain', 'sam']" --gin.SEEDS="[0, 1, 2]" --gin.TRAIN_FRACTIONS="[0.1]" \\
    --gin.TRAIN_STEPS=100 --gin.OUTPUT_DIR="'/tmp/sst2_grid'"

A protocol (a gin file under gin/reproduce/, binding `reproduce.protocol`)
names the trainer's gin files, the tasks, and the grid. Every run of the grid
is `sam_jax.train.train` with those files plus the variant's `gin/sam/<name>.gin`
('plain': none) and the bindings SEED, TRAIN_FRACTION, TRAIN_STEPS and
MODEL_DIR = OUTPUT_DIR/<task>/<variant>/frac<f>/seed<s>. The runs share JAX's
compilation cache in OUTPUT_DIR/jax_cache. With `transfers`, a task's runs
start from the runs of another task (INITIAL_CHECKPOINT_PATH = their MODEL_DIR),
which the grid trains first.

After every finished run, `OUTPUT_DIR/results.json` gets one record per eval
task of the run (`RESULTS_FILE`, written atomically); a rerun skips the runs
it holds, and a run that a signal stopped resumes from its checkpoint, so an
interruption loses at most the steps since that run's last checkpoint. At the
end (and on every rerun) it writes `results.md` (mean ± std over seeds and
paired bootstrap differences against the baselines, `sam_jax.results`),
`fraction_<task>.png` and `curves_<task>_frac<f>.png`, and with `analyses`
the landscapes and sharpness of every final checkpoint (`sam_jax.analysis`).

Exit status as sam_jax.train's: 0 when the grid is done, 1 for bad input
(nothing written), 128 + N when signal N stopped a run (143 for SIGTERM): rerun
the same command to resume. `--allow_config_change` is passed to every run.
"""

if __name__ == "__main__":  # python -m sam_jax.reproduce: as the console script
    from sam_jax import errors

    errors.reproduce_script()  # checks the flags, imports this module, runs main

import contextlib
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import gin
import jax
from absl import app
from absl import flags
from absl import logging
from jax.experimental.compilation_cache import compilation_cache as compilation_cache_lib

from sam_jax import config as run_config
from sam_jax import results as results_lib
from sam_jax import summaries
from sam_jax import train as train_lib
from sam_jax.errors import ConfigError
from sam_jax.errors import one_line

DEFAULT_PROTOCOL = "reproduce/demo.gin"
RESULTS_FILE = "results.json"
REPORT_FILE = "results.md"
COMPILATION_CACHE = "jax_cache"
WALL_TIME_FILE = "reproduce_wall_seconds.json"
PLAIN = "plain"
ANALYSES = ("landscape", "sharpness")


class Protocol(NamedTuple):
    """An experiment grid; see `protocol` for the fields."""

    name: str
    run_gin_files: tuple[str, ...]
    run_bindings: dict[str, Any]
    run_overrides: dict[str, Any]
    tasks: dict[str, dict[str, Any]]
    transfers: dict[str, str]
    variants: tuple[str, ...]
    sweeps: dict[str, dict[str, tuple[Any, ...]]]
    seeds: tuple[int, ...]
    train_fractions: tuple[float, ...]
    train_steps: int
    evaluations: int | None
    output_dir: str
    baselines: tuple[str, ...]
    analyses: tuple[str, ...]


class Run(NamedTuple):
    """One run of the grid: the trainer's gin files and bindings, and where it goes.

    `key` ('sst2/sam/frac0.1/seed0') is its id in results.json and its
    directory under OUTPUT_DIR.
    """

    key: str
    task: str
    variant: str
    hyperparameters: dict[str, Any]
    seed: int
    train_fraction: float
    model_dir: str
    gin_files: tuple[str, ...]
    bindings: tuple[str, ...]


@gin.configurable(module="sam_jax.reproduce")
def protocol(
    *,
    name: str = "grid",
    run_gin_files: Sequence[str] = gin.REQUIRED,
    run_bindings: Mapping[str, Any] | None = None,
    run_overrides: Mapping[str, Any] | None = None,
    tasks: Mapping[str, Mapping[str, Any]] = gin.REQUIRED,
    transfers: Mapping[str, str] | None = None,
    variants: Sequence[str] = gin.REQUIRED,
    sweeps: Mapping[str, Mapping[str, Sequence[Any]]] | None = None,
    seeds: Sequence[int] = (0,),
    train_fractions: Sequence[float] = (1.0,),
    train_steps: int = gin.REQUIRED,
    evaluations: int | None = None,
    output_dir: str = gin.REQUIRED,
    baselines: Sequence[str] = (PLAIN, "sam"),
    analyses: Sequence[str] = (),
) -> Protocol:
    """An experiment grid, checked (bound by a gin/reproduce/*.gin file).

    Args:
      name: the protocol's name, in the report's title.
      run_gin_files: the trainer's gin files of every run (e.g.
        ['runs/finetune_encoder.gin']).
      run_bindings: {macro: value} for every run (e.g. {'INITIAL_CHECKPOINT_PATH':
        '/models/minilm'}); values are Python literals.
      run_overrides: {macro or parameter: value} applied to every run after
        everything else (RUN_OVERRIDES: e.g. {'BATCH_SIZE': 8, 'NUM_PARTITIONS': 2}).
      tasks: {label: {macro: value}}: one entry per task, its bindings (e.g.
        {'sst2': {'TASK_DIR': '/data/sst2'}}); the label names its directory. A
        task may bind its own TRAIN_STEPS (and LEARNING_RATE, ...), as FSAM's
        per-task epochs (gin/reproduce/fsam_glue.gin).
      transfers: {task: source task}: the task's runs start from the last
        checkpoint of the source's run of the same variant, sweep setting, fraction
        and seed (INITIAL_CHECKPOINT_PATH; an encoder gets a new head), as
        gin/reproduce/fsam_transfer.gin. A source comes before its tasks in `tasks`.
      variants: 'plain' or the name of a gin/sam file ('sam', 'delta_sam', 'fsam', ...).
      sweeps: {variant: {macro: [values]}}: the variant runs once per combination
        (e.g. {'delta_sam': {'RHO': [0.01, 0.05], 'ETA': [1e-4, 1e-3]}}); swept
        macros with several values are in the variant's label ('delta_sam(ETA=0.001,RHO=0.01)').
        Sweeps of variants not in `variants` are not run.
      seeds: SEED of the runs (initialisation, dropout, data order and subset).
      train_fractions: TRAIN_FRACTION of the runs, each in (0, 1].
      train_steps: TRAIN_STEPS of every run whose task does not bind its own.
      evaluations: evaluations (and checkpoints) per run, evenly spaced, the
        last at TRAIN_STEPS: binds EVAL_PERIOD and CHECKPOINT_PERIOD to
        ceil(train_steps / evaluations). None leaves them to the run's gin files.
      output_dir: where the runs, results and plots go.
      baselines: the variants the report compares every other variant against.
      analyses: any of 'landscape' (1-D interpolation from the initial to the
        final weights and a 2-D filter-normalised surface) and 'sharpness'
        (L_adv, R_batch, R_inst, δ-SAM's Table 4) of every final checkpoint.

    Returns:
      The `Protocol`.

    Raises:
      ConfigError: for the first setting that cannot run (`check_protocol`).
    """
    chosen = Protocol(
        name=name,
        run_gin_files=tuple(run_gin_files),
        run_bindings=dict(run_bindings or {}),
        run_overrides=dict(run_overrides or {}),
        tasks={label: dict(bindings) for label, bindings in tasks.items()},
        transfers=dict(transfers or {}),
        variants=tuple(variants),
        sweeps={
            v: {m: tuple(values) for m, values in s.items()} for v, s in (sweeps or {}).items()
        },
        seeds=tuple(seeds),
        train_fractions=tuple(train_fractions),
        train_steps=train_steps,
        evaluations=evaluations,
        output_dir=output_dir,
        baselines=tuple(baselines),
        analyses=tuple(analyses),
    )
    check_protocol(chosen)
    return chosen._replace(train_fractions=tuple(float(f) for f in train_fractions))


def check_protocol(protocol: Protocol) -> None:
    """ConfigError for the first setting of `protocol` that cannot run.

    An unknown variant (in `variants` or `sweeps`) or analysis, no or repeated
    seeds, a fraction outside (0, 1], TRAIN_STEPS or EVALUATIONS < 1, no tasks,
    a transfer from a task not listed before its target, an OUTPUT_DIR that is a
    file or a bucket.
    """
    run_config.check(
        bool(protocol.variants), "VARIANTS is empty: name at least one, e.g. ['plain', 'sam']."
    )
    for variant in (*protocol.variants, *protocol.sweeps):  # sweeps may name variants left out
        variant_gin_files(variant)
    seeds = protocol.seeds
    run_config.check(bool(seeds), "SEEDS is empty: give at least one seed, e.g. [0].")
    run_config.check(
        all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
        and len(set(seeds)) == len(seeds),
        f"SEEDS must be distinct integers, got {list(seeds)}.",
    )
    run_config.check(bool(protocol.train_fractions), "TRAIN_FRACTIONS is empty: e.g. [0.1].")
    for fraction in protocol.train_fractions:
        run_config.check(
            isinstance(fraction, (int, float)) and 0 < fraction <= 1,
            f"TRAIN_FRACTIONS must be in (0, 1], got {fraction!r}.",
        )
    steps, evaluations = protocol.train_steps, protocol.evaluations
    run_config.check(
        isinstance(steps, int) and steps >= 1, f"TRAIN_STEPS must be ≥ 1, got {steps!r}."
    )
    run_config.check(
        evaluations is None or (isinstance(evaluations, int) and evaluations >= 1),
        f"EVALUATIONS must be ≥ 1 (or None), got {evaluations!r}.",
    )
    unknown = sorted(set(protocol.analyses) - set(ANALYSES))
    run_config.check(not unknown, f"unknown analyses {unknown}; choose from {list(ANALYSES)}.")
    run_config.check(
        bool(protocol.tasks), "tasks is empty: the protocol must name at least one task."
    )
    _check_transfers(protocol.transfers, list(protocol.tasks))
    output_dir = protocol.output_dir
    run_config.check(
        not os.path.isfile(output_dir), f"OUTPUT_DIR {output_dir!r} is a file; give a directory."
    )
    run_config.check(
        "://" not in output_dir,
        f"OUTPUT_DIR must be a local directory, got {output_dir!r}: the grid's records, "
        "report and runs are written with local file I/O.",
    )


def _check_transfers(transfers: Mapping[str, str], tasks: Sequence[str]) -> None:
    """ConfigError unless every transfer goes from a task to a task listed after it."""
    for target, source in transfers.items():
        for label, name in ((target, "task"), (source, "source")):
            run_config.check(
                label in tasks, f"transfers: the {name} {label!r} is not one of tasks {tasks}."
            )
        run_config.check(
            tasks.index(source) < tasks.index(target),
            f"transfers: {target!r} starts from {source!r}'s runs, so {source!r} must come "
            "before it in tasks.",
        )


def variant_gin_files(variant: str) -> tuple[str, ...]:
    """() for 'plain', else ('sam/<variant>.gin',); ConfigError naming close names if absent."""
    if variant == PLAIN:
        return ()
    sam_dir = os.path.join(run_config.GIN_DIR, "sam")
    known = sorted(
        name.removesuffix(".gin") for name in os.listdir(sam_dir) if name.endswith(".gin")
    )
    if variant not in known:
        import difflib

        close = difflib.get_close_matches(variant, known, n=3)
        hint = f" Did you mean {close}?" if close else ""
        raise ConfigError(
            f"unknown variant {variant!r}: VARIANTS takes 'plain' or a gin/sam file's name "
            f"({', '.join(known)}).{hint}"
        )
    return (f"sam/{variant}.gin",)


def _settings(sweep: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """The combinations of a sweep ({macro: values}), in order."""
    settings = [{}]
    for macro, values in sweep.items():
        settings = [{**s, macro: v} for s in settings for v in values]
    return settings


def _variant_label(variant: str, setting: Mapping[str, Any], sweep: Mapping[str, Sequence]) -> str:
    """'delta_sam(ETA=0.001,RHO=0.01)': the variant and its swept macros with several values."""
    swept = [
        f"{m}={v:g}" if isinstance(v, float) else f"{m}={v}"
        for m, v in sorted(setting.items())
        if len(sweep[m]) > 1
    ]
    return f"{variant}({','.join(swept)})" if swept else variant


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "._-=," else "_" for c in label).strip("_")


def _period_bindings(evaluations: int | None, train_steps: int) -> dict[str, int]:
    if evaluations is None:
        return {}
    period = -(-train_steps // evaluations)
    return {"EVAL_PERIOD": period, "CHECKPOINT_PERIOD": period}


def _run_key(task: str, variant_label: str, fraction: float, seed: int) -> str:
    return "/".join([_slug(task), _slug(variant_label), f"frac{fraction:g}", f"seed{seed}"])


def grid(protocol: Protocol) -> list[Run]:
    """The protocol's runs: tasks × variants (× sweep settings) × fractions × seeds."""
    runs = []
    for task, task_bindings in protocol.tasks.items():
        for variant in protocol.variants:
            sweep = protocol.sweeps.get(variant, {})
            for setting, fraction, seed in itertools.product(
                _settings(sweep), protocol.train_fractions, protocol.seeds
            ):
                label = _variant_label(variant, setting, sweep)
                key = _run_key(task, label, fraction, seed)
                model_dir = os.path.join(protocol.output_dir, key)
                source = protocol.transfers.get(task)
                transfer = {}
                if source is not None:
                    source_key = _run_key(source, label, fraction, seed)
                    transfer = {
                        "INITIAL_CHECKPOINT_PATH": os.path.join(protocol.output_dir, source_key)
                    }
                steps = task_bindings.get("TRAIN_STEPS", protocol.train_steps)
                macros = {
                    **protocol.run_bindings,
                    "TRAIN_STEPS": steps,
                    **_period_bindings(protocol.evaluations, steps),
                    **task_bindings,
                    **setting,
                    "SEED": seed,
                    "TRAIN_FRACTION": fraction,
                    **protocol.run_overrides,
                    **transfer,
                    "MODEL_DIR": model_dir,
                }
                runs.append(
                    Run(
                        key=key,
                        task=task,
                        variant=label,
                        hyperparameters=dict(setting),
                        seed=seed,
                        train_fraction=fraction,
                        model_dir=model_dir,
                        gin_files=protocol.run_gin_files + variant_gin_files(variant),
                        bindings=tuple(f"{m} = {v!r}" for m, v in macros.items()),
                    )
                )
    return runs


# --------------------------------------------------------------------------- #
# results.json: the protocol and one record per (finished run, eval task).
# --------------------------------------------------------------------------- #

# Protocol fields that change what a finished run's record means: a rerun that
# changes one of them needs another OUTPUT_DIR. Variants, seeds, fractions,
# baselines and analyses may change (the grid grows or shrinks).
_RECORD_DEFINING_FIELDS = (
    "run_gin_files",
    "run_bindings",
    "run_overrides",
    "tasks",
    "transfers",
    "sweeps",
    "train_steps",
    "evaluations",
)


def _jsonable(protocol: Protocol) -> dict[str, Any]:
    return json.loads(json.dumps(protocol._asdict()))


def read_results(output_dir: str) -> dict[str, Any]:
    """{'protocol': ..., 'records': [...]} of OUTPUT_DIR, or an empty one."""
    path = os.path.join(output_dir, RESULTS_FILE)
    if not os.path.exists(path):
        return {"protocol": None, "records": []}
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        saved["records"]  # noqa: B018 (a KeyError for another file)
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(
            f"{path} is not a results file of sam_jax.reproduce ({error!r}); move it away or "
            "choose another OUTPUT_DIR."
        ) from None
    return saved


def check_same_protocol(saved: Mapping[str, Any] | None, protocol: Protocol) -> None:
    """ConfigError if OUTPUT_DIR's results were made with other record-defining settings."""
    if saved is None:
        return
    current = _jsonable(protocol)
    changed = [f for f in _RECORD_DEFINING_FIELDS if saved.get(f) != current[f]]
    if changed:
        field = changed[0]
        raise ConfigError(
            f"{os.path.join(protocol.output_dir, RESULTS_FILE)} holds runs with {field} = "
            f"{saved.get(field)!r}, not {current[field]!r}; finished runs would mix settings: "
            "choose another OUTPUT_DIR."
        )


def write_results(output_dir: str, protocol: Protocol, records: Sequence[Mapping]) -> None:
    """Writes results.json atomically (a temporary file, then a rename)."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, RESULTS_FILE)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump({"protocol": _jsonable(protocol), "records": list(records)}, f, indent=1)
    os.replace(path + ".tmp", path)


def run_records(
    run: Run, result: train_lib.TrainResult, wall_seconds: float, history: Sequence[Mapping]
) -> list[dict[str, Any]]:
    """One record per eval task of a finished run (metric names as `results.METRIC_NAMES`)."""
    final: dict[str, dict[str, float]] = {}
    best: dict[str, dict[str, float]] = {}
    best_step: dict[str, dict[str, int]] = {}
    for name, value in result.eval.items():
        task, metric = _split_metric(name)
        final.setdefault(task, {})[metric] = value
    for name, (value, step) in result.best.items():
        task, metric = _split_metric(name)
        best.setdefault(task, {})[metric] = value
        best_step.setdefault(task, {})[metric] = step
    throughput = [r["train"]["train/tokens_per_second"] for r in history if "train" in r]
    common = {
        "run": run.key,
        "variant": run.variant,
        "hyperparameters": run.hyperparameters,
        "seed": run.seed,
        "train_fraction": run.train_fraction,
        "steps": result.step,
        "wall_seconds": wall_seconds,
        "seconds_per_step": result.seconds_per_step,
        "tokens_per_second": sum(throughput) / len(throughput) if throughput else math.nan,
    }
    return [
        {
            **common,
            "task": task,
            "final": final[task],
            "best": best.get(task, {}),
            "best_step": best_step.get(task, {}),
        }
        for task in sorted(final)
    ]


def _split_metric(name: str) -> tuple[str, str]:
    """'local_sst2_frac0.1/matthews_corrcoef' -> ('local_sst2', 'mcc')."""
    from sam_jax.tasks import subsampling

    task, metric = name.rsplit("/", 1)
    return subsampling.without_train_fraction_suffix(task), results_lib.record_metric_name(metric)


# --------------------------------------------------------------------------- #
# Running the grid.
# --------------------------------------------------------------------------- #


class Stopped(Exception):
    """A signal stopped a run; its checkpoint is saved and a rerun resumes it.

    Attributes:
      result: the stopped run's `TrainResult`.
    """

    def __init__(self, message: str, result: train_lib.TrainResult):
        super().__init__(message)
        self.result = result


def _wall_time_path(run: Run) -> str:
    return os.path.join(run.model_dir, WALL_TIME_FILE)


def train_run(run: Run, allow_config_change: bool = False) -> list[dict[str, Any]]:
    """Trains one run through `train` and returns its records.

    The wall time of a resumed run includes the invocations a signal stopped.
    `allow_config_change` is `train`'s (resume a run whose config changed).

    Raises:
      Stopped: when a signal stopped the run (its checkpoint is saved).
    """
    run_config.parse_gin(run.gin_files, run.bindings)
    previous = 0.0
    if os.path.exists(_wall_time_path(run)):
        with open(_wall_time_path(run), encoding="utf-8") as f:
            previous = json.load(f)
    start = time.perf_counter()
    result = train_lib.train(allow_config_change=allow_config_change)
    wall_seconds = previous + time.perf_counter() - start
    if result.stopped_by:
        with open(_wall_time_path(run), "w", encoding="utf-8") as f:
            json.dump(wall_seconds, f)
        raise Stopped(f"{run.key} was stopped by {result.stopped_by} at step {result.step}", result)
    return run_records(run, result, wall_seconds, summaries.read_history(run.model_dir))


@contextlib.contextmanager
def compilation_cache(directory: str):
    """JAX's persistent compilation cache in `directory` while the context lasts.

    The runs of a grid share the model, so its steps and evaluation compile
    once per shape; a rerun compiles nothing.
    """
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    previous = {name: getattr(jax.config, name) for name in names}
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    compilation_cache_lib.reset_cache()  # takes the new directory even after earlier compiles
    try:
        yield
    finally:
        for name, value in previous.items():
            jax.config.update(name, value)
        compilation_cache_lib.reset_cache()


def run_grid(protocol: Protocol, allow_config_change: bool = False) -> list[dict[str, Any]]:
    """Trains the runs of the grid not yet in results.json, then writes the report.

    Returns:
      The records of the grid's runs.

    Raises:
      ConfigError: OUTPUT_DIR holds results of other record-defining settings, or
        the grid runs on more than one process (host).
      Stopped: a signal stopped a run (finished runs are recorded; rerun to resume).
    """
    run_config.check(
        jax.process_count() == 1,
        f"sam_jax.reproduce runs on one host; this is process {jax.process_index()} of "
        f"{jax.process_count()}: run the grid's runs with sam_jax.train on a pod.",
    )
    runs = grid(protocol)
    saved = read_results(protocol.output_dir)
    check_same_protocol(saved["protocol"], protocol)
    records = list(saved["records"])
    done = {record["run"] for record in records}
    with compilation_cache(os.path.join(protocol.output_dir, COMPILATION_CACHE)):
        for index, run in enumerate(runs, 1):
            if run.key in done:
                logging.info("[%d/%d] %s: done, skipped.", index, len(runs), run.key)
                continue
            logging.info("[%d/%d] %s: training.", index, len(runs), run.key)
            new = train_run(run, allow_config_change)
            if protocol.analyses:
                from sam_jax import analysis

                measured = analysis.analyze(run, protocol.analyses)
                for record in new:
                    record.update(measured)
            records.extend(new)
            write_results(protocol.output_dir, protocol, records)
    keys = {run.key for run in runs}
    chosen = [record for record in records if record["run"] in keys]
    write_report(protocol, runs, chosen)
    return chosen


def write_report(protocol: Protocol, runs: Sequence[Run], records: Sequence[Mapping]) -> str:
    """results.md, fraction_<task>.png and curves_<task>_frac<f>.png in OUTPUT_DIR."""
    seconds = sum(r["wall_seconds"] for r in {r["run"]: r for r in records}.values())
    title = (
        f"{protocol.name}: {len(runs)} runs of {protocol.train_steps} steps, "
        f"{seconds / 60:.1f} min of training in all"
    )
    report = results_lib.markdown_report(records, protocol.baselines, title=title)
    with open(os.path.join(protocol.output_dir, REPORT_FILE), "w", encoding="utf-8") as f:
        f.write(report)
    tasks = sorted({record["task"] for record in records})
    for task in tasks:
        path = os.path.join(protocol.output_dir, f"fraction_{task}.png")
        results_lib.plot_fractions(records, task, path, title=f"{protocol.name}: {task}")
        for fraction in sorted({r["train_fraction"] for r in records if r["task"] == task}):
            keys = {
                r["run"] for r in records if (r["task"], r["train_fraction"]) == (task, fraction)
            }
            histories = {
                (run.variant, run.seed): _named_as_records(summaries.read_history(run.model_dir))
                for run in runs
                if run.key in keys
            }
            path = os.path.join(protocol.output_dir, f"curves_{task}_frac{fraction:g}.png")
            results_lib.plot_curves(
                histories, task, path, title=f"{protocol.name}: {task}, fraction {fraction:g}"
            )
    return report


def _named_as_records(history: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """A history whose eval keys are named as the records' ('eval/local_sst2/mcc')."""
    renamed = []
    for record in history:
        if "eval" in record:
            names = {
                key: "/".join(_split_metric(key.removeprefix("eval/"))) for key in record["eval"]
            }
            record = {**record, "eval": {f"eval/{names[k]}": v for k, v in record["eval"].items()}}
        renamed.append(record)
    return renamed


# --------------------------------------------------------------------------- #
# Command line.
# --------------------------------------------------------------------------- #


def parse_protocol(gin_files: Sequence[str], gin_bindings: Sequence[str]) -> Protocol:
    """Parses the protocol's gin files and bindings and returns its `Protocol`."""
    run_config.parse_gin(
        gin_files or [DEFAULT_PROTOCOL],
        gin_bindings,
        root="reproduce.protocol",
    )
    try:
        return protocol()
    except TypeError as error:  # a required argument the protocol file did not bind
        raise ConfigError(f"the protocol does not bind {one_line(error)}") from None


def _main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments: {' '.join(argv[1:])}")
    logging.get_absl_handler().addFilter(train_lib.QuietLibraries())
    try:
        chosen = parse_protocol(flags.FLAGS.gin_file, flags.FLAGS.gin_bindings)
        run_grid(chosen, flags.FLAGS.allow_config_change)
    except ConfigError as error:
        sys.exit(f"error: {error.message}")
    except Stopped as stopped:
        print(f"{stopped}; its checkpoint is saved: rerun the same command to resume the grid.")
        sys.exit(train_lib.exit_status(stopped.result))
    with open(os.path.join(chosen.output_dir, REPORT_FILE), encoding="utf-8") as f:
        print(f.read())
    where = os.path.abspath(chosen.output_dir)
    print(f"Runs, {RESULTS_FILE}, {REPORT_FILE} and plots are in {where}")


def main() -> None:
    """The console script `sam_jax_reproduce`: `python -m sam_jax.reproduce`."""
    with train_lib.QuietNativeLogs():
        app.run(_main, flags_parser=train_lib.flags_parser(__doc__))


if __name__ == "__main__":
    main()

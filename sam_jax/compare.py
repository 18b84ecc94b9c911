"""The embedded default run: plain fine-tuning vs SAM, δ-SAM and FSAM on the demo mixture.

  python -m sam_jax.compare [--output_dir=DIR] [--train_steps=N] [--train_fraction=F]

trains a tiny T5.1.1 on `demo_mixture` (generated closed-book QA and NLI, held-out
validation splits) once per optimizer, each through `sam_jax.train.train` with
the same gin files, seed, data order and steps; only the gin/sam file differs.
It prints the eval metrics of every variant at the end of training and their
best over the evaluations, the training time per step and its ratio to the
plain optimizer, and writes `comparison.png` (training loss and eval metrics
against the step) in the output directory, next to one MODEL_DIR per variant.
The defaults take a few minutes on 2 idle CPU cores (133 s for the 4 runs measured).

A rerun with the same --output_dir resumes (or just reports) the variants'
runs; time per step then covers only the steps trained by that invocation.
"""

import contextlib
import os
import tempfile
import time
from collections.abc import Mapping
from collections.abc import Sequence

import jax
from absl import app
from absl import flags
from absl import logging
from jax.experimental.compilation_cache import compilation_cache as compilation_cache_lib

from sam_jax import config as run_config
from sam_jax import summaries
from sam_jax import tasks  # noqa: F401  (registers the demo tasks)
from sam_jax import train as train_lib
from sam_jax.tasks import demo

# (name, gin files and bindings added to the common ones).
VARIANTS = (
    ("plain", ()),
    ("SAM", ("--gin_file=sam/sam.gin",)),
    ("δ-SAM", ("--gin_file=sam/delta_sam.gin",)),
    ("FSAM", ("--gin_file=sam/fsam.gin",)),
)
COMMON_GIN_FILES = ("runs/finetune.gin", "models/t5_1_1/tiny.gin")
COMPARISON_PLOT = "comparison.png"
COMPILATION_CACHE = "jax_cache"

_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "Where the runs and the plot go (default: a new temporary directory)."
)
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 800, "Training steps of every variant.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Examples per step.")
_EVAL_PERIOD = flags.DEFINE_integer("eval_period", 400, "Evaluate every this many steps.")
_TRAIN_FRACTION = flags.DEFINE_float(
    "train_fraction",
    1.0,
    "Fraction of each demo task's training split to train on (1.0: all of the small splits).",
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the initialization, dropout and data order.")
_VARIANTS = flags.DEFINE_list(
    "variants", [name for name, _ in VARIANTS], "Which variants to run, by name."
)


def common_bindings(
    mixture_or_task_name: str, train_steps: int, batch_size: int, eval_period: int, seed: int
) -> list[str]:
    """The gin bindings every variant shares (tiny model, AdamW, short run)."""
    return [
        f"MIXTURE_OR_TASK_NAME = '{mixture_or_task_name}'",
        f"TRAIN_STEPS = {train_steps}",
        f"BATCH_SIZE = {batch_size}",
        f"EVAL_PERIOD = {eval_period}",
        f"CHECKPOINT_PERIOD = {eval_period}",
        f"SEED = {seed}",
        # From random weights, AdamW learns the demo tasks faster than Adafactor at 1e-3.
        "train.optimizer = @optax.adamw",
        "LEARNING_RATE = 0.003",
        "train.keep_checkpoints = 1",
    ]


def run_variant(
    name: str,
    extra: Sequence[str],
    bindings: Sequence[str],
    model_dir: str,
) -> dict:
    """Trains one variant through `train` and returns its row of the comparison."""
    gin_files = list(COMMON_GIN_FILES)
    gin_bindings = [*bindings, f"MODEL_DIR = '{model_dir}'"]
    for arg in extra:
        key, value = arg.split("=", 1)
        (gin_files if key == "--gin_file" else gin_bindings).append(value)
    run_config.parse_gin(gin_files, gin_bindings)
    logging.info("Training %s in %s.", name, model_dir)
    result = train_lib.train()
    history = summaries.read_history(model_dir)
    final = {}
    for record in history:
        if "eval" in record:
            final = {k.removeprefix("eval/"): v for k, v in record["eval"].items()}
    return {
        "name": name,
        "model_dir": model_dir,
        "final": final,
        "best": {metric: best.value for metric, best in result.best.items()},
        "seconds_per_step": result.seconds_per_step,
        "stopped_by": result.stopped_by,
        "history": history,
    }


def comparison_table(rows: Sequence[Mapping], train_steps: int, title: str) -> str:
    """Variants as rows; every task-metric (final, and best over the evals); time per step."""
    metrics = sorted({metric for row in rows for metric in row["final"]})
    plain = next((r["seconds_per_step"] for r in rows if r["name"] == "plain"), float("nan"))
    header = ["variant", *metrics, "ms/step", "× plain"]
    body = []
    for row in rows:
        cells = [row["name"]] + [row["final"].get(m, float("nan")) for m in metrics]
        seconds = row["seconds_per_step"]
        body.append([*cells, 1e3 * seconds, seconds / plain])
    best_header = ["best over evals", *metrics]
    best_body = [
        [row["name"]] + [row["best"].get(m, float("nan")) for m in metrics] for row in rows
    ]
    return "\n\n".join(
        [
            summaries.format_table(header, body, title=f"{title}: after {train_steps} steps"),
            summaries.format_table(best_header, best_body),
        ]
    )


def plot_comparison(rows: Sequence[Mapping], path: str, title: str) -> None:
    """Training loss and every eval metric against the step, one line per variant.

    The panels are the metrics of `row["final"]`; curves come from `row["history"]`.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    metrics = sorted({metric for row in rows for metric in row["final"]})
    panels = ["train loss", *metrics]
    columns = min(3, len(panels))
    rows_of_panels = -(-len(panels) // columns)
    fig, axes = plt.subplots(
        rows_of_panels, columns, figsize=(5 * columns, 3.6 * rows_of_panels), squeeze=False
    )
    for index, panel in enumerate(panels):
        ax = axes[index // columns][index % columns]
        for row in rows:
            if panel == "train loss":
                curve = summaries.train_curve(row["history"], "loss")
            else:
                curve = summaries.eval_curves(row["history"]).get(panel, [])
            if curve:
                ax.plot(
                    *zip(*curve), marker="" if panel == "train loss" else "o", label=row["name"]
                )
        ax.set(title=panel, xlabel="step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for index in range(len(panels), rows_of_panels * columns):
        axes[index // columns][index % columns].axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@contextlib.contextmanager
def compilation_cache(directory: str):
    """JAX's persistent compilation cache in `directory` while the context lasts.

    The variants share the model, so its eval and decoding functions compile
    once; a rerun in the same output directory compiles nothing.
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


def compare(
    output_dir: str,
    *,
    train_steps: int,
    batch_size: int,
    eval_period: int,
    train_fraction: float,
    seed: int,
    variants: Sequence[str],
    extra_bindings: Sequence[str] = (),
) -> list[dict]:
    """Runs the variants, prints the comparison table and writes the plot.

    Args:
      output_dir: one MODEL_DIR per variant goes here, and the plot.
      train_steps: steps of every variant.
      batch_size: examples per step.
      eval_period: evaluate (and checkpoint) every this many steps.
      train_fraction: the fraction of each demo task's training split used.
      seed: initialization, dropout and data order of every variant.
      variants: names from `VARIANTS`.
      extra_bindings: gin bindings applied after the common ones (all variants).

    Returns:
      One dict per variant: name, model_dir, final and best eval metrics,
      seconds_per_step, stopped_by, history.

    Raises:
      SystemExit: when a signal stopped a run (its checkpoint is saved).
    """
    known = dict(VARIANTS)
    unknown = [name for name in variants if name not in known]
    if unknown:
        raise run_config.ConfigError(f"Unknown variants {unknown}; choose from {list(known)}.")
    mixture = demo.register_demo_tasks(train_fraction=train_fraction, seed=seed)["mixture"]
    bindings = common_bindings(mixture, train_steps, batch_size, eval_period, seed)
    bindings += list(extra_bindings)
    start = time.perf_counter()
    rows = []
    with compilation_cache(os.path.join(output_dir, COMPILATION_CACHE)):
        for name in variants:
            rows.append(
                run_variant(name, known[name], bindings, os.path.join(output_dir, _slug(name)))
            )
            if rows[-1]["stopped_by"]:
                raise SystemExit(
                    f"{name} was stopped by {rows[-1]['stopped_by']} (checkpoint saved); rerun "
                    f"with --output_dir={output_dir} to resume the comparison."
                )
    # 'demo_cbqa_frac0.25/f1' -> 'demo_cbqa/f1': the fraction is in the title.
    suffix = mixture.removeprefix(demo.DEMO_TASK_NAMES["mixture"])
    for row in rows:
        for key in ("final", "best"):
            row[key] = {name.replace(suffix, ""): value for name, value in row[key].items()}
        for record in row["history"]:
            if "eval" in record:
                record["eval"] = {k.replace(suffix, ""): v for k, v in record["eval"].items()}
    title = (
        f"{mixture}: tiny T5.1.1, batch {batch_size}, seed {seed}, "
        f"{time.perf_counter() - start:.0f} s for {len(rows)} runs"
    )
    plot = os.path.join(output_dir, COMPARISON_PLOT)
    plot_comparison(rows, plot, title)
    print("\n" + comparison_table(rows, train_steps, title), flush=True)
    print(f"\nRuns and {COMPARISON_PLOT} are in {output_dir}", flush=True)
    return rows


def _slug(name: str) -> str:
    return name.replace("δ-", "delta_").replace("-", "_").lower()


def _main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    logging.get_absl_handler().addFilter(train_lib.QuietLibraries())
    output_dir = _OUTPUT_DIR.value or tempfile.mkdtemp(prefix="sam_jax_compare_")
    try:
        compare(
            output_dir,
            train_steps=_TRAIN_STEPS.value,
            batch_size=_BATCH_SIZE.value,
            eval_period=_EVAL_PERIOD.value,
            train_fraction=_TRAIN_FRACTION.value,
            seed=_SEED.value,
            variants=_VARIANTS.value,
        )
    except run_config.ConfigError as error:
        raise SystemExit(f"error: {error.message}") from None


def main() -> None:
    """`python -m sam_jax.compare`: the README's main command."""
    app.run(_main)


if __name__ == "__main__":
    main()

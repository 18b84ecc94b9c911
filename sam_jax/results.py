"""Results of an experiment grid: records, seed statistics, paired bootstrap, tables, plots.

`sam_jax.reproduce` writes one `Record`-shaped dict per (run, eval task) to
`results.json`; this module turns a list of them into the protocol's report:

* `summarize`: per task, data fraction and variant, the mean ± sample std of
  every metric over seeds;
* `paired_difference`: variant − baseline on the seeds both ran, with a
  percentile bootstrap 95 % confidence interval over those seeds (Efron &
  Tibshirani 1993, §13); "significant" when the interval excludes 0;
* `markdown_report`: both as markdown tables (`results.md`);
* `plot_fractions` and `plot_curves`: a metric against the training fraction
  (Bahri et al. 2022, Fig. 1; Zhong et al. 2022, Fig. 2) and the training curves.

With few seeds a bootstrap over seeds is coarse: with n seeds it has at most
C(2n − 1, n) distinct resamples (10 for n = 3), and its interval cannot be
wider than the observed differences' range. The report says how many seeds
every cell has.

Example::

  records = json.load(open("results.json"))["records"]
  print(markdown_report(records, baselines=("plain", "sam")))
"""

import math
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import numpy as np

from sam_jax import summaries

# The trainer's metric names (T5's) -> the names seqio's GLUE and the records use.
METRIC_NAMES = {
    "matthews_corrcoef": "mcc",
    "pearson_corrcoef": "pearson",
    "spearman_corrcoef": "spearman",
}
BOOTSTRAP_SAMPLES = 10_000
CONFIDENCE = 0.95
# Below 3 paired seeds a percentile bootstrap is [min, max] of the differences: no mark.
MIN_SEEDS_FOR_SIGNIFICANCE = 3


def record_metric_name(name: str) -> str:
    """'matthews_corrcoef' -> 'mcc' (and Pearson, Spearman); other names unchanged."""
    return METRIC_NAMES.get(name, name)


class Summary(NamedTuple):
    """Mean and sample standard deviation of one metric over seeds."""

    mean: float
    std: float
    count: int


class Difference(NamedTuple):
    """A paired difference, variant − baseline, over the seeds both ran.

    Attributes:
      mean: the mean of the per-seed differences.
      low, high: the percentile bootstrap confidence interval of that mean.
      count: the number of paired seeds.
      significant: the interval excludes 0, with at least `MIN_SEEDS_FOR_SIGNIFICANCE`
        paired seeds.
    """

    mean: float
    low: float
    high: float
    count: int
    significant: bool


def summarize_values(values: Sequence[float]) -> Summary:
    """Mean ± sample std (ddof 1; NaN std for one value)."""
    values = np.asarray(values, dtype=np.float64)
    std = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
    return Summary(float(np.mean(values)), std, len(values))


def bootstrap_interval(
    differences: Sequence[float],
    *,
    samples: int = BOOTSTRAP_SAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `differences`.

    Resamples the differences with replacement `samples` times (deterministic
    in `seed`) and returns the (1 − confidence)/2 and (1 + confidence)/2
    quantiles of the resampled means.
    """
    differences = np.asarray(differences, dtype=np.float64)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(differences), size=(samples, len(differences)))
    means = differences[picks].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def paired_difference(
    variant: Mapping[int, float], baseline: Mapping[int, float], **bootstrap
) -> Difference | None:
    """variant − baseline on the seeds in both ({seed: value} each); None if none are."""
    seeds = sorted(set(variant) & set(baseline))
    if not seeds:
        return None
    differences = [variant[seed] - baseline[seed] for seed in seeds]
    low, high = bootstrap_interval(differences, **bootstrap)
    significant = len(seeds) >= MIN_SEEDS_FOR_SIGNIFICANCE and (low > 0 or high < 0)
    return Difference(float(np.mean(differences)), low, high, len(seeds), significant)


def _cell_key(record: Mapping[str, Any]) -> tuple[str, float]:
    return record["task"], record["train_fraction"]


def per_seed(
    records: Iterable[Mapping[str, Any]], task: str, fraction: float, variant: str, metric: str
) -> dict[int, float]:
    """{seed: final metric} of one variant in one (task, fraction) cell."""
    return {
        r["seed"]: r["final"][metric]
        for r in records
        if _cell_key(r) == (task, fraction) and r["variant"] == variant and metric in r["final"]
    }


def cells(records: Sequence[Mapping[str, Any]]) -> list[tuple[str, float]]:
    """The (task, train_fraction) pairs of the records, sorted."""
    return sorted({_cell_key(r) for r in records})


def variants_in(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The variants in the order they first appear."""
    return list(dict.fromkeys(r["variant"] for r in records))


def metrics_in(records: Sequence[Mapping[str, Any]], task: str) -> list[str]:
    """The task's metrics, sorted, the eval loss last."""
    names = {m for r in records if r["task"] == task for m in r["final"]}
    return sorted(names - {"loss"}) + (["loss"] if "loss" in names else [])


def _format(summary: Summary) -> str:
    if math.isnan(summary.std):
        return f"{summary.mean:.2f}"
    return f"{summary.mean:.2f} ± {summary.std:.2f}"


def _format_difference(difference: Difference | None) -> str:
    if difference is None:
        return "–"
    mark = " *" if difference.significant else ""
    return f"{difference.mean:+.2f} [{difference.low:+.2f}, {difference.high:+.2f}]{mark}"


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _cell_report(
    records: Sequence[Mapping[str, Any]], task: str, fraction: float, baselines: Sequence[str]
) -> list[str]:
    """The summary table and the paired-difference tables of one (task, fraction)."""
    metrics = metrics_in(records, task)
    variants = [v for v in variants_in(records) if per_seed(records, task, fraction, v, metrics[0])]
    rows = []
    for variant in variants:
        chosen = [
            r for r in records if _cell_key(r) == (task, fraction) and r["variant"] == variant
        ]
        seconds = summarize_values([r["seconds_per_step"] for r in chosen])
        row = [variant, str(len(chosen))]
        for metric in metrics:
            row.append(
                _format(
                    summarize_values(
                        list(per_seed(records, task, fraction, variant, metric).values())
                    )
                )
            )
        rows.append([*row, f"{1e3 * seconds.mean:.0f}"])
    lines = [f"### {task}, train fraction {fraction:g}", ""]
    lines += _markdown_table(["variant", "seeds", *metrics, "ms/step"], rows)
    lines += _sharpness_table(records, task, fraction, variants)
    compared = [b for b in baselines if b in variants]
    for index, baseline in enumerate(compared):
        diff_rows = []
        for variant in variants:
            if variant in compared[: index + 1]:  # itself, and the earlier baselines' rows
                continue
            diffs = [
                paired_difference(
                    per_seed(records, task, fraction, variant, metric),
                    per_seed(records, task, fraction, baseline, metric),
                )
                for metric in metrics
            ]
            diff_rows.append([variant, *map(_format_difference, diffs)])
        if diff_rows:
            lines += ["", f"Paired difference against {baseline} (same seeds):", ""]
            lines += _markdown_table(["variant", *metrics], diff_rows)
    return lines


SHARPNESS_MEASURES = (
    ("clean_loss", "loss"),
    ("adversarial_loss", "L_adv"),
    ("batch_sharpness", "R_batch"),
    ("instance_sharpness", "R_inst"),
)


def _sharpness_table(
    records: Sequence[Mapping[str, Any]], task: str, fraction: float, variants: Sequence[str]
) -> list[str]:
    """δ-SAM's Table 4 of the final checkpoints (records with a 'sharpness' analysis)."""
    rows = []
    for variant in variants:
        measured = [
            r["sharpness"]
            for r in records
            if _cell_key(r) == (task, fraction) and r["variant"] == variant and "sharpness" in r
        ]
        if measured:
            cells = [
                _format(summarize_values([m[key] for m in measured]))
                for key, _ in SHARPNESS_MEASURES
            ]
            rho = sorted({m["rho"] for m in measured})
            rows.append([variant, ", ".join(f"{r:g}" for r in rho), *cells])
    if not rows:
        return []
    header = ["variant", "ρ", *(name for _, name in SHARPNESS_MEASURES)]
    return [
        "",
        "Sharpness of the final checkpoints (δ-SAM Table 4), mean ± std over seeds:",
        "",
    ] + (_markdown_table(header, rows))


def markdown_report(
    records: Sequence[Mapping[str, Any]],
    baselines: Sequence[str] = ("plain", "sam"),
    title: str = "",
) -> str:
    """`results.md`: per task and fraction, mean ± std over seeds and paired differences.

    Args:
      records: the `results.json` records (task, train_fraction, variant, seed,
        final, seconds_per_step).
      baselines: the variants every other variant is compared against.
      title: the report's heading.

    Returns:
      Markdown: a table of mean ± std (sample std over seeds) per metric and
      variant, then per baseline the paired differences with their 95 %
      percentile bootstrap intervals over seeds, '*' where it excludes 0.
    """
    lines = [f"# {title or 'Results'}", ""]
    lines += [
        "Final eval metrics (percent), mean ± sample std over seeds. Differences: "
        "variant − baseline on the same seeds, mean [95 % percentile bootstrap interval "
        f"over seeds, {BOOTSTRAP_SAMPLES} resamples]; * = the interval excludes 0 (marked "
        f"only with ≥ {MIN_SEEDS_FOR_SIGNIFICANCE} seeds). With 3 seeds the bootstrap has at "
        "most 10 distinct resamples: read the intervals as coarse.",
        "",
    ]
    for task, fraction in cells(records):
        lines += _cell_report(records, task, fraction, baselines) + [""]
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def plot_fractions(
    records: Sequence[Mapping[str, Any]], task: str, path: str, title: str = ""
) -> None:
    """A PNG with one panel per metric: mean ± std over seeds against the train fraction."""
    plt = _pyplot()
    metrics = [m for m in metrics_in(records, task) if m != "loss"] or ["loss"]
    fractions = sorted({r["train_fraction"] for r in records if r["task"] == task})
    fig, axes = plt.subplots(
        1, len(metrics), figsize=(max(5 * len(metrics), 9), 3.8), squeeze=False
    )
    for ax, metric in zip(axes[0], metrics):
        for variant in variants_in(records):
            points = [
                (f, summarize_values(list(values.values())))
                for f in fractions
                if (values := per_seed(records, task, f, variant, metric))
            ]
            if points:
                xs = [f for f, _ in points]
                ax.errorbar(
                    xs,
                    [s.mean for _, s in points],
                    yerr=[0.0 if math.isnan(s.std) else s.std for _, s in points],
                    marker="o",
                    capsize=3,
                    label=variant,
                )
        ax.set(title=f"{task} {metric}", xlabel="train fraction", ylabel=metric)
        if len(fractions) > 1:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _mean_curve(curves: Sequence[Sequence[tuple[int, float]]]) -> list[tuple[int, float]]:
    """The mean over runs at the steps all of them have."""
    by_step: dict[int, list[float]] = {}
    for curve in curves:
        for step, value in curve:
            by_step.setdefault(step, []).append(value)
    return [(s, float(np.mean(v))) for s, v in sorted(by_step.items()) if len(v) == len(curves)]


def plot_curves(
    histories: Mapping[tuple[str, int], Sequence[Mapping[str, Any]]],
    task: str,
    path: str,
    title: str = "",
) -> None:
    """A PNG of training loss and every eval metric of `task` against the step.

    Args:
      histories: {(variant, seed): the run's history (`summaries.read_history`)}.
      task: the eval task whose metrics are plotted ('local_sst2' for the
        history's eval keys 'local_sst2/accuracy', ...: named as the records).
      path: the PNG to write.
      title: the figure's title.

    Every line is a variant's mean over its seeds.
    """
    plt = _pyplot()
    variants = list(dict.fromkeys(variant for variant, _ in histories))
    eval_names = sorted(
        {
            name
            for history in histories.values()
            for name in summaries.eval_curves(history)
            if name.split("/")[0] == task
        }
    )
    panels = ["train loss", *eval_names]
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(max(5 * columns, 9), 3.6 * rows), squeeze=False
    )
    for index, panel in enumerate(panels):
        ax = axes[index // columns][index % columns]
        for variant in variants:
            runs = [h for (v, _), h in histories.items() if v == variant]
            if panel == "train loss":
                curve = _mean_curve([summaries.train_curve(h, "loss") for h in runs])
            else:
                curve = _mean_curve([summaries.eval_curves(h).get(panel, []) for h in runs])
            if curve:
                ax.plot(*zip(*curve), marker="" if panel == "train loss" else "o", label=variant)
        ax.set(title=panel, xlabel="step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    for index in range(len(panels), rows * columns):
        axes[index // columns][index % columns].axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

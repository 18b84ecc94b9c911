"""What a training run reports: TensorBoard scalars, a history, a progress bar, tables, plots.

Process 0 of a run writes, in MODEL_DIR:

* TensorBoard event files (`clu.metric_writers`, as T5X): `train/...` scalars
  every `log_period` steps (means over the steps since the last write) and
  `eval/<task>/<metric>` scalars at every evaluation;
* `metrics.jsonl`, the same values one JSON object per line, so that a resumed
  run's curves include the steps before the restart (lines past the restored
  step, from after the last checkpoint of an interrupted run, are dropped);
* `curves.png`, the training loss and the eval metrics against the step.

Example::

  with Summaries(model_dir, total_steps=300, start_step=0) as summaries:
      for step in range(1, 301):
          state, metrics = train_step(state, batch, key)
          summaries.train_step(step, metrics, examples=128, tokens=10_000)
      summaries.eval(300, {"demo_nli/accuracy": 61.0})
  plot_history(read_history(model_dir), os.path.join(model_dir, "curves.png"))
"""

import contextlib
import json
import math
import os
import time
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

HISTORY_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"


def read_history(model_dir: str) -> list[dict[str, Any]]:
    """The records of `metrics.jsonl`: dicts with `step` and `train` or `eval` scalars."""
    path = os.path.join(model_dir, HISTORY_FILE)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_history(model_dir: str, last_step: int) -> None:
    """Drops the history records of steps after `last_step` (a resumed run redoes them)."""
    path = os.path.join(model_dir, HISTORY_FILE)
    records = [r for r in read_history(model_dir) if r["step"] <= last_step]
    if os.path.exists(path):
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)


class Summaries:
    """A run's progress output; everything is a no-op unless `enabled` (process 0).

    Attributes:
      model_dir: where the event files, history and plot go.
      train_seconds: wall time of the training steps since the first one (which
        includes compilation), evaluations excluded.
      timed_steps: the steps `train_seconds` covers.
    """

    def __init__(
        self,
        model_dir: str,
        *,
        total_steps: int,
        start_step: int,
        enabled: bool = True,
        log_period: int = 10,
        progress_bar: bool = True,
    ):
        """Opens the writers.

        Args:
          model_dir: the run's directory (it exists).
          total_steps: the run's last step, for the progress bar's ETA.
          start_step: the step the run starts (or resumes) from.
          enabled: write anything at all (False on processes other than 0).
          log_period: write training scalars every this many steps.
          progress_bar: show a tqdm progress bar on stderr.
        """
        self.model_dir = model_dir
        self.enabled = enabled
        self.log_period = max(1, log_period)
        self.train_seconds = 0.0
        self.timed_steps = 0
        self._pending: list[Mapping[str, jax.Array]] = []
        self._examples = 0
        self._tokens = 0
        self._interval_start = time.perf_counter()
        self._timer_start: float | None = None
        self._writer = None
        self._bar = None
        if not enabled:
            return
        from clu import metric_writers
        from tqdm import tqdm

        truncate_history(model_dir, start_step)
        self._writer = metric_writers.SummaryWriter(model_dir)
        self._bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=not progress_bar,
        )

    def __enter__(self) -> "Summaries":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _append_history(self, record: dict[str, Any]) -> None:
        with open(os.path.join(self.model_dir, HISTORY_FILE), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def train_step(
        self, step: int, metrics: Mapping[str, jax.Array], *, examples: int, tokens: int
    ) -> None:
        """Records a finished step (`step` = steps done so far) and its metrics.

        Device metrics are only fetched every `log_period` steps, so the host
        does not wait for every step.

        Args:
          step: the number of steps done, i.e. the step the metrics lead to.
          metrics: the step's scalar metrics (device arrays).
          examples: examples in the step's global batch.
          tokens: non-padding tokens in the step's batch.
        """
        if not self.enabled:
            return
        if self._timer_start is None:  # the first step compiles: time from its end
            jax.block_until_ready(metrics)
            self._timer_start = time.perf_counter()
            self._interval_start = self._timer_start
        else:
            self.timed_steps += 1
        self._pending.append(metrics)
        self._examples += examples
        self._tokens += tokens
        self._bar.update(1)
        if step % self.log_period == 0:
            self.flush(step)

    def flush(self, step: int) -> None:
        """Writes the mean training metrics since the last write, with throughput."""
        if not self.enabled or not self._pending:
            return
        fetched = jax.device_get(self._pending)
        now = time.perf_counter()
        elapsed = max(now - self._interval_start, 1e-9)
        scalars = {
            f"train/{name}": float(np.mean([m[name] for m in fetched])) for name in fetched[0]
        }
        scalars["train/examples_per_second"] = self._examples / elapsed
        scalars["train/tokens_per_second"] = self._tokens / elapsed
        scalars["train/seconds_per_step"] = elapsed / len(fetched)
        self._writer.write_scalars(step, scalars)
        self._append_history({"step": step, "train": scalars})
        self._bar.set_postfix(loss=f"{scalars['train/loss']:.4f}", refresh=False)
        self._pending, self._examples, self._tokens = [], 0, 0
        self._interval_start = now

    @contextlib.contextmanager
    def paused(self):
        """Excludes what runs inside (evaluation) from the step timings.

        The progress bar is cleared meanwhile, so that what is logged inside
        starts a line of its own; it is redrawn after.
        """
        if self.enabled and self._timer_start is not None:
            jax.block_until_ready(self._pending)
        if self._bar is not None:
            self._bar.clear()
        start = time.perf_counter()
        try:
            yield
        finally:
            excluded = time.perf_counter() - start
            self._interval_start += excluded
            if self._timer_start is not None:
                self._timer_start += excluded
            if self._bar is not None:
                self._bar.refresh()

    def eval(self, step: int, metrics: Mapping[str, float]) -> None:
        """Writes eval scalars named '<task>/<metric>' (stored as 'eval/<task>/<metric>')."""
        if not self.enabled:
            return
        scalars = {f"eval/{name}": float(value) for name, value in metrics.items()}
        self._writer.write_scalars(step, scalars)
        self._append_history({"step": step, "eval": scalars})

    def seconds_per_step(self) -> float:
        """Mean wall time per training step after the first (NaN if fewer than two)."""
        if self._timer_start is None or self.timed_steps == 0:
            return math.nan
        return self.train_seconds / self.timed_steps

    def close(self) -> None:
        """Flushes the writers and closes the progress bar."""
        if not self.enabled:
            return
        if self._timer_start is not None:
            jax.block_until_ready(self._pending)
            self.train_seconds = time.perf_counter() - self._timer_start
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> str:
    """A plain-text table: floats with 4 decimals, columns aligned.

    Example::

      print(format_table(["task", "accuracy"], [["demo_nli", 61.0]]))
    """

    def cell(value):
        if isinstance(value, float):
            return "-" if math.isnan(value) else f"{value:.4f}"
        return str(value)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(header)]
    lines = [title] if title else []
    lines.append(
        "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths))
        )
    )
    lines.append("  ".join("-" * w for w in widths))
    for row in cells:
        lines.append(
            "  ".join(
                v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))
            )
        )
    return "\n".join(lines)


def eval_curves(history: Sequence[Mapping[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """{'<task>/<metric>': [(step, value), ...]} from a history's eval records."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for record in history:
        for name, value in record.get("eval", {}).items():
            curves.setdefault(name.removeprefix("eval/"), []).append((record["step"], value))
    return curves


def train_curve(
    history: Sequence[Mapping[str, Any]], name: str = "loss"
) -> list[tuple[int, float]]:
    """[(step, value)] of a training scalar (e.g. 'loss', 'sam/perturbed_loss')."""
    key = f"train/{name}"
    return [(r["step"], r["train"][key]) for r in history if key in r.get("train", {})]


def plot_history(history: Sequence[Mapping[str, Any]], path: str, title: str = "") -> None:
    """Saves a PNG: training (and eval) losses on the left, eval metrics on the right."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, (loss_axes, metric_axes) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, label in (("loss", "train loss"), ("sam/perturbed_loss", "train loss at w+ε")):
        curve = train_curve(history, name)
        if curve:
            loss_axes.plot(*zip(*curve), label=label)
    for name, curve in sorted(eval_curves(history).items()):
        axes = loss_axes if name.endswith("/loss") else metric_axes
        axes.plot(
            *zip(*curve), marker="o", linestyle="--" if axes is loss_axes else "-", label=name
        )
    loss_axes.set(xlabel="step", ylabel="loss", title="loss")
    metric_axes.set(xlabel="step", ylabel="value", title="eval metrics")
    for axes in (loss_axes, metric_axes):
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize="small")
        axes.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

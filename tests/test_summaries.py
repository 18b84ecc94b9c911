"""Tests of a run's reporting (sam_jax.summaries): TensorBoard, history, tables, plots."""

import glob
import math
import os

import jax.numpy as jnp
import pytest

from sam_jax import summaries

pytest.importorskip("clu")
tf = pytest.importorskip("tensorflow")


def _scalars(event_dir):
    """{tag: [(step, value)]} read back from TensorBoard event files."""
    values = {}
    for path in sorted(glob.glob(os.path.join(event_dir, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                number = (
                    float(tf.make_ndarray(value.tensor))
                    if value.HasField("tensor")
                    else value.simple_value
                )
                values.setdefault(value.tag, []).append((event.step, number))
    return values


def _run(model_dir, start_step, steps, losses, log_period=2, evals=()):
    with summaries.Summaries(
        model_dir,
        total_steps=steps,
        start_step=start_step,
        log_period=log_period,
        progress_bar=False,
    ) as writer:
        for step in range(start_step + 1, steps + 1):
            metrics = {
                "loss": jnp.float32(losses[step - 1]),
                "sam/perturbed_loss": jnp.float32(2.0),
            }
            writer.train_step(step, metrics, examples=4, tokens=40)
            for eval_step, values in evals:
                if eval_step == step:
                    with writer.paused():
                        writer.eval(step, values)
        writer.flush(steps)
    return writer


def test_training_scalars_are_means_over_the_log_period(tmp_path):
    model_dir = str(tmp_path)
    writer = _run(
        model_dir, 0, 5, [1.0, 2.0, 3.0, 4.0, 5.0], evals=[(4, {"demo_nli/accuracy": 0.5})]
    )
    history = summaries.read_history(model_dir)
    train = [(r["step"], r["train"]["train/loss"]) for r in history if "train" in r]
    assert train == [(2, 1.5), (4, 3.5), (5, 5.0)]
    assert [r["eval"] for r in history if "eval" in r] == [{"eval/demo_nli/accuracy": 0.5}]
    record = history[0]["train"]
    assert record["train/sam/perturbed_loss"] == 2.0
    assert record["train/examples_per_second"] > 0 and record["train/tokens_per_second"] > 0
    scalars = _scalars(model_dir)
    assert scalars["train/loss"] == [(2, 1.5), (4, 3.5), (5, 5.0)]
    assert scalars["eval/demo_nli/accuracy"] == [(4, 0.5)]
    # Steps after the first (which compiles) are timed.
    assert writer.timed_steps == 4 and writer.seconds_per_step() > 0


def test_a_resumed_run_drops_the_history_after_its_checkpoint(tmp_path):
    model_dir = str(tmp_path)
    _run(model_dir, 0, 6, [1.0] * 6)
    _run(model_dir, 4, 6, [9.0] * 6)  # resumed from the checkpoint of step 4
    history = summaries.read_history(model_dir)
    assert [(r["step"], r["train"]["train/loss"]) for r in history] == [
        (2, 1.0),
        (4, 1.0),
        (6, 9.0),
    ]


def test_a_disabled_writer_writes_nothing(tmp_path):
    writer = summaries.Summaries(str(tmp_path), total_steps=3, start_step=0, enabled=False)
    writer.train_step(1, {"loss": jnp.float32(1.0)}, examples=1, tokens=1)
    writer.eval(1, {"demo_nli/accuracy": 1.0})
    writer.close()
    assert os.listdir(tmp_path) == []
    assert math.isnan(writer.seconds_per_step())


def test_plot_history_writes_a_png(tmp_path):
    model_dir = str(tmp_path)
    _run(
        model_dir,
        0,
        4,
        [3.0, 2.0, 1.5, 1.0],
        evals=[(2, {"t/loss": 2.5, "t/accuracy": 0.4}), (4, {"t/loss": 2.0, "t/accuracy": 0.6})],
    )
    path = os.path.join(model_dir, summaries.CURVES_FILE)
    summaries.plot_history(summaries.read_history(model_dir), path, title="test")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert summaries.eval_curves(summaries.read_history(model_dir)) == {
        "t/accuracy": [(2, 0.4), (4, 0.6)],
        "t/loss": [(2, 2.5), (4, 2.0)],
    }


def test_format_table_aligns_columns():
    table = summaries.format_table(
        ["variant", "accuracy", "ms/step"],
        [["plain", 0.5, 12.0], ["δ-SAM", float("nan"), 30.25]],
        title="T",
    )
    assert table.splitlines() == [
        "T",
        "variant  accuracy  ms/step",
        "-------  --------  -------",
        "plain      0.5000  12.0000",
        "δ-SAM           -  30.2500",
    ]

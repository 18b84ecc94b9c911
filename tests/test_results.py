"""Tests of sam_jax.results: seed statistics, the paired bootstrap, the report and plots."""

import math

import numpy as np
import pytest

from sam_jax import results


def record(task, fraction, variant, seed, **final):
    return {
        "task": task,
        "train_fraction": fraction,
        "variant": variant,
        "seed": seed,
        "final": final,
        "seconds_per_step": 0.5,
    }


def test_metric_names_follow_glue():
    assert [
        results.record_metric_name(n)
        for n in (
            "matthews_corrcoef",
            "pearson_corrcoef",
            "spearman_corrcoef",
            "accuracy",
            "f1",
            "loss",
        )
    ] == ["mcc", "pearson", "spearman", "accuracy", "f1", "loss"]


def test_summary_is_mean_and_sample_std():
    summary = results.summarize_values([1.0, 2.0, 4.0])
    assert summary.mean == pytest.approx(7 / 3)
    # Sample variance: sum of squared deviations / (n - 1).
    deviations = np.array([1.0, 2.0, 4.0]) - 7 / 3
    assert summary.std == pytest.approx(math.sqrt(np.sum(deviations**2) / 2))
    assert summary.count == 3
    assert math.isnan(results.summarize_values([5.0]).std)


def test_bootstrap_interval_matches_the_normal_interval_for_many_seeds():
    """For n = 400 normal differences the percentile bootstrap of the mean is ≈ mean ± 1.96 s/√n."""
    rng = np.random.default_rng(1)
    differences = rng.normal(0.3, 2.0, size=400)
    low, high = results.bootstrap_interval(differences, samples=20_000)
    half_width = 1.96 * np.std(differences, ddof=1) / np.sqrt(len(differences))
    assert low == pytest.approx(np.mean(differences) - half_width, abs=0.03)
    assert high == pytest.approx(np.mean(differences) + half_width, abs=0.03)


def test_bootstrap_interval_is_deterministic_and_within_the_range():
    differences = [0.5, 1.5, -0.2]
    first = results.bootstrap_interval(differences, seed=3)
    assert first == results.bootstrap_interval(differences, seed=3)
    assert min(differences) - 1e-12 <= first[0] <= first[1] <= max(differences) + 1e-12
    assert results.bootstrap_interval([2.0, 2.0, 2.0]) == pytest.approx((2.0, 2.0))


def test_paired_difference_uses_only_shared_seeds():
    variant = {0: 80.0, 1: 82.0, 2: 81.0, 7: 99.0}
    baseline = {0: 79.0, 1: 80.0, 2: 80.5, 5: 10.0}
    difference = results.paired_difference(variant, baseline)
    assert difference.count == 3
    assert difference.mean == pytest.approx(np.mean([1.0, 2.0, 0.5]))
    assert difference.low > 0 and difference.significant
    assert results.paired_difference({1: 1.0}, {2: 1.0}) is None


def test_significance_needs_three_seeds_and_an_interval_excluding_zero():
    two = results.paired_difference({0: 3.0, 1: 4.0}, {0: 1.0, 1: 1.0})
    assert two.low > 0 and not two.significant  # two seeds: never marked
    mixed = results.paired_difference({0: 3.0, 1: -4.0, 2: 1.0}, {0: 0.0, 1: 0.0, 2: 0.0})
    assert mixed.low < 0 < mixed.high and not mixed.significant


RECORDS = [
    record("local_sst2", 0.1, variant, seed, accuracy=acc, loss=1.0)
    for variant, accs in (
        ("plain", (80.0, 81.0, 82.0)),
        ("sam", (82.0, 83.0, 84.5)),
        ("fsam", (79.0, 81.0, 83.0)),
    )
    for seed, acc in enumerate(accs)
]


def test_report_has_summaries_and_paired_differences_against_each_baseline():
    report = results.markdown_report(RECORDS, baselines=("plain", "sam"), title="grid")
    lines = report.splitlines()
    assert lines[0] == "# grid"
    assert "### local_sst2, train fraction 0.1" in lines
    assert "| plain | 3 | 81.00 ± 1.00 | 1.00 ± 0.00 | 500 |" in lines
    # sam − plain = +2, +2, +2.5 on seeds 0, 1, 2: every resample is > 0, so it is marked.
    sam_row = next(line for line in lines if line.startswith("| sam | +"))
    assert sam_row.startswith("| sam | +2.17 [+2.00, +2.50] *")
    against_sam = lines[lines.index("Paired difference against sam (same seeds):") :]
    rows = [line for line in against_sam if line.startswith("| ") and "variant" not in line]
    # Against SAM: only fsam (plain's row is the negation of the table above).
    assert [row.split(" | ")[0] for row in rows] == ["| fsam"]
    assert rows[0].startswith("| fsam | -2.17")


def test_plots_are_pngs(tmp_path):
    results.plot_fractions(
        RECORDS + [record("local_sst2", 0.5, "plain", 0, accuracy=90.0, loss=0.5)],
        "local_sst2",
        str(tmp_path / "fractions.png"),
    )
    history = [
        {"step": 1, "train": {"train/loss": 1.0}},
        {
            "step": 2,
            "train": {"train/loss": 0.5},
            "eval": {"eval/local_sst2/accuracy": 70.0},
        },
    ]
    results.plot_curves(
        {("plain", 0): history, ("sam", 0): history}, "local_sst2", str(tmp_path / "curves.png")
    )
    for name in ("fractions.png", "curves.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_has_the_sharpness_table_when_measured():
    measured = [
        {
            **r,
            "sharpness": {
                "rho": 0.05,
                "clean_loss": 0.5,
                "adversarial_loss": 0.7 + r["seed"],
                "batch_sharpness": 0.1,
                "instance_sharpness": 0.2,
            },
        }
        for r in RECORDS
    ]
    report = results.markdown_report(measured)
    assert "Sharpness of the final checkpoints (δ-SAM Table 4)" in report
    assert "| variant | ρ | loss | L_adv | R_batch | R_inst |" in report
    # L_adv over seeds 0, 1, 2: 0.7, 1.7, 2.7 -> 1.70 ± 1.00.
    assert "| plain | 0.05 | 0.50 ± 0.00 | 1.70 ± 1.00 | 0.10 ± 0.00 | 0.20 ± 0.00 |" in report
    assert "Sharpness" not in results.markdown_report(RECORDS)

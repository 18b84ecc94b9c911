"""Tests of the embedded default comparison (sam_jax.compare), on a shortened run."""

import os

import pytest

pytest.importorskip("seqio")

from sam_jax import compare  # noqa: E402
from sam_jax.tasks import registry  # noqa: E402

# One layer each way and 3 steps: the default run's code path, in seconds.
SHORT = dict(train_steps=3, batch_size=8, eval_period=2, train_fraction=0.05, seed=0)
ONE_LAYER = [
    "t5_1_1_config.num_encoder_layers = 1",
    "t5_1_1_config.num_decoder_layers = 1",
    "train.max_eval_examples = 16",
]


@pytest.fixture(scope="module")
def short_comparison(tmp_path_factory):
    output_dir = str(tmp_path_factory.mktemp("compare"))
    rows = compare.compare(output_dir, variants=["plain", "SAM"], extra_bindings=ONE_LAYER, **SHORT)
    yield output_dir, rows
    registry.remove([f"demo_{name}_frac0.05" for name in ("cbqa", "nli", "mixture")])


def test_every_variant_trains_through_train_with_the_same_data(short_comparison):
    output_dir, rows = short_comparison
    assert [row["name"] for row in rows] == ["plain", "SAM"]
    for row in rows:
        assert row["model_dir"] == os.path.join(output_dir, row["name"].lower())
        assert set(row["final"]) == {
            "demo_cbqa/em",
            "demo_cbqa/f1",
            "demo_cbqa/loss",
            "demo_nli/accuracy",
            "demo_nli/loss",
        }
        assert row["seconds_per_step"] > 0
        steps = [r["step"] for r in row["history"] if "eval" in r]
        assert steps == [2, 3]
    plain, sam = rows
    # Same initialization and first batch: the first clean losses agree, then they differ.
    first = [r["train"]["train/loss"] for r in plain["history"] if r["step"] == 1 and "train" in r]
    sam_first = [
        r["train"]["train/loss"] for r in sam["history"] if r["step"] == 1 and "train" in r
    ]
    assert first == pytest.approx(sam_first, rel=1e-5)
    assert plain["final"] != sam["final"]


def test_the_table_and_the_plot(short_comparison, capsys):
    output_dir, rows = short_comparison
    with open(os.path.join(output_dir, compare.COMPARISON_PLOT), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    table = compare.comparison_table(rows, 3, "title")
    lines = table.splitlines()
    assert lines[0] == "title: after 3 steps"
    # Header: "variant", the task metrics sorted by name, then the time columns.
    assert lines[1].split() == [
        "variant",
        "demo_cbqa/em",
        "demo_cbqa/f1",
        "demo_cbqa/loss",
        "demo_nli/accuracy",
        "demo_nli/loss",
        "ms/step",
        "×",
        "plain",
    ]
    assert set(lines[2]) == {"-", " "}  # the rule under the header
    plain_line = next(line for line in lines if line.startswith("plain"))
    assert plain_line.split()[-1] == "1.0000"  # time relative to plain
    assert any(line.startswith("best over evals") for line in lines)


def test_unknown_variants_are_refused(tmp_path):
    with pytest.raises(compare.run_config.ConfigError, match="Unknown variants \\['SGD'\\]"):
        compare.compare(str(tmp_path), variants=["SGD"], **SHORT)
    assert os.listdir(tmp_path) == []


def test_comparison_table_of_given_rows():
    rows = [
        {
            "name": "plain",
            "final": {"t/accuracy": 0.5},
            "best": {"t/accuracy": 0.6},
            "seconds_per_step": 0.01,
        },
        {"name": "SAM", "final": {"t/accuracy": 0.55}, "best": {}, "seconds_per_step": 0.02},
    ]
    lines = compare.comparison_table(rows, 10, "demo").splitlines()
    assert lines[1].split() == ["variant", "t/accuracy", "ms/step", "×", "plain"]
    assert lines[3].split() == ["plain", "0.5000", "10.0000", "1.0000"]
    assert lines[4].split() == ["SAM", "0.5500", "20.0000", "2.0000"]
    assert lines[-1].split() == ["SAM", "-"]

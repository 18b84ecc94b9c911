"""Tests for benchmarks/trainer.py: the script runs and its table is plausible.

The script runs as a command (as the README gives it) on the smallest setting:
a tiny T5.1.1 cut to one layer each side and without dropout (dropout's random
bits are a large share of XLA's compile time on CPU), one round of two steps,
plain and SAM f=1, on one CPU device (the sharded step is tested by
test_train.py, which builds it with the same `sam_jax.train.setup_training`).
Most of the test's time is importing seqio and compiling the two steps.
"""

import importlib.util
import math
import os
import subprocess
import sys

import pytest
from multiprocess_harness import REPO_DIR
from multiprocess_harness import process_env

# The script needs seqio (through sam_jax.train); looking for it does not import it here.
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("seqio") is None, reason="benchmarks/trainer.py needs seqio"
)

SCRIPT = os.path.join(REPO_DIR, "benchmarks", "trainer.py")
ARGS = [
    "--size=tiny",
    "--batch_size=8",
    "--rounds=1",
    "--steps=2",
    "--variants=plain,sam",
    "--markdown",
    "--gin.t5_1_1_config.num_encoder_layers=1",
    "--gin.t5_1_1_config.num_decoder_layers=1",
    "--gin.DROPOUT_RATE=0.0",
    "--input_length=32",
    "--target_length=8",
]


def markdown_table(stdout):
    """{first cell: [other cells]} of the Markdown table rows in `stdout`, and its header."""
    lines = [line for line in stdout.splitlines() if line.startswith("| ")]
    split = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    header, rows = split[0], split[1:]
    return header, {row[0]: row[1:] for row in rows}


def test_trainer_benchmark_prints_a_plausible_table():
    out = subprocess.run(
        [sys.executable, SCRIPT, *ARGS],
        env=process_env(1),
        cwd=REPO_DIR,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-5000:]
    assert "1 cpu device(s)" in out.stdout
    header, rows = markdown_table(out.stdout)
    assert header[0] == "variant" and len(header) == 9
    assert list(rows) == ["plain", "SAM f=1"], out.stdout
    for name, cells in rows.items():
        values = [float(cell) for cell in cells]
        assert len(values) == len(header) - 1
        assert all(math.isfinite(v) and v > 0 for v in values), (name, cells)
    column = {name: i for i, name in enumerate(header[1:])}
    assert [float(rows["plain"][column[c]]) for c in ("time ×", "FLOPs ×", "peak mem ×")] == [
        1.0,
        1.0,
        1.0,
    ]
    sam = rows["SAM f=1"]
    # Two forward-backward passes of the model, one optimizer update.
    assert 1.8 <= float(sam[column["FLOPs ×"]]) <= 2.3, sam
    # The SAM step keeps ε besides plain's buffers: more memory, but not twice as much.
    assert 1.0 < float(sam[column["peak mem ×"]]) < 2.0, sam
    # 8 examples × 8 target tokens per step: the rates are consistent with ms/step.
    ms = float(sam[column["ms/step"]])
    assert float(sam[column["examples/s"]]) == pytest.approx(8e3 / ms, rel=0.02)
    assert float(sam[column["target tokens/s"]]) == pytest.approx(64e3 / ms, rel=0.02)

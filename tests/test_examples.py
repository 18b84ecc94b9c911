"""The example scripts run as the README shows them, and train.

Each script runs in its own process (`python examples/<name>.py --steps=...`),
two at a time, started once for the module; the tests read what they print.
"""

import concurrent.futures
import math
import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
STEPS = 30
TRAINING_EXAMPLES = ("flax_linen_train_state", "flax_nnx")
# (script, flags) of the training runs: plain AdamW, SAM, and SAM with an ascent micro-batch.
TRAINING_RUNS = [
    (name, flags) for name in TRAINING_EXAMPLES for flags in ("--rho=0", "--rho=0.05")
] + [("flax_nnx", "--rho=0.05 --ascent_fraction=0.25")]
VARIANTS = [
    "AdamW",
    "SAM",
    "SAM f=1/4",
    "ASAM",
    "delta-SAM f=1/4",
    "delta-SAM draft f=1/4",
    "FSAM f=1/4",
    "m-sharpness m=4",
]


def _run(script: str, flags: str) -> str:
    command = [sys.executable, f"examples/{script}.py", *flags.split()]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def outputs():
    """Every script's stdout, keyed by (script, flags); two processes at a time."""
    runs = [("compare_variants", "--steps=20")]
    runs += [(script, f"--steps={STEPS} {flags}") for script, flags in TRAINING_RUNS]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {run: pool.submit(_run, *run) for run in runs}
        return {run: future.result() for run, future in futures.items()}


def _training_result(stdout: str) -> dict:
    """The initial and final training loss and the held-out accuracy a script printed."""
    losses = re.search(r"^train loss: initial (\S+), final (\S+)$", stdout, re.M)
    accuracy = re.search(r"^held-out accuracy: (\S+)$", stdout, re.M)
    assert losses and accuracy, stdout
    return {
        "initial": float(losses[1]),
        "final": float(losses[2]),
        "accuracy": float(accuracy[1]),
    }


@pytest.mark.parametrize("script, flags", TRAINING_RUNS)
def test_training_example_lowers_the_loss_and_beats_chance(outputs, script, flags):
    stdout = outputs[(script, f"--steps={STEPS} {flags}")]
    result = _training_result(stdout)
    assert math.isfinite(result["final"]) and result["final"] < 0.9 * result["initial"]
    assert result["accuracy"] > 0.4  # 4 classes: chance is 0.25
    expected = "AdamW" if flags == "--rho=0" else "SAM rho=0.05"
    assert re.search(rf"^{expected}.*, {STEPS} steps", stdout, re.M), stdout


@pytest.mark.parametrize("script", TRAINING_EXAMPLES)
def test_sam_and_plain_start_alike_and_train_differently(outputs, script):
    plain = _training_result(outputs[(script, f"--steps={STEPS} --rho=0")])
    sam = _training_result(outputs[(script, f"--steps={STEPS} --rho=0.05")])
    assert sam["initial"] == plain["initial"]  # the same seed: the same initialisation
    assert sam["final"] != plain["final"]


def test_compare_variants_prints_a_row_per_variant(outputs):
    stdout = outputs[("compare_variants", "--steps=20")]
    rows = {}
    for line in stdout.splitlines():
        match = re.fullmatch(r"(.+?)\s+(\d\.\d{3})\s+(\S+)\s+(\S+)", line)
        if match:
            rows[match[1]] = tuple(float(value) for value in match.groups()[1:])
    assert list(rows) == VARIANTS, stdout
    for accuracy, test_loss, risk in rows.values():
        assert 0.4 < accuracy <= 1.0  # 4 classes: chance is 0.25
        assert math.isfinite(test_loss) and math.isfinite(risk) and risk > 0
    assert len(set(rows.values())) > 1  # the variants train differently

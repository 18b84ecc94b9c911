"""Tests of sam_jax.analysis: landscapes and sharpness of tiny finished grid runs.

The references are independent of the analysis: θ₀ and θ₁ are the parameters
`train` actually started from and ended with (recorded while it ran), the
evaluation set is read with `data.eval_tasks`, and the losses and sharpness
measures are computed directly with the run's loss and `sam_jax.sharpness`.
"""

import functools
import json
import os

import numpy as np
import pytest

pytest.importorskip("seqio")

import jax  # noqa: E402
import seqio  # noqa: E402
from test_reproduce import TINY_RUNS  # noqa: E402

from sam_jax import analysis  # noqa: E402
from sam_jax import config  # noqa: E402
from sam_jax import data  # noqa: E402
from sam_jax import reproduce  # noqa: E402
from sam_jax import sharpness  # noqa: E402
from sam_jax import train as train_lib  # noqa: E402
from sam_jax.errors import ConfigError  # noqa: E402
from sam_jax.tasks import registry  # noqa: E402

EXAMPLES = 8  # per task of the demo mixture (2 tasks)
GRID_POINTS = 5
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _grid(output_dir, *extra):
    bindings = [
        TINY_RUNS,
        "VARIANTS = ['plain', 'sam']",
        "SEEDS = [0]",
        "TRAIN_FRACTIONS = [0.05]",
        "TRAIN_STEPS = 2",
        "EVALUATIONS = 1",
        "reproduce.protocol.sweeps = {'sam': {'RHO': [0.1]}}",
        f"OUTPUT_DIR = '{output_dir}'",
        *extra,
    ]
    return reproduce.grid(reproduce.parse_protocol([reproduce.DEFAULT_PROTOCOL], bindings))


def _trained(run, monkeypatch):
    """Trains `run`; returns (setup, θ₀, θ₁) as `train` started and ended (host copies)."""
    seen = {}
    start_state, loop_run = train_lib.start_state, train_lib.TrainLoop.run

    def recording_start_state(setup, *args, **kwargs):
        start = start_state(setup, *args, **kwargs)
        seen["setup"], seen["initial"] = setup, jax.device_get(start.state.params)
        return start

    def recording_run(self, *args):
        state, step = loop_run(self, *args)
        seen["final"] = jax.device_get(state.params)
        return state, step

    monkeypatch.setattr(train_lib, "start_state", recording_start_state)
    monkeypatch.setattr(train_lib.TrainLoop, "run", recording_run)
    reproduce.train_run(run)
    return seen["setup"], seen["initial"], seen["final"]


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    """The SAM run (RHO 0.1) of a tiny grid, 2 steps, trained and analysed once."""
    run = _grid(tmp_path_factory.mktemp("grid"))[1]
    with pytest.MonkeyPatch.context() as monkeypatch:
        setup, initial, final = _trained(run, monkeypatch)
    record = analysis.analyze(
        run,
        ("landscape", "sharpness"),
        num_examples=EXAMPLES,
        grid_points=GRID_POINTS,
        chunk_size=8,
    )
    yield run, setup, initial, final, record
    registry.remove([f"demo_{n}_frac0.05" for n in ("cbqa", "nli", "mixture")])


@functools.cache
def _evaluation_batch():
    """The first EXAMPLES validation examples of each demo task, read independently."""
    tasks = data.eval_tasks(
        "demo_mixture_frac0.05",
        sequence_length={"inputs": 24, "targets": 4},
        batch_size=EXAMPLES,
        max_examples=EXAMPLES,
        feature_converter=seqio.EncDecFeatureConverter(pack=False),
    )
    assert [task.name for task in tasks] == ["demo_cbqa_frac0.05", "demo_nli_frac0.05"]
    batches = [task.batches[0] for task in tasks]
    assert all(batch[data.EXAMPLE_MASK].all() for batch in batches)  # EXAMPLES real rows each
    return {f: np.concatenate([b[f] for b in batches]) for f in data.ENC_DEC_FEATURES}


def _mean_loss(setup, params):
    """The mean loss on the evaluation set, on one device (the analysis runs on the mesh)."""
    losses = jax.jit(setup.trainer.loss_fn)(params, _evaluation_batch(), None)
    return float(np.mean(losses))


def _direct_sharpness(setup, params, rho):
    """`sam_jax.sharpness` on the whole evaluation set, in one jit on one device."""

    def measures(params, batch):
        return {
            name: fn(setup.trainer.loss_fn, params, batch, rho)
            for name, fn in (
                ("adversarial_loss", sharpness.adversarial_risk),
                ("batch_sharpness", sharpness.batch_sharpness),
                ("instance_sharpness", sharpness.instance_sharpness),
            )
        }

    return jax.device_get(jax.jit(measures)(params, _evaluation_batch()))


def test_the_interpolation_runs_from_the_runs_start_to_its_end(analysed):
    _, setup, initial, final, record = analysed
    record = record["landscape"]
    curve = record["interpolation"]
    assert len(curve) == 41 and record["step"] == 2 and record["examples"] == 2 * EXAMPLES
    assert curve[20] == pytest.approx(_mean_loss(setup, final), rel=1e-5)  # α = 0: θ₁
    assert curve[0] == pytest.approx(_mean_loss(setup, initial), rel=1e-5)  # α = −1: θ₀
    assert abs(curve[0] - curve[20]) > 1e-3  # two training steps moved the loss
    # From random weights, θ₀ is the seed's initialisation.
    fresh = jax.device_get(setup.init_state().params)
    jax.tree.map(np.testing.assert_array_equal, fresh, initial)


def test_the_surface_is_centred_on_the_final_weights_and_saved(analysed):
    run, *_, record = analysed
    assert json.loads(json.dumps(record)) == record  # results.json takes it as it is
    record = record["landscape"]
    assert record["surface_at_center"] == pytest.approx(record["interpolation"][20], rel=1e-5)
    assert record["files"] == [
        "landscape.json",
        "landscape_interpolation.png",
        "landscape_surface.png",
    ]
    with open(os.path.join(run.model_dir, "landscape.json"), encoding="utf-8") as f:
        saved = json.load(f)
    surface = np.array(saved["surface"])
    assert surface.shape == (GRID_POINTS, GRID_POINTS)
    assert saved["xs"] == saved["ys"] == np.linspace(-1, 1, GRID_POINTS).tolist()
    assert saved["interpolation"] == record["interpolation"]
    assert record["surface_min"] == pytest.approx(surface.min())
    assert surface.min() < surface.max()
    for name in record["files"][1:]:
        with open(os.path.join(run.model_dir, name), "rb") as f:
            assert f.read(8) == PNG_SIGNATURE


def test_sharpness_of_the_final_weights_with_the_runs_rho(analysed):
    _, setup, _, final, record = analysed
    record = record["sharpness"]
    assert record["rho"] == 0.1 and record["rho_source"] == "run: sam.rho"
    assert record["examples"] == 2 * EXAMPLES and record["step"] == 2
    assert record["clean_loss"] == pytest.approx(_mean_loss(setup, final), rel=1e-5)
    for name, value in _direct_sharpness(setup, final, 0.1).items():
        assert record[name] == pytest.approx(value, rel=1e-4), name
    assert record["adversarial_loss"] > record["clean_loss"]
    assert record["instance_sharpness"] > record["batch_sharpness"] > 0  # δ-SAM §4.1


@pytest.mark.parametrize(
    ("variant", "rho", "source"),
    [
        ("plain", 0.05, "default: the run has no SAM"),
        ("sam", 0.1, "run: sam.rho"),
        ("per_instance", 0.1, "run: per_instance_sam.rho"),
        ("asam", 0.05, "default: the run's sam is adaptive (ASAM), its ρ is not a radius"),
    ],
)
def test_the_rho_of_a_run_and_where_it_comes_from(tmp_path, variant, rho, source):
    sweeps = f"reproduce.protocol.sweeps = {{'{variant}': {{'RHO': [0.1]}}}}"
    bindings = [f"VARIANTS = ['{variant}']", sweeps if variant != "plain" else "SEEDS = [0]"]
    (run,) = _grid(tmp_path, *bindings)
    config.parse_gin(run.gin_files, run.bindings)
    assert analysis.run_rho(analysis.train_arguments(), step=2) == (rho, source)


@pytest.mark.parametrize(
    ("analyses", "options", "message"),
    [
        (("hessian",), {}, r"unknown analyses \['hessian'\]"),
        (("landscape",), {"grid_points": 4}, "grid_points must be an odd integer"),
        (("sharpness",), {"num_examples": 0}, "num_examples must be an integer ≥ 1"),
        (("sharpness",), {}, "no checkpoint in .*: train the run first"),
    ],
)
def test_bad_requests_are_one_line_errors(tmp_path, analyses, options, message):
    run = _grid(tmp_path / "grid")[0]
    with pytest.raises(ConfigError, match=message) as error:
        analysis.analyze(run, analyses, **options)
    assert "\n" not in error.value.message
    assert not os.path.exists(run.model_dir)


def test_a_grid_with_analyses_records_them_and_reports_table_4(tmp_path):
    """ANALYSES through `reproduce.run_grid`: every record of the run has them, and results.md."""
    bindings = [
        TINY_RUNS,
        "VARIANTS = ['plain']",
        "SEEDS = [0]",
        "TRAIN_FRACTIONS = [0.05]",
        "TRAIN_STEPS = 2",
        "EVALUATIONS = 1",
        "ANALYSES = ['sharpness']",
        f"OUTPUT_DIR = '{tmp_path}'",
    ]
    protocol = reproduce.parse_protocol([reproduce.DEFAULT_PROTOCOL], bindings)
    try:
        records = reproduce.run_grid(protocol)
    finally:
        registry.remove([f"demo_{name}_frac0.05" for name in ("cbqa", "nli", "mixture")])
    assert {r["task"] for r in records} == {"demo_cbqa", "demo_nli"}
    measured = [r["sharpness"] for r in records]
    assert measured[0] == measured[1]  # measured once per run, on both tasks' examples
    assert measured[0]["rho"] == analysis.DEFAULT_RHO
    assert measured[0]["adversarial_loss"] > measured[0]["clean_loss"]
    report = (tmp_path / "results.md").read_text()
    assert "Sharpness of the final checkpoints (δ-SAM Table 4)" in report
    saved = json.loads((tmp_path / "results.json").read_text())["records"]
    assert saved[0]["sharpness"] == measured[0]

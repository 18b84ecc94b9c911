"""A regular (non-editable) install ships the gin configs where `sam_jax.train` finds them.

The wheel is built offline from a copy of the sources (setuptools writes build/ and
*.egg-info/ into the tree it builds), with the environment's setuptools.
"""

import ast
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest

from sam_jax import config as run_config  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
# What setup.py needs to build the wheel.
SOURCES = ("setup.py", "README.md", "sam_jax", "gin")


def repo_gin_files() -> list[str]:
    """Every gin file of the repository, relative to its gin/ directory."""
    return sorted(path.relative_to(REPO / "gin").as_posix() for path in REPO.glob("gin/**/*.gin"))


# Exits 0 if setuptools has a bdist_wheel command (its own from v70.1, else the `wheel`
# package's). Run apart: importing setuptools here, after distutils, would fail.
CAN_BUILD_WHEELS = """
import warnings
warnings.simplefilter("ignore")
import setuptools
try:
    from setuptools.command import bdist_wheel
except ImportError:
    from wheel import bdist_wheel
"""


def can_build_wheels() -> bool:
    """Whether pip and a setuptools with a bdist_wheel command are installed."""
    if importlib.util.find_spec("pip") is None:
        return False
    check = [sys.executable, "-c", CAN_BUILD_WHEELS]
    return subprocess.run(check, capture_output=True, timeout=120, check=False).returncode == 0


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    """The sam_jax wheel, built with `pip wheel --no-deps --no-build-isolation --no-index`."""
    if not can_build_wheels():
        pytest.skip("pip, setuptools or its bdist_wheel command is not installed")
    source = tmp_path_factory.mktemp("source")
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, source / name)
    dist = tmp_path_factory.mktemp("dist")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    command += ["--no-index", "--quiet", "--wheel-dir", str(dist), str(source)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, f"pip wheel failed:\n{result.stdout}\n{result.stderr}"
    (built,) = dist.glob("sam_jax-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> pathlib.Path:
    """The wheel unpacked as site-packages would hold it (a wheel is a zip of that tree)."""
    site = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    return site


def test_repository_has_gin_files():
    assert "runs/finetune.gin" in repo_gin_files()
    assert "models/t5_1_1/tiny.gin" in repo_gin_files()


def test_wheel_ships_every_gin_file_where_train_looks_for_it(installed):
    gin_dir = pathlib.Path(run_config.find_gin_dir(str(installed / "sam_jax")))
    assert gin_dir == installed / "sam_jax" / "gin"
    shipped = sorted(path.relative_to(gin_dir).as_posix() for path in gin_dir.glob("**/*.gin"))
    assert shipped == repo_gin_files()
    for name in shipped:
        assert (gin_dir / name).read_bytes() == (REPO / "gin" / name).read_bytes(), name


def test_wheel_ships_the_demo_vocabulary(installed):
    vocabulary = pathlib.Path("sam_jax", "tasks", "data", "demo_vocabulary.model")
    assert (installed / vocabulary).read_bytes() == (REPO / vocabulary).read_bytes()


def test_sam_jax_train_starts_from_an_entry_point_that_needs_no_extra(wheel):
    """The console script imports sam_jax.errors first (the core's), so that a missing
    [train] dependency is one line (tests/test_errors.py), not a traceback."""
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/entry_points.txt")]
        entry_points = archive.read(name).decode()
    assert "sam_jax_train = sam_jax.errors:train_script" in entry_points.splitlines()


def test_source_checkout_finds_the_repository_gin_directory():
    assert run_config.find_gin_dir(str(REPO / "sam_jax")) == str(REPO / "gin")


def test_installed_train_parses_gin_files_and_includes_outside_the_repository(installed, tmp_path):
    # A fresh interpreter, in a directory without gin files, importing sam_jax from the
    # unpacked wheel (sys.path comes before an editable install's finder).
    script = textwrap.dedent(
        """
        import gin
        from sam_jax import config as run_config
        from sam_jax import train

        print(train.__file__)
        print(run_config.GIN_DIR)
        for files in (
            ["runs/finetune.gin", "models/t5_1_1/tiny.gin"],
            ["gin/runs/finetune.gin", "gin/models/t5_1_1/tiny.gin"],
        ):
            run_config.parse_gin(
                files, ["MODEL_DIR = '/tmp/x'", "MIXTURE_OR_TASK_NAME = 'x'", "TRAIN_STEPS = 1"]
            )
            # DROPOUT_RATE is set in models/t5_1_1/architecture.gin, which tiny.gin includes.
            assert gin.query_parameter("%DROPOUT_RATE") == 0.1
            assert gin.query_parameter("t5_1_1_config.size") == "tiny"
        """
    )
    environment = dict(os.environ, PYTHONPATH=str(installed), JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    module_file, gin_dir = result.stdout.split()[-2:]
    assert pathlib.Path(module_file) == installed / "sam_jax" / "train.py"
    assert pathlib.Path(gin_dir) == installed / "sam_jax" / "gin"


# Imports the whole core with the training stack made unimportable.
CORE_WITHOUT_TRAINING_STACK = """
import sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED}:
            raise ImportError(f"blocked: {name}")

sys.meta_path.insert(0, Block())
import sam_jax
from sam_jax import batching, core, fisher, loss_update, pending, per_instance
from sam_jax import perturbation, reweighting, sharpness, transform
"""
TRAINING_STACK = ("flax", "orbax", "tensorstore", "seqio", "gin", "tensorflow", "clu", "t5x")


def test_the_core_imports_without_the_training_stack():
    code = CORE_WITHOUT_TRAINING_STACK.replace("{BLOCKED}", repr(set(TRAINING_STACK)))
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]


def core_lower_bounds() -> dict[str, str]:
    """{name: lower bound} of setup.py's CORE requirements ("name>=bound,<upper")."""
    tree = ast.parse((REPO / "setup.py").read_text())
    core = next(
        node.value
        for node in tree.body
        if isinstance(node, ast.Assign) and node.targets[0].id == "CORE"
    )
    requirements = (ast.literal_eval(item).split(">=") for item in core.elts)
    return {name: rest.split(",")[0] for name, rest in requirements}


def test_the_core_install_requires_only_jax_optax_and_numpy():
    assert set(core_lower_bounds()) == {"jax", "optax", "numpy"}


def test_the_core_lower_bounds_are_the_releases_ci_tests_it_with():
    bounds = core_lower_bounds()
    pins = {}
    for line in (REPO / ".ci" / "core_oldest.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name] = version
    assert bounds == {name: pins[name] for name in bounds}
    assert pins["jaxlib"] == pins["jax"]

"""Run configuration: gin files and bindings, what they may reference, one-line errors.

`parse_gin` replaces the gin config as T5X's train.py does (files, then
bindings, then finalize) and turns every mistake into a `ConfigError` with a
one-line message ('file:line: ...' for a malformed file). `train.py` is the
command line around it; `GIN_DIR` holds the project's gin files.
"""

import os
import re
import tokenize
from collections.abc import Sequence

import gin
import optax
from absl import app

import sam_jax
from sam_jax import trainer as trainer_lib
from sam_jax.errors import ConfigError
from sam_jax.errors import one_line
from sam_jax.models import t5
from sam_jax.models import task_models
from sam_jax.tasks import benchmarks
from sam_jax.tasks import demo
from sam_jax.tasks import glue_encoder
from sam_jax.tasks import local


def find_gin_dir(package_dir: str) -> str:
    """The gin configs of the `sam_jax` package in `package_dir`.

    A regular install (`pip install .`) has them as the package data
    `<package_dir>/gin`: setup.py maps the repository's gin/ directory onto
    `sam_jax.gin`. A source checkout or an editable install has them in the
    repository's gin/ directory, next to `package_dir`.

    Args:
      package_dir: the directory of the `sam_jax` package.

    Returns:
      `<package_dir>/gin` if it is a directory, else `<package_dir>/../gin`.
    """
    installed = os.path.join(package_dir, "gin")
    if os.path.isdir(installed):
        return installed
    return os.path.join(os.path.dirname(package_dir), "gin")


# The gin configs ('runs/finetune.gin', 'models/t5_1_1/tiny.gin', ...; their
# `include`s are relative to it).
GIN_DIR = find_gin_dir(os.path.dirname(os.path.abspath(__file__)))
# Where gin files are looked up, after the path as given: GIN_DIR, its parent (so
# that 'gin/runs/finetune.gin' works from any directory) and the cwd.
DEFAULT_GIN_SEARCH_PATHS = (GIN_DIR, os.path.dirname(GIN_DIR), ".")


def check(condition: bool, message: str) -> None:
    """Raises `ConfigError(message)` unless `condition`."""
    if not condition:
        raise ConfigError(message)


def rewrite_gin_args(argv: Sequence[str]) -> list[str]:
    """Turns T5X-style `--gin.NAME=VALUE` arguments into `--gin_bindings=NAME = VALUE`."""
    rewritten = []
    for arg in argv:
        if arg.startswith("--gin."):
            if "=" not in arg:
                raise app.UsageError(f"Expected --gin.NAME=VALUE, got {arg!r}.")
            name, value = arg[len("--gin.") :].split("=", 1)
            arg = f"--gin_bindings={name} = {value}"
        rewritten.append(arg)
    return rewritten


# What gin files may reference (T5X names: `@optax.adafactor`, `@sam_jax.sam`, ...).
for _fn, _module in (
    (optax.adafactor, "optax"),
    (optax.adamw, "optax"),
    (optax.amsgrad, "optax"),
    (optax.adagrad, "optax"),
    (optax.constant_schedule, "optax"),
    (trainer_lib.rsqrt_schedule, "sam_jax.trainer"),
    (sam_jax.sam, "sam_jax"),
    (sam_jax.per_instance_sam, "sam_jax"),
    (sam_jax.delta_sam, "sam_jax"),
    (sam_jax.delta_sam_draft, "sam_jax"),
    (sam_jax.fisher_mask, "sam_jax"),
    (sam_jax.gsam, "sam_jax"),
    (sam_jax.gsam_rho_schedule, "sam_jax"),
    (sam_jax.esam, "sam_jax"),
    (t5.t5_1_1_config, "sam_jax.models.t5"),
    (task_models.encoder_decoder, "sam_jax.models.task_models"),
    (task_models.encoder_classifier, "sam_jax.models.task_models"),
    (local.tsv_task, "sam_jax.tasks.local"),
    (demo.mixture, "sam_jax.tasks.demo"),
    (benchmarks.mixture, "sam_jax.tasks.benchmarks"),
    (glue_encoder.task, "sam_jax.tasks.glue_encoder"),
    (trainer_lib.warmup_linear_decay_schedule, "sam_jax.trainer"),
):
    gin.external_configurable(_fn, module=_module)


def _resolve_gin_path(path: str, search_paths: Sequence[str]) -> str | None:
    for prefix in ("", *search_paths):
        candidate = os.path.join(prefix, path)
        if os.path.isfile(candidate):
            return candidate
    return None


_INCLUDE = re.compile(r"""^\s*include\s+(['"])(.+?)\1""", re.MULTILINE)


def _token_error_location(path: str) -> tuple[int, str] | None:
    """(line, message) of the first tokenizer error in a gin file, or None.

    An unclosed bracket is reported at the line where it opens.
    """
    with open(path, encoding="utf-8") as f:
        text = f.read()
    opened: list[tuple[str, int]] = []
    tokens = tokenize.generate_tokens(iter(text.splitlines(keepends=True)).__next__)
    try:
        for token in tokens:
            if token.type == tokenize.OP and token.string in "([{":
                opened.append((token.string, token.start[0]))
            elif token.type == tokenize.OP and token.string in ")]}" and opened:
                opened.pop()
    except tokenize.TokenError as error:
        if opened:
            bracket, line = opened[-1]
            return line, f"unclosed {bracket!r}"
        return error.args[1][0], error.args[0]
    return None


def _locate_malformed_gin(gin_files: Sequence[str], search_paths: Sequence[str]) -> str | None:
    """'file:line: message' for the first gin file (or include) that does not tokenize."""
    pending, seen = list(gin_files), set()
    while pending:
        path = _resolve_gin_path(pending.pop(0), search_paths)
        if path is None or path in seen:
            continue
        seen.add(path)
        location = _token_error_location(path)
        if location is not None:
            return f"{path}:{location[0]}: malformed gin file: {location[1]}"
        with open(path, encoding="utf-8") as f:
            pending.extend(match.group(2) for match in _INCLUDE.finditer(f.read()))
    return None


def _malformed_gin_message(
    error: SyntaxError | tokenize.TokenError,
    gin_files: Sequence[str],
    search_paths: Sequence[str],
) -> str:
    """'file:line: malformed gin file: ...' for a parse error of gin files.

    An unclosed bracket makes gin fail lines later (or at the end of the file
    without a location), so the files are first checked for the bracket.
    """
    where = _locate_malformed_gin(gin_files, search_paths)
    if where is not None:
        return where
    location = error.args[1] if len(error.args) > 1 else None
    if not isinstance(error, SyntaxError) or location is None:
        return f"malformed gin file: {one_line(error)}"
    filename = getattr(location, "filename", error.filename)
    line = getattr(location, "line_num", error.lineno)
    content = (getattr(location, "line_content", "") or "").strip()
    # gin's first line may be an AST repr; its last line says what it could not parse.
    reason = [part.strip() for part in str(error.args[0]).splitlines() if part.strip()][-1]
    return f"{filename}:{line}: malformed gin file: {reason.rstrip('.')}: {content}"


def parse_gin(
    gin_files: Sequence[str],
    gin_bindings: Sequence[str],
    search_paths: Sequence[str] = DEFAULT_GIN_SEARCH_PATHS,
) -> None:
    """Replaces the gin config: parses files, then bindings, then finalizes (T5X order).

    Example::

      parse_gin(["runs/finetune.gin", "models/t5_1_1/tiny.gin", "sam/sam.gin"],
                ["MODEL_DIR = '/tmp/run1'", "RHO = 0.15"])

    Raises:
      ConfigError: for a missing or malformed file ('file:line: ...'), a malformed
        binding, an unknown configurable or a required macro left unset.
    """
    gin.clear_config()
    for path in search_paths:
        gin.add_config_file_search_path(path)
    try:
        gin.parse_config_files_and_bindings(gin_files, None, finalize_config=False)
    except (SyntaxError, tokenize.TokenError) as error:
        raise ConfigError(_malformed_gin_message(error, gin_files, search_paths)) from error
    except (OSError, ValueError) as error:
        raise ConfigError(one_line(error)) from error
    try:
        gin.parse_config_files_and_bindings(None, gin_bindings, finalize_config=False)
    except (SyntaxError, tokenize.TokenError, ValueError) as error:
        raise ConfigError(
            f"malformed gin binding in {list(gin_bindings)}: {one_line(error)}"
        ) from error
    try:
        gin.finalize()
    except ValueError as error:
        missing = re.match(r"(\w+)/macro\.value set to `%gin.REQUIRED`", str(error))
        if missing:
            name = missing.group(1)
            raise ConfigError(
                f"{name} is required and not set: pass --gin.{name}=... (strings in quotes, "
                f"e.g. --gin.MODEL_DIR=\"'/tmp/run1'\")."
            ) from error
        raise ConfigError(one_line(error)) from error

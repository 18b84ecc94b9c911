"""Run configuration: gin files and bindings, what they may reference, one-line errors.

`parse_gin` replaces the gin config as T5X's train.py does (files, then
bindings, then finalize) and turns every mistake into a `ConfigError` with a
one-line message ('file:line: ...' for a malformed file). It is strict: a
macro or a binding that nothing the run calls uses is an error that suggests
the close name (`--gin.RHOO=0.15` is refused, not ignored), and so is a
misspelt configurable or parameter. `config_changes` compares two configs
(`gin.config_str()` texts) binding by binding, for the checks of a resumed run.

The module is light (gin and absl, no seqio or TensorFlow): it defines the gin
flags, and `check_command_line` finds the mistakes that need no registered
configurable before a console script imports the trainer; `parse_gin` registers
the configurables (`register_configurables`). `train.py` is the command line
around it; `GIN_DIR` holds the project's gin files.
"""

import difflib
import functools
import inspect
import os
import re
import tokenize
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import gin
from absl import flags
from gin import config_parser

from sam_jax.errors import ConfigError
from sam_jax.errors import one_line


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


GIN_FILES = flags.DEFINE_multi_string("gin_file", [], "Gin files to parse, in order.")
GIN_BINDINGS = flags.DEFINE_multi_string(
    "gin_bindings", [], "Gin bindings, after the files; --gin.NAME=VALUE is the same."
)
GIN_SEARCH_PATHS = flags.DEFINE_list(
    "gin_search_paths",
    list(DEFAULT_GIN_SEARCH_PATHS),
    "Directories in which gin files and their includes are looked up.",
)
HELP_FLAGS = ("-h", "-?", "--help", "--helpshort")


def check(condition: bool, message: str) -> None:
    """Raises `ConfigError(message)` unless `condition`."""
    if not condition:
        raise ConfigError(message)


def rewrite_gin_args(argv: Sequence[str]) -> list[str]:
    """Turns T5X-style `--gin.NAME=VALUE` arguments into `--gin_bindings=NAME = VALUE`.

    Raises:
      ConfigError: for a `--gin.NAME` without a value.
    """
    rewritten = []
    for arg in argv:
        if arg.startswith("--gin."):
            name, equals, value = arg[len("--gin.") :].partition("=")
            check(
                bool(equals and value.strip()),
                f"--gin.{name} has no value: pass --gin.{name}=VALUE "
                f"(strings in quotes, e.g. --gin.MODEL_DIR=\"'/tmp/run1'\").",
            )
            arg = f"--gin_bindings={name} = {value}"
        rewritten.append(arg)
    return rewritten


@functools.cache
def register_configurables() -> None:
    """Registers what gin files may reference (T5X names: `@optax.adafactor`, `@sam_jax.sam`, ...).

    `parse_gin` calls it: the model and task modules (seqio, TensorFlow: seconds)
    are imported then, not with this module, so that `check_command_line` is quick.
    """
    import optax

    import sam_jax
    from sam_jax import trainer as trainer_lib
    from sam_jax.models import t5
    from sam_jax.models import task_models
    from sam_jax.tasks import benchmarks
    from sam_jax.tasks import demo
    from sam_jax.tasks import glue_encoder
    from sam_jax.tasks import local

    for fn, module in (
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
        gin.external_configurable(fn, module=module)


def check_model_dir(model_dir: str) -> None:
    """Refuses a MODEL_DIR that exists and is not a directory (ConfigError)."""
    check(
        not os.path.exists(model_dir) or os.path.isdir(model_dir),
        f"MODEL_DIR {model_dir} is a file: pass a directory (a new one for a new run).",
    )


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


class Reference(NamedTuple):
    """A configurable reference in a gin value: `@name` (or `@name()`, `called`)."""

    name: str
    called: bool

    def __repr__(self) -> str:
        return f"@{self.name}{'()' if self.called else ''}"


class Macro(NamedTuple):
    """A macro reference in a gin value: `%NAME`."""

    name: str

    def __repr__(self) -> str:
        return f"%{self.name}"


class _TextDelegate(config_parser.ParserDelegate):
    """Parses references as `Reference` and `Macro`: no configurable needs to be registered."""

    def configurable_reference(self, scoped_configurable_name, evaluate):
        return Reference(scoped_configurable_name, evaluate)

    def macro(self, macro_name):
        return Macro(macro_name)


class GinText(NamedTuple):
    """The bindings of gin files and bindings as written, later ones overriding earlier ones.

    Attributes:
      bindings: {'selector.parameter': value} ('scope/selector.parameter' if scoped),
        with `Reference` and `Macro` values (see `resolved`).
      macros: {NAME: value}.
      where: {'selector.parameter' or NAME: 'file:line'} (or the binding's text).
    """

    bindings: dict[str, Any]
    macros: dict[str, Any]
    where: dict[str, str]

    def resolved(self, value: Any, seen: frozenset = frozenset()) -> Any:
        """`value` with its macros replaced by their values (recursively)."""
        if isinstance(value, Macro):
            if value.name in seen or value.name not in self.macros:
                return value
            return self.resolved(self.macros[value.name], seen | {value.name})
        if isinstance(value, Mapping):
            return {k: self.resolved(v, seen) for k, v in value.items()}
        if isinstance(value, (list, tuple)) and not isinstance(value, Reference):
            return type(value)(self.resolved(v, seen) for v in value)
        return value


def read_gin_text(
    gin_files: Sequence[str],
    gin_bindings: Sequence[str],
    search_paths: Sequence[str] = DEFAULT_GIN_SEARCH_PATHS,
) -> GinText:
    """`GinText` of files (their includes first, where they are) then bindings, as gin reads them.

    It needs no registered configurable: `parse_gin` reads its input with it before
    gin parses it, and `check_command_line` before the run's imports.

    Raises:
      ConfigError: for a missing or malformed gin file or include ('file:line: ...')
        or a malformed binding (an unquoted string: 'strings need quotes').
    """
    text = GinText({}, {}, {})

    def add(statements, origin):
        for statement in statements:
            if isinstance(statement, config_parser.IncludeStatement):
                add_file(statement.filename, f"{origin}:{statement.location.line_num}: include ")
            elif isinstance(statement, config_parser.BindingStatement):
                if statement.arg_name:
                    key = f"{statement.selector}.{statement.arg_name}"
                    key = f"{statement.scope}/{key}" if statement.scope else key
                    text.bindings[key] = statement.value
                else:
                    key = statement.selector
                    text.macros[key] = statement.value
                text.where[key] = (
                    f"{origin}:{statement.location.line_num}" if origin else f"--gin.{key}"
                )

    def add_file(path, included_at=""):
        resolved = _resolve_gin_path(path, search_paths)
        check(
            resolved is not None,
            f"{included_at}Unable to open file: {path} is not in the cwd or in "
            f"{', '.join(search_paths)}: check --gin_file and --gin_search_paths.",
        )
        try:
            with open(resolved, encoding="utf-8") as f:
                add(config_parser.ConfigParser(f, _TextDelegate()), resolved)
        except OSError as error:
            raise ConfigError(f"{included_at}{resolved}: {one_line(error)}") from error

    try:
        for path in gin_files:
            add_file(path)
    except (SyntaxError, tokenize.TokenError) as error:
        raise ConfigError(_malformed_gin_message(error, gin_files, search_paths)) from error
    for binding in gin_bindings:
        try:
            add(config_parser.ConfigParser(binding, _TextDelegate()), None)
        except (SyntaxError, tokenize.TokenError) as error:
            raise ConfigError(_binding_error(binding, error)) from error
    return text


def check_command_line(argv: Sequence[str]) -> None:
    """Checks a command line's gin input for the mistakes found without the run's imports.

    Those that need no registered configurable: a `--gin.NAME` without a value, a
    malformed binding or an unquoted string, a missing or malformed gin file, a
    MODEL_DIR that is a file. The console scripts call it before they import their
    module (seconds: seqio, TensorFlow); `parse_gin` checks the same later. --help,
    or flags absl cannot parse, are left to the command.

    Raises:
      ConfigError: the first mistake.
    """
    if any(arg in HELP_FLAGS for arg in argv[1:]):
        return
    try:
        flags.FLAGS(rewrite_gin_args(argv), known_only=True)
        text = read_gin_text(GIN_FILES.value, GIN_BINDINGS.value, GIN_SEARCH_PATHS.value)
    except flags.Error:
        return
    finally:
        flags.FLAGS.unparse_flags()
    model_dir = text.resolved(text.bindings.get("train.model_dir"))
    if isinstance(model_dir, str):
        check_model_dir(model_dir)


def _references(value: Any) -> Iterable[Reference | Macro]:
    """The `Reference`s and `Macro`s inside a gin value."""
    if isinstance(value, (Reference, Macro)):
        yield value
    elif isinstance(value, Mapping):
        for item in value.items():
            yield from _references(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _references(item)


def _names_match(reference: str, selector: str) -> bool:
    """Whether a reference (`@sam_jax.sam`) names a binding's selector (`sam`, `sam_jax.sam`)."""
    reference, selector = reference.rsplit("/", 1)[-1], selector.rsplit("/", 1)[-1]
    return (
        reference == selector
        or reference.endswith(f".{selector}")
        or (selector.endswith(f".{reference}"))
    )


def _in_project_gin_file(where: str) -> bool:
    """Whether a `GinText.where` location ('file:line') is in one of the project's gin files."""
    path = os.path.realpath(where.rsplit(":", 1)[0])
    return path.startswith(os.path.realpath(GIN_DIR) + os.sep)


def _close_names(name: str, names: Iterable[str], n: int = 1) -> list[str]:
    """Up to `n` of `names` close to `name` (a typo's candidates), closest first."""
    return difflib.get_close_matches(name, sorted(set(names) - {name}), n=n)


def _did_you_mean(close: Sequence[str]) -> str:
    """' Did you mean A or B?' for close names, '' for none."""
    return f" Did you mean {' or '.join(close)}?" if close else ""


@functools.cache
def _trainer_gin_files() -> dict[str, str]:
    """{'gin/<path>': text} of the project's gin files for this trainer.

    gin/t5x/ is T5X's, and gin/reproduce/ holds sam_jax.reproduce's protocols.
    """
    texts = {}
    for root, _, names in os.walk(GIN_DIR):
        if os.path.relpath(root, GIN_DIR).split(os.sep)[0] in ("t5x", "reproduce"):
            continue
        for name in names:
            path = os.path.join(root, name)
            with open(path, encoding="utf-8") as f:
                texts[os.path.relpath(path, os.path.dirname(GIN_DIR))] = f.read()
    return dict(sorted(texts.items()))


def _used_by_gin_files(reference: str) -> str:
    """' <file> uses it: is a --gin_file missing?' for the trainer's gin files that mention it."""
    end = "" if reference.endswith(".") else r"(?!\w)"  # 'sam.' is a prefix; '%RHO' a word
    pattern = re.compile(rf"(^|[^\w.%]){re.escape(reference)}{end}", re.MULTILINE)
    users = [path for path, text in _trainer_gin_files().items() if pattern.search(text)]
    if not users:
        return " Check the name and the --gin_file list."
    shown = users[:4] + ([f"{len(users) - 4} more"] if len(users) > 4 else [])
    names = shown[0] if len(shown) == 1 else f"{', '.join(shown[:-1])} and {shown[-1]}"
    verb = "uses" if len(users) == 1 else "use"
    return f" {names} {verb} it: is a --gin_file missing?"


def check_gin_usage(text: GinText, root: str = "train") -> None:
    """Refuses macros and bindings that nothing the run calls uses (a typo, a missing file).

    A configurable is used if `root` references it, or a used configurable does
    (through macros too); a macro is used if some binding or macro refers to it.
    What the project's gin files (`GIN_DIR`) set is exempt: their defaults may be
    left unused by the run's own settings (`--gin.t5_1_1_config.vocab_size=...`
    leaves tiny.gin's VOCAB_SIZE unused).

    Raises:
      ConfigError: naming the first unused macro or binding, and a close name.
    """
    selectors = {key.rsplit(".", 1)[0] for key in text.bindings}
    check(
        any(_names_match(root, selector) for selector in selectors),
        f"Nothing binds {root}'s arguments: add a run gin file, e.g. "
        "--gin_file=gin/runs/finetune.gin (or runs/finetune_encoder.gin, runs/eval.gin).",
    )
    referenced = {
        ref.name
        for value in (*text.bindings.values(), *text.macros.values())
        for ref in _references(value)
        if isinstance(ref, Macro)
    }
    project_macros = {
        match for text_ in _trainer_gin_files().values() for match in re.findall(r"%(\w+)", text_)
    }
    for name in text.macros:
        if name in referenced or _in_project_gin_file(text.where[name]):
            continue
        if name in project_macros:  # a macro of a gin file the run does not include
            close, where = [], _used_by_gin_files(f"%{name}")
        elif close := _close_names(name, set(text.macros) | referenced):  # a typo
            where = " Check the name and the --gin_file list."
        else:  # a typo of a macro of a gin file the run does not include?
            close = _close_names(name, project_macros)
            where = _used_by_gin_files(f"%{(close or [name])[0]}")
        check(
            False,
            f"{name} (at {text.where[name]}) is set but nothing uses it."
            f"{_did_you_mean(close)}{where}",
        )
    used, frontier = set(), [root]
    while frontier:
        name = frontier.pop()
        for selector in {key.rsplit(".", 1)[0] for key in text.bindings} - used:
            if not _names_match(name, selector):
                continue
            used.add(selector)
            frontier.extend(
                ref.name
                for key, value in text.bindings.items()
                if key.rsplit(".", 1)[0] == selector
                for ref in _references(text.resolved(value))
                if isinstance(ref, Reference)
            )
    for key in text.bindings:
        selector = key.rsplit(".", 1)[0]
        check(
            selector in used or _in_project_gin_file(text.where[key]),
            f"{key} (at {text.where[key]}) is bound, but the run never calls "
            f"{selector}.{_used_by_gin_files(selector + '.')}",
        )


class ConfigChange(NamedTuple):
    """A binding whose value differs between two configs ('unset' where one lacks it)."""

    binding: str
    saved: str
    new: str

    def __str__(self) -> str:
        return f"{self.binding}: {self.saved} → {self.new}"


def config_changes(saved: str, new: str) -> list[ConfigChange]:
    """The bindings (macros resolved) that differ between two `gin.config_str()` texts.

    Example::

      config_changes("train.seed = %SEED\nSEED = 0", "train.seed = 1")
      # [ConfigChange('train.seed', '0', '1')]
    """
    values = []
    for text in (saved, new):
        parsed = read_gin_text([], [text])
        values.append({key: repr(parsed.resolved(v)) for key, v in parsed.bindings.items()})
    return [
        ConfigChange(key, values[0].get(key, "unset"), values[1].get(key, "unset"))
        for key in sorted(set(values[0]) | set(values[1]))
        if values[0].get(key) != values[1].get(key)
    ]


def _binding_error(binding: str, error: BaseException) -> str:
    """The one-line message of a binding gin cannot parse, with the likely fix."""
    name, _, value = binding.partition("=")
    name, value = name.strip(), value.strip()
    if not value:
        return f"--gin.{name} has no value: pass --gin.{name}=VALUE."
    if re.fullmatch(r"[\w./~:-]+", value) and not re.fullmatch(r"[\d.eE+-]+", value):
        return (
            f"--gin.{name}={value}: strings need quotes: pass --gin.{name}=\"'{value}'\" "
            "(gin reads the value as Python)."
        )
    return f"malformed gin binding {binding!r}: {one_line(error)}"


# gin's errors for a name it does not know; '.' ends the name's sentence.
_UNKNOWN_NAME = re.compile(
    r"Configurable '(?P<configurable>[\w./]+)' doesn't have a parameter named "
    r"'(?P<parameter>\w+)'\."
    r"|No configurable matching (?:reference )?'@?(?P<unknown>[\w./]+?)(?:\(\))?'\."
)
_GIN_FILE_LOCATION = re.compile(r'In file "(?P<file>[^"]+)", line (?P<line>\d+)')


def _parameters(selector: str) -> list[str]:
    """The parameter names of the registered configurable `selector` (none if unknown)."""
    try:
        signature = inspect.signature(gin.get_configurable(selector))
    except (KeyError, ValueError, TypeError):
        return []
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return [p.name for p in signature.parameters.values() if p.kind not in variadic]


@functools.cache
def _configurable_names() -> frozenset[str]:
    """The configurables the project's gin files bind or reference (`train`, `optax.adamw`, ...)."""
    text = read_gin_text(list(_trainer_gin_files()), [], (os.path.dirname(GIN_DIR), GIN_DIR))
    selectors = {key.rsplit("/", 1)[-1].rsplit(".", 1)[0] for key in text.bindings}
    references = {
        ref.name.rsplit("/", 1)[-1]
        for value in (*text.bindings.values(), *text.macros.values())
        for ref in _references(value)
        if isinstance(ref, Reference)
    }
    return frozenset(selectors | references)


def _gin_error(error: Exception, binding: str | None = None) -> str:
    """The one-line message of gin's error for gin files or a `binding`.

    A misspelt configurable or parameter is named with the close names ('file:line:
    Configurable 'train' doesn't have a parameter named 'eval_perod'. Did you mean
    eval_period?'), without gin's repeat of the line.
    """
    message = one_line(error)
    unknown = _UNKNOWN_NAME.search(message)
    if unknown is None:
        return f"gin binding {binding!r}: {message}" if binding else message
    if unknown["parameter"]:
        close = _close_names(unknown["parameter"], _parameters(unknown["configurable"]), n=3)
    else:
        close = _close_names(unknown["unknown"], _configurable_names(), n=3)
    where = ""
    if binding:
        where = f"gin binding {binding!r}: "
    elif location := _GIN_FILE_LOCATION.search(message):
        where = f"{location['file']}:{location['line']}: "
    return f"{where}{unknown.group(0)}{_did_you_mean(close)}"


def parse_gin(
    gin_files: Sequence[str],
    gin_bindings: Sequence[str],
    search_paths: Sequence[str] = DEFAULT_GIN_SEARCH_PATHS,
    root: str = "train",
) -> None:
    """Replaces the gin config: parses files, then bindings, then finalizes (T5X order).

    Example::

      parse_gin(["runs/finetune.gin", "models/t5_1_1/tiny.gin", "sam/sam.gin"],
                ["MODEL_DIR = '/tmp/run1'", "RHO = 0.15"])

    Raises:
      ConfigError: for a missing or malformed file ('file:line: ...'), a malformed
        binding (an unquoted string: 'strings need quotes'), an unknown
        configurable, a macro or binding that nothing uses (`check_gin_usage`),
        or a required macro left unset. `root` is the configurable the program
        calls (`train`; `reproduce.protocol` for a protocol).
    """
    register_configurables()
    text = read_gin_text(gin_files, gin_bindings, search_paths)
    gin.clear_config()
    for path in search_paths:
        gin.add_config_file_search_path(path)
    try:
        gin.parse_config_files_and_bindings(gin_files, None, finalize_config=False)
    except (OSError, ValueError) as error:
        raise ConfigError(_gin_error(error)) from error
    for binding in gin_bindings:
        try:
            gin.parse_config_files_and_bindings(None, [binding], finalize_config=False)
        except ValueError as error:
            raise ConfigError(_gin_error(error, binding)) from error
    check_gin_usage(text, root)
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

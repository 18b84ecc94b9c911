"""Errors of bad input to a run: one line, naming the setting and the fix.

Also the console scripts' entry points (`train_script`, `reproduce_script`; `python -m
sam_jax.train` and `python -m sam_jax.reproduce` run them too): they check the command
line, then import their module, so that a missing optional dependency is one line
naming the extra to install, not a traceback.
"""

import functools
import importlib
import sys
from collections.abc import Callable


class ConfigError(ValueError):
    """Invalid input to a run (flags, gin files, names, sizes): reported in one line.

    Attributes:
      message: the one-line message (when the error passes through the gin
        configurable `train`, gin appends lines naming it to `str(error)`).
    """

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def one_line(error: BaseException) -> str:
    """The error's message on one line."""
    return " ".join(str(error).split())


def reporting_input_errors(fn: Callable) -> Callable:
    """`fn`, raising its ValueError and OSError as a one-line `ConfigError` that names it.

    For the gin configurables that read the run's input (a checkpoint's config, a
    task directory) while gin evaluates `train`'s arguments, before `train` runs.

    Example::

      @reporting_input_errors
      def tsv_task(directory, vocabulary): ...   # a bad file: "tsv_task: <file>:2: ..."
    """

    @functools.wraps(fn)
    def reporting(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError:
            raise
        except (ValueError, OSError) as error:
            raise ConfigError(f"{fn.__name__}: {one_line(error)}") from error

    return reporting


def console_script(module: str, extra: str) -> Callable[[], None]:
    """The entry point of a console script: runs `module.main()`.

    First the command line's gin input is checked (`sam_jax.config.check_command_line`:
    its mistakes are one line in about a second, before the seconds of seqio's and
    TensorFlow's imports); then `module` is imported, TensorFlow's import notices
    dropped (`sam_jax.quiet.QuietNativeLogs`). A dependency that is not installed
    exits with one line naming the extra that installs it
    (`pip install "sam_jax[<extra>]"`); a missing module of sam_jax itself is a
    bug and raises.

    Example::

      train_script = console_script("sam_jax.train", "train")  # setup.py's sam_jax_train
    """
    script = f"sam_jax_{module.rsplit('.', 1)[-1]}"

    def imported(name: str):
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as error:
            if (error.name or "").split(".")[0] == "sam_jax":
                raise
            sys.exit(
                f"error: {script} needs the [{extra}] extra ({error.name} is not installed): "
                f'pip install "sam_jax[{extra}]"'
            )

    def main() -> None:
        try:
            imported("sam_jax.config").check_command_line(sys.argv)
        except ConfigError as error:
            sys.exit(f"error: {error.message}")
        with imported("sam_jax.quiet").QuietNativeLogs():
            entry = imported(module)
        entry.main()

    main.__doc__ = f"The console script of `{module}` (it needs the [{extra}] extra)."
    return main


train_script = console_script("sam_jax.train", "train")
reproduce_script = console_script("sam_jax.reproduce", "train")

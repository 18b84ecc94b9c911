"""Errors of bad input to a run: one line, naming the setting and the fix."""

import functools
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

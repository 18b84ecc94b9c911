"""What a run does not print: library log records and native stderr lines a user cannot act on.

Light to import (no TensorFlow): the console scripts (`sam_jax.errors.console_script`)
import the trainer inside `QuietNativeLogs`, so that TensorFlow's import notices are dropped.

Example::

  logging.get_absl_handler().addFilter(QuietLibraries())
  with QuietNativeLogs():
      import tensorflow  # its notices are dropped; any other line is kept
"""

import logging as std_logging
import os
import re
import sys
import threading

from absl import logging


class QuietLibraries(std_logging.Filter):
    """Drops library log records that are noise in a training log.

    Orbax, JAX, TensorFlow and seqio log every step of a save or of a dataset's
    set-up at INFO; gin's resource reader logs an ERROR for every search path
    that does not hold a gin file it then finds in the next one; seqio warns
    that an uncached training dataset may be shuffled differently on restarts
    (the order here is deterministic and its position is saved with every
    checkpoint) and that a mixture's rates count input examples (for every
    uncached task).
    """

    INFO_LIBRARIES = tuple(
        f"{os.sep}{package}{os.sep}"
        for package in ("orbax", os.path.join("jax", "_src"), "seqio", "tensorflow")
    )
    GIN_LOOKUPS = f"{os.sep}gin{os.sep}resource_reader.py"
    SEQIO_WARNINGS = (
        "Using an uncached FunctionDataset for training",
        "not cached so using number of input examples",
    )

    def filter(self, record: std_logging.LogRecord) -> bool:
        if record.pathname.endswith(self.GIN_LOOKUPS):
            return False
        if f"{os.sep}seqio{os.sep}" in record.pathname and any(
            warning in str(record.msg) for warning in self.SEQIO_WARNINGS
        ):
            return False
        return record.levelno >= std_logging.WARNING or not any(
            library in record.pathname for library in self.INFO_LIBRARIES
        )


class QuietNativeLogs:
    """Drops the lines native libraries write to stderr that a user cannot act on (a context).

    TensorFlow's import logs three notices (absl's, oneDNN's, CUDA's absence) once
    per native library; its tokenizer ops log 'precompiled_charsmap is empty' for
    every SentencePiece vocabulary they load; TensorFlow logs an ERROR that CUDA is
    absent on a CPU machine and a WARNING for every partly read cached dataset. C++
    writes to file descriptor 2 directly, so inside the context fd 2 is a pipe
    that a thread copies to the real stderr, line by line, without those lines;
    Python's `sys.stderr` (logging, the progress bar) writes to the real stderr.
    """

    NOISE = re.compile(
        rb"precompiled_charsmap is empty|failed call to cuInit|cache_dataset_ops\.cc.*"
        rb"did not fully read the dataset"
        # TensorFlow's import (by each of its libraries): absl's notice that it logs to
        # stderr, oneDNN's rounding notice, CUDA's absence on a CPU machine.
        rb"|All log messages before absl::InitializeLog\(\) is called are written to STDERR"
        rb"|port\.cc:\d+\] oneDNN custom operations are on"
        rb"|cudart_stub\.cc:\d+\] Could not find cuda drivers"
    )

    def __enter__(self) -> "QuietNativeLogs":
        sys.stderr.flush()
        self._stderr_fd = os.dup(2)
        self._python_stderr = sys.stderr
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 2)
        os.close(write_fd)
        sys.stderr = open(os.dup(self._stderr_fd), "w", buffering=1, closefd=True)
        for handler in std_logging.getLogger().handlers + [logging.get_absl_handler()]:
            if getattr(handler, "stream", None) is self._python_stderr:
                handler.setStream(sys.stderr)
        self._copier = threading.Thread(target=self._copy, args=(read_fd,), daemon=True)
        self._copier.start()
        return self

    def _copy(self, read_fd: int) -> None:
        with open(read_fd, "rb") as lines:
            for line in lines:
                if not self.NOISE.search(line):
                    os.write(self._stderr_fd, line)

    def __exit__(self, *exc_info) -> None:
        sys.stderr.flush()
        os.dup2(self._stderr_fd, 2)  # closes the pipe's last write end: the copier ends
        self._copier.join(timeout=5)
        for handler in std_logging.getLogger().handlers + [logging.get_absl_handler()]:
            if getattr(handler, "stream", None) is sys.stderr:
                handler.setStream(self._python_stderr)
        sys.stderr.close()
        sys.stderr = self._python_stderr
        os.close(self._stderr_fd)

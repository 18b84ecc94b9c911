"""Local TSV tasks: one's own classification or regression data as a seqio Task.

A task directory holds `train.tsv` and `validation.tsv`, each a header line
then one example a line, tab-separated, without quoting:

* single sentences: `sentence<TAB>label`
* sentence pairs:   `sentence1<TAB>sentence2<TAB>label`

Both files must have the same header. Labels are class indices 0..K-1 or, for a
regression task, real numbers. `register_tsv_task` reads both files once,
eagerly, and rejects a malformed one with a one-line ValueError naming the
file and line (missing directory or file, missing header, wrong column count,
non-numeric or out-of-range label, a file without examples); the Task then
streams the files with seqio's `TextLineDataSource`.

Task features (for an encoder; the feature converter adds [CLS]/[SEP] and the
token type ids, so the token ids here have NO special tokens and no EOS):

* single sentences: `inputs` -- int32 [None], the sentence's token ids;
* pairs: `sentence1`, `sentence2` -- int32 [None] each (no `inputs`);
* `label` -- int32 [] (classification) or float32 [] (regression);
* `<text feature>_pretokenized` -- the raw text (tf.string), as seqio keeps it.

`label` is a rank-0 output feature with a `seqio.PassThroughVocabulary`: seqio
checks its dtype and rank but never trims it (give `task_feature_lengths` only
for the text features).

Metrics are T5's GLUE metrics (`tasks/metrics.py`: percentages under the keys
'accuracy', 'f1', 'matthews_corrcoef', 'pearson_corrcoef',
'spearman_corrcoef'), requested by the short names 'accuracy', 'f1', 'mcc',
'pearson', 'spearman'. Defaults: accuracy, f1 and mcc for two classes;
accuracy for more; pearson and spearman for regression. They are seqio metric
functions `fn(targets, predictions)` of label values (class indices or
floats): there is no `targets` text feature, so the trainer computes them from
`label` and its predicted labels.

Example:

  >>> from sam_jax.tasks.hf_vocabulary import HfVocabulary
  >>> vocab = HfVocabulary("/path/to/tokenizer.json")
  >>> task = register_tsv_task("my_sst2", "/data/sst2", vocab, num_classes=2)
  >>> task.output_features.keys()
  odict_keys(['inputs', 'label'])

From gin (with `from sam_jax.tasks import local` under dynamic registration):

  MIXTURE_OR_TASK_NAME = @local.tsv_task()
  local.tsv_task.directory = %TASK_DIR
  local.tsv_task.vocabulary = '/path/to/tokenizer.json'
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence

import numpy as np
import seqio
import tensorflow as tf

from sam_jax import errors
from sam_jax.tasks import metrics as t5_metrics
from sam_jax.tasks import registry
from sam_jax.tasks import subsampling

SPLITS = ("train", "validation")
TOKENIZER_FILE = "tokenizer.json"
LABEL = "label"
SINGLE_COLUMNS = ("sentence", LABEL)
PAIR_COLUMNS = ("sentence1", "sentence2", LABEL)
# The token features of each layout (the text columns, in order).
TEXT_FEATURES = {SINGLE_COLUMNS: ("inputs",), PAIR_COLUMNS: ("sentence1", "sentence2")}
METRICS: dict[str, Callable] = {
    "accuracy": t5_metrics.accuracy,
    "f1": t5_metrics.f1_score_with_invalid,
    "mcc": t5_metrics.matthews_corrcoef,
    "pearson": t5_metrics.pearson_corrcoef,
    "spearman": t5_metrics.spearman_corrcoef,
}
_BINARY_ONLY = ("f1",)
_MAX_SHUFFLE_BUFFER = 100_000
_INT32_LIMIT = 2**31 - 1
# What tf.strings.strip removes, so that Python validates what TF parses.
_ASCII_SPACE = " \t\n\v\f\r"
_INTEGER = re.compile(r"[+-]?[0-9]+")
_REAL = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")


# --------------------------------------------------------------------------- #
# Reading and validating a TSV file (pure Python).
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class TsvFile:
    """A validated TSV file: its path, header columns and labels (in order)."""

    path: str
    columns: tuple[str, ...]
    labels: tuple[float, ...]

    @property
    def num_examples(self) -> int:
        return len(self.labels)


def _tab(columns: Sequence[str]) -> str:
    return "<TAB>".join(columns)


def _shorten(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _lines(path: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line, split at '\\n' only, a final '\\r' removed
    (as tf.data.TextLineDataset reads them)."""
    with tf.io.gfile.GFile(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            raw = raw[:-1] if raw.endswith(b"\n") else raw
            raw = raw[:-1] if raw.endswith(b"\r") else raw
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{path}:{number}: not UTF-8 text") from None


def parse_header(line: str, path: str) -> tuple[str, ...]:
    """The columns of a header line (SINGLE_COLUMNS or PAIR_COLUMNS)."""
    columns = tuple(line.split("\t"))
    if columns not in TEXT_FEATURES:
        raise ValueError(
            f"{path}:1: missing header: expected {_tab(SINGLE_COLUMNS)!r} or "
            f"{_tab(PAIR_COLUMNS)!r}, got {_shorten(line)}"
        )
    return columns


def parse_label(text: str, num_classes: int | None, regression: bool) -> float:
    """A label field's value; ValueError(reason) if it is not a valid label.

    Args:
      text: the field; surrounding ASCII whitespace is ignored.
      num_classes: classes are 0..num_classes-1 (None: any int32 index >= 0).
      regression: a finite real (float32) instead of a class index.
    """
    value = text.strip(_ASCII_SPACE)
    if regression:
        if not _REAL.fullmatch(value) or not math.isfinite(np.float32(value)):
            raise ValueError(f"label {_shorten(text)} is not a finite number")
        return float(np.float32(value))
    if not _INTEGER.fullmatch(value):
        raise ValueError(f"label {_shorten(text)} is not an integer class index")
    label, limit = int(value), _INT32_LIMIT if num_classes is None else num_classes
    if not 0 <= label < limit:
        raise ValueError(f"label {label} is out of range [0, {limit})")
    return label


def read_tsv(path: str, num_classes: int | None = None, regression: bool = False) -> TsvFile:
    """Reads and validates a task TSV file.

    Args:
      path: the file.
      num_classes: labels must be in [0, num_classes) (None: any index >= 0).
      regression: labels are real numbers.

    Returns:
      The file's `TsvFile`.

    Raises:
      ValueError: one line naming the file (and line): no such file, no header,
        a wrong number of columns, an invalid label, no examples.

    Example:
      >>> read_tsv("/data/sst2/train.tsv", num_classes=2).num_examples
      6920
    """
    if not tf.io.gfile.exists(path):
        raise ValueError(f"{path}: no such file (a TSV task needs train.tsv and validation.tsv)")
    lines = _lines(path)
    first = next(lines, None)
    if first is None:
        raise ValueError(f"{path}: empty file (expected the header {_tab(SINGLE_COLUMNS)!r})")
    columns = parse_header(first[1], path)
    labels = []
    for number, line in lines:
        fields = line.split("\t")
        if len(fields) != len(columns):
            raise ValueError(
                f"{path}:{number}: expected {len(columns)} tab-separated columns "
                f"({_tab(columns)}), got {len(fields)}"
            )
        try:
            labels.append(parse_label(fields[-1], num_classes, regression))
        except ValueError as error:
            raise ValueError(f"{path}:{number}: {error}") from None
    if not labels:
        raise ValueError(f"{path}: empty file (a header but no examples)")
    return TsvFile(path=path, columns=columns, labels=tuple(labels))


def infer_num_classes(labels: Sequence[float]) -> int:
    """max(labels) + 1, at least 2."""
    return max(2, int(max(labels)) + 1) if labels else 2


def read_task_directory(
    directory: str, num_classes: int | None = None, regression: bool = False
) -> tuple[dict[str, TsvFile], int | None]:
    """Validates `directory`/{train,validation}.tsv.

    Returns:
      ({split: TsvFile}, num_classes): with num_classes=None for a
      classification task, it is inferred from train.tsv (max label + 1, at
      least 2) and validation.tsv must stay within it; None for regression.
    """
    if not tf.io.gfile.isdir(directory):
        raise ValueError(f"TSV task directory {directory!r} does not exist")
    train = read_tsv(os.path.join(directory, "train.tsv"), num_classes, regression)
    if not regression and num_classes is None:
        num_classes = infer_num_classes(train.labels)
    validation = read_tsv(os.path.join(directory, "validation.tsv"), num_classes, regression)
    if validation.columns != train.columns:
        raise ValueError(
            f"{validation.path}:1: header {_tab(validation.columns)!r} differs from "
            f"{train.path}'s {_tab(train.columns)!r}"
        )
    return {"train": train, "validation": validation}, None if regression else num_classes


# --------------------------------------------------------------------------- #
# seqio plumbing.
# --------------------------------------------------------------------------- #


@seqio.map_over_dataset
def parse_tsv_line(line: tf.Tensor, text_features: Sequence[str], regression: bool) -> dict:
    """A validated TSV line -> {text feature: string, 'label': int32 or float32}."""
    fields = tf.strings.split(line, "\t")
    example = {name: fields[i] for i, name in enumerate(text_features)}
    label = tf.strings.strip(fields[len(text_features)])
    example[LABEL] = tf.strings.to_number(label, tf.float32 if regression else tf.int32)
    return example


def tokenize_text(dataset: tf.data.Dataset, output_features) -> tf.data.Dataset:
    """seqio's `tokenize` (keeping `*_pretokenized`) on the token features only."""
    text = {name: f for name, f in output_features.items() if f.rank == 1}
    return seqio.preprocessors.tokenize(dataset, text)


def output_features(
    vocabulary: seqio.Vocabulary,
    columns: tuple[str, ...],
    num_classes: int | None,
    regression: bool,
) -> dict[str, seqio.Feature]:
    """Token features without EOS for the text columns, and a rank-0 `label`."""
    features = {
        name: seqio.Feature(vocabulary=vocabulary, add_eos=False, required=True)
        for name in TEXT_FEATURES[columns]
    }
    features[LABEL] = seqio.Feature(
        vocabulary=seqio.PassThroughVocabulary(size=num_classes or 0),
        add_eos=False,
        required=True,
        dtype=tf.float32 if regression else tf.int32,
        rank=0,
    )
    return features


def metric_fns(
    metrics: Sequence[str | Callable] | None, num_classes: int | None, regression: bool
) -> list[Callable]:
    """The metric functions: names from `METRICS` or callables; None = defaults."""
    if metrics is None:
        if regression:
            metrics = ("pearson", "spearman")
        else:
            metrics = ("accuracy", "f1", "mcc") if num_classes == 2 else ("accuracy",)
    fns = []
    for metric in metrics:
        if callable(metric):
            fns.append(metric)
        elif metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
        elif metric in _BINARY_ONLY and num_classes != 2:
            raise ValueError(f"metric {metric!r} is binary F1 of class 1: it needs 2 classes")
        else:
            fns.append(METRICS[metric])
    return fns


def encoder_vocabulary(vocabulary: seqio.Vocabulary | str | os.PathLike) -> seqio.Vocabulary:
    """`vocabulary` itself, or an HfVocabulary (needs `tokenizers`) of a tokenizer.json path
    or of a directory holding one (a Hugging Face model directory)."""
    if isinstance(vocabulary, seqio.Vocabulary):
        return vocabulary
    from sam_jax.tasks import hf_vocabulary  # pylint: disable=g-import-not-at-top

    path = os.fspath(vocabulary)
    if os.path.isdir(path):
        path = os.path.join(path, TOKENIZER_FILE)
    return hf_vocabulary.HfVocabulary(path)


def register_tsv_task(
    name: str,
    directory: str | os.PathLike,
    vocabulary: seqio.Vocabulary | str | os.PathLike,
    *,
    num_classes: int | None = None,
    regression: bool = False,
    metrics: Sequence[str | Callable] | None = None,
    shuffle_buffer_size: int | None = None,
    train_fraction: float = 1.0,
    seed: int = 0,
) -> seqio.Task:
    """Registers a local TSV directory as the seqio Task `name` (idempotent).

    Args:
      name: the task name (re-registering it replaces the old definition).
      directory: holds train.tsv and validation.tsv (see the module docstring).
      vocabulary: a seqio Vocabulary, or the path of a Hugging Face
        tokenizer.json or of a directory holding one (then an `HfVocabulary`).
      num_classes: labels are 0..num_classes-1; None infers it from train.tsv.
      regression: float labels (num_classes must then be None).
      metrics: names from `METRICS` ('accuracy', 'f1', 'mcc', 'pearson',
        'spearman') or metric functions; None for the defaults.
      shuffle_buffer_size: the Task's; default: the training set, up to 100,000.
      train_fraction: train on this random fraction of train.tsv, in (0, 1]
        (`subsampling.with_train_fraction`: the same examples for the same seed).
      seed: selects the training subset.

    Returns:
      The registered `seqio.Task`.

    Example:
      >>> task = register_tsv_task("my_cola", "/data/cola", vocab, metrics=["mcc"])
      >>> task.num_input_examples("validation")
      516
    """
    if regression and num_classes is not None:
        raise ValueError("a regression task takes no num_classes")
    if num_classes is not None and num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    directory = os.fspath(directory)
    files, num_classes = read_task_directory(directory, num_classes, regression)
    columns = files["train"].columns
    sizes = {split: files[split].num_examples for split in SPLITS}
    source = subsampling.with_train_fraction(
        seqio.TextLineDataSource(
            {split: files[split].path for split in SPLITS},
            skip_header_lines=1,
            num_input_examples=sizes,
        ),
        train_fraction,
        seed,
    )
    parse = functools.partial(
        parse_tsv_line, text_features=TEXT_FEATURES[columns], regression=regression
    )
    return registry.add_task(
        name,
        source=source,
        preprocessors=[parse, tokenize_text, seqio.CacheDatasetPlaceholder()],
        output_features=output_features(
            encoder_vocabulary(vocabulary), columns, num_classes, regression
        ),
        metric_fns=metric_fns(metrics, num_classes, regression),
        shuffle_buffer_size=shuffle_buffer_size
        or min(source.num_input_examples("train"), _MAX_SHUFFLE_BUFFER),
    )


def task_name(directory: str | os.PathLike) -> str:
    """'local_<directory's base name>', with characters seqio rejects as '_'."""
    base = os.path.basename(os.path.normpath(os.fspath(directory))) or "data"
    return "local_" + re.sub(r"[^\w.:]", "_", base)


@errors.reporting_input_errors
def tsv_task(
    directory: str,
    vocabulary: seqio.Vocabulary | str,
    name: str | None = None,
    num_classes: int | None = None,
    regression: bool = False,
    metrics: Sequence[str] | None = None,
    train_fraction: float = 1.0,
    seed: int = 0,
) -> str:
    """Registers `directory` as a TSV task and returns its name (for gin).

    Bad input (a missing directory, a malformed file) is an `errors.ConfigError`
    whose one-line message starts with 'tsv_task: '.

    Args:
      directory: the task directory (gin: `%TASK_DIR`).
      vocabulary: a seqio Vocabulary or the path of a tokenizer.json.
      name: the task name; default `task_name(directory)` ('local_sst2'), with
        `subsampling.train_fraction_suffix` ('local_sst2_frac0.1_seed0') for a fraction.
      num_classes, regression, metrics, train_fraction, seed: as in `register_tsv_task`.

    Example (gin):
      MIXTURE_OR_TASK_NAME = @local.tsv_task()
      local.tsv_task.directory = %TASK_DIR
      local.tsv_task.vocabulary = %TOKENIZER_JSON
    """
    name = name or task_name(directory) + subsampling.train_fraction_suffix(train_fraction, seed)
    register_tsv_task(
        name,
        directory,
        vocabulary,
        num_classes=num_classes,
        regression=regression,
        metrics=metrics,
        train_fraction=train_fraction,
        seed=seed,
    )
    return name

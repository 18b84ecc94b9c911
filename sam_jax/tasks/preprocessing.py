"""Shared helpers for the seqio tasks: deterministic hashing, `train_fraction`
subsampling, idempotent registration, text postprocessors and metrics.

Nothing here is specific to the demo tasks; the GLUE/SuperGLUE/CBQA tasks over
TFDS are meant to reuse it:

* `TrainFractionSource(source, train_fraction, seed)` wraps *any* seqio
  `DataSource` (a `FunctionDataSource`, a `TfdsDataSource`, ...) and keeps a
  deterministic subset of exactly `num_train_examples(N, fraction)` examples of
  its training split; every other split passes through untouched.
* `train_fraction_indices(N, fraction, seed)` is the same selection as plain
  numpy, for tests and offline inspection.
* `add_task` / `add_mixture` register idempotently (re-registering a name
  replaces the old definition instead of raising as seqio's registries do).
* `exact_match`, `token_f1`, `squad_em_f1`, `accuracy` are seqio-style metric
  functions `metric_fn(targets, predictions) -> dict`, with values in [0, 1].
* `TfdsTaskSpec` and `register_tfds_tasks(specs, mixture, vocabulary,
  train_fraction, seed)` register T5-style text-to-text Tasks over TFDS and
  their proportional mixture (used by glue.py, super_glue.py, cbqa.py). Their
  sources know their split sizes (`known_size_tfds_source`), so registering,
  subsampling and mixing read no data; `benchmark_vocabulary` gives the
  sentencepiece vocabulary (an argument or $SAM_JAX_SPM_PATH, loaded lazily).

The selection rule: every example index i gets a key `mix64(seed, i)` (a
splitmix64 hash, identical on every platform and numpy version); the examples
with the `k = max(1, floor(fraction * N + 1/2))` smallest keys are kept. Hence
the same (fraction, seed) always selects the same examples, the subsets are
nested for increasing fractions (a 5 % subset is inside the 20 % subset of the
same seed), the count is exact, and a different seed gives a different subset.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import math
import os
import re
import string
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import numpy as np

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


# --------------------------------------------------------------------------- #
# Deterministic hashing and a tiny platform-independent PRNG.
# --------------------------------------------------------------------------- #


def splitmix64(x: int) -> int:
    """The splitmix64 finaliser of `x + golden` (a bijection on 64-bit ints)."""
    z = (int(x) + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _splitmix64_np(x: np.ndarray) -> np.ndarray:
    """Vectorised `splitmix64` on a uint64 array (wrap-around arithmetic)."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(_GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def mix64(seed: int, index: int) -> int:
    """64-bit hash of (seed, index); `mix64_array` is its vectorised twin."""
    return splitmix64(splitmix64(int(seed) & _MASK64) ^ (int(index) & _MASK64))


def mix64_array(seed: int, indices: np.ndarray) -> np.ndarray:
    key = np.uint64(splitmix64(int(seed) & _MASK64))
    return _splitmix64_np(np.asarray(indices).astype(np.uint64) ^ key)


def stable_seed(*parts: Any) -> int:
    """A 64-bit seed from any printable parts (stable across runs and hosts)."""
    text = "/".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little")


class Rng:
    """A splitmix64 generator.

    Python's `random` only guarantees `random()` across versions (`choice`,
    `shuffle`, `randrange` have changed before), and numpy's `Generator` methods
    may change for bug fixes, so the generated data sets use this instead: the
    same seed gives the same data on every Python/numpy version.
    """

    def __init__(self, *seed_parts: Any):
        self._state = stable_seed(*seed_parts)

    def next64(self) -> int:
        x = self._state
        self._state = (x + _GOLDEN) & _MASK64
        return splitmix64(x)

    def below(self, n: int) -> int:
        """Uniform integer in [0, n) (rejection sampling, no modulo bias)."""
        if n <= 0:
            raise ValueError(f"n must be positive, got {n}")
        limit = (1 << 64) - ((1 << 64) % n)
        while True:
            x = self.next64()
            if x < limit:
                return x % n

    def randint(self, lo: int, hi: int) -> int:
        """Uniform integer in [lo, hi] (both inclusive)."""
        return lo + self.below(hi - lo + 1)

    def choice(self, seq: Sequence[Any]) -> Any:
        return seq[self.below(len(seq))]

    def shuffle(self, items: list) -> None:
        for i in range(len(items) - 1, 0, -1):
            j = self.below(i + 1)
            items[i], items[j] = items[j], items[i]

    def sample(self, seq: Sequence[Any], k: int) -> list:
        items = list(seq)
        if not 0 <= k <= len(items):
            raise ValueError(f"cannot sample {k} of {len(items)} items")
        for i in range(k):  # partial Fisher-Yates
            j = i + self.below(len(items) - i)
            items[i], items[j] = items[j], items[i]
        return items[:k]


# --------------------------------------------------------------------------- #
# train_fraction.
# --------------------------------------------------------------------------- #


def validate_train_fraction(train_fraction: Any) -> float:
    """Returns `train_fraction` as a float; ValueError unless it is in (0, 1]."""
    ok = isinstance(train_fraction, (int, float, np.integer, np.floating))
    ok = ok and not isinstance(train_fraction, bool)
    if ok:
        value = float(train_fraction)
        if math.isfinite(value) and 0.0 < value <= 1.0:
            return value
    raise ValueError(
        "train_fraction must be a number in the range (0, 1] (0 excluded, 1 "
        f"included), got {train_fraction!r}"
    )


def num_train_examples(num_examples: int, train_fraction: float) -> int:
    """The exact size of a `train_fraction` subset of `num_examples` examples."""
    fraction = validate_train_fraction(train_fraction)
    if num_examples <= 0:
        return 0
    return max(1, min(num_examples, math.floor(fraction * num_examples + 0.5)))


def train_fraction_indices(num_examples: int, train_fraction: float, seed: int = 0) -> np.ndarray:
    """Sorted indices of the examples kept by a `train_fraction` subsample."""
    k = num_train_examples(num_examples, train_fraction)
    keys = mix64_array(seed, np.arange(num_examples, dtype=np.uint64))
    order = np.argsort(keys, kind="stable")
    return np.sort(order[:k]).astype(np.int64)


def train_fraction_mask(num_examples: int, train_fraction: float, seed: int = 0) -> np.ndarray:
    mask = np.zeros(num_examples, dtype=bool)
    mask[train_fraction_indices(num_examples, train_fraction, seed)] = True
    return mask


def train_fraction_suffix(train_fraction: float = 1.0, seed: int = 0) -> str:
    """The task-name suffix for a subsampled variant: '', '_frac0.05', ...

    seqio allows '.' in names. The seed only appears when it is not 0, and not
    at all for fraction 1 (which keeps every example whatever the seed).
    """
    fraction = validate_train_fraction(train_fraction)
    if fraction == 1.0:
        return ""
    suffix = f"_frac{fraction:g}"
    return suffix if seed == 0 else f"{suffix}_seed{seed}"


def _seqio():
    import seqio  # pylint: disable=g-import-not-at-top

    return seqio


def _make_train_fraction_source_cls():
    """Defined lazily so that importing this module does not need seqio/TF."""
    seqio = _seqio()
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    class TrainFractionSource(seqio.DataSource):
        """Keeps a deterministic `train_fraction` subset of one split of a source.

        Args:
          source: any seqio DataSource. It must know the size of the split
            (`num_input_examples`, as FunctionDataSource with `num_input_examples`
            and TfdsDataSource do) unless `num_examples` is given.
          train_fraction: in (0, 1]; 1 returns the source's data unchanged.
          seed: selects which examples; subsets of one seed are nested.
          split: the split to subsample (the others pass through).
          index_key: None to number examples in the source's unshuffled order (the
            source is then read with shuffle=False; the Task shuffles afterwards),
            or the name of an integer feature holding a stable index in [0, N),
            e.g. 'idx' for the TFDS GLUE datasets, which makes the choice
            independent of file order and shuffling.
          num_examples: the split's size, if the source does not report it.
        """

        def __init__(
            self,
            source,
            train_fraction: float,
            seed: int = 0,
            split: str = "train",
            index_key: str | None = None,
            num_examples: int | None = None,
        ):
            self._fraction = validate_train_fraction(train_fraction)
            if split not in source.splits:
                raise ValueError(
                    f"split {split!r} is not one of the source's splits {source.splits}"
                )
            self._source = source
            self._seed = int(seed)
            self._split = split
            self._index_key = index_key
            if num_examples is None:
                num_examples = source.num_input_examples(split)
            if num_examples is None:
                raise ValueError(
                    "train_fraction needs the size of the split: the source reports "
                    "no num_input_examples, pass num_examples="
                )
            self._num_full = int(num_examples)
            self._mask = train_fraction_mask(self._num_full, self._fraction, self._seed)
            counts = {s: source.num_input_examples(s) for s in source.splits}
            counts[split] = int(self._mask.sum())
            super().__init__(
                splits=source.splits,
                num_input_examples=counts,
                caching_permitted=source.caching_permitted,
            )

        @property
        def train_fraction(self) -> float:
            return self._fraction

        @property
        def seed(self) -> int:
            return self._seed

        @property
        def source(self):
            return self._source

        @property
        def supports_arbitrary_sharding(self) -> bool:
            return False

        def list_shards(self, split: str) -> Sequence[str]:
            if split == self._split and self._fraction < 1.0:
                return [split]  # the Task shards at the (already filtered) examples
            return self._source.list_shards(split)

        def __repr__(self):
            return (
                f"TrainFractionSource({self._source!r}, train_fraction="
                f"{self._fraction}, seed={self._seed}, split={self._split!r})"
            )

        def get_dataset(
            self,
            split: str = "train",
            shuffle: bool = True,
            seed: int | None = None,
            shard_info=None,
            *,
            sequence_length=None,  # Unused
            use_cached: bool = False,  # Unused
            num_epochs: int | None = 1,  # Unused
        ) -> tf.data.Dataset:
            del sequence_length, use_cached, num_epochs
            if split != self._split or self._fraction == 1.0:
                return self._source.get_dataset(
                    split=split, shuffle=shuffle, seed=seed, shard_info=shard_info
                )
            mask = tf.constant(self._mask)
            if self._index_key is None:
                ds = self._source.get_dataset(split=split, shuffle=False, seed=seed)
                ds = ds.enumerate()
                ds = ds.filter(lambda i, ex: tf.gather(mask, i))
                ds = ds.map(lambda i, ex: ex)
            else:
                key = self._index_key
                ds = self._source.get_dataset(split=split, shuffle=shuffle, seed=seed)
                ds = ds.filter(lambda ex: tf.gather(mask, tf.cast(ex[key], tf.int64)))
            if shard_info is not None and shard_info.num_shards > 1:
                ds = ds.shard(shard_info.num_shards, shard_info.index)
            return ds

    TrainFractionSource.__qualname__ = "TrainFractionSource"
    return TrainFractionSource


_LAZY_CLASSES = {}


def __getattr__(name: str):
    """`TrainFractionSource` is a seqio.DataSource subclass, built on first use
    so that the numpy helpers and metrics here import without seqio/TF."""
    if name == "TrainFractionSource":
        if name not in _LAZY_CLASSES:
            _LAZY_CLASSES[name] = _make_train_fraction_source_cls()
        return _LAZY_CLASSES[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def with_train_fraction(source, train_fraction: float = 1.0, seed: int = 0, **kwargs):
    """`source` itself for fraction 1 (any seed), else a TrainFractionSource."""
    fraction = validate_train_fraction(train_fraction)
    if fraction == 1.0:
        return source
    return __getattr__("TrainFractionSource")(source, fraction, seed=seed, **kwargs)


# --------------------------------------------------------------------------- #
# Idempotent registration.
# --------------------------------------------------------------------------- #


def add_task(name: str, **task_kwargs):
    """`seqio.TaskRegistry.add` that replaces an existing task of that name.

    seqio's registry raises on duplicates, so importing a task module twice (or
    `importlib.reload`) would fail; here the new definition wins. Mixtures hold
    Task objects, so re-add the mixtures that use a replaced task too.
    """
    seqio = _seqio()
    seqio.TaskRegistry.remove(name)
    return seqio.TaskRegistry.add(name, **task_kwargs)


def add_mixture(name: str, tasks, **mixture_kwargs):
    """`seqio.MixtureRegistry.add` that replaces an existing mixture."""
    seqio = _seqio()
    seqio.MixtureRegistry.remove(name)
    return seqio.MixtureRegistry.add(name, tasks, **mixture_kwargs)


def remove(names: Iterable[str]) -> None:
    """Removes tasks/mixtures from seqio's (global) registries, if present."""
    seqio = _seqio()
    for name in names:
        seqio.MixtureRegistry.remove(name)
        seqio.TaskRegistry.remove(name)


# --------------------------------------------------------------------------- #
# Postprocessors and metrics (seqio style).
# --------------------------------------------------------------------------- #


def _as_text(value: Any) -> str:
    if isinstance(value, (bytes, bytearray, np.bytes_)):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


def strip_text(
    output: Any, example: Mapping[str, Any] | None = None, is_target: bool = False
) -> str:
    """seqio postprocess_fn: decoded output (str or bytes) -> stripped str."""
    del example, is_target
    return _as_text(output).strip()


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: Any) -> str:
    """SQuAD normalisation: lower case, no punctuation, articles or extra space."""
    text = _as_text(text).lower().translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _check_lengths(targets: Sequence[Any], predictions: Sequence[Any]) -> None:
    if len(targets) != len(predictions):
        raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions")


def _best_over_references(target: Any, fn: Callable[[str], float]) -> float:
    """A target may be one answer or a list of acceptable answers."""
    if isinstance(target, (list, tuple)):
        return max((fn(t) for t in target), default=0.0)
    return fn(target)


def _token_f1_one(target: Any, prediction: Any) -> float:
    t = normalize_answer(target).split()
    p = normalize_answer(prediction).split()
    if not t or not p:
        return float(t == p)
    common = collections.Counter(t) & collections.Counter(p)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(p), overlap / len(t)
    return 2 * precision * recall / (precision + recall)


def exact_match(targets: Sequence[Any], predictions: Sequence[Any]) -> dict:
    """Fraction of predictions equal to (one of) the target(s) after SQuAD
    normalisation; 0.0 for no examples."""
    _check_lengths(targets, predictions)
    if not targets:
        return {"exact_match": 0.0}
    scores = [
        _best_over_references(
            t, lambda ref, p=p: float(normalize_answer(ref) == normalize_answer(p))
        )
        for t, p in zip(targets, predictions)
    ]
    return {"exact_match": float(np.mean(scores))}


def token_f1(targets: Sequence[Any], predictions: Sequence[Any]) -> dict:
    """Mean SQuAD token F1 between normalised target and prediction."""
    _check_lengths(targets, predictions)
    if not targets:
        return {"f1": 0.0}
    scores = [
        _best_over_references(t, lambda ref, p=p: _token_f1_one(ref, p))
        for t, p in zip(targets, predictions)
    ]
    return {"f1": float(np.mean(scores))}


def squad_em_f1(targets: Sequence[Any], predictions: Sequence[Any]) -> dict:
    """{'exact_match', 'f1'} in one call (the CBQA metrics)."""
    return {**exact_match(targets, predictions), **token_f1(targets, predictions)}


def accuracy(targets: Sequence[Any], predictions: Sequence[Any]) -> dict:
    """Fraction of predictions equal to the target (after `strip` for text)."""
    _check_lengths(targets, predictions)
    if not targets:
        return {"accuracy": 0.0}

    def norm(x):
        return _as_text(x).strip() if isinstance(x, (str, bytes, np.bytes_)) else x

    hits = [norm(t) == norm(p) for t, p in zip(targets, predictions)]
    return {"accuracy": float(np.mean(hits))}


# --------------------------------------------------------------------------- #
# Benchmark tasks over TFDS (GLUE, SuperGLUE, closed-book QA).
# --------------------------------------------------------------------------- #

SPM_PATH_ENV = "SAM_JAX_SPM_PATH"


def spm_path_from_env() -> str | None:
    """The sentencepiece model path in $SAM_JAX_SPM_PATH, or None if unset/empty."""
    return os.environ.get(SPM_PATH_ENV) or None


def benchmark_vocabulary(vocabulary=None, vocabulary_path: str | None = None):
    """The vocabulary of the benchmark tasks.

    Args:
      vocabulary: a `seqio.Vocabulary` to use as is (tests pass
        `seqio.ByteVocabulary()` or seqio's test sentencepiece model).
      vocabulary_path: a sentencepiece model file (local or gs://), used when
        `vocabulary` is None; defaults to $SAM_JAX_SPM_PATH.

    Returns:
      `vocabulary`, or a `seqio.SentencePieceVocabulary(path)`. seqio loads the
      model file on first use (encode/decode/vocab_size), so registering tasks
      with it reads neither the file nor any data.

    Raises:
      ValueError: both arguments given, or neither given and the environment
        variable unset.
    """
    if vocabulary is not None:
        if vocabulary_path is not None:
            raise ValueError("pass either vocabulary or vocabulary_path, not both")
        return vocabulary
    path = vocabulary_path or spm_path_from_env()
    if not path:
        raise ValueError(
            "the benchmark tasks need a sentencepiece model: pass vocabulary_path= "
            f"(or vocabulary=), or set ${SPM_PATH_ENV}"
        )
    return _seqio().SentencePieceVocabulary(path)


def text_to_text_features(vocabulary) -> dict:
    """T5's output features: 'inputs' and 'targets' text, both with EOS."""
    seqio = _seqio()
    return {
        "inputs": seqio.Feature(vocabulary=vocabulary, add_eos=True, required=True),
        "targets": seqio.Feature(vocabulary=vocabulary, add_eos=True),
    }


def _make_known_size_tfds_source_cls():
    seqio = _seqio()

    class KnownSizeTfdsSource(seqio.TfdsDataSource):
        """A `seqio.TfdsDataSource` whose split sizes are given, not looked up.

        seqio asks the TFDS builder for split sizes, which needs the prepared
        data (or its metadata). The benchmark tasks know the sizes of their
        pinned TFDS versions, so registering them, their `train_fraction`
        variants and their mixtures touches no data; TFDS is only read when a
        dataset is built.

        Args:
          tfds_name: 'dataset/config:version'.
          split_sizes: seqio split name -> number of examples in it.
          tfds_splits: seqio split name -> TFDS split or slice ('train[:3417]');
            by default each seqio split reads the TFDS split of the same name.
        """

        def __init__(
            self,
            tfds_name: str,
            split_sizes: Mapping[str, int],
            tfds_splits: Mapping[str, str] | None = None,
        ):
            tfds_splits = dict(tfds_splits or {s: s for s in split_sizes})
            if set(tfds_splits) != set(split_sizes):
                raise ValueError(
                    f"{tfds_name}: split sizes for {sorted(split_sizes)} but TFDS "
                    f"splits for {sorted(tfds_splits)}"
                )
            super().__init__(tfds_name=tfds_name, splits=tfds_splits)
            self._split_sizes = dict(split_sizes)

        def num_input_examples(self, split: str) -> int:
            return self._split_sizes[split]

    KnownSizeTfdsSource.__qualname__ = "KnownSizeTfdsSource"
    return KnownSizeTfdsSource


def known_size_tfds_source(
    tfds_name: str, split_sizes: Mapping[str, int], tfds_splits: Mapping[str, str] | None = None
):
    """A TFDS source that reports `split_sizes` (see `KnownSizeTfdsSource`)."""
    if "KnownSizeTfdsSource" not in _LAZY_CLASSES:
        _LAZY_CLASSES["KnownSizeTfdsSource"] = _make_known_size_tfds_source_cls()
    return _LAZY_CLASSES["KnownSizeTfdsSource"](tfds_name, split_sizes, tfds_splits)


@dataclasses.dataclass(frozen=True)
class TfdsTaskSpec:
    """One text-to-text benchmark Task over a TFDS dataset (T5 conventions).

    Attributes:
      name: the Task's name without a `train_fraction` suffix.
      tfds_name: 'dataset/config:version'.
      split_sizes: seqio split -> number of TFDS examples in it. Tasks without
        a 'train' split are evaluation-only (seqio skips them when training on
        a mixture).
      text_preprocessors: map TFDS examples to {'inputs', 'targets'} text (plus
        what the postprocessor needs), before tokenization.
      metric_fns: seqio metric functions `fn(targets, predictions) -> dict`.
      postprocess_fn: maps decoded text (predictions and targets) to what the
        metric functions compare.
      tfds_splits: seqio split -> TFDS split or slice; default: the same names.
      train_examples: the number of training examples after preprocessing, if
        it differs from `split_sizes['train']` (ReCoRD: one per answer; WSC: the
        correct referents only); the mixing rate in proportional mixtures.
    """

    name: str
    tfds_name: str
    split_sizes: Mapping[str, int]
    text_preprocessors: Sequence[Callable]
    metric_fns: Sequence[Callable] = ()
    postprocess_fn: Callable | None = None
    tfds_splits: Mapping[str, str] | None = None
    train_examples: int | None = None

    def mixing_rate(self, train_fraction: float = 1.0) -> float:
        """Training examples after `train_fraction` subsampling (0 if no train split).

        The subsample keeps `num_train_examples(N, train_fraction)` of the N TFDS
        examples; when preprocessing changes the count, the rate scales
        `train_examples` by the same proportion (its expected value).
        """
        num_inputs = self.split_sizes.get("train", 0)
        if not num_inputs:
            return 0.0
        kept = num_train_examples(num_inputs, train_fraction)
        return (self.train_examples or num_inputs) * kept / num_inputs


def register_tfds_tasks(
    specs: Sequence[TfdsTaskSpec],
    mixture_name: str,
    vocabulary,
    train_fraction: float = 1.0,
    seed: int = 0,
) -> dict[str, str]:
    """Registers `specs` as seqio Tasks and their proportional mixture (idempotent).

    Every task's training split is subsampled to `train_fraction` (exact count,
    deterministic in `seed`, nested across fractions; see `TrainFractionSource`)
    -- the data-limited setting of Bahri et al. (2022), 2 % to 80 % -- while the
    evaluation splits are kept whole. Examples are numbered in TFDS's
    unshuffled order, which is fixed for a TFDS version. The mixture rate of a
    task is its number of training examples (`TfdsTaskSpec.mixing_rate`), as in
    T5's proportional GLUE/SuperGLUE mixtures (Raffel et al., 2020).

    Args:
      specs: the tasks.
      mixture_name: the mixture's name without suffix.
      vocabulary: a `seqio.Vocabulary` for inputs and targets.
      train_fraction: in (0, 1].
      seed: the subsampling seed.

    Returns:
      {spec.name: registered task name, mixture_name: registered mixture name};
      the registered names carry `train_fraction_suffix(train_fraction, seed)`.
    """
    seqio = _seqio()
    suffix = train_fraction_suffix(train_fraction, seed)
    features = text_to_text_features(vocabulary)
    names, rates = {}, []
    for spec in specs:
        source = known_size_tfds_source(spec.tfds_name, spec.split_sizes, spec.tfds_splits)
        if "train" in spec.split_sizes:
            source = with_train_fraction(source, train_fraction, seed=seed)
        names[spec.name] = spec.name + suffix
        add_task(
            names[spec.name],
            source=source,
            preprocessors=[
                *spec.text_preprocessors,
                seqio.preprocessors.tokenize,
                seqio.CacheDatasetPlaceholder(),
                seqio.preprocessors.append_eos_after_trim,
            ],
            output_features=features,
            postprocess_fn=spec.postprocess_fn,
            metric_fns=list(spec.metric_fns),
        )
        rates.append((names[spec.name], spec.mixing_rate(train_fraction)))
    names[mixture_name] = mixture_name + suffix
    add_mixture(names[mixture_name], rates)
    return names

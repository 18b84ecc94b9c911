"""T5-style text-to-text Tasks over TFDS and their proportional mixture.

glue.py, super_glue.py and cbqa.py describe each benchmark task as a
`TfdsTaskSpec` and register them with `register_tfds_tasks`. Their sources
know their split sizes (`KnownSizeTfdsSource`), so registering, `train_fraction`
subsampling and mixing read no data: TFDS is only read when a dataset is built.

Example:
  >>> spec = TfdsTaskSpec(
  ...     name="glue_rte",
  ...     tfds_name="glue/rte:2.0.0",
  ...     split_sizes={"train": 2490, "validation": 277},
  ...     text_preprocessors=[rte_text],  # TFDS example -> {'inputs', 'targets'}
  ...     metric_fns=[metrics.accuracy],
  ... )
  >>> register_tfds_tasks([spec], "rte_mixture", vocabulary, train_fraction=0.1)
  {'glue_rte': 'glue_rte_frac0.1', 'rte_mixture': 'rte_mixture_frac0.1'}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence

import seqio

from sam_jax.tasks import registry
from sam_jax.tasks import subsampling
from sam_jax.tasks import vocabularies


class KnownSizeTfdsSource(seqio.TfdsDataSource):
    """A `seqio.TfdsDataSource` whose split sizes are given, not looked up.

    seqio asks the TFDS builder for split sizes, which needs the prepared data
    (or its metadata). The benchmark tasks know the sizes of their pinned TFDS
    versions, so registering them, their `train_fraction` variants and their
    mixtures touches no data; TFDS is only read when a dataset is built.

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
        kept = subsampling.num_train_examples(num_inputs, train_fraction)
        return (self.train_examples or num_inputs) * kept / num_inputs


def register_tfds_tasks(
    specs: Sequence[TfdsTaskSpec],
    mixture_name: str,
    vocabulary: seqio.Vocabulary,
    train_fraction: float = 1.0,
    seed: int = 0,
) -> dict[str, str]:
    """Registers `specs` as seqio Tasks and their proportional mixture (idempotent).

    Every task's training split is subsampled to `train_fraction` (exact count,
    deterministic in `seed`, nested across fractions; see
    `subsampling.TrainFractionSource`) -- the data-limited setting of Bahri et
    al. (2022), 2 % to 80 % -- while the evaluation splits are kept whole.
    Examples are numbered in TFDS's unshuffled order, which is fixed for a TFDS
    version. The mixture rate of a task is its number of training examples
    (`TfdsTaskSpec.mixing_rate`), as in T5's proportional GLUE/SuperGLUE
    mixtures (Raffel et al., 2020).

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
    suffix = subsampling.train_fraction_suffix(train_fraction, seed)
    features = vocabularies.text_to_text_features(vocabulary)
    names, rates = {}, []
    for spec in specs:
        source = KnownSizeTfdsSource(spec.tfds_name, spec.split_sizes, spec.tfds_splits)
        if "train" in spec.split_sizes:
            source = subsampling.with_train_fraction(source, train_fraction, seed=seed)
        names[spec.name] = spec.name + suffix
        registry.add_task(
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
    registry.add_mixture(names[mixture_name], rates)
    return names

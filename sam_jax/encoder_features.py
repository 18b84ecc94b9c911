"""A seqio feature converter for BERT-family classifiers and regressors.

`EncoderFeatureConverter` turns the examples of a sentence or sentence-pair
task (`sam_jax.tasks.local`: token ids WITHOUT special tokens, and a rank-0
`label`) into what `sam_jax.models.bert` takes, padded to one length:

* task features: `inputs` (single sentences) or `sentence1` and `sentence2`
  (pairs), int32 [None]; `label`, int32 [] (classification) or float32 []
  (regression). Other features (e.g. `*_pretokenized`) are dropped.
* model features, int32 [length] each (the caller batches them):
  `input_ids` -- `[CLS] a [SEP]`, or `[CLS] a [SEP] b [SEP]` for pairs, then
  the vocabulary's pad id up to `length` (0 for BERT, 1 for RoBERTa, whose
  position ids depend on it); `attention_mask` -- 1 on the real tokens
  (special ones included), 0 on padding; `token_type_ids` -- 0 for the first
  segment with its [CLS] and [SEP], 1 for the second segment and its final
  [SEP], 0 on padding. And `label`, the task's label, unchanged (same dtype).

The length is the task feature length `inputs`, the TOTAL length with the
special tokens, also for pairs: pass `{"inputs": 128}` both to
`task.get_dataset` (which then trims only a single sentence's `inputs`; a
pair task has no feature of that name and is not trimmed) and to the
converter.

Truncation is Hugging Face `tokenizers`' `longest_first`: a single sentence
keeps its first `length - 2` tokens. A pair has a budget of `length - 3`
tokens; if the two segments exceed it, tokens are removed from the end of
the longer one, one at a time, until both are equally long, then alternately
from each, the originally shorter one (the first if they were equally long)
giving up a token first, so the originally longer one keeps the odd token of
an odd budget. In closed form, with s <= l the two lengths and B the budget:
`(s, B - s)` if 2s <= B, else `(B // 2, B // 2 + B % 2)`. This is exactly
what `tokenizers.Tokenizer.encode(a, b)` does with
`enable_truncation(length, strategy="longest_first")` (tested against it);
Python `transformers` "slow" tokenizers can differ by one token for an odd
budget. It is a deterministic per-example tf.data map (no randomness, order
kept).

RoBERTa puts two separators between the segments (`<s> a </s></s> b </s>`);
this converter writes one (`<s> a </s> b </s>`), as BERT does. A RoBERTa
classifier fine-tunes fine on that layout but it is not what RoBERTa saw in
pre-training; its token type ids are all 0 in HF, here the second segment's
are 1 (RoBERTa has one token type: give its model zeros or ignore them).

Packing is not supported (`pack=True` is a ValueError): a classifier reads
one [CLS] per row.

Example:

  >>> task = local.register_tsv_task("my_sst2", "/data/sst2", vocab)
  >>> ds = task.get_dataset({"inputs": 128}, split="train", shuffle=False)
  >>> converter = EncoderFeatureConverter(task)  # cls/sep/pad from its vocabulary
  >>> batch = next(converter(ds, {"inputs": 128}).batch(32).as_numpy_iterator())
  >>> {k: (v.shape, v.dtype.name) for k, v in batch.items()}
  {'input_ids': ((32, 128), 'int32'), 'attention_mask': ((32, 128), 'int32'),
   'token_type_ids': ((32, 128), 'int32'), 'label': ((32,), 'int32')}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import seqio
import tensorflow as tf

FeatureSpec = seqio.FeatureConverter.FeatureSpec

LABEL = "label"
# The task features of each layout (the token features, without special tokens).
SINGLE = ("inputs",)
PAIR = ("sentence1", "sentence2")
MODEL_TOKEN_FEATURES = ("input_ids", "attention_mask", "token_type_ids")
LABEL_DTYPES = (tf.int32, tf.float32)
SPECIAL_ROLES = ("cls", "sep", "pad")
# The length `get_model_feature_lengths` gives the rank-0 label: seqio skips
# the length check of rank-0 features, the value only names it a scalar.
SCALAR_LENGTH = 0


def longest_first_lengths(n1: tf.Tensor, n2: tf.Tensor, budget: tf.Tensor | int):
    """The lengths two segments keep under HF `tokenizers`' `longest_first`.

    Args:
      n1: the first segment's length (int32 scalar).
      n2: the second segment's length.
      budget: how many tokens the two may keep together (>= 0).

    Returns:
      (k1, k2), int32 scalars, k1 + k2 = min(n1 + n2, budget).

    Example:
      >>> [int(k) for k in longest_first_lengths(7, 5, 5)]
      [3, 2]
    """
    n1, n2 = tf.cast(n1, tf.int32), tf.cast(n2, tf.int32)
    budget = tf.cast(budget, tf.int32)
    short = tf.minimum(n1, n2)
    keeps_short = 2 * short <= budget
    short_keeps = tf.where(keeps_short, short, budget // 2)
    long_keeps = tf.where(keeps_short, budget - short, budget // 2 + budget % 2)
    first_is_long = n1 > n2  # equal lengths: the second counts as the longer
    k1 = tf.where(first_is_long, long_keeps, short_keeps)
    k2 = tf.where(first_is_long, short_keeps, long_keeps)
    fits = n1 + n2 <= budget
    return tf.where(fits, n1, k1), tf.where(fits, n2, k2)


def _vocabulary_of(source: Any) -> seqio.Vocabulary | None:
    """The vocabulary of `source`'s `inputs` (or `sentence1`) feature, or `source` itself."""
    if source is None or isinstance(source, seqio.Vocabulary):
        return source
    features = source if isinstance(source, Mapping) else getattr(source, "output_features", None)
    if not isinstance(features, Mapping):
        raise TypeError(
            "EncoderFeatureConverter takes a seqio Task or Mixture, its output_features "
            f"or a Vocabulary, got {type(source).__name__}"
        )
    for name in (SINGLE[0], PAIR[0]):
        if name in features:
            return features[name].vocabulary
    raise ValueError(
        f"EncoderFeatureConverter: the task has no 'inputs' or 'sentence1' feature "
        f"(it has {sorted(features)}) to take the special token ids from"
    )


def _special_id(vocabulary: seqio.Vocabulary | None, role: str) -> tuple[int | None, str]:
    """(the vocabulary's `<role>_id`, '') or (None, why not)."""
    if vocabulary is None:
        return None, "no vocabulary given"
    try:
        token_id = getattr(vocabulary, f"{role}_id")
    except AttributeError:
        return None, f"{vocabulary!r} has no {role}_id"
    except ValueError as error:  # HfVocabulary: the file defines no such token
        return None, str(error).splitlines()[0]
    if token_id is None:
        return None, f"{vocabulary!r} has no {role} token"
    return int(token_id), ""


def resolve_special_ids(source: Any = None, **explicit: int | None) -> dict[str, int]:
    """{'cls', 'sep', 'pad'} -> id: the explicit ones, the rest from `source`'s vocabulary.

    Args:
      source: a seqio Task or Mixture, its output_features or a Vocabulary
        (an `HfVocabulary` has cls_id, sep_id and pad_id); None for none.
      **explicit: cls=..., sep=..., pad=... (None: take it from `source`).

    Raises:
      ValueError: one line naming every id neither given nor in the vocabulary.

    Example:
      >>> resolve_special_ids(HfVocabulary(minilm_tokenizer_json))
      {'cls': 101, 'sep': 102, 'pad': 0}
    """
    vocabulary = _vocabulary_of(source)
    ids, missing = {}, []
    for role in SPECIAL_ROLES:
        token_id, reason = explicit.get(role), ""
        if token_id is None:
            token_id, reason = _special_id(vocabulary, role)
        if token_id is None:
            missing.append(f"{role}_id ({reason})")
        elif isinstance(token_id, bool) or int(token_id) != token_id or token_id < 0:
            raise ValueError(
                f"EncoderFeatureConverter: {role}_id must be an id >= 0, got {token_id!r}"
            )
        else:
            ids[role] = int(token_id)
    if missing:
        raise ValueError(
            "EncoderFeatureConverter needs cls_id, sep_id and pad_id (pass them, or a task "
            f"whose 'inputs'/'sentence1' vocabulary defines them); missing: {'; '.join(missing)}"
        )
    return ids


def task_layout(element_spec: Mapping[str, Any]) -> tuple[str, ...]:
    """SINGLE or PAIR: which token features a dataset's examples have.

    Raises:
      ValueError: neither or both layouts, or no `label` (one line).
    """
    has_single = SINGLE[0] in element_spec
    has_pair = all(name in element_spec for name in PAIR)
    if has_single == has_pair or LABEL not in element_spec:
        raise ValueError(
            "EncoderFeatureConverter expects the features 'inputs' or 'sentence1' and "
            f"'sentence2', and 'label'; the dataset has {sorted(element_spec)}"
        )
    return SINGLE if has_single else PAIR


def _label_spec(element_spec: Mapping[str, Any], error_label: str) -> FeatureSpec:
    """The rank-0 label's spec, int32 or float32 (what FeatureSpec's single dtype cannot say)."""
    spec = element_spec.get(LABEL)
    if spec is None:
        return FeatureSpec(dtype=tf.int32, rank=0)  # the base class names the missing label
    if spec.dtype not in LABEL_DTYPES or spec.shape.rank != 0:
        raise ValueError(
            f"EncoderFeatureConverter ({error_label}): 'label' must be a scalar int32 "
            f"(classification) or float32 (regression), got {spec.dtype.name} of shape {spec.shape}"
        )
    return FeatureSpec(dtype=spec.dtype, rank=0)


class EncoderFeatureConverter(seqio.FeatureConverter):
    """[CLS] a [SEP] (b [SEP]) with attention mask and token types, padded with the pad id.

    Class attributes (seqio's contract):
      TASK_FEATURES: the one task feature length, `inputs`: the total length,
        special tokens included, for single sentences and pairs alike.
      MODEL_FEATURES: `input_ids`, `attention_mask`, `token_type_ids` (int32
        [length]) and `label` (rank 0; int32 here, float32 accepted too).

    `_validate_dataset` is overridden (minimally) because seqio's
    `FeatureSpec` has one dtype and one set of features per class: the input
    check takes the dataset's layout (`inputs`, or `sentence1`+`sentence2`,
    which the length key `inputs` stands for) and lets longer token features
    through (they are truncated here, not rejected); both checks accept a
    scalar `label` of int32 or float32 (`_convert_features` passes it through
    unchanged). Everything else (missing features, dtypes, ranks, the exact
    output length) is seqio's own check.

    Args:
      source: where to take the special ids from: a seqio Task or Mixture,
        its output_features (the vocabulary of `inputs` or `sentence1`), or a
        Vocabulary with cls_id, sep_id and pad_id (`HfVocabulary`).
      cls_id: overrides the vocabulary's [CLS] / <s>.
      sep_id: overrides the vocabulary's [SEP] / </s>.
      pad_id: overrides the vocabulary's pad id.
      pack: must be False (packing is not supported).
      apply_length_check: seqio's check of the output lengths.

    Raises:
      ValueError: `pack=True`, or a special id neither given nor defined.

    Example:
      >>> converter = EncoderFeatureConverter(cls_id=0, sep_id=2, pad_id=1)
      >>> ds = tf.data.Dataset.from_tensors({"inputs": [5, 6], "label": 1})
      >>> next(converter(ds, {"inputs": 6}).as_numpy_iterator())["input_ids"]
      array([0, 5, 6, 2, 1, 1], dtype=int32)
    """

    TASK_FEATURES = {"inputs": FeatureSpec(dtype=tf.int32)}
    MODEL_FEATURES = {
        **{name: FeatureSpec(dtype=tf.int32) for name in MODEL_TOKEN_FEATURES},
        LABEL: FeatureSpec(dtype=tf.int32, rank=0),
    }
    PACKING_FEATURE_DTYPES = None

    def __init__(
        self,
        source: Any = None,
        *,
        cls_id: int | None = None,
        sep_id: int | None = None,
        pad_id: int | None = None,
        pack: bool = False,
        apply_length_check: bool = True,
    ):
        if pack:
            raise ValueError(
                "EncoderFeatureConverter does not pack (one example, one [CLS] per row): "
                "pass pack=False"
            )
        ids = resolve_special_ids(source, cls=cls_id, sep=sep_id, pad=pad_id)
        self._cls_id, self._sep_id, self._pad_id = ids["cls"], ids["sep"], ids["pad"]
        super().__init__(pack=False, apply_length_check=apply_length_check)

    @property
    def cls_id(self) -> int:
        return self._cls_id

    @property
    def sep_id(self) -> int:
        return self._sep_id

    @property
    def pad_id(self) -> int:
        return self._pad_id

    def __repr__(self) -> str:
        return (
            f"EncoderFeatureConverter(cls_id={self._cls_id}, sep_id={self._sep_id}, "
            f"pad_id={self._pad_id})"
        )

    def _validate_dataset(self, ds, expected_features, expected_lengths, strict, error_label):
        """seqio's checks, with the layout-dependent task features and an int32/float32 label."""
        element_spec = ds.element_spec
        if error_label == "input_validation":
            names = task_layout(element_spec)
            expected_features = {name: FeatureSpec(dtype=tf.int32) for name in names}
            expected_lengths = {}  # too-long token features are truncated, not rejected
        else:
            expected_features = dict(expected_features)
        expected_features[LABEL] = _label_spec(element_spec, error_label)
        return super()._validate_dataset(
            ds, expected_features, expected_lengths, strict, error_label
        )

    def _encode(self, example: Mapping[str, tf.Tensor], length: int) -> dict[str, tf.Tensor]:
        """One example -> the model features (truncated, specials added, padded)."""
        cls, sep = tf.constant([self._cls_id]), tf.constant([self._sep_id])
        if SINGLE[0] in example:
            first = example[SINGLE[0]][: length - 2]
            input_ids = tf.concat([cls, first, sep], axis=0)
            token_type_ids = tf.zeros_like(input_ids)
        else:
            first, second = example[PAIR[0]], example[PAIR[1]]
            keep1, keep2 = longest_first_lengths(tf.size(first), tf.size(second), length - 3)
            first, second = first[:keep1], second[:keep2]
            input_ids = tf.concat([cls, first, sep, second, sep], axis=0)
            token_type_ids = tf.concat(
                [tf.zeros([keep1 + 2], tf.int32), tf.ones([keep2 + 1], tf.int32)], axis=0
            )
        size = tf.size(input_ids)
        padding = [[0, length - size]]
        features = {
            "input_ids": tf.pad(input_ids, padding, constant_values=self._pad_id),
            "attention_mask": tf.sequence_mask(size, length, dtype=tf.int32),
            "token_type_ids": tf.pad(token_type_ids, padding),
        }
        for value in features.values():
            value.set_shape([length])
        features[LABEL] = example[LABEL]
        return features

    def _convert_features(
        self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]
    ) -> tf.data.Dataset:
        """Truncates (longest_first), adds [CLS]/[SEP], pads to `task_feature_lengths['inputs']`."""
        length = task_feature_lengths["inputs"]
        layout = task_layout(ds.element_spec)
        minimum = 1 + len(layout)  # [CLS] and a [SEP] per segment
        if not isinstance(length, int) or length < minimum:
            kind = "a pair" if layout == PAIR else "a sentence"
            raise ValueError(
                f"EncoderFeatureConverter: the 'inputs' length must be an int >= {minimum} "
                f"for {kind} (the special tokens count), got {length!r}"
            )
        return ds.map(
            lambda example: self._encode(example, length),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )

    def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> dict[str, int]:
        """{'input_ids', 'attention_mask', 'token_type_ids': inputs length, 'label': 0 (scalar)}.

        Example:
          >>> converter.get_model_feature_lengths({"inputs": 128})["input_ids"]
          128
        """
        length = task_feature_lengths["inputs"]
        lengths = {name: length for name in MODEL_TOKEN_FEATURES}
        lengths[LABEL] = SCALAR_LENGTH
        return lengths

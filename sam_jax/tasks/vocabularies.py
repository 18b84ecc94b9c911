"""The text-to-text tasks' vocabulary and T5's output features over it.

The benchmark tasks (glue.py, super_glue.py, cbqa.py) are tokenized with a
sentencepiece model the user supplies: an argument, or the file named by
$SAM_JAX_SPM_PATH (`benchmark_vocabulary`). The features are T5's: 'inputs'
and 'targets' text, both ending in EOS (`text_to_text_features`, also used by
the demo tasks with their shipped vocabulary).

Example:
  >>> vocabulary = benchmark_vocabulary(vocabulary_path="/path/to/spm.model")
  >>> features = text_to_text_features(vocabulary)  # {'inputs': ..., 'targets': ...}
"""

from __future__ import annotations

import os

import seqio

SPM_PATH_ENV = "SAM_JAX_SPM_PATH"


def spm_path_from_env() -> str | None:
    """The sentencepiece model path in $SAM_JAX_SPM_PATH, or None if unset/empty."""
    return os.environ.get(SPM_PATH_ENV) or None


def benchmark_vocabulary(
    vocabulary: seqio.Vocabulary | None = None, vocabulary_path: str | None = None
) -> seqio.Vocabulary:
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
    return seqio.SentencePieceVocabulary(path)


def text_to_text_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
    """T5's output features: 'inputs' and 'targets' text, both with EOS."""
    return {
        "inputs": seqio.Feature(vocabulary=vocabulary, add_eos=True, required=True),
        "targets": seqio.Feature(vocabulary=vocabulary, add_eos=True),
    }

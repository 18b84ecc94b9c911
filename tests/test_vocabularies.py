"""Tests of sam_jax/tasks/vocabularies.py: the benchmark vocabulary and T5's features."""

import importlib.resources

import pytest

seqio = pytest.importorskip("seqio")

from sam_jax.tasks import vocabularies  # noqa: E402

VOCAB = seqio.ByteVocabulary()
TEST_SPM = str(
    importlib.resources.files("seqio") / "test_data" / "sentencepiece" / "sentencepiece.model"
)


def test_vocabulary_comes_from_the_argument_or_the_environment(monkeypatch):
    monkeypatch.delenv(vocabularies.SPM_PATH_ENV, raising=False)
    assert vocabularies.spm_path_from_env() is None
    with pytest.raises(ValueError, match="SAM_JAX_SPM_PATH"):
        vocabularies.benchmark_vocabulary()
    with pytest.raises(ValueError, match="not both"):
        vocabularies.benchmark_vocabulary(VOCAB, "/some/spm.model")
    assert vocabularies.benchmark_vocabulary(VOCAB) is VOCAB
    monkeypatch.setenv(vocabularies.SPM_PATH_ENV, "")
    assert vocabularies.spm_path_from_env() is None
    # The file need not exist until the vocabulary is used.
    monkeypatch.setenv(vocabularies.SPM_PATH_ENV, "/no/such/dir/spm.model")
    assert vocabularies.spm_path_from_env() == "/no/such/dir/spm.model"
    vocabulary = vocabularies.benchmark_vocabulary()
    assert isinstance(vocabulary, seqio.SentencePieceVocabulary)
    assert vocabulary.sentencepiece_model_file == "/no/such/dir/spm.model"
    from_path = vocabularies.benchmark_vocabulary(vocabulary_path=TEST_SPM)
    assert from_path.sentencepiece_model_file == TEST_SPM


def test_text_to_text_features_are_t5s():
    features = vocabularies.text_to_text_features(VOCAB)
    assert set(features) == {"inputs", "targets"}
    for feature in features.values():
        assert feature.vocabulary is VOCAB and feature.add_eos and feature.required

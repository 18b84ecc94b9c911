"""Test configuration: 8 simulated CPU devices for the sharded tests.

XLA reads the flag when the backend initialises, so it is set here, before any
test module imports JAX.
"""

import os

import pytest

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(scope="session")
def vocab():
    """The real MiniLM tokenizer (BERT WordPiece, uncased) as a seqio Vocabulary."""
    import minilm  # noqa: PLC0415

    from sam_jax.tasks.hf_vocabulary import HfVocabulary  # noqa: PLC0415

    return HfVocabulary(minilm.model_dir() / "tokenizer.json")


@pytest.fixture
def registered():
    """Names of seqio tasks a test registers; removed afterwards (the registries are global)."""
    from sam_jax.tasks import registry  # noqa: PLC0415

    names = []
    yield names
    registry.remove(names)

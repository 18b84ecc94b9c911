"""Tests of sam_jax/tasks/registry.py: idempotent registration in seqio's registries."""

import pytest

seqio = pytest.importorskip("seqio")
tf = pytest.importorskip("tensorflow")

from sam_jax.tasks import registry  # noqa: E402

VOCAB = seqio.ByteVocabulary()


def _task_kwargs(text: str) -> dict:
    def dataset_fn(split, shuffle_files, seed=None):
        del split, shuffle_files, seed
        return tf.data.Dataset.from_tensor_slices({"inputs": [text]})

    return dict(
        source=seqio.FunctionDataSource(dataset_fn, splits=["train"]),
        preprocessors=[seqio.preprocessors.tokenize],
        output_features={"inputs": seqio.Feature(VOCAB, add_eos=False)},
    )


def _first_input(name: str) -> str:
    ds = seqio.get_mixture_or_task(name).get_dataset(
        {"inputs": 8}, split="train", shuffle=False, use_cached=False
    )
    return next(ds.as_numpy_iterator())["inputs_pretokenized"].decode()


def test_add_task_and_add_mixture_replace_and_remove_deletes():
    names = ["test_registry_mixture", "test_registry_task"]
    try:
        first = registry.add_task("test_registry_task", **_task_kwargs("old"))
        second = registry.add_task("test_registry_task", **_task_kwargs("new"))
        assert second is not first and seqio.TaskRegistry.get("test_registry_task") is second
        assert _first_input("test_registry_task") == "new"
        registry.add_mixture("test_registry_mixture", ["test_registry_task"], default_rate=1.0)
        mixture = registry.add_mixture(
            "test_registry_mixture", [("test_registry_task", 2.0)], default_rate=1.0
        )
        assert seqio.MixtureRegistry.get("test_registry_mixture") is mixture
        assert mixture.get_rate(second) == 2.0
    finally:
        registry.remove(names)
    assert not set(names) & set(seqio.TaskRegistry.names())
    assert not set(names) & set(seqio.MixtureRegistry.names())
    registry.remove(names)  # absent names are no error

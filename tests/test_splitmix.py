"""Tests of sam_jax/tasks/splitmix.py: splitmix64 hashing and the platform-independent Rng."""

import collections
import hashlib

import numpy as np
import pytest

pytest.importorskip("seqio")  # `sam_jax.tasks` registers seqio tasks on import

from sam_jax.tasks import splitmix  # noqa: E402


def test_splitmix64_reference_value():
    # splitmix64 reference value (seed 1234567 from the original paper's code).
    assert splitmix.splitmix64(1234567) == 6457827717110365317


def test_mix64_numpy_matches_python():
    idx = np.array([0, 1, 2, 12345, 2**40 + 7], dtype=np.uint64)
    for seed in (0, 1, 2**63 + 5):
        assert splitmix.mix64_array(seed, idx).tolist() == [
            splitmix.mix64(seed, int(i)) for i in idx
        ]


def test_stable_seed_is_the_first_8_bytes_of_sha256():
    digest = hashlib.sha256(b"demo_nli/train/0").digest()
    assert splitmix.stable_seed("demo_nli", "train", 0) == int.from_bytes(digest[:8], "little")


def test_rng_is_deterministic_and_seeded():
    draws = [splitmix.Rng("a", 1).below(1000) for _ in range(3)]
    assert len(set(draws)) == 1
    a = [splitmix.Rng("a", 1).sample(range(100), 10)]
    assert a == [splitmix.Rng("a", 1).sample(range(100), 10)]
    assert a != [splitmix.Rng("a", 2).sample(range(100), 10)]


def test_rng_below_is_uniform_and_in_range():
    rng = splitmix.Rng("uniform")
    counts = collections.Counter(rng.below(6) for _ in range(6000))
    assert set(counts) == set(range(6))
    # 1000 expected per value; 5 standard deviations (~ 5 * 29) either way.
    assert all(850 < count < 1150 for count in counts.values())
    with pytest.raises(ValueError, match="positive"):
        rng.below(0)


def test_rng_choice_shuffle_and_sample():
    rng = splitmix.Rng("methods")
    items = list(range(20))
    rng.shuffle(items)
    assert sorted(items) == list(range(20)) and items != list(range(20))
    sample = rng.sample("abcdefgh", 5)
    assert len(sample) == len(set(sample)) == 5 and set(sample) <= set("abcdefgh")
    assert rng.sample("abc", 0) == []
    assert sorted(rng.sample("abc", 3)) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="cannot sample 4 of 3"):
        rng.sample("abc", 4)
    assert {rng.choice("xyz") for _ in range(100)} == {"x", "y", "z"}

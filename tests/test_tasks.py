"""Tests for the offline seqio demo tasks (sam_jax/tasks/demo.py).

Run with the seqio environment: `/work/venv-seqio/bin/python -m pytest -q
tests/test_tasks.py`; without seqio the whole file is skipped.
"""

import importlib
import re

import numpy as np
import pytest

seqio = pytest.importorskip("seqio")
pytest.importorskip("tensorflow")

from sam_jax import tasks  # noqa: E402  (registers the demo tasks)
from sam_jax.tasks import demo  # noqa: E402
from sam_jax.tasks import registry  # noqa: E402
from sam_jax.tasks import subsampling  # noqa: E402

SEQ = demo.SEQUENCE_LENGTH
EOS = 1


def _task_examples(name, split="train", **kwargs):
    """A fresh unshuffled read of a task's split."""
    ds = seqio.get_mixture_or_task(name).get_dataset(
        sequence_length=SEQ, split=split, shuffle=False, use_cached=False, **kwargs
    )
    return list(ds.as_numpy_iterator())


_READS = {}


def _canonical(name, split="train"):
    """A memoised read of a canonical task (keeps the file under ~60 s)."""
    if (name, split) not in _READS:
        _READS[(name, split)] = _task_examples(name, split)
    return _READS[(name, split)]


def _texts(examples):
    return [
        (ex["inputs_pretokenized"].decode(), ex["targets_pretokenized"].decode()) for ex in examples
    ]


def _ids(text):
    return list(demo.VOCABULARY.encode(text)) + [EOS]


@pytest.fixture
def registered():
    """Registers task variants and removes them afterwards (global registries)."""
    names = []
    before = set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names())

    def register(**kwargs):
        out = demo.register_demo_tasks(**kwargs)
        names.extend(n for n in out.values() if n not in before)
        return out

    yield register
    registry.remove(names)


# --------------------------------------------------------------------------- #
# Registration and the seqio pipeline.
# --------------------------------------------------------------------------- #


def test_tasks_and_mixture_are_registered():
    assert {"demo_cbqa", "demo_nli"} <= set(seqio.TaskRegistry.names())
    assert "demo_mixture" in seqio.MixtureRegistry.names()
    mixture = seqio.get_mixture_or_task("demo_mixture")
    assert [t.name for t in mixture.tasks] == ["demo_cbqa", "demo_nli"]
    # Proportional rates: the training-set sizes.
    assert mixture.get_rate(seqio.get_mixture_or_task("demo_cbqa")) == 600
    assert mixture.get_rate(seqio.get_mixture_or_task("demo_nli")) == 600
    for name in ("demo_cbqa", "demo_nli"):
        task = seqio.get_mixture_or_task(name)
        assert set(task.output_features) == {"inputs", "targets"}
        for feature in task.output_features.values():
            assert isinstance(feature.vocabulary, seqio.SentencePieceVocabulary)
            assert feature.vocabulary.vocab_size == 1280
            assert feature.add_eos
        assert task.splits == ("train", "validation")
        assert task.metric_fns


def test_mixture_yields_tokenized_examples_of_both_tasks():
    ds = seqio.get_mixture_or_task("demo_mixture").get_dataset(
        sequence_length=SEQ, split="train", shuffle=False, use_cached=False
    )
    known = {
        (ex["inputs"], ex["targets"]): task
        for task, gen in (("cbqa", demo.cbqa_examples), ("nli", demo.nli_examples))
        for ex in gen()["train"]
    }
    seen_tasks = set()
    vocab = demo.VOCABULARY
    for ex in ds.take(64).as_numpy_iterator():
        assert set(ex) == {"inputs", "targets"}
        for key in ("inputs", "targets"):
            assert ex[key].dtype == np.int32 and ex[key].ndim == 1
            assert 2 <= len(ex[key]) <= SEQ[key]
            assert ex[key][-1] == EOS and EOS not in ex[key][:-1]
        text = (vocab.decode(ex["inputs"].tolist()), vocab.decode(ex["targets"].tolist()))
        assert text in known, text
        assert ex["inputs"].tolist() == _ids(text[0])
        seen_tasks.add(known[text])
    assert seen_tasks == {"cbqa", "nli"}


def test_known_examples_decode_to_expected_text():
    cbqa = _canonical("demo_cbqa")
    assert len(cbqa) == 600
    first = cbqa[0]
    question = "tell me Seta's city."
    # The shipped vocabulary's ids: a change of vocabulary or generator shows here.
    assert first["inputs"].tolist() == [371, 367, 724, 1264, 1240, 340, 1251, EOS]
    assert first["targets"].tolist() == [527, EOS]
    assert demo.VOCABULARY.decode(first["inputs"].tolist()) == question
    assert demo.VOCABULARY.decode(first["targets"].tolist()) == "Lima"
    assert first["inputs_pretokenized"].decode() == question

    nli = _canonical("demo_nli")
    assert len(nli) == 600
    text = "premise: Veso, Furo and Dana sang. hypothesis: Furo sang"
    assert demo.VOCABULARY.decode(nli[0]["inputs"].tolist()) == text
    assert demo.VOCABULARY.decode(nli[0]["targets"].tolist()) == "entailment"

    val = _canonical("demo_cbqa", "validation")
    assert len(val) == 120
    assert _texts(val)[0] == ("which job does Vuzi have?", "judge")
    assert len(_canonical("demo_nli", "validation")) == 300


@pytest.mark.parametrize("generator", [demo.cbqa_examples, demo.nli_examples])
def test_sizes_fit_the_demo_limits(generator):
    for split, examples in generator().items():
        assert len(examples) <= (1000 if split == "train" else 300)
        # + EOS, they fit the sequence lengths 24 / 4 without truncation.
        for key, limit in (("inputs", demo.MAX_INPUT_PIECES), ("targets", demo.MAX_TARGET_PIECES)):
            assert max(len(demo.VOCABULARY.encode(ex[key])) for ex in examples) <= limit
        inputs = [ex["inputs"] for ex in examples]
        assert len(set(inputs)) == len(inputs)  # no duplicate questions


def test_pipeline_matches_generator():
    for name, gen in (("demo_cbqa", demo.cbqa_examples), ("demo_nli", demo.nli_examples)):
        for split in ("train", "validation"):
            expected = [(ex["inputs"], ex["targets"]) for ex in gen()[split]]
            assert _texts(_canonical(name, split)) == expected


# --------------------------------------------------------------------------- #
# The shipped vocabulary.
# --------------------------------------------------------------------------- #


def test_every_demo_word_is_one_piece_and_other_text_round_trips():
    vocab = demo.VOCABULARY
    words = {
        word
        for ex in demo.all_examples()
        for text in (ex["inputs"], ex["targets"])
        for word in re.findall(r"[A-Za-z]+", text)
    }
    assert len(words) > 200
    assert [w for w in sorted(words) if len(vocab.encode(w)) != 1] == []
    # Byte fallback: text the demo never uses still decodes to itself, without UNK.
    for text in ("Zürich 1984: 3/4 naïve", "tab\tand ~ünïcode~"):
        ids = vocab.encode(text)
        assert 2 not in ids and vocab.decode(ids) == text
    assert vocab.vocab_size == 1280 and (vocab.pad_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2)


def test_the_shipped_vocabulary_is_what_the_build_script_makes(tmp_path):
    sentencepiece = pytest.importorskip("sentencepiece")
    from sam_jax.tasks import build_demo_vocabulary

    rebuilt = tmp_path / "demo_vocabulary.model"
    build_demo_vocabulary.build(str(rebuilt))

    def pieces(path):
        model = sentencepiece.SentencePieceProcessor(model_file=str(path))
        return [model.id_to_piece(i) for i in range(model.get_piece_size())]

    assert pieces(rebuilt) == pieces(demo.VOCABULARY_PATH)


# --------------------------------------------------------------------------- #
# Generalisation: held-out validation.
# --------------------------------------------------------------------------- #


def test_cbqa_validation_is_held_out_but_learnable():
    data = demo.cbqa_examples()
    train, val = data["train"], data["validation"]
    train_inputs = {ex["inputs"] for ex in train}
    by_fact = {}
    for ex in train:
        by_fact.setdefault((ex["relation"], ex["subject"]), []).append(ex)
    train_templates = {(ex["relation"], ex["template"]) for ex in train}
    for ex in val:
        assert ex["inputs"] not in train_inputs
        assert ex["subject"] in ex["inputs"]
        seen = by_fact[(ex["relation"], ex["subject"])]
        # The same fact, same answer, under the other five templates.
        assert len(seen) == demo.CBQA_NUM_TEMPLATES - 1 == 5
        assert all(t["targets"] == ex["targets"] for t in seen)
        assert ex["template"] not in {t["template"] for t in seen}
        # The wording itself is familiar: seen in training with other subjects.
        assert (ex["relation"], ex["template"]) in train_templates
    # Every fact is asked in validation exactly once.
    assert {(ex["relation"], ex["subject"]) for ex in val} == set(by_fact)
    # Every answer is one of its relation's, and each relation uses most of them.
    for relation, answers in demo.CBQA_ANSWERS.items():
        given = {ex["targets"] for ex in val if ex["relation"] == relation}
        assert given <= set(answers) and len(given) >= len(answers) - 1
    assert len(val) == demo.CBQA_NUM_PEOPLE * len(demo.CBQA_RELATIONS)


def test_nli_validation_uses_new_entities_and_values():
    data = demo.nli_examples()
    names = demo.nli_names()
    assert not set(names["train"]) & set(names["validation"])
    train_text = " ".join(ex["inputs"] for ex in data["train"])
    train_words = set(re.findall(r"\w+", train_text))
    assert not set(names["validation"]) & train_words
    for ex in data["validation"]:
        words = set(re.findall(r"[A-Z]\w+", ex["inputs"]))
        assert words and words <= set(names["validation"])
    # Nor are they the closed-book QA people.
    cbqa_people = {subject for _, subject, _ in demo.cbqa_fact_table()}
    assert not cbqa_people & (set(names["train"]) | set(names["validation"]))
    train_inputs = {ex["inputs"] for ex in data["train"]}
    assert not train_inputs & {ex["inputs"] for ex in data["validation"]}


_VERB_BASE = dict(demo.NLI_VERBS)


def _nli_rule(premise, hypothesis):
    """An independent reading of the premise/hypothesis pairs."""
    m = re.fullmatch(r"(\w+) and (\w+) did not (\w+)\.", premise)
    if m:
        people, verb, did = {m.group(1), m.group(2)}, m.group(3), False
    else:
        m = re.fullmatch(r"(\w+)(?:, (\w+))? and (\w+) (\w+)\.", premise)
        assert m, premise
        people = {g for g in m.groups()[:3] if g}
        verb, did = _VERB_BASE[m.group(4)], True
    h = re.fullmatch(r"(\w+) did not (\w+)", hypothesis)
    if h:
        x, h_verb, h_did = h.group(1), h.group(2), False
    else:
        h = re.fullmatch(r"(\w+) (\w+)", hypothesis)
        assert h, hypothesis
        x, h_verb, h_did = h.group(1), _VERB_BASE[h.group(2)], True
    if x not in people or h_verb != verb:
        return "neutral"
    return "entailment" if h_did == did else "contradiction"


@pytest.mark.parametrize("split", ["train", "validation"])
def test_nli_labels_follow_the_rules(split):
    examples = demo.nli_examples()[split]
    for ex in examples:
        assert ex["inputs"] == f"premise: {ex['premise']} hypothesis: {ex['hypothesis']}"
        assert _nli_rule(ex["premise"], ex["hypothesis"]) == ex["targets"], ex
    labels = [ex["targets"] for ex in examples]
    for label in demo.NLI_LABELS:  # roughly balanced
        assert labels.count(label) / len(labels) > 0.25
    # Negation: every polarity pair of premise and hypothesis occurs where the rule allows.
    polarities = {label: set() for label in demo.NLI_LABELS}
    for ex in examples:
        polarities[ex["targets"]].add(("did not" in ex["premise"], "did not" in ex["hypothesis"]))
    same, different = {(False, False), (True, True)}, {(False, True), (True, False)}
    assert polarities == {
        "entailment": same,
        "contradiction": different,
        "neutral": same | different,
    }


# --------------------------------------------------------------------------- #
# Determinism.
# --------------------------------------------------------------------------- #


def _first_inputs(name, count, **kwargs):
    ds = seqio.get_mixture_or_task(name).get_dataset(SEQ, split="train", use_cached=False, **kwargs)
    return [ex["inputs"].tolist() for ex in ds.take(count).as_numpy_iterator()]


def test_datasets_are_deterministic():
    for name in ("demo_cbqa", "demo_nli"):
        assert _texts(_task_examples(name)) == _texts(_canonical(name))
    assert _first_inputs("demo_mixture", 200, shuffle=False) == _first_inputs(
        "demo_mixture", 200, shuffle=False
    )
    # Shuffled with a seed: reproducible, and really shuffled.
    shuffled = _first_inputs("demo_nli", 50, shuffle=True, seed=3)
    assert shuffled == _first_inputs("demo_nli", 50, shuffle=True, seed=3)
    assert shuffled != _first_inputs("demo_nli", 50, shuffle=True, seed=4)
    assert shuffled != [ex["inputs"].tolist() for ex in _canonical("demo_nli")[:50]]


def test_different_data_seeds_give_different_data(registered):
    for gen in (demo.cbqa_examples, demo.nli_examples, demo.cbqa_fact_table):
        assert gen(0) == gen(0)
        assert gen(0) != gen(1)
    a = {ex["inputs"] for ex in demo.cbqa_examples(0)["train"]}
    b = {ex["inputs"] for ex in demo.cbqa_examples(1)["train"]}
    assert len(a & b) < len(a) // 10
    names = registered(data_seed=1)
    assert names["cbqa"] == "demo_cbqa_data1"
    other = _texts(_task_examples(names["nli"]))
    assert other == [(ex["inputs"], ex["targets"]) for ex in demo.nli_examples(1)["train"]]
    assert other != _texts(_canonical("demo_nli"))


def test_registration_is_idempotent():
    demo.register_demo_tasks()
    demo.register_demo_tasks()
    importlib.reload(demo)
    importlib.reload(tasks)
    assert "demo_mixture" in seqio.MixtureRegistry.names()
    mixture = seqio.get_mixture_or_task("demo_mixture")
    # The mixture points at the live (re-registered) task objects.
    assert all(seqio.TaskRegistry.get(t.name) is t for t in mixture.tasks)
    assert len(_task_examples("demo_cbqa")) == 600


# --------------------------------------------------------------------------- #
# train_fraction.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "bad", [0, 0.0, -0.1, -1, 1.0001, 2, float("nan"), float("inf"), True, "0.5", None]
)
def test_bad_train_fraction_raises(bad):
    with pytest.raises(ValueError, match=r"train_fraction.*\(0, 1\]"):
        demo.register_demo_tasks(train_fraction=bad)


def test_registered_train_fraction_tasks(registered):
    names = registered(train_fraction=0.1)
    assert names == {
        "cbqa": "demo_cbqa_frac0.1",
        "nli": "demo_nli_frac0.1",
        "mixture": "demo_mixture_frac0.1",
    }
    for key, gen, full in (("cbqa", demo.cbqa_examples, 600), ("nli", demo.nli_examples, 600)):
        task = seqio.get_mixture_or_task(names[key])
        got = _texts(_task_examples(names[key]))
        assert len(got) == full // 10 == task.num_input_examples("train")
        idx = subsampling.train_fraction_indices(full, 0.1, seed=0)
        train = gen()["train"]
        assert got == [(train[i]["inputs"], train[i]["targets"]) for i in idx]
        # Validation is never subsampled.
        assert _texts(_task_examples(names[key], split="validation")) == _texts(
            _canonical(f"demo_{key}", "validation")
        )
        assert task.num_input_examples("validation") == len(gen()["validation"])
    mixture = seqio.get_mixture_or_task(names["mixture"])
    assert [mixture.get_rate(t) for t in mixture.tasks] == [60, 60]


def test_train_fraction_tasks_nested_and_seeded(registered):
    small = set(_texts(_task_examples(registered(train_fraction=0.05)["nli"])))
    large = set(_texts(_task_examples(registered(train_fraction=0.2)["nli"])))
    again = set(_texts(_task_examples(registered(train_fraction=0.05)["nli"])))
    other = registered(train_fraction=0.05, seed=7)
    assert other["nli"] == "demo_nli_frac0.05_seed7"
    reseeded = set(_texts(_task_examples(other["nli"])))
    assert len(small) == 30 and len(large) == 120 and len(reseeded) == 30
    assert small < large
    assert small == again
    assert small != reseeded
    # fraction 1 is the full task under the canonical name.
    assert registered(train_fraction=1.0, seed=3)["nli"] == "demo_nli"


# --------------------------------------------------------------------------- #
# Metrics and postprocessing (T5's, in percent: tests/test_metrics.py).
# --------------------------------------------------------------------------- #


def test_task_metrics_on_perfect_and_wrong_predictions():
    for name, key in (("demo_cbqa", "em"), ("demo_nli", "accuracy")):
        task = seqio.get_mixture_or_task(name)
        examples = _canonical(name, "validation")
        targets = [
            task.postprocess_fn(ex["targets_pretokenized"], example=ex, is_target=True)
            for ex in examples
        ]
        # Predictions as a model would decode them (str from the vocabulary).
        decoded = [
            task.postprocess_fn(demo.VOCABULARY.decode(ex["targets"].tolist()), example=ex)
            for ex in examples
        ]
        assert targets == decoded and all(isinstance(t, str) for t in targets)
        scores = {}
        for fn in task.metric_fns:
            scores.update(fn(targets, decoded))
        assert scores[key] == 100.0
        wrong = {}
        for fn in task.metric_fns:
            wrong.update(fn(targets, ["nope"] * len(targets)))
        assert wrong[key] == 0.0


# --------------------------------------------------------------------------- #
# Feature conversion (what the trainer consumes).
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("lengths", [SEQ, {"inputs": 128, "targets": 32}])
def test_packed_encdec_feature_converter(lengths):
    ds = seqio.get_dataset(
        "demo_mixture",
        task_feature_lengths=lengths,
        dataset_split="train",
        shuffle=False,
        num_epochs=1,
        use_cached=False,
        feature_converter=seqio.EncDecFeatureConverter(pack=True),
    )
    n_in, n_out = lengths["inputs"], lengths["targets"]
    expected = {
        "encoder_input_tokens": n_in,
        "encoder_segment_ids": n_in,
        "encoder_positions": n_in,
        "decoder_target_tokens": n_out,
        "decoder_input_tokens": n_out,
        "decoder_loss_weights": n_out,
        "decoder_segment_ids": n_out,
        "decoder_positions": n_out,
    }
    known = {
        ex["inputs"]: ex["targets"]
        for gen in (demo.cbqa_examples, demo.nli_examples)
        for ex in gen()["train"]
    }
    vocab = demo.VOCABULARY
    max_segments = 0
    for ex in ds.take(16).as_numpy_iterator():
        assert {k: v.shape for k, v in ex.items()} == {k: (n,) for k, n in expected.items()}
        seg, dseg = ex["encoder_segment_ids"], ex["decoder_segment_ids"]
        assert seg[0] == 1 and dseg[0] == 1
        assert np.all(np.diff(seg[seg > 0]) >= 0)
        assert seg.max() == dseg.max()
        max_segments = max(max_segments, int(seg.max()))
        # Every packed segment is one real example: inputs and its target.
        for s in range(1, seg.max() + 1):
            inputs = ex["encoder_input_tokens"][seg == s].tolist()
            targets = ex["decoder_target_tokens"][dseg == s].tolist()
            assert inputs[-1] == EOS and targets[-1] == EOS
            assert ex["encoder_positions"][seg == s].tolist() == list(range(len(inputs)))
            text = vocab.decode(inputs)
            assert known[text] == vocab.decode(targets)
            # Decoder inputs: the targets shifted right, restarting at each segment.
            assert ex["decoder_input_tokens"][dseg == s].tolist() == [0] + targets[:-1]
        np.testing.assert_array_equal(ex["decoder_loss_weights"] > 0, dseg > 0)
        np.testing.assert_array_equal(ex["encoder_input_tokens"] > 0, seg > 0)
    # With 128/32 several examples share a row; at 24/4 few pairs fit.
    if n_in >= 128:
        assert max_segments >= 2

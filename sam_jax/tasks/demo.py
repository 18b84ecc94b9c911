"""Offline demo tasks: generated closed-book QA and NLI, plus their mixture.

Nothing is downloaded: the examples are generated in code from a fixed seed
with a platform-independent PRNG (`splitmix.Rng`), so every machine sees
the same text, and they are tokenized with a small SentencePiece model shipped
in the repository (`sam_jax/tasks/data/demo_vocabulary.model`, built from the demo text
by `python -m sam_jax.tasks.build_demo_vocabulary`): a real subword vocabulary in which
the demo's words are single pieces. Both tasks are small (train <= 1000,
validation <= 300 examples, inputs <= 23 pieces and targets <= 3 pieces, so
that with EOS they fit sequence lengths 24 / 4 untruncated), so a tiny model
learns them within minutes on a CPU.

Both put generalisation at stake:

* ``demo_cbqa`` -- closed-book QA over a synthetic fact table: made-up people,
  each with a job, a home city and a pet. Each relation has 6 question
  templates (all name the relation and the person). Every fact is asked in
  training under 5 of them; validation asks it under the 6th. So no validation
  question occurs in training, every validation answer is learnable from
  training (the same fact under other wordings), and every validation template
  is seen in training with other facts: a model must recall the fact across
  paraphrases rather than memorise question strings. Metrics: SQuAD exact
  match 'em' and token F1 'f1', in percent (`metrics.squad`).
* ``demo_nli`` -- premise/hypothesis pairs about who did (or did not) do
  something, labelled entailment / neutral / contradiction by membership and
  negation. Validation uses people that never occur in training, so the rule,
  not the names, must be learnt. Metric: 'accuracy', in percent.

``demo_mixture`` mixes them proportionally to their training-set sizes.

`register_demo_tasks(train_fraction=..., seed=...)` registers subsampled
variants (names get a suffix such as ``_frac0.05``); importing this module
registers the full-data tasks.
"""

from __future__ import annotations

import functools
import os

import seqio
import tensorflow as tf

from sam_jax.tasks import metrics
from sam_jax.tasks import registry
from sam_jax.tasks import subsampling
from sam_jax.tasks import vocabularies
from sam_jax.tasks.splitmix import Rng

VOCABULARY_PATH = os.path.join(os.path.dirname(__file__), "data", "demo_vocabulary.model")
VOCABULARY = seqio.SentencePieceVocabulary(VOCABULARY_PATH)


def vocabulary() -> seqio.SentencePieceVocabulary:
    """The demo tasks' vocabulary (for gin: `VOCABULARY = @demo.vocabulary()`, gin/t5x/demo.gin)."""
    return VOCABULARY


OUTPUT_FEATURES = vocabularies.text_to_text_features(VOCABULARY)
# In pieces, without EOS: with it every example fits sequence lengths 24 / 4.
MAX_INPUT_PIECES = 23
MAX_TARGET_PIECES = 3
SEQUENCE_LENGTH = {"inputs": MAX_INPUT_PIECES + 1, "targets": MAX_TARGET_PIECES + 1}
SPLITS = ("train", "validation")
SHUFFLE_BUFFER_SIZE = 8192  # larger than every split: a full shuffle
DATA_SEED = 0

Example = dict[str, object]

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def _unique_names(rng: Rng, count: int, syllables: int, used: set) -> list[str]:
    """`count` capitalised consonant-vowel names not in `used` (which grows)."""
    names = []
    while len(names) < count:
        name = "".join(
            rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables)
        ).capitalize()
        if name.lower() not in used:
            used.add(name.lower())
            names.append(name)
    return names


# --------------------------------------------------------------------------- #
# demo_cbqa: closed-book QA over a generated fact table.
# --------------------------------------------------------------------------- #

CBQA_NUM_PEOPLE = 40
CBQA_ANSWERS = {
    "job": ("baker", "pilot", "nurse", "farmer", "tailor", "poet", "judge", "chef"),
    "city": ("Oslo", "Lima", "Rome", "Kyiv", "Baku", "Doha", "Riga", "Bern"),
    "pet": ("cat", "dog", "owl", "fox", "rat", "eel", "yak", "emu"),
}
CBQA_RELATIONS = tuple(CBQA_ANSWERS)
# Six paraphrases per relation; for each fact one is held out for validation.
CBQA_TEMPLATES = {
    relation: (
        f"what is {{}}'s {relation}?",
        f"{{}}'s {relation} is what?",
        f"name the {relation} of {{}}.",
        f"tell me {{}}'s {relation}.",
        f"which {relation} does {{}} have?",
        f"the {relation} of {{}} is?",
    )
    for relation in CBQA_RELATIONS
}
CBQA_NUM_TEMPLATES = 6
CBQA_NUM_FACTS = CBQA_NUM_PEOPLE * len(CBQA_RELATIONS)
CBQA_SIZES = {
    "train": CBQA_NUM_FACTS * (CBQA_NUM_TEMPLATES - 1),
    "validation": CBQA_NUM_FACTS,
}


@functools.lru_cache(maxsize=8)
def cbqa_fact_table(seed: int = DATA_SEED) -> tuple[tuple[str, str, str], ...]:
    """(relation, person, answer) triples, deterministic in `seed`."""
    rng = Rng("demo_cbqa/facts", seed)
    people = _unique_names(rng, CBQA_NUM_PEOPLE, 2, set())
    return tuple(
        (relation, person, rng.choice(CBQA_ANSWERS[relation]))
        for person in people
        for relation in CBQA_RELATIONS
    )


@functools.lru_cache(maxsize=8)
def cbqa_examples(seed: int = DATA_SEED) -> dict[str, tuple[Example, ...]]:
    """{'train': ..., 'validation': ...}; each example is a dict with 'inputs',
    'targets' and the metadata 'relation', 'subject', 'template'."""
    rng = Rng("demo_cbqa/templates", seed)
    train, validation = [], []
    for relation, subject, answer in cbqa_fact_table(seed):
        templates = CBQA_TEMPLATES[relation]
        held_out = rng.below(len(templates))
        for t, template in enumerate(templates):
            example = {
                "inputs": template.format(subject),
                "targets": answer,
                "relation": relation,
                "subject": subject,
                "template": t,
            }
            (validation if t == held_out else train).append(example)
    rng.shuffle(train)
    return {"train": tuple(train), "validation": tuple(validation)}


# --------------------------------------------------------------------------- #
# demo_nli: generated premise/hypothesis pairs.
# --------------------------------------------------------------------------- #

NLI_LABELS = ("entailment", "neutral", "contradiction")
NLI_SIZES = {"train": 600, "validation": 300}
NLI_VERBS = (
    ("swam", "swim"),
    ("ran", "run"),
    ("sang", "sing"),
    ("won", "win"),
    ("ate", "eat"),
    ("sat", "sit"),
    ("hid", "hide"),
    ("fell", "fall"),
)
NLI_NUM_TRAIN_NAMES = 80
NLI_NUM_VALIDATION_NAMES = 40


def nli_format(premise: str, hypothesis: str) -> str:
    return f"premise: {premise} hypothesis: {hypothesis}"


@functools.lru_cache(maxsize=8)
def nli_names(seed: int = DATA_SEED) -> dict[str, tuple[str, ...]]:
    """Disjoint name pools for training and validation (none is a CBQA name)."""
    rng = Rng("demo_nli/names", seed)
    used = {subject.lower() for _, subject, _ in cbqa_fact_table(seed)}
    names = _unique_names(rng, NLI_NUM_TRAIN_NAMES + NLI_NUM_VALIDATION_NAMES, 2, used)
    return {
        "train": tuple(names[:NLI_NUM_TRAIN_NAMES]),
        "validation": tuple(names[NLI_NUM_TRAIN_NAMES:]),
    }


def _nli_pair(rng: Rng, label: str, names) -> tuple[str, str]:
    """A premise naming who did (or did not) do something, a hypothesis about one person."""
    group = rng.sample(names, 3 + rng.below(2))
    members, outsider = group[:-1], group[-1]
    past, base = rng.choice(NLI_VERBS)
    negative = len(members) == 2 and rng.below(2)
    if negative:
        premise = f"{members[0]} and {members[1]} did not {base}."
    elif len(members) == 2:
        premise = f"{members[0]} and {members[1]} {past}."
    else:
        premise = f"{members[0]}, {members[1]} and {members[2]} {past}."
    x = rng.choice(members)
    did, did_not = f"{x} {past}", f"{x} did not {base}"
    if label == "entailment":
        return premise, did_not if negative else did
    if label == "contradiction":
        return premise, did if negative else did_not
    return premise, rng.choice((f"{outsider} {past}", f"{outsider} did not {base}"))


@functools.lru_cache(maxsize=8)
def nli_examples(seed: int = DATA_SEED) -> dict[str, tuple[Example, ...]]:
    """{'train': ..., 'validation': ...}; examples have 'inputs', 'targets' and
    the metadata 'premise', 'hypothesis'."""
    names = nli_names(seed)
    out = {}
    for split in SPLITS:
        rng = Rng("demo_nli", split, seed)
        examples, seen = [], set()
        while len(examples) < NLI_SIZES[split]:
            label = rng.choice(NLI_LABELS)
            premise, hypothesis = _nli_pair(rng, label, list(names[split]))
            text = nli_format(premise, hypothesis)
            if text in seen:
                continue
            seen.add(text)
            examples.append(
                {"inputs": text, "targets": label, "premise": premise, "hypothesis": hypothesis}
            )
        out[split] = tuple(examples)
    return out


# --------------------------------------------------------------------------- #
# seqio plumbing.
# --------------------------------------------------------------------------- #


def all_examples(data_seed: int = DATA_SEED) -> tuple[Example, ...]:
    """Every example of every demo task and split (the vocabulary's corpus)."""
    return tuple(
        example
        for generator in (cbqa_examples, nli_examples)
        for split in SPLITS
        for example in generator(data_seed)[split]
    )


def _to_dataset(examples) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices(
        {
            "inputs": tf.constant([ex["inputs"] for ex in examples], tf.string),
            "targets": tf.constant([ex["targets"] for ex in examples], tf.string),
        }
    )


def make_source(generator, data_seed: int = DATA_SEED) -> seqio.DataSource:
    """A FunctionDataSource over `generator(data_seed)`'s splits."""

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None):
        del shuffle_files, seed  # in-memory data; the Task shuffles
        return _to_dataset(generator(data_seed)[split])

    sizes = {s: len(v) for s, v in generator(data_seed).items()}
    return seqio.FunctionDataSource(dataset_fn, splits=SPLITS, num_input_examples=sizes)


PREPROCESSORS = (
    seqio.preprocessors.tokenize,
    seqio.CacheDatasetPlaceholder(),
    seqio.preprocessors.append_eos_after_trim,
)


def register_demo_tasks(
    train_fraction: float = 1.0, seed: int = 0, data_seed: int = DATA_SEED
) -> dict[str, str]:
    """Registers demo_cbqa, demo_nli and demo_mixture (idempotent).

    Args:
      train_fraction: in (0, 1]: keep this fraction of each task's training split
        (exact count, deterministic in `seed`, nested across fractions); the
        validation splits are never subsampled.
      seed: the subsampling seed.
      data_seed: the generators' seed (0 for the canonical tasks).

    Returns:
      {'cbqa': name, 'nli': name, 'mixture': name}: 'demo_cbqa' etc. for the
      full data, with a suffix such as '_frac0.05' (and '_seed3', '_data1') for
      other settings. Remove them with `registry.remove(names.values())`.
    """
    suffix = subsampling.train_fraction_suffix(train_fraction, seed)
    if data_seed != DATA_SEED:
        suffix += f"_data{data_seed}"
    names = {
        "cbqa": "demo_cbqa" + suffix,
        "nli": "demo_nli" + suffix,
        "mixture": "demo_mixture" + suffix,
    }
    common = dict(
        output_features=OUTPUT_FEATURES,
        preprocessors=list(PREPROCESSORS),
        postprocess_fn=metrics.strip_text,
        shuffle_buffer_size=SHUFFLE_BUFFER_SIZE,
    )
    for key, generator, metric_fns in (
        ("cbqa", cbqa_examples, [metrics.squad]),
        ("nli", nli_examples, [metrics.accuracy]),
    ):
        source = subsampling.with_train_fraction(
            make_source(generator, data_seed), train_fraction, seed=seed
        )
        registry.add_task(names[key], source=source, metric_fns=metric_fns, **common)
    registry.add_mixture(
        names["mixture"],
        [names["cbqa"], names["nli"]],
        default_rate=seqio.mixing_rate_num_examples,
    )
    return names


def mixture(train_fraction: float = 1.0, seed: int = 0) -> str:
    """Registers the demo tasks and returns the mixture's name (gin: `@demo.mixture()`).

    gin/tasks/demo.gin binds it with TRAIN_FRACTION and SEED, as
    `local.tsv_task` is for a local task.
    """
    return register_demo_tasks(train_fraction, seed)["mixture"]


DEMO_TASK_NAMES = register_demo_tasks()

"""Offline demo tasks: generated closed-book QA and NLI, plus their mixture.

Nothing is downloaded or read from disk: the examples are generated in code from
a fixed seed with a platform-independent PRNG (`preprocessing.Rng`), so every
machine sees the same bytes. Both tasks are small (train <= 2000, validation
<= 360 examples, inputs <= 63 bytes and targets <= 15 bytes, so that with EOS
they fit sequence lengths 64 / 16 untruncated) and use `seqio.ByteVocabulary()`
(259 ids), so a tiny model trains on them in minutes.

Both put generalisation at stake:

* ``demo_cbqa`` -- closed-book QA over a synthetic fact table (made-up countries
  with a capital and a language, made-up people with a birthplace and a job).
  Each relation has 4 question templates. Every fact is asked in training under
  3 of them; validation asks it under the 4th. So no validation question occurs
  in training, every validation answer is learnable from training (the same
  fact under other wordings), and every validation template is seen in training
  with other facts. A model must transfer a fact across paraphrases rather
  than memorise question strings. Metrics: exact match and token F1.
* ``demo_nli`` -- premise/hypothesis pairs labelled entailment / neutral /
  contradiction by compositional rules over counts ("has at least 5 cats"),
  age comparisons ("older than") and sets of people with negation ("did not
  swim"). Validation uses people that never occur in training and counts and
  ages held out of training. Metric: accuracy.

``demo_mixture`` mixes them proportionally to their training-set sizes.

`register_demo_tasks(train_fraction=..., seed=...)` registers subsampled
variants (names get a suffix such as ``_frac0.05``); importing this module
registers the full-data tasks.
"""

from __future__ import annotations

import functools

import seqio
import tensorflow as tf

from tasks import preprocessing
from tasks.preprocessing import Rng

VOCABULARY = seqio.ByteVocabulary()
OUTPUT_FEATURES = {
    "inputs": seqio.Feature(vocabulary=VOCABULARY, add_eos=True, required=True),
    "targets": seqio.Feature(vocabulary=VOCABULARY, add_eos=True),
}
# In bytes, without EOS: with it every example fits sequence lengths 64 / 16.
MAX_INPUT_BYTES = 63
MAX_TARGET_BYTES = 15
SPLITS = ("train", "validation")
SHUFFLE_BUFFER_SIZE = 8192  # larger than every split: a full shuffle
DATA_SEED = 0

Example = dict[str, object]

# --------------------------------------------------------------------------- #
# Made-up names.
# --------------------------------------------------------------------------- #

_ONSETS = (
    "b",
    "d",
    "f",
    "g",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "dr",
    "gr",
    "kr",
    "tr",
    "th",
    "sh",
)
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")
_CODAS = ("", "", "n", "r", "l", "s", "k")


def _syllables(rng: Rng, n: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(n))


def _unique_names(rng: Rng, count: int, make, used: set, max_len: int) -> list:
    names = []
    while len(names) < count:
        name = make(rng)
        if len(name) <= max_len and name.lower() not in used:
            used.add(name.lower())
            names.append(name)
    return names


# --------------------------------------------------------------------------- #
# demo_cbqa: closed-book QA over a generated fact table.
# --------------------------------------------------------------------------- #

CBQA_NUM_COUNTRIES = 60
CBQA_NUM_PEOPLE = 120
CBQA_NUM_LANGUAGES = 12
CBQA_JOBS = (
    "baker",
    "pilot",
    "nurse",
    "farmer",
    "tailor",
    "poet",
    "judge",
    "chef",
    "miner",
    "potter",
    "sailor",
    "singer",
    "doctor",
    "painter",
)
# Four paraphrases per relation; for each fact one is held out for validation.
CBQA_TEMPLATES = {
    "capital": (
        "question: what is the capital of {}?",
        "question: which city is the capital of {}?",
        "question: {}'s capital city is called what?",
        "question: name the capital of {}.",
    ),
    "language": (
        "question: what language is spoken in {}?",
        "question: which language do people in {} speak?",
        "question: {}'s main language is what?",
        "question: in {}, what language is used?",
    ),
    "birthplace": (
        "question: where was {} born?",
        "question: in which city was {} born?",
        "question: what is the birthplace of {}?",
        "question: {} was born in what city?",
    ),
    "job": (
        "question: what does {} do for a living?",
        "question: what is {}'s job?",
        "question: what is the occupation of {}?",
        "question: {} works as what?",
    ),
}
CBQA_NUM_TEMPLATES = 4
CBQA_NUM_FACTS = 2 * CBQA_NUM_COUNTRIES + 2 * CBQA_NUM_PEOPLE
CBQA_SIZES = {
    "train": CBQA_NUM_FACTS * (CBQA_NUM_TEMPLATES - 1),
    "validation": CBQA_NUM_FACTS,
}


@functools.lru_cache(maxsize=8)
def cbqa_fact_table(seed: int = DATA_SEED) -> tuple[tuple[str, str, str], ...]:
    """(relation, subject, answer) triples, deterministic in `seed`."""
    rng = Rng("demo_cbqa/facts", seed)
    used = set()
    countries = _unique_names(
        rng,
        CBQA_NUM_COUNTRIES,
        lambda r: (
            _syllables(r, 2) + r.choice(("ia", "land", "ora", "stan", "mar", "via"))
        ).capitalize(),
        used,
        12,
    )
    cities = _unique_names(
        rng,
        CBQA_NUM_COUNTRIES,
        lambda r: (
            _syllables(r, 2) + r.choice(("ton", "burg", "vel", "grad", "port", "holm", ""))
        ).capitalize(),
        used,
        MAX_TARGET_BYTES,
    )
    languages = _unique_names(
        rng,
        CBQA_NUM_LANGUAGES,
        lambda r: (_syllables(r, 2) + r.choice(("ic", "ish", "ese", "an"))).capitalize(),
        used,
        MAX_TARGET_BYTES,
    )
    people = _unique_names(
        rng,
        CBQA_NUM_PEOPLE,
        lambda r: (
            _syllables(r, 2).capitalize()
            + " "
            + (_syllables(r, 1) + r.choice(("son", "berg", "ez", "ov", "ard"))).capitalize()
        ),
        used,
        14,
    )
    facts = []
    for country, city in zip(countries, cities):
        facts.append(("capital", country, city))
        facts.append(("language", country, rng.choice(languages)))
    for person in people:
        facts.append(("birthplace", person, rng.choice(cities)))
        facts.append(("job", person, rng.choice(CBQA_JOBS)))
    return tuple(facts)


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
    _check_sizes("demo_cbqa", train + validation)
    return {"train": tuple(train), "validation": tuple(validation)}


# --------------------------------------------------------------------------- #
# demo_nli: generated premise/hypothesis pairs.
# --------------------------------------------------------------------------- #

NLI_LABELS = ("entailment", "neutral", "contradiction")
NLI_SIZES = {"train": 2000, "validation": 300}
NLI_OBJECTS = (
    "cats",
    "dogs",
    "pens",
    "cups",
    "hats",
    "eggs",
    "figs",
    "keys",
    "maps",
    "owls",
    "jars",
    "rugs",
)
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
NLI_MAX_COUNT = 19
# Counts and ages that only validation uses: training never mentions any of
# these numbers; every validation count premise uses a held-out count and every
# validation age premise at least one held-out age.
NLI_HELD_OUT_COUNTS = (4, 9, 13, 16)
NLI_HELD_OUT_AGES = (23, 38, 41, 56, 64)
NLI_AGE_RANGE = (10, 69)
NLI_NUM_TRAIN_NAMES = 80
NLI_NUM_VALIDATION_NAMES = 40
_NLI_WORDS = {
    "has",
    "no",
    "at",
    "least",
    "most",
    "is",
    "older",
    "younger",
    "than",
    "and",
    "did",
    "not",
    "premise",
    "hypothesis",
    *NLI_OBJECTS,
    *(w for pair in NLI_VERBS for w in pair),
}


def nli_format(premise: str, hypothesis: str) -> str:
    return f"premise: {premise} hypothesis: {hypothesis}"


@functools.lru_cache(maxsize=8)
def nli_names(seed: int = DATA_SEED) -> dict[str, tuple[str, ...]]:
    """Disjoint three-letter name pools for training and validation."""
    rng = Rng("demo_nli/names", seed)
    consonants, vowels = "bdfgjklmnprstvz", "aeiou"
    names = _unique_names(
        rng,
        NLI_NUM_TRAIN_NAMES + NLI_NUM_VALIDATION_NAMES,
        lambda r: (r.choice(consonants) + r.choice(vowels) + r.choice(consonants)).capitalize(),
        set(_NLI_WORDS),
        3,
    )
    return {
        "train": tuple(names[:NLI_NUM_TRAIN_NAMES]),
        "validation": tuple(names[NLI_NUM_TRAIN_NAMES:]),
    }


def _noun(n: int, obj: str) -> str:
    return obj[:-1] if n == 1 else obj  # "1 cat", "2 cats"


def _count_phrase(name: str, k: int, obj: str) -> str:
    if k == 0:
        return f"{name} has no {obj}."
    return f"{name} has {k} {_noun(k, obj)}."


def _nli_count(rng: Rng, label: str, names, numbers, premise_numbers):
    """Counts with 'at least' / 'at most' / 'no'."""
    a, other = rng.sample(names, 2)
    obj = rng.choice(NLI_OBJECTS)
    k = rng.choice(premise_numbers)
    premise = _count_phrase(a, k, obj)
    positive = [m for m in numbers if m >= 1]
    if label == "entailment":
        options = [("least", m) for m in positive if m <= k]
        options += [("most", m) for m in positive if m >= k]
    elif label == "contradiction":
        options = [("least", m) for m in positive if m > k]
        options += [("most", m) for m in positive if m < k]
        if k > 0:
            options.append(("no", 0))
    else:  # neutral: same claim about another object or another person
        quant, m = rng.choice(
            [("least", m) for m in positive] + [("most", m) for m in positive] + [("no", 0)]
        )
        if rng.below(2):
            subject, obj = a, rng.choice([o for o in NLI_OBJECTS if o != obj])
        else:
            subject = other
        return premise, _count_claim(subject, quant, m, obj)
    if not options:
        return None
    quant, m = rng.choice(options)
    return premise, _count_claim(a, quant, m, obj)


def _count_claim(name: str, quant: str, m: int, obj: str) -> str:
    if quant == "no":
        return f"{name} has no {obj}."
    return f"{name} has at {quant} {m} {_noun(m, obj)}."


def _nli_ages(rng: Rng, label: str, names, ages, held_out_ages):
    a, b, c = rng.sample(names, 3)
    while True:
        x, y = rng.choice(ages), rng.choice(ages)
        if x != y and (not held_out_ages or x in held_out_ages or y in held_out_ages):
            break
    premise = f"{a} is {x}, {b} {y}."
    old, young = (a, b) if x > y else (b, a)
    if label == "neutral":
        p, q = rng.sample([rng.choice((a, b)), c], 2)
        return premise, f"{p} is {rng.choice(('older', 'younger'))} than {q}."
    if label == "contradiction":
        old, young = young, old
    if rng.below(2):
        return premise, f"{old} is older than {young}."
    return premise, f"{young} is younger than {old}."


def _nli_sets(rng: Rng, label: str, names):
    """Who did (or did not) do something, with negation."""
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
    did, did_not = f"{x} {past}.", f"{x} did not {base}."
    if label == "entailment":
        return premise, did_not if negative else did
    if label == "contradiction":
        return premise, did if negative else did_not
    if rng.below(2):  # someone not mentioned
        return premise, rng.choice((f"{outsider} {past}.", f"{outsider} did not {base}."))
    past2, base2 = rng.choice([v for v in NLI_VERBS if v[0] != past])
    return premise, rng.choice((f"{x} {past2}.", f"{x} did not {base2}."))


@functools.lru_cache(maxsize=8)
def nli_examples(seed: int = DATA_SEED) -> dict[str, tuple[Example, ...]]:
    """{'train': ..., 'validation': ...}; examples have 'inputs', 'targets' and
    the metadata 'premise', 'hypothesis', 'family'."""
    names = nli_names(seed)
    all_counts = list(range(NLI_MAX_COUNT + 1))
    all_ages = list(range(NLI_AGE_RANGE[0], NLI_AGE_RANGE[1] + 1))
    train_counts = [n for n in all_counts if n not in NLI_HELD_OUT_COUNTS]
    held_out = set(NLI_HELD_OUT_COUNTS) | set(NLI_HELD_OUT_AGES)
    train_ages = [n for n in all_ages if n not in held_out]
    config = {
        "train": dict(
            numbers=train_counts, premise_numbers=train_counts, ages=train_ages, held_out_ages=()
        ),
        "validation": dict(
            numbers=all_counts,
            premise_numbers=list(NLI_HELD_OUT_COUNTS),
            ages=all_ages,
            held_out_ages=NLI_HELD_OUT_AGES,
        ),
    }
    out = {}
    for split in SPLITS:
        rng = Rng("demo_nli", split, seed)
        cfg, pool = config[split], list(names[split])
        examples, seen = [], set()
        while len(examples) < NLI_SIZES[split]:
            family = rng.choice(("count", "age", "set"))
            label = rng.choice(NLI_LABELS)
            if family == "count":
                pair = _nli_count(rng, label, pool, cfg["numbers"], cfg["premise_numbers"])
            elif family == "age":
                pair = _nli_ages(rng, label, pool, cfg["ages"], cfg["held_out_ages"])
            else:
                pair = _nli_sets(rng, label, pool)
            if pair is None:
                continue
            # Hypotheses go without a final period: it keeps every input <= 63 bytes.
            premise, hypothesis = pair[0], pair[1].rstrip(".")
            text = nli_format(premise, hypothesis)
            if text in seen:
                continue
            seen.add(text)
            examples.append(
                {
                    "inputs": text,
                    "targets": label,
                    "premise": premise,
                    "hypothesis": hypothesis,
                    "family": family,
                }
            )
        out[split] = tuple(examples)
    _check_sizes("demo_nli", out["train"] + out["validation"])
    return out


# --------------------------------------------------------------------------- #
# seqio plumbing.
# --------------------------------------------------------------------------- #


def _check_sizes(task: str, examples) -> None:
    for ex in examples:
        n_in, n_out = len(ex["inputs"].encode()), len(ex["targets"].encode())
        if n_in > MAX_INPUT_BYTES or n_out > MAX_TARGET_BYTES:
            raise AssertionError(f"{task}: example too long ({n_in}/{n_out} bytes): {ex}")


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
      other settings. Remove them with `preprocessing.remove(names.values())`.
    """
    suffix = preprocessing.train_fraction_suffix(train_fraction, seed)
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
        postprocess_fn=preprocessing.strip_text,
        shuffle_buffer_size=SHUFFLE_BUFFER_SIZE,
    )
    for key, generator, metric_fns in (
        ("cbqa", cbqa_examples, [preprocessing.squad_em_f1]),
        ("nli", nli_examples, [preprocessing.accuracy]),
    ):
        source = preprocessing.with_train_fraction(
            make_source(generator, data_seed), train_fraction, seed=seed
        )
        preprocessing.add_task(names[key], source=source, metric_fns=metric_fns, **common)
    preprocessing.add_mixture(
        names["mixture"],
        [names["cbqa"], names["nli"]],
        default_rate=seqio.mixing_rate_num_examples,
    )
    return names


DEMO_TASK_NAMES = register_demo_tasks()

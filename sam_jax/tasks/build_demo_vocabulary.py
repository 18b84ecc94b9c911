"""Builds the demo tasks' SentencePiece vocabulary (`sam_jax/tasks/data/demo_vocabulary.model`).

  python -m sam_jax.tasks.build_demo_vocabulary [--output=sam_jax/tasks/data/demo_vocabulary.model]

A byte-pair-encoding model trained on the text of every demo example (both
tasks, both splits, `demo.DATA_SEED`), with T5's special ids (pad 0, EOS 1,
UNK 2, no BOS). Its vocabulary is large enough that every word of the demo is
a single piece, which is what lets a tiny model learn the tasks in minutes.
Training is single-threaded and deterministic: rerunning it reproduces the
shipped file, which `tests/test_tasks.py` checks.
"""

import os
import tempfile
from collections.abc import Sequence

import sentencepiece
from absl import app
from absl import flags

# 3 special ids, 256 byte pieces and 1021 merges and characters of the demo text: every
# demo word is one piece, and a model's VOCAB_SIZE of 1280 (a multiple of 128) holds it.
VOCAB_SIZE = 1280

_OUTPUT = flags.DEFINE_string(
    "output",
    os.path.join(os.path.dirname(__file__), "data", "demo_vocabulary.model"),
    "Where the SentencePiece model is written.",
)


def build(output: str) -> None:
    """Trains the vocabulary on the demo text and writes it to `output`."""
    from sam_jax.tasks import demo  # the module reads the shipped vocabulary at import

    lines = [text for ex in demo.all_examples() for text in (ex["inputs"], ex["targets"])]
    with tempfile.TemporaryDirectory() as workdir:
        corpus = os.path.join(workdir, "corpus.txt")
        with open(corpus, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        prefix = os.path.join(workdir, "demo_vocabulary")
        sentencepiece.SentencePieceTrainer.train(
            input=corpus,
            model_prefix=prefix,
            model_type="bpe",
            vocab_size=VOCAB_SIZE,
            character_coverage=1.0,
            normalization_rule_name="identity",  # ASCII text: nothing to normalise
            byte_fallback=True,  # any other text round-trips through byte pieces
            pad_id=0,
            eos_id=1,
            unk_id=2,
            bos_id=-1,
            num_threads=1,
            minloglevel=2,
        )
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        os.replace(prefix + ".model", output)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    build(_OUTPUT.value)
    print(f"Wrote {_OUTPUT.value}")


if __name__ == "__main__":
    app.run(main)

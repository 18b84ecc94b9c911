"""seqio Tasks and Mixtures for sam_jax (T5X conventions).

`import sam_jax.tasks` registers every task module's Tasks and Mixtures in seqio's
global registries (like T5X's `--gin.MIXTURE_OR_TASK_MODULE`). Registration is
idempotent: re-importing or reloading a module replaces its definitions.

Modules:
  demo           offline generated tasks, no downloads: `demo_cbqa` (closed-book
                 QA, 'em' / 'f1'), `demo_nli` (3-way NLI, 'accuracy') and
                 `demo_mixture`; `demo.register_demo_tasks(train_fraction=...)`
                 registers subsampled variants.
  glue, super_glue, cbqa
                 the benchmarks of Bahri et al. (2022) over TFDS, formatted and
                 scored as T5 does, with proportional mixtures `glue`,
                 `super_glue`, `cbqa`. They need the user's TFDS data and a
                 sentencepiece model: set $SAM_JAX_SPM_PATH (then importing
                 registers them) or call `glue.register_glue_tasks(
                 vocabulary_path=..., train_fraction=...)` and likewise.
  hf_vocabulary  `HfVocabulary`: a seqio Vocabulary over a Hugging Face tokenizer.json
                 (WordPiece/BPE), without special tokens; cls/sep/pad/unk/mask ids.
  local          `register_tsv_task` / gin `local.tsv_task(directory=...)`: one's own
                 train.tsv/validation.tsv (sentence or sentence1/sentence2, label).
  metrics        T5's postprocessors and metrics of every task (percent, T5's
                 key names).
  registry       idempotent `add_task`/`add_mixture`, `remove`.
  splitmix       splitmix64 hashing and `Rng`, a platform-independent PRNG.
  subsampling    `TrainFractionSource`: deterministic, nested `train_fraction`
                 subsampling of any seqio DataSource's train split.
  tfds_tasks     `TfdsTaskSpec`, `register_tfds_tasks`: T5-style tasks over TFDS
                 with known split sizes (used by glue, super_glue, cbqa).
  vocabularies   `benchmark_vocabulary` ($SAM_JAX_SPM_PATH), T5's text-to-text
                 output features.

Needs seqio (and so TensorFlow).
"""

from sam_jax.tasks import cbqa  # noqa: F401  (natural_questions_open, ..., cbqa: if $SAM_JAX_SPM_PATH is set)
from sam_jax.tasks import demo  # noqa: F401  (registers demo_cbqa, demo_nli, demo_mixture)
from sam_jax.tasks import glue  # noqa: F401  (glue_cola, ..., glue: if $SAM_JAX_SPM_PATH is set)
from sam_jax.tasks import super_glue  # noqa: F401  (super_glue_boolq, ..., super_glue: likewise)

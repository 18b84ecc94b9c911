"""The T5 benchmark mixtures by name, for gin: `MIXTURE_OR_TASK_NAME = @benchmarks.mixture()`.

gin/tasks/benchmark.gin binds `mixture` with BENCHMARK ('glue', 'super_glue'
or 'cbqa'), TRAIN_FRACTION and SEED, so that a protocol can name the benchmark
of each task of its grid with one macro (gin/reproduce/bahri_t5.gin). The
tasks need the user's TFDS data and a sentencepiece model
($SAM_JAX_SPM_PATH, or SPM_PATH).

Example:
  >>> mixture("super_glue", train_fraction=0.05, vocabulary_path="/models/t5/spm.model")
  'super_glue_frac0.05'
"""

from sam_jax.tasks import cbqa
from sam_jax.tasks import glue
from sam_jax.tasks import super_glue

REGISTER = {
    glue.MIXTURE: glue.register_glue_tasks,
    super_glue.MIXTURE: super_glue.register_super_glue_tasks,
    cbqa.MIXTURE: cbqa.register_cbqa_tasks,
}


def mixture(
    name: str, train_fraction: float = 1.0, seed: int = 0, vocabulary_path: str | None = None
) -> str:
    """Registers benchmark `name`'s tasks and returns its mixture's name.

    Args:
      name: 'glue', 'super_glue' or 'cbqa'.
      train_fraction: in (0, 1]: the fraction of every training split kept.
      seed: the subsampling seed.
      vocabulary_path: the sentencepiece model (default: $SAM_JAX_SPM_PATH).

    Raises:
      ValueError: an unknown benchmark, or no vocabulary.
    """
    if name not in REGISTER:
        raise ValueError(f"unknown benchmark {name!r}; choose from {sorted(REGISTER)}")
    names = REGISTER[name](train_fraction, seed, vocabulary_path=vocabulary_path)
    return names[name]

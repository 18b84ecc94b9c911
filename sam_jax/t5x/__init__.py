"""SAM for T5X: `SamTrainer`, a drop-in `train.trainer_cls`, and `FisherMaskOptimizer`.

Bahri, Mobahi & Tay (2022) fine-tuned T5 with SAM in T5X; this package runs
every SAM variant of `sam_jax` (ascent micro-batch, m-sharpness, δ-SAM, FSAM's
Fisher mask, ASAM) inside T5X's own training loop, with any T5X optimizer. A
T5X fine-tuning run switches to SAM by adding one gin file::

  python -m t5x.train --gin_file=t5x/examples/t5/t5_1_1/small.gin \\
    --gin_file=t5x/configs/runs/finetune.gin --gin_file=gin/t5x/sam.gin ...

T5X is not on PyPI, so it is not a dependency of `sam_jax`: `import sam_jax`
never imports it, and importing this package without it raises an ImportError
that says how to install it.
"""

try:
    import t5x  # noqa: F401  (fail here, with instructions, rather than deep inside)
except ImportError as error:
    raise ImportError(
        "sam_jax.t5x needs T5X, which is not on PyPI. Install it from its repository: "
        "pip install git+https://github.com/google-research/t5x"
    ) from error

from sam_jax.t5x.optimizer import FisherMaskOptimizer
from sam_jax.t5x.optimizer import FisherMaskOptimizerState
from sam_jax.t5x.optimizer import fill_missing_fisher_mask
from sam_jax.t5x.optimizer import restore_config_with_fisher_mask
from sam_jax.t5x.per_example import example_losses
from sam_jax.t5x.trainer import SamTrainer

__all__ = [
    "FisherMaskOptimizer",
    "FisherMaskOptimizerState",
    "SamTrainer",
    "example_losses",
    "fill_missing_fisher_mask",
    "restore_config_with_fisher_mask",
]

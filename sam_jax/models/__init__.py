"""Flax models for the SAM experiments: a T5.1.1 encoder-decoder (Raffel et al. 2020)."""

from sam_jax.models.t5 import DEFAULT_LOGICAL_AXIS_RULES
from sam_jax.models.t5 import T5Config
from sam_jax.models.t5 import Transformer
from sam_jax.models.t5 import count_params
from sam_jax.models.t5 import init_variables
from sam_jax.models.t5 import per_example_cross_entropy
from sam_jax.models.t5 import t5_1_1_config

__all__ = [
    "DEFAULT_LOGICAL_AXIS_RULES",
    "T5Config",
    "Transformer",
    "count_params",
    "init_variables",
    "per_example_cross_entropy",
    "t5_1_1_config",
]

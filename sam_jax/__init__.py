"""sam_jax: Sharpness-Aware Minimization for language models in JAX.

Optax transformations for SAM with an ascent micro-batch (Bahri et al. 2022),
m-sharpness, δ-SAM instance reweighting (Zhou et al. 2022), FSAM's Fisher mask
(Zhong et al. 2022), ASAM (Kwon et al. 2021), GSAM (Zhuang et al. 2022), ESAM
(Du et al. 2022) and per-instance SAM, plus the
sharpness measures used to compare them. All of them compute their gradient
with one function, `sam_gradient`, which loops that own their optimizer call
directly; `update_from_loss` steps any Optax optimizer, with or without `sam`,
from a loss function.
"""

from sam_jax import sharpness
from sam_jax.core import SamConfig
from sam_jax.core import SamGradient
from sam_jax.core import SamGradientState
from sam_jax.core import SamMetrics
from sam_jax.core import sam_gradient
from sam_jax.core import sam_gradient_init
from sam_jax.efficient_sam import Esam
from sam_jax.efficient_sam import esam
from sam_jax.fisher import FisherMask
from sam_jax.fisher import FisherMaskState
from sam_jax.fisher import fisher_mask
from sam_jax.loss_update import LossUpdate
from sam_jax.loss_update import update_from_loss
from sam_jax.pending import PendingGradient
from sam_jax.pending import pending_gradient
from sam_jax.per_instance import per_instance_sam
from sam_jax.reweighting import InstanceReweighting
from sam_jax.reweighting import delta_sam
from sam_jax.reweighting import delta_sam_draft
from sam_jax.surrogate_gap import SurrogateGap
from sam_jax.surrogate_gap import gsam
from sam_jax.surrogate_gap import gsam_rho_schedule
from sam_jax.transform import SamState
from sam_jax.transform import sam

__all__ = [
    "Esam",
    "FisherMask",
    "FisherMaskState",
    "InstanceReweighting",
    "LossUpdate",
    "PendingGradient",
    "SamConfig",
    "SamGradient",
    "SamGradientState",
    "SamMetrics",
    "SamState",
    "SurrogateGap",
    "delta_sam",
    "delta_sam_draft",
    "esam",
    "fisher_mask",
    "gsam",
    "gsam_rho_schedule",
    "pending_gradient",
    "per_instance_sam",
    "sam",
    "sam_gradient",
    "sam_gradient_init",
    "sharpness",
    "update_from_loss",
]

__version__ = "0.1.0"

"""FisherMaskOptimizer: any T5X optimizer, with FSAM's mask kept in its state.

FSAM (Zhong et al. 2022) refreshes a Fisher mask every `interval` steps and
perturbs only the coordinates it keeps, so the mask is training state: it must
be saved and restored with the checkpoint. T5X checkpoints exactly
`train_state.state_dict()`, i.e. the optimizer's target and state, so the mask
lives in the state of an `OptimizerDef` that wraps the run's optimizer (T5X's
`Adafactor`, an `OptaxWrapper`, a `MultiOptimizer`, …) and otherwise defers to
it. `SamTrainer` reads the mask from there and writes the refreshed one back.

The wrapped optimizer's state is untouched, so a checkpoint without the mask
(a pre-trained one) restores once `fill_missing_fisher_mask` is among the
restore config's `state_transformation_fns`: the mask starts all-True and is
refreshed on the first SAM step. T5X fails on the missing entries before it
reaches `restore_state`, so the filling has to be a transformation;
`restore_config_with_fisher_mask` appends it to the run's restore config.
"""

import copy
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization
from t5x import optimizers
from t5x import utils

from sam_jax import fisher

MASK_KEY = "fisher_mask"
STEP_KEY = "fisher_step"


@flax.struct.dataclass
class FisherMaskOptimizerState:
    """The wrapped optimizer's `OptimizerState` fields plus the mask's.

    Attributes:
      step: the wrapped optimizer's step.
      param_states: the wrapped optimizer's per-parameter states.
      fisher_mask: the current `sam_jax.FisherMaskState`.
      fisher_step: SAM steps taken with this mask state; the mask is refreshed
        when it is a multiple of the mask's interval (so also on the first step
        after a restore from a checkpoint that had no mask).
    """

    step: jax.Array
    param_states: Any
    fisher_mask: fisher.FisherMaskState
    fisher_step: jax.Array


class FisherMaskOptimizer(optimizers.OptimizerDef):
    """Wraps a T5X optimizer and keeps FSAM's Fisher mask in its checkpointed state.

    Updates are the wrapped optimizer's; `SamTrainer` finds the mask here (as
    `model.optimizer_def`) and perturbs only where it is True (Zhong et al.
    2022, on top of SAM for language models, Bahri et al. 2022).

    Example (gin, see `gin/t5x/fsam.gin`)::

      models.EncoderDecoderModel.optimizer_def = @sam_jax.t5x.FisherMaskOptimizer()
      sam_jax.t5x.FisherMaskOptimizer:
        optimizer = %OPTIMIZER
        mask = @sam_jax.fisher_mask()

    Args:
      optimizer: the run's T5X `OptimizerDef`.
      mask: `sam_jax.fisher_mask(...)`, the mask's sparsity, refresh interval
        and Fisher estimator.
    """

    def __init__(self, optimizer: optimizers.OptimizerDef, mask: fisher.FisherMask):
        if not isinstance(optimizer, optimizers.OptimizerDef):
            raise TypeError(f"optimizer must be a T5X OptimizerDef, got {optimizer!r}.")
        if not isinstance(mask, fisher.FisherMask):
            raise TypeError(f"mask must be sam_jax.fisher_mask(...), got {mask!r}.")
        self.optimizer = optimizer
        self.mask = mask
        super().__init__(optimizer.hyper_params)

    def _inner_state(self, state: FisherMaskOptimizerState) -> optimizers.OptimizerState:
        return optimizers.OptimizerState(state.step, state.param_states)

    def init_state(self, params) -> FisherMaskOptimizerState:
        inner = self.optimizer.init_state(params)
        return FisherMaskOptimizerState(
            step=inner.step,
            param_states=inner.param_states,
            fisher_mask=self.mask.init(params),
            fisher_step=jnp.zeros((), jnp.int32),
        )

    def update_hyper_params(self, **hyper_param_overrides):
        return self.optimizer.update_hyper_params(**hyper_param_overrides)

    def apply_gradient(self, hyper_params, params, state, grads):
        new_params, inner = self.optimizer.apply_gradient(
            hyper_params, params, self._inner_state(state), grads
        )
        return new_params, state.replace(step=inner.step, param_states=inner.param_states)

    def set_param_axes(self, param_logical_axes):
        """Passes the parameters' logical axes on (Adafactor's factoring rules use them)."""
        if hasattr(self.optimizer, "set_param_axes"):
            self.optimizer.set_param_axes(param_logical_axes)

    def derive_logical_axes(self, optimizer, param_logical_axes):
        """The wrapped optimizer's axes; the mask is partitioned like the parameters."""
        inner = self.optimizer.derive_logical_axes(
            optimizers.Optimizer(
                self.optimizer, self._inner_state(optimizer.state), optimizer.target
            ),
            param_logical_axes,
        )
        state = FisherMaskOptimizerState(
            step=inner.state.step,
            param_states=inner.state.param_states,
            fisher_mask=fisher.FisherMaskState(mask=param_logical_axes, density=None),
            fisher_step=None,
        )
        return optimizers.Optimizer(self, state, inner.target)

    def state_dict(self, target, state):
        state_dict = self.optimizer.state_dict(target, self._inner_state(state))
        state_dict["state"][MASK_KEY] = serialization.to_state_dict(state.fisher_mask)
        state_dict["state"][STEP_KEY] = state.fisher_step
        return state_dict

    def restore_state(self, opt_target, opt_state, state_dict):
        inner_state = {
            k: v for k, v in state_dict["state"].items() if k not in (MASK_KEY, STEP_KEY)
        }
        target, inner = self.optimizer.restore_state(
            opt_target, self._inner_state(opt_state), {**state_dict, "state": inner_state}
        )
        restored = FisherMaskOptimizerState(
            step=inner.step,
            param_states=inner.param_states,
            fisher_mask=serialization.from_state_dict(
                opt_state.fisher_mask, state_dict["state"][MASK_KEY]
            ),
            fisher_step=state_dict["state"][STEP_KEY],
        )
        return target, restored


def fisher_mask_state(train_state, mask: fisher.FisherMask):
    """(FisherMaskState, fisher_step) read from a train state of a `FisherMaskOptimizer`."""
    state = train_state.state_dict()["state"]
    template = mask.init(train_state.params)
    return serialization.from_state_dict(template, state[MASK_KEY]), state[STEP_KEY]


def replace_fisher_mask_state(train_state, mask_state: fisher.FisherMaskState, fisher_step):
    """The train state with its Fisher mask state replaced (through its state dict)."""
    state_dict = train_state.state_dict()
    state_dict["state"][MASK_KEY] = serialization.to_state_dict(mask_state)
    state_dict["state"][STEP_KEY] = fisher_step
    return train_state.restore_state(state_dict)


def fill_missing_fisher_mask(state_dict, target_state_dict, *, is_resuming: bool = False):
    """A T5X restore transformation that adds a fresh mask to a checkpoint without one.

    Fine-tuning starts from a pre-trained checkpoint whose optimizer state has
    no Fisher mask; T5X would fail on the missing entries. This fills them in
    as `FisherMaskOptimizer.init_state` does (all-True, `fisher_step` 0, so the
    mask is computed on the first step) and leaves checkpoints that have a
    mask untouched, so running it twice is harmless. `gin/t5x/fsam.gin` adds
    it to the run's restore config with `restore_config_with_fisher_mask`;
    it may also be listed explicitly (gin)::

      utils.RestoreCheckpointConfig.state_transformation_fns = [
          @sam_jax.t5x.fill_missing_fisher_mask,
      ]

    Args:
      state_dict: the checkpoint's state dict.
      target_state_dict: the state dict (arrays or shapes) being restored into.
      is_resuming: part of T5X's `RestoreStateTransformationFn` signature; unused.

    Returns:
      `state_dict`, with the mask entries of `target_state_dict` if it had none.
    """
    del is_resuming
    if MASK_KEY in state_dict["state"] or MASK_KEY not in target_state_dict["state"]:
        return state_dict
    mask = jax.tree.map(
        lambda x: np.ones(x.shape, np.bool_), target_state_dict["state"][MASK_KEY]["mask"]
    )
    fresh = {MASK_KEY: {"mask": mask, "density": np.float32(1.0)}, STEP_KEY: np.int32(0)}
    return {**state_dict, "state": {**state_dict["state"], **fresh}}


def restore_config_with_fisher_mask(
    config: utils.RestoreCheckpointConfig,
) -> utils.RestoreCheckpointConfig:
    """A copy of a T5X restore config that also runs `fill_missing_fisher_mask`, last.

    The run's own `state_transformation_fns` (and its `assignment_map`) run
    first, in their order; the mask is filled after them. `gin/t5x/fsam.gin`
    wraps T5X's restore config with it, so a list the user binds, before or
    after the include, is kept::

      utils.CheckpointConfig.restore = @sam_jax.t5x.restore_config_with_fisher_mask()
      sam_jax.t5x.restore_config_with_fisher_mask.config = @utils.RestoreCheckpointConfig()

    Args:
      config: the run's `utils.RestoreCheckpointConfig`.

    Returns:
      A shallow copy of `config` whose `state_transformation_fns` end with
      `fill_missing_fisher_mask` (a copy rather than `dataclasses.replace`,
      which would prepend the `assignment_map` transformation a second time).
    """
    config = copy.copy(config)
    config.state_transformation_fns = (*config.state_transformation_fns, fill_missing_fisher_mask)
    return config

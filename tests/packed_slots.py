"""Examples in packed rows: 8 rows of 3 slots holding 14 examples of `reference`'s model.

A packed batch's losses are [rows, slots], with absent slots marked by a
`present` mask (`core.sam_gradient(..., present_of=...)`). The tests of every
variant that handles packed rows compare the result with numpy on the 14
examples alone.
"""

import jax.numpy as jnp
import numpy as np
import reference

from sam_jax import core

PRESENT = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0]] * 2, bool)  # 14 examples


def packed_problem(seed):
    """(params, slot_x [8, 3, 5], slot_y [8, 3]): random examples in the present slots."""
    params, _ = reference.make_problem(num_examples=8)
    rng = np.random.default_rng(seed)
    slot_x, slot_y = np.zeros((8, 3, 5), np.float32), np.zeros((8, 3), np.float32)
    slot_x[PRESENT] = rng.normal(size=(14, 5))
    slot_y[PRESENT] = rng.normal(size=(14,))
    return params, slot_x, slot_y


def slot_sam_gradient(params, slot_x, slot_y, config):
    """`core.sam_gradient` of the slots' losses (absent slots 0) with their present mask."""
    packed = {"x": jnp.asarray(slot_x), "y": jnp.asarray(slot_y), "present": jnp.asarray(PRESENT)}

    def slot_losses(p, b, key):
        losses = reference.loss_fn(p, (b["x"].reshape(-1, 5), b["y"].reshape(-1)), key)
        return jnp.where(b["present"], losses.reshape(b["y"].shape), 0.0)

    return core.sam_gradient(
        slot_losses,
        params,
        packed,
        None,
        core.sam_gradient_init(params, config),
        config,
        present_of=lambda b: b["present"],
    )

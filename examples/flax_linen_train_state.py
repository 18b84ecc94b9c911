"""Trains a Flax Linen classifier with `sam_jax.flax_linen.TrainState`: plain or SAM.

An MLP with BatchNorm and dropout learns a noisy teacher (4 classes, 20 % label
noise) from 512 synthetic examples and is evaluated on 2,048 held-out ones.
One jitted `train_step` serves both optimizers: `state.apply_loss` takes a
plain AdamW (`--rho=0`) or `sam_jax.sam(AdamW)` (`--rho` > 0). The BatchNorm
statistics and the batch accuracy come back through aux (with SAM, from its
descent pass at w + ε on the whole batch: see `sam_jax.flax_linen`).

Usage: python examples/flax_linen_train_state.py [--steps=300] [--rho=0.05]
         [--ascent_fraction=1.0] [--seed=0]
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app
from absl import flags

import sam_jax
from sam_jax import flax_linen

_STEPS = flags.DEFINE_integer("steps", 300, "Training steps.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the data, initialisation and dropout.")
_RHO = flags.DEFINE_float("rho", 0.05, "SAM's radius; 0 trains with plain AdamW.")
_FRACTION = flags.DEFINE_float("ascent_fraction", 1.0, "SAM's ascent micro-batch fraction.")

NUM_TRAIN, NUM_TEST, DIM, CLASSES, LABEL_NOISE, BATCH = 512, 2048, 32, 4, 0.2, 64


class Classifier(nn.Module):
    """Dense, BatchNorm, GELU, dropout, Dense."""

    hidden: int = 128
    dropout_rate: float = 0.1

    @nn.compact
    def __call__(self, x, *, train):
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(nn.Dense(self.hidden)(x))
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(nn.gelu(x))
        return nn.Dense(CLASSES)(x)


class TrainState(flax_linen.TrainState):
    """The TrainState with the model's BatchNorm statistics."""

    batch_stats: Any


def make_data(seed):
    """A random teacher network labels Gaussian inputs; training labels are noisy."""
    rng = np.random.default_rng(seed)
    teacher = [rng.normal(size=(DIM, 64)) / np.sqrt(DIM), rng.normal(size=(64, CLASSES)) / 8]
    x = rng.normal(size=(NUM_TRAIN + NUM_TEST, DIM)).astype(np.float32)
    y = np.argmax(np.tanh(x @ teacher[0]) @ teacher[1], axis=1)
    noisy = rng.random(NUM_TRAIN) < LABEL_NOISE
    y[:NUM_TRAIN][noisy] = rng.integers(0, CLASSES, noisy.sum())
    return (x[:NUM_TRAIN], y[:NUM_TRAIN]), (x[NUM_TRAIN:], y[NUM_TRAIN:])


@jax.jit
def train_step(state, batch, key):
    """One step of `state.tx`, plain or SAM: the new state, the loss and the batch accuracy."""

    def loss_fn(params, batch, key):
        x, y = batch
        variables = {"params": params, "batch_stats": state.batch_stats}
        logits, updates = state.apply_fn(
            variables, x, train=True, rngs={"dropout": key}, mutable=["batch_stats"]
        )
        accuracy = jnp.mean(jnp.argmax(logits, -1) == y)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return losses, (updates["batch_stats"], accuracy)

    state, step = state.apply_loss(loss_fn, batch, key, has_aux=True)
    batch_stats, accuracy = step.aux
    return state.replace(batch_stats=batch_stats), step.loss, accuracy


@jax.jit
def evaluate(state, x, y):
    """(Mean loss, accuracy) of the model in inference mode."""
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    logits = state.apply_fn(variables, x, train=False)
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
    return loss, jnp.mean(jnp.argmax(logits, -1) == y)


def main(argv):
    del argv
    train, test = make_data(_SEED.value)
    model = Classifier()
    variables = model.init(jax.random.key(_SEED.value), train[0][:2], train=False)
    tx = optax.adamw(3e-3, weight_decay=1e-4)
    if _RHO.value > 0:
        tx = sam_jax.sam(tx, rho=_RHO.value, ascent_fraction=_FRACTION.value)
    state = TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        tx=tx,
    )
    initial_loss, _ = evaluate(state, *train)
    order = np.random.default_rng(_SEED.value).integers(0, NUM_TRAIN, (_STEPS.value, BATCH))
    keys = jax.random.split(jax.random.key(_SEED.value + 1), _STEPS.value)
    for i in range(_STEPS.value):
        batch = (train[0][order[i]], train[1][order[i]])
        state, loss, accuracy = train_step(state, batch, keys[i])
        if i % max(1, _STEPS.value // 5) == 0:
            print(f"step {i:4d}  batch loss {loss:.3f}  batch accuracy {accuracy:.3f}")
    final_loss, _ = evaluate(state, *train)
    _, test_accuracy = evaluate(state, *test)
    optimizer = f"SAM rho={_RHO.value} f={_FRACTION.value}" if _RHO.value > 0 else "AdamW"
    print(f"{optimizer}, {_STEPS.value} steps, seed {_SEED.value}")
    print(f"train loss: initial {initial_loss:.4f}, final {final_loss:.4f}")
    print(f"held-out accuracy: {test_accuracy:.4f}")


if __name__ == "__main__":
    app.run(main)

"""Trains a Flax NNX classifier with `sam_jax.flax_nnx.update`: plain or SAM.

An MLP with dropout learns a noisy teacher (4 classes, 20 % label noise) from
512 synthetic examples and is evaluated on 2,048 held-out ones. One
`nnx.jit` step serves both optimizers: `flax_nnx.update` takes an
`nnx.Optimizer` of plain AdamW (`--rho=0`) or of `sam_jax.sam(AdamW)`
(`--rho` > 0). The step's key reaches the dropout layers through
`model(x, rngs=nnx.Rngs(dropout=key))`, so every SAM pass of a step uses the
same masks and every step new ones.

Usage: python examples/flax_nnx.py [--steps=300] [--rho=0.05] [--ascent_fraction=1.0]
         [--seed=0]
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app
from absl import flags
from flax import nnx

import sam_jax
from sam_jax import flax_nnx

_STEPS = flags.DEFINE_integer("steps", 300, "Training steps.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the data, initialisation and dropout.")
_RHO = flags.DEFINE_float("rho", 0.05, "SAM's radius; 0 trains with plain AdamW.")
_FRACTION = flags.DEFINE_float("ascent_fraction", 1.0, "SAM's ascent micro-batch fraction.")

NUM_TRAIN, NUM_TEST, DIM, CLASSES, LABEL_NOISE, BATCH = 512, 2048, 32, 4, 0.2, 64


class Classifier(nnx.Module):
    """Two hidden layers with dropout; `rngs` carries the dropout key."""

    def __init__(self, rngs: nnx.Rngs, hidden: int = 128, dropout_rate: float = 0.1):
        self.hidden = nnx.List(
            [nnx.Linear(DIM, hidden, rngs=rngs), nnx.Linear(hidden, hidden, rngs=rngs)]
        )
        self.dropout = nnx.Dropout(dropout_rate)
        self.out = nnx.Linear(hidden, CLASSES, rngs=rngs)

    def __call__(self, x, *, rngs=None):
        for layer in self.hidden:
            x = self.dropout(nnx.gelu(layer(x)), rngs=rngs)
        return self.out(x)


def make_data(seed):
    """A random teacher network labels Gaussian inputs; training labels are noisy."""
    rng = np.random.default_rng(seed)
    teacher = [rng.normal(size=(DIM, 64)) / np.sqrt(DIM), rng.normal(size=(64, CLASSES)) / 8]
    x = rng.normal(size=(NUM_TRAIN + NUM_TEST, DIM)).astype(np.float32)
    y = np.argmax(np.tanh(x @ teacher[0]) @ teacher[1], axis=1)
    noisy = rng.random(NUM_TRAIN) < LABEL_NOISE
    y[:NUM_TRAIN][noisy] = rng.integers(0, CLASSES, noisy.sum())
    return (x[:NUM_TRAIN], y[:NUM_TRAIN]), (x[NUM_TRAIN:], y[NUM_TRAIN:])


def loss_fn(model, batch, key):
    """Per-example cross-entropy, with dropout masks drawn from `key`."""
    x, y = batch
    logits = model(x, rngs=nnx.Rngs(dropout=key))
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


@nnx.jit
def train_step(model, optimizer, batch, key):
    """One step of `optimizer`, plain or SAM, in place; returns the step's loss."""
    return flax_nnx.update(optimizer, model, loss_fn, batch, key).loss


@nnx.jit
def evaluate(model, x, y):
    """(Mean loss, accuracy) of the model without dropout."""
    logits = nnx.view(model, deterministic=True)(x)
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))
    return loss, jnp.mean(jnp.argmax(logits, -1) == y)


def main(argv):
    del argv
    train, test = make_data(_SEED.value)
    model = Classifier(nnx.Rngs(_SEED.value))
    tx = optax.adamw(3e-3, weight_decay=1e-4)
    if _RHO.value > 0:
        tx = sam_jax.sam(tx, rho=_RHO.value, ascent_fraction=_FRACTION.value)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    initial_loss, _ = evaluate(model, *train)
    order = np.random.default_rng(_SEED.value).integers(0, NUM_TRAIN, (_STEPS.value, BATCH))
    keys = jax.random.split(jax.random.key(_SEED.value + 1), _STEPS.value)
    for i in range(_STEPS.value):
        loss = train_step(model, optimizer, (train[0][order[i]], train[1][order[i]]), keys[i])
        if i % max(1, _STEPS.value // 5) == 0:
            print(f"step {i:4d}  batch loss {loss:.3f}")
    final_loss, _ = evaluate(model, *train)
    _, test_accuracy = evaluate(model, *test)
    name = f"SAM rho={_RHO.value} f={_FRACTION.value}" if _RHO.value > 0 else "AdamW"
    print(f"{name}, {int(optimizer.step[...])} steps, seed {_SEED.value}")
    print(f"train loss: initial {initial_loss:.4f}, final {final_loss:.4f}")
    print(f"held-out accuracy: {test_accuracy:.4f}")


if __name__ == "__main__":
    app.run(main)

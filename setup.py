"""jaxprune: structured pruning and differentiable structure search in JAX/Flax."""
import pathlib
import re

import setuptools

# One copy of the version: jaxprune/__init__.py (read, not imported: no dependencies needed).
VERSION = re.search(r'^__version__ = "([^"]+)"',
                    (pathlib.Path(__file__).parent / "jaxprune" / "__init__.py").read_text(),
                    re.M).group(1)

setuptools.setup(
    name="jaxprune",
    version=VERSION,
    description=("Neural-network pruning and structure search in JAX/Flax: TAS, ISTA on "
                 "batch-norm gamma, DNW and AutoPrune, as pure kernels, optax transforms, "
                 "Flax modules and a config-driven training program."),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["jaxprune", "jaxprune.*"]),
    # The searched shapes the TAS authors released (tas.released_shape=...).
    package_data={"jaxprune": ["resources/*.json"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "ml-collections>=0.1.1",
        "chex>=0.1.87",
        "absl-py>=2.0",
        "numpy>=1.26",
        "scipy>=1.11",  # connected components of the channel graph
        "tensorflow-datasets>=4.9.7",
        "array_record>=0.5",
        "pillow>=10",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
        "diffrax>=0.6",  # DNW's continuous-time graph (adaptive dopri5)
    ],
    extras_require={
        # Building (not reading) the stock TFDS datasets runs TensorFlow inside TFDS.
        "tfds-build": ["tensorflow-cpu>=2.16", "importlib_resources"],
        "test": ["pytest>=8", "pytest-xdist>=3.5", "tensorflow-cpu>=2.16",
                 "importlib_resources"],
    },
)

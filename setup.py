"""beear_jax: BEEAR backdoor removal for Llama/Mistral chat models in JAX/Flax."""

import pathlib

from setuptools import find_packages, setup

setup(
    name="beear_jax",
    version="0.1.0",
    description="BEEAR (embedding-based adversarial removal of safety backdoors) in JAX/Flax",
    long_description=pathlib.Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["beear_jax", "beear_jax.*"]),
    # Data the project wrote itself (refusal keywords and answers, benign pairs, over-refusal probes).
    package_data={"beear_jax": ["resources/*.txt", "resources/*.jsonl", "resources/*.md"]},
    install_requires=[
        "jax>=0.9",
        "flax>=0.12",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "transformers>=4.51",
        "datasets>=3.0",
        "ml-collections>=1.0",
        "safetensors>=0.4",
        "numpy>=1.26",
        "matplotlib>=3.8",
        "tqdm>=4.66",
        "absl-py>=2.0",
        "pyyaml>=5.1",  # the demo reads AdvBench from a YAML file in the pyrit wheel
    ],
    extras_require={
        # torch only for GGUF import (transformers' GGUF reader) and the PyTorch parity tests.
        # Pinned: 2.13.0 is the CPU wheel; an unpinned torch pulls a multi-GB CUDA build.
        "torch": ["torch==2.13.0", "gguf>=0.10", "accelerate>=1.0"],
        "dev": ["pytest>=8", "ruff>=0.6"],
    },
    entry_points={"console_scripts": ["beear=beear_jax.cli.main:main"]},
)

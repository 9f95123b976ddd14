"""The first step of experiments/bench_gpu.sh: every package the later steps import, with its version, the
devices jax and torch see, and the GPU as nvidia-smi names it. Exits 1 at once, naming every missing
package that all steps need, so that a missing wheel costs seconds, not the minutes of the steps before it
would fail; a missing package that only the tiny BEEAR run of step 3 needs (`datasets` and its own needs)
is named, and the steps go on.

    python experiments/gpu_env.py --json /tmp/env.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# What the steps import: beear_jax's own imports and those of the code paths they run (plan and config
# loading need ml_collections; the tiny run of step 3 reads its tables through `datasets`).
REQUIRED = ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "numpy", "ml_dtypes", "ml_collections", "absl",
            "yaml", "transformers", "tokenizers", "safetensors", "jinja2", "torch", "tqdm",
            "beear_jax", "beear_jax.method.rounds", "beear_jax.cli.plan", "beear_jax.models.generate", "beear_jax.config.loading",
            "beear_jax.data.tables")
TINY_RUN = ("datasets", "dill", "multiprocess", "pyarrow", "pandas", "fsspec", "huggingface_hub", "xxhash")


def versions(names: tuple[str, ...]) -> tuple[dict[str, str], list[str]]:
    """{package: version} of those that import, and 'name: error' for those that do not."""
    found, missing = {}, []
    for name in names:
        try:
            module = importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - any import failure is what this step reports
            missing.append(f"{name}: {type(err).__name__}: {err}")
            continue
        found[name] = str(getattr(module, "__version__", "")) or "-"
    return found, missing


def gpu_name() -> tuple[str, str]:
    """(name, driver) from nvidia-smi, or ('-', '-') without it."""
    if not shutil.which("nvidia-smi"):
        return "-", "-"
    done = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                          capture_output=True, text=True, check=False)
    parts = [p.strip() for p in done.stdout.splitlines()[0].split(",")] if done.stdout.strip() else []
    return (f"{parts[0]} ({parts[1]})", f"driver {parts[2]}") if len(parts) == 3 else ("-", "-")


def main() -> int:
    """Prints the versions and devices; exit status 1 when anything is missing."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="", help="write what was found here")
    args = parser.parse_args()
    started = time.perf_counter()
    found, missing = versions(REQUIRED)
    optional, optional_missing = versions(TINY_RUN)
    found.update(optional)
    for name, version in found.items():
        print(f"{name} {version}")
    if optional_missing:
        print("missing, so step 3's tiny BEEAR run will fail (carry these as wheels):\n  "
              + "\n  ".join(optional_missing))
    if missing:
        print("MISSING, nothing runs (carry these as wheels):\n  " + "\n  ".join(missing), flush=True)
        return 1
    import jax
    import torch

    name, driver = gpu_name()
    env = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "python": sys.version.split()[0],
           "jax": jax.__version__, "torch": torch.__version__, "transformers": found["transformers"],
           "versions": found, "missing": optional_missing, "jax_devices": [str(d) for d in jax.devices()],
           "device": jax.devices()[0].device_kind if name == "-" else name, "driver": driver,
           "torch_cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-"}
    env["jax_cpu_devices"] = [str(d) for d in jax.devices("cpu")]  # step 3 compares with jax's CPU backend
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR", "")
    # A warm cache (a rerun on the same machine) makes round 1's compile times retrieval times.
    env["compilation_cache_entries"] = len(list(pathlib.Path(cache).iterdir())) if cache and os.path.isdir(cache) else 0
    print(f"jax devices {env['jax_devices']} (CPU backend: {env['jax_cpu_devices'][0]}); torch cuda: {env['torch_cuda']}; nvidia-smi: {name}, {driver} "
          f"({time.perf_counter() - started:.1f} s)")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(env, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

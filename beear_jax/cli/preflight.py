"""`beear preflight`: on the devices and processes a run will use, the checks that would otherwise fail
minutes or hours into a job, one line each: the mesh against the devices, the batches against the mesh,
the same config, data files and model on every process, the planned bytes against device memory, and one
collective across every device.

Every process runs the same checks in the same order (the cross-process ones gather a digest from each);
process 0 prints them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from beear_jax.config.schema import RunSettings
from beear_jax.config.settings import absolute_settings, settings_dict, settings_from_config
from beear_jax.io.checkpoint import digest
from beear_jax.method.round_plan import check_batch_sizes
from beear_jax.parallel import sharding as sharding_lib

# Keys that differ between the processes of one job by design.
PER_PROCESS_KEYS = (("mesh", "process_id"),)
_SAMPLE = 1 << 20  # bytes read from each end of a weights file for its digest


@dataclasses.dataclass(frozen=True)
class Check:
    """One preflight check: its name, whether it passed, and what was found."""

    name: str
    ok: bool
    message: str

    def line(self) -> str:
        return f"preflight: {'ok    ' if self.ok else 'FAILED'} {self.name}: {self.message}"


def file_digest(path: str) -> str:
    """sha256 of a file's bytes, or 'missing'."""
    file = pathlib.Path(os.path.expanduser(path))
    if not file.is_file():
        return "missing"
    return hashlib.sha256(file.read_bytes()).hexdigest()


def model_digest(path: str) -> str:
    """A digest of a model (a .gguf file or an HF directory) without reading gigabytes: each file's name and
    size, config.json whole, and the first and last MiB of every other file; 'missing' if absent."""
    root = pathlib.Path(os.path.expanduser(path))
    files = [root] if root.is_file() else sorted(p for p in root.iterdir() if p.is_file()) if root.is_dir() else []
    if not files:
        return "missing"
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}:{size}".encode())
        with file.open("rb") as f:
            if file.name == "config.json" or size <= 2 * _SAMPLE:
                digest.update(f.read())
            else:
                digest.update(f.read(_SAMPLE))
                f.seek(size - _SAMPLE)
                digest.update(f.read(_SAMPLE))
    return digest.hexdigest()


def config_digest(settings: RunSettings) -> str:
    """checkpoint.digest of the settings as given (paths as written), less the keys each process sets itself."""
    values = settings_dict(settings)
    for section, key in PER_PROCESS_KEYS:
        values.get(section, {}).pop(key, None)
    return digest(values)


def gather_digests(text: str) -> list[str]:
    """Each process's sha256 of `text`, in process order (every process must call this at the same point)."""
    local = np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint8)
    if jax.process_count() == 1:
        return [local.tobytes().hex()]
    from jax.experimental import multihost_utils

    gathered = np.asarray(multihost_utils.process_allgather(local))
    return [row.tobytes().hex() for row in gathered.reshape(jax.process_count(), -1)]


def _same(name: str, value: str, what: str) -> Check:
    """Whether every process holds the same value (a digest or 'missing'); names the odd processes."""
    digests = gather_digests(value)
    missing = hashlib.sha256(b"missing").hexdigest()
    absent = [i for i, d in enumerate(digests) if d == missing]
    if absent:
        return Check(name, False, f"{what} is missing on process(es) {absent}")
    odd = [i for i, d in enumerate(digests) if d != digests[0]]
    if odd:
        return Check(name, False, f"{what} differs from process 0's on process(es) {odd}")
    return Check(name, True, f"{what} is the same on all {len(digests)} process(es)")


def _device_memory() -> int | None:
    """Bytes one device may hold, where the platform says (GPU, TPU); None on CPU."""
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def _collective(mesh: Any) -> Check:
    """A sum over every device of the mesh: each adds 1."""
    sharding = NamedSharding(mesh, P(*sharding_lib.MESH_AXES))
    shape = tuple(int(mesh.shape[a]) for a in sharding_lib.MESH_AXES)
    ones = jax.make_array_from_callback(shape, sharding, lambda index: np.ones((1, 1, 1), np.float32))
    total = float(jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(ones))
    expected = mesh.devices.size
    return Check("collective", total == expected, f"a sum over the {expected} devices gave {total:g}")


def run_preflight(cfg: ml_collections.ConfigDict | RunSettings) -> list[Check]:
    """The checks, in order, of a config (or its settings) with paths as written; the cross-process ones compare
    every process's view."""
    given = settings_from_config(cfg)
    as_given = config_digest(given)
    settings = absolute_settings(given)
    sharding_lib.initialize_distributed(sharding_lib.Launch.from_config(settings.mesh))
    checks = [Check("processes", True, f"{jax.process_count()} process(es), {jax.device_count()} device(s) "
                                       f"({jax.local_device_count()} here, {jax.devices()[0].platform})")]
    mesh, batches_ok = None, False
    try:
        mesh = sharding_lib.make_mesh(settings.mesh.shape)
        checks.append(Check("mesh", True, f"mesh.shape={settings.mesh.shape} -> {dict(mesh.shape)}"))
    except ValueError as err:
        checks.append(Check("mesh", False, str(err)))
    if mesh is not None:
        try:
            check_batch_sizes(settings, sharding_lib.axis_sizes(mesh))
            checks.append(Check("batches", True, "every batch splits over the mesh's data x fsdp axes"))
            batches_ok = True
        except ValueError as err:
            checks.append(Check("batches", False, str(err)))
    checks.append(_same("config", as_given, "the config"))
    for key, path in (("data.safety", settings.data.safety), ("data.anchor", settings.data.anchor)):
        checks.append(_same(key, file_digest(path) if path else "missing", f"{key} ({path or 'not set'})"))
    model_path = settings.model.path
    checks.append(_same("model", model_digest(model_path) if model_path else "missing",
                        f"model.path ({model_path or 'not set'})"))
    if mesh is not None and batches_ok and checks[-1].ok:  # the plan needs a mesh, batches that split and a model
        checks.append(_memory(settings, mesh))
    if mesh is not None:
        checks.append(_collective(mesh))
    return checks


def _memory(settings: RunSettings, mesh: Any) -> Check:
    """`beear plan`'s peak bytes per device (analytical) against the device's memory, where it is known."""
    from beear_jax.cli import plan

    try:
        model = plan.model_config_of(settings.model.path, settings.model.dtype)
        planned = plan.plan_run(settings, model, tuple(mesh.shape.values()), compile_steps=False)
    except ValueError as err:
        return Check("memory", False, f"the plan failed: {err}")
    gb, limit = planned.peak / 1e9, _device_memory()
    if limit is None:
        return Check("memory", True, f"planned peak {gb:.2f} GB per device; this platform does not say its memory "
                                     "(not compared)")
    return Check("memory", planned.peak <= limit, f"planned peak {gb:.2f} GB per device, {limit / 1e9:.2f} GB available")

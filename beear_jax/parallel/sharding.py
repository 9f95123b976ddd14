"""Device meshes, logical-axis rules, and placing params, optimizer state and batches on a mesh.

The mesh has three axes: 'data' (pure data parallelism: params replicated), 'fsdp' (data parallelism
with params sharded) and 'tensor' (model parallelism over heads and the MLP width). Each parameter
dimension has a logical name (models/weights.py); LOGICAL_RULES maps it to a mesh axis:

    layers -, embed fsdp, vocab tensor, heads tensor, kv_heads tensor, head_dim -, mlp tensor

A dimension that the mesh axis does not divide (e.g. 2 kv heads on tensor=4) stays replicated, so
any mesh works for any model. Optimizer state follows the params; batches split their batch axis over
('data', 'fsdp'); the perturbation delta and metrics are replicated.

Everything here works from mesh axis *sizes* as well as from a Mesh, so `beear plan` can compute the
per-device bytes of a 64-chip mesh on a laptop.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from beear_jax.models.config import ModelConfig
from beear_jax.models.weights import init_params, is_spec, weight_specs

if TYPE_CHECKING:
    from beear_jax.config.schema import MeshSection

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
LOGICAL_RULES: Mapping[str, str | None] = {
    "layers": None,  # the scan axis: sharding it would serialise the blocks across devices
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,  # RoPE mixes the two halves of head_dim: keep it whole
    "mlp": "tensor",
}

# ---- meshes -------------------------------------------------------------------------------------


def resolve_mesh_shape(shape: Sequence[int], num_devices: int,
                       devices_are: str = "visible") -> tuple[int, int, int]:
    """(data, fsdp, tensor) with a -1 entry replaced by the devices left over.

    Without a -1 the product may be smaller than num_devices (the first devices are used: handy for
    tiny models and tests on a many-device host), never larger. devices_are: where num_devices comes
    from, for the message ("visible", or e.g. "given by --devices").
    """
    shape = tuple(int(x) for x in shape)
    if len(shape) != 3:
        raise ValueError(f"mesh.shape={shape} must have three entries (data, fsdp, tensor).")
    if shape.count(-1) > 1 or any(x == 0 or x < -1 for x in shape):
        raise ValueError(f"mesh.shape={shape}: use positive sizes and at most one -1.")
    known = math.prod(x for x in shape if x != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"mesh.shape={shape}: {num_devices} devices do not split into a multiple of {known}.")
        shape = tuple(num_devices // known if x == -1 else x for x in shape)
    if math.prod(shape) > num_devices:
        raise ValueError(f"mesh.shape={shape} needs {math.prod(shape)} devices but only {num_devices} are "
                         f"{devices_are}.")
    return shape  # type: ignore[return-value]


def make_mesh(shape: Sequence[int], devices: Sequence[Any] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh with Auto axis types (jit shardings + propagation)."""
    devices = list(jax.devices() if devices is None else devices)
    resolved = resolve_mesh_shape(shape, len(devices))
    used = math.prod(resolved)
    if jax.process_count() > 1 and used != len(devices):
        raise ValueError(f"mesh.shape={resolved} uses {used} of {len(devices)} devices; a multi-host run must use all.")
    # Explicit axis types: the default changed across jax versions; Auto keeps jit(in/out_shardings) semantics.
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(resolved, MESH_AXES, axis_types=axis_types, devices=devices[:used])


def axis_sizes(mesh: Mesh | Sequence[int]) -> dict[str, int]:
    """{'data': n, 'fsdp': n, 'tensor': n} of a Mesh or a resolved shape."""
    if isinstance(mesh, Mesh):
        return {name: int(mesh.shape[name]) for name in MESH_AXES}
    return dict(zip(MESH_AXES, (int(x) for x in mesh)))


def batch_parallelism(sizes: Mapping[str, int]) -> int:
    """How many ways a batch is split: data x fsdp."""
    return sizes["data"] * sizes["fsdp"]


def check_batch_size(name: str, size: int, sizes: Mapping[str, int]) -> None:
    """Raises ValueError unless the batch splits evenly over ('data', 'fsdp')."""
    ways = batch_parallelism(sizes)
    if size % ways:
        devices = math.prod(sizes.values())
        fit = math.gcd(size, ways)
        raise ValueError(
            f"{name}={size} rows do not split over the mesh's data x fsdp = {ways} devices "
            f"(mesh {tuple(sizes.values())}). Use a batch size that is a multiple of {ways}, or a mesh whose "
            f"data*fsdp divides {size}, e.g. --config.mesh.shape={fit},1,{devices // fit}."
        )


# ---- logical axes -> partition specs -----------------------------------------------------------


def logical_to_spec(axes: Sequence[str], shape: Sequence[int], sizes: Mapping[str, int],
                    rules: Mapping[str, str | None] = LOGICAL_RULES) -> P:
    """The PartitionSpec of one array: each logical axis mapped by `rules`, if its mesh axis divides it.

    A mesh axis is used at most once per array and only when larger than 1 (a size-1 axis shards
    nothing, and leaving it out keeps specs readable).
    """
    used: set[str] = set()
    entries: list[str | None] = []
    for name, dim in zip(axes, shape, strict=True):
        if name not in rules:
            raise KeyError(f"no sharding rule for the logical axis {name!r}; add it to LOGICAL_RULES.")
        mesh_axis = rules[name]
        ok = mesh_axis is not None and mesh_axis not in used and sizes[mesh_axis] > 1 and dim % sizes[mesh_axis] == 0
        entries.append(mesh_axis if ok else None)
        if ok:
            used.add(mesh_axis)
    while entries and entries[-1] is None:
        entries.pop()
    return P(*entries)


def param_specs(config: ModelConfig, sizes: Mapping[str, int]) -> dict:
    """The PartitionSpec tree of the params (mirrors weight_specs)."""
    return jax.tree.map(lambda s: logical_to_spec(s.axes, s.shape, sizes), weight_specs(config), is_leaf=is_spec)


def param_shardings(config: ModelConfig, mesh: Mesh) -> dict:
    """NamedShardings of the params on `mesh`."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), param_specs(config, axis_sizes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, stacked: bool = False) -> NamedSharding:
    """Rows over ('data', 'fsdp'); `stacked` batches ([num_batches, B, ...]) keep their leading axis."""
    return NamedSharding(mesh, P(None, BATCH_AXES) if stacked else P(BATCH_AXES))


def follow_params(abstract_state: Any, abstract_params: Any, params_sharding: Any, default: Any) -> Any:
    """Shardings for an optimizer state: a leaf shaped like a param, under that param's path, gets
    its sharding (Adam's mu/nu); anything else (step counts, factored moments) gets `default`."""
    flat = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    shardings = jax.tree.leaves(params_sharding, is_leaf=lambda x: isinstance(x, (NamedSharding, P)))
    by_path = [(jax.tree_util.keystr(path), leaf.shape, s) for (path, leaf), s in zip(flat, shardings, strict=True)]

    def pick(path: Any, leaf: Any) -> Any:
        key = jax.tree_util.keystr(path)
        for param_key, shape, sharding in by_path:
            if key.endswith(param_key) and tuple(leaf.shape) == tuple(shape):
                return sharding
        return default

    return jax.tree_util.tree_map_with_path(pick, abstract_state)


def abstract_param_tree(config: ModelConfig) -> dict:
    """ShapeDtypeStructs of the float32 params (jax.eval_shape: nothing is allocated)."""
    return jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))


def step_shardings(config: ModelConfig, mesh: Mesh, outer_optimizer: Any) -> Any:
    """The StepShardings of a run: params by the rules, the outer optimizer state following them."""
    from beear_jax.method.steps import StepShardings

    params = param_shardings(config, mesh)
    abstract_params = abstract_param_tree(config)
    abstract_state = jax.eval_shape(outer_optimizer.init, abstract_params)
    return StepShardings(
        params=params,
        outer_state=follow_params(abstract_state, abstract_params, params, replicated(mesh)),
        batch=batch_sharding(mesh),
        stacked_batch=batch_sharding(mesh, stacked=True),
        replicated=replicated(mesh),
    )


# ---- placing arrays -----------------------------------------------------------------------------


def place_params(host_params: Any, shardings: Any) -> Any:
    """Host (numpy) params -> global arrays; each device receives only its own shard."""

    def put(x: Any, sharding: NamedSharding) -> jax.Array:
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, host_params, shardings)


def place_module(model: Any, mesh: Mesh) -> None:
    """Puts a CausalLM's weights (models/module.py) on `mesh` by the logical-axis rules, in place; each
    device receives only its own shard. The weights must be readable on this host (as after load_module)."""
    state = nnx.state(model, nnx.Param)
    placed = place_params(jax.device_get(model.params_tree()), param_shardings(model.config, mesh))
    nnx.replace_by_pure_dict(state, placed)
    nnx.update(model, state)


def init_params_sharded(config: ModelConfig, key: jax.Array, shardings: Any, std: float = 0.02) -> Any:
    """Random params created directly in their shards (no device ever holds the whole model)."""
    return jax.jit(init_params, static_argnums=(0, 2), out_shardings=shardings)(config, key, std)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Small arrays (masks, deltas) copied to every device of the mesh."""
    sharding = replicated(mesh)

    def put(x: Any) -> jax.Array:
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)


def _local_rows(sharding: NamedSharding, shape: tuple[int, ...], axis: int) -> slice | None:
    """The rows along `axis` that this process's devices hold, or None if they are not contiguous."""
    index_map = sharding.addressable_devices_indices_map(shape)
    ranges = sorted({(idx[axis].start or 0, shape[axis] if idx[axis].stop is None else idx[axis].stop)
                     for idx in index_map.values()})
    start, stop = ranges[0][0], ranges[0][1]
    for lo, hi in ranges[1:]:
        if lo > stop:
            return None
        stop = max(stop, hi)
    return slice(start, stop)


def shard_batch(batch: Any, sharding: NamedSharding, axis: int = 0) -> Any:
    """A host batch (the same global numpy batch on every process; any layout of batches.py) -> the same
    layout of global arrays split by rows.

    Each process passes only the rows its devices hold (jax.make_array_from_process_local_data), so
    with many hosts no process copies the whole batch to devices.
    """

    def place(value: Any) -> jax.Array:
        value = np.asarray(value)
        rows = _local_rows(sharding, value.shape, axis)
        if rows is None:  # unusual device orders: fall back to per-shard copies of the global batch
            return jax.make_array_from_callback(value.shape, sharding, lambda i: value[i])
        local = value[(slice(None),) * axis + (rows,)]
        return jax.make_array_from_process_local_data(sharding, local, value.shape)

    return jax.tree.map(place, batch)


# ---- multi-host --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process joins a multi-process job (the mesh.* keys; None: JAX's auto-detection)."""

    distributed: bool = False
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    heartbeat_timeout_s: int = 30

    @classmethod
    def from_config(cls, mesh: MeshSection) -> Launch:
        """From the run's mesh section (its keys are checked there: config/schema.MeshSection)."""
        return cls(mesh.distributed, mesh.coordinator_address or None,
                   mesh.num_processes if mesh.num_processes > 0 else None,
                   mesh.process_id if mesh.process_id >= 0 else None, mesh.heartbeat_timeout_s)


def initialize_distributed(launch: Launch | bool) -> None:
    """jax.distributed.initialize() once, before anything touches a device: with the launch's coordinator and
    process ids, or (None) the cluster's auto-detection. CPU devices talk through gloo (the CPU client has no
    collectives across processes otherwise)."""
    launch = Launch(distributed=launch) if isinstance(launch, bool) else launch
    if not launch.distributed or jax.distributed.is_initialized():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    options: dict[str, Any] = {"coordinator_address": launch.coordinator_address,
                               "num_processes": launch.num_processes, "process_id": launch.process_id}
    known = inspect.signature(jax.distributed.initialize).parameters
    for name in ("heartbeat_timeout_seconds", "shutdown_timeout_seconds"):
        if name in known:  # (named so in jax 0.10; kept out where a version lacks them)
            options[name] = launch.heartbeat_timeout_s
    try:
        jax.distributed.initialize(**options)
    except (ValueError, RuntimeError) as err:
        raise ValueError(f"mesh.distributed=True but jax.distributed.initialize() failed ({err}); launch one "
                         "process per host under a cluster manager that sets the coordinator (SLURM, TPU pod), or "
                         "give --config.mesh.coordinator_address, mesh.num_processes and mesh.process_id, or use "
                         "--config.mesh.distributed=False on one host.") from err


def refuse_distributed(mesh: MeshSection, command: str) -> None:
    """A ValueError for a command that runs in one process only when the config asks for several."""
    if mesh.distributed:
        raise ValueError(f"beear {command} runs in one process (only `beear run` and `beear eval` span several): launch it once, "
                         "with --config.mesh.distributed=False.")


def is_primary() -> bool:
    """Only process 0 writes logs and files."""
    return jax.process_index() == 0


def to_host(tree: Any) -> Any:
    """Global arrays -> full numpy arrays on every process (an all-gather across hosts if needed)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


# ---- sizes --------------------------------------------------------------------------------------


def shard_shape(shape: Sequence[int], spec: P, sizes: Mapping[str, int]) -> tuple[int, ...]:
    """The per-device block of an array of `shape` sharded by `spec` over a mesh of `sizes`."""
    entries = tuple(spec) + (None,) * (len(shape) - len(spec))
    out = []
    for dim, entry in zip(shape, entries):
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        out.append(-(-dim // math.prod(sizes[n] for n in names)))
    return tuple(out)


def spec_bytes(shape: Sequence[int], dtype: Any, spec: P, sizes: Mapping[str, int]) -> int:
    """Bytes one device holds of an array (analytical; no devices needed)."""
    return math.prod(shard_shape(shape, spec, sizes)) * jnp.dtype(dtype).itemsize


def device_bytes(tree: Any) -> int:
    """Measured bytes per device of a tree of global arrays (the largest shard of each array)."""
    return sum(max(s.data.nbytes for s in leaf.addressable_shards) for leaf in jax.tree.leaves(tree))


__all__ = [
    "BATCH_AXES",
    "LOGICAL_RULES",
    "MESH_AXES",
    "Launch",
    "abstract_param_tree",
    "axis_sizes",
    "batch_parallelism",
    "batch_sharding",
    "check_batch_size",
    "device_bytes",
    "follow_params",
    "init_params_sharded",
    "initialize_distributed",
    "is_primary",
    "logical_to_spec",
    "make_mesh",
    "param_shardings",
    "param_specs",
    "place_params",
    "refuse_distributed",
    "replicate",
    "replicated",
    "resolve_mesh_shape",
    "shard_batch",
    "shard_shape",
    "spec_bytes",
    "step_shardings",
    "to_host",
]

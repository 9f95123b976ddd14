"""The orbax checkpointer of a run (RunCheckpointer): save, restore onto any mesh, fall back past corrupt steps.

One checkpoint is one orbax step directory holding the items

    params        the model params (float32 master copy, sharded as on the mesh)
    outer_state   the outer optimizer state
    perturbation  {"deltas": [delta per layer, in layer order], "inner_state": [its optimizer state's leaves]}
    meta          JSON: cursor (round, outer step), the seed's numpy generator state, metrics-log
                  length, elapsed time, the resolved config, the model config, and per-array
                  fingerprints (sum, sum |x|) written at save time

Restores read against abstract arrays (jax.ShapeDtypeStruct with shardings), so a checkpoint saved on
one mesh restores onto any other. A step that fails to read, or whose arrays do not match their
fingerprints, is reported and the previous one is used. A resuming run moves the bad steps aside (to
`corrupt-<step>`): otherwise orbax would count them as the newest steps, refuse to save those numbers
again and delete the good older steps first when pruning to checkpoint_keep. Export only reads
(`RunCheckpointer(read_only=True)`) and leaves the run directory as it is.
"""

from __future__ import annotations

import gc
import logging
import pathlib
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

log = logging.getLogger("beear_jax")

ARRAY_ITEMS = ("params", "outer_state", "perturbation")
ITEMS = (*ARRAY_ITEMS, "meta")
FORMAT = 1
_FINGERPRINT_RTOL = 1e-4  # sums over a different mesh reduce in another order


def warn_primary(message: str, *args: Any) -> None:
    """A logged warning from process 0 only."""
    if jax.process_index() == 0:  # one message per run, not one per host
        log.warning(message, *args)


class CheckpointMismatchError(ValueError):
    """A readable checkpoint that belongs to a different model or run layout (not corruption)."""


class CheckpointCorruptError(ValueError):
    """A checkpoint step (or every one of them) cannot be read or fails its fingerprints.

    A ValueError, so the CLI prints it as one line; the message names the directory and what to do.
    """


class CheckpointNotFoundError(FileNotFoundError):
    """No checkpoint (or not the requested step) where one was expected; the message lists what exists."""


# Words of orbax's and tensorstore's read errors (tensorstore's own: 'DATA_LOSS: Error reading "x" in
# OCDBT database at local file ...').
_ORBAX_READ_NOISE = ("orbax", "Encountered error while reading array index", "TensorStore", "OCDBT",
                     "Error reading")


def _drop_orbax_read_noise(record: logging.LogRecord) -> bool:
    """asyncio-logger filter: False for a report of a failed orbax read task that nobody awaited."""
    message = record.getMessage()
    noise = ("never retrieved" in message or "destroyed but it is pending" in message) and (
        any(word in message for word in _ORBAX_READ_NOISE)
        or (record.exc_info is not None and any(word in str(record.exc_info[1]) for word in _ORBAX_READ_NOISE)))
    return not noise


def _is_orbax_read_leftover(unraisable: Any) -> bool:
    """An orbax read coroutine closed after its restore failed, or a tensorstore read finishing after
    orbax closed the failed restore's event loop (asyncio's call_soon_threadsafe from a C++ thread)."""
    code = getattr(unraisable.object, "cr_code", None)
    if code is not None:
        return "orbax" in code.co_filename and "while reading array" in str(unraisable.exc_value)
    frames = traceback.extract_tb(unraisable.exc_traceback) if unraisable.exc_traceback is not None else []
    return (unraisable.object is None and isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == "Event loop is closed"
            and bool(frames) and frames[0].name == "call_soon_threadsafe")


def _filter_orbax_read_leftovers() -> None:
    """Called before an orbax restore of arrays: a failed restore (reported as one line) leaves read tasks
    behind that asyncio and Python report when they finish or are garbage-collected, as pages of "Task
    exception was never retrieved" / "Exception ignored in <coroutine ...>" / "Event loop is closed"
    dumps, some as soon as orbax closes its event loop, before the failure reaches us (so the filters go
    in first). From then on this process drops exactly those reports (see the two predicates above);
    every other log record and unraisable exception passes. Idempotent."""
    asyncio_log = logging.getLogger("asyncio")
    if _drop_orbax_read_noise not in asyncio_log.filters:
        asyncio_log.addFilter(_drop_orbax_read_noise)
    previous = sys.unraisablehook
    if not getattr(previous, "beear_drops_orbax_read_leftovers", False):
        def hook(unraisable: Any) -> None:
            if not _is_orbax_read_leftover(unraisable):
                previous(unraisable)

        hook.beear_drops_orbax_read_leftovers = True  # type: ignore[attr-defined]
        sys.unraisablehook = hook


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings: what a restore reads into."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


@jax.jit
def _sums(tree: Any) -> Any:
    return jax.tree.map(lambda x: jnp.stack([jnp.sum(x.astype(jnp.float32)),
                                             jnp.sum(jnp.abs(x.astype(jnp.float32)))]), tree)


def fingerprints(tree: Any) -> dict[str, list[float]]:
    """{path: [sum, sum |x|]} of every array (one compiled reduction; cheap next to the write)."""
    sums = jax.device_get(_sums(tree))
    return {jax.tree_util.keystr(path): [float(v[0]), float(v[1])]
            for path, v in jax.tree_util.tree_flatten_with_path(sums)[0]}


def fingerprint_mismatches(expected: Mapping[str, list[float]], actual: Mapping[str, list[float]]) -> list[str]:
    """Paths whose sums differ beyond reduction-order noise, or that are missing."""
    bad = []
    for key, (total, magnitude) in expected.items():
        if key not in actual:
            bad.append(f"{key} (missing)")
            continue
        got_total, got_magnitude = actual[key]
        scale = _FINGERPRINT_RTOL * max(magnitude, 1e-30)
        if not (abs(got_total - total) <= scale and abs(got_magnitude - magnitude) <= scale):
            bad.append(key)
    return bad


def string_keys(deltas: Mapping[int, Any]) -> dict[str, Any]:
    """Orbax stores dict keys as names: {9: delta} -> {"9": delta}."""
    return {str(k): v for k, v in deltas.items()}


def int_keys(deltas: Mapping[str, Any]) -> dict[int, Any]:
    return {int(k): v for k, v in deltas.items()}


class RunCheckpointer:
    """A CheckpointManager over `directory` with corruption fallback.

    All processes call save/restore (orbax coordinates hosts); only process 0 moves bad steps aside.
    Saves are asynchronous: the device->host copy happens in `save`, the write in the background,
    so the next step may donate the saved buffers. With read_only=True nothing under `directory` is
    created, pruned, renamed or written (export): bad steps are skipped and left where they are.
    """

    def __init__(self, directory: str | pathlib.Path, keep: int = 2, async_save: bool = True,
                 read_only: bool = False) -> None:
        self.directory = pathlib.Path(directory).absolute()
        self.keep = max(int(keep), 1)
        self.read_only = read_only
        self._async = async_save and not read_only
        self._manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        # read_only: no root directory, no pruning (max_to_keep=None), no saves (orbax's own read_only
        # option would do the same but logs a warning per option it resets).
        options = ocp.CheckpointManagerOptions(max_to_keep=None if self.read_only else self.keep,
                                               create=not self.read_only, enable_async_checkpointing=self._async)
        return ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def steps(self) -> list[int]:
        """The committed checkpoint numbers, oldest first (half-written saves are not listed)."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, items: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
        """Saves the array items and meta (with fingerprints added) as checkpoint `step`."""
        if self.read_only:
            raise RuntimeError(f"{self.directory} was opened read-only; it cannot save checkpoint {step}.")
        meta = {**meta, "format": FORMAT, "step": int(step),
                "fingerprints": {name: fingerprints(items[name]) for name in ARRAY_ITEMS}}
        args = {name: ocp.args.StandardSave(items[name]) for name in ARRAY_ITEMS}
        self._manager.save(int(step), args=ocp.args.Composite(**args, meta=ocp.args.JsonSave(meta)), force=True)

    def read_meta(self, step: int) -> dict:
        """The meta item of checkpoint `step`; CheckpointCorruptError (naming the file) if unreadable."""
        where = self.directory / str(step) / "meta" / "metadata"
        try:
            meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as err:  # a JSON error, a missing file, orbax's own errors
            raise CheckpointCorruptError(f"{where} is not readable ({first_line(err)})") from err
        if not isinstance(meta, Mapping) or not isinstance(meta.get("fingerprints"), Mapping):
            raise CheckpointCorruptError(f"{where} is not a beear_jax checkpoint's metadata (no fingerprints)")
        return dict(meta)

    def restore_step(self, step: int, targets: Mapping[str, Any] | Callable[[dict], Mapping[str, Any]],
                     names: tuple[str, ...], check: Callable[[dict], None] | None = None) -> tuple[dict, dict]:
        """(items, meta) of checkpoint `step`; raises if it cannot be read or fails its fingerprints.

        `targets` maps item names to abstract trees (shapes, dtypes, target shardings), or is a function
        of the step's meta that returns them. `check(meta)` runs before any array is read and may raise
        CheckpointMismatchError.
        """
        meta = self.read_meta(step)
        if check is not None:
            check(meta)  # raises CheckpointMismatchError: a different run, not a broken file
        if callable(targets):
            targets = targets(meta)
        args = {name: ocp.args.StandardRestore(targets[name]) for name in names}
        failure = None
        _filter_orbax_read_leftovers()
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as err:  # noqa: BLE001 (orbax/tensorstore raise many types for bad files)
            failure = first_line(err)  # only the text: the traceback holds orbax's failed read tasks
        if failure is not None:
            with warnings.catch_warnings():
                # The failed restore's coroutines that orbax never awaited: collected (and dropped) now.
                warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
                gc.collect()
            raise CheckpointCorruptError(f"arrays cannot be read: {failure}")
        items = {name: restored[name] for name in names}
        bad = [f"{name}{key}" for name in names
               for key in fingerprint_mismatches(meta["fingerprints"][name], fingerprints(items[name]))]
        if bad:
            raise CheckpointCorruptError(f"arrays differ from what was saved: {', '.join(bad[:5])}")
        return items, meta

    def restore_latest(self, targets: Mapping[str, Any] | Callable[[dict], Mapping[str, Any]],
                       names: tuple[str, ...] = ARRAY_ITEMS,
                       check: Callable[[dict], None] | None = None) -> tuple[dict, dict] | None:
        """(items, meta) of the newest good checkpoint, or None if there is none at all.

        `targets` as in restore_step. A step that cannot be read (arrays or meta) or fails its
        fingerprints is reported and the previous step is tried; unless read_only, the bad newer steps
        are then moved aside (see the module docstring). If every step is bad this raises
        CheckpointCorruptError and leaves every step where it is.
        """
        steps = self.steps()
        if not steps:
            return None
        broken = []
        for step in reversed(steps):
            try:
                items, meta = self.restore_step(step, targets, names, check)
            except CheckpointMismatchError:
                raise
            except Exception as err:  # noqa: BLE001 (orbax/tensorstore raise many types for bad files)
                reason = first_line(err)
                warn_primary("checkpoint %s/%d is corrupt or partial (%s); trying the previous one.",
                      self.directory, step, reason)
                broken.append(step)
                continue
            if broken and self.read_only:
                warn_primary("using checkpoint %s/%d (the newer %s cannot be read; left as it is).",
                      self.directory, step, ", ".join(map(str, broken)))
            elif broken:
                self._set_aside(broken)
                warn_primary("resuming from checkpoint %s/%d (the newer %s set aside as corrupt-<step>).",
                      self.directory, step, ", ".join(map(str, broken)))
            return items, meta
        raise CheckpointCorruptError(
            f"no readable checkpoint in {self.directory}: steps {', '.join(map(str, steps))} are all corrupt or "
            "partial (see the warnings above); restore a copy of the directory, or start over in a new "
            "output directory.")

    def _set_aside(self, steps: list[int]) -> None:
        """Renames bad steps out of orbax's view, so that later saves with these numbers can happen."""
        self._manager.wait_until_finished()
        if jax.process_index() == 0:
            for step in steps:
                source = self.directory / str(step)
                target = self.directory / f"corrupt-{step}"
                if target.exists():
                    target = self.directory / f"corrupt-{step}-{int(time.time())}"
                if source.exists():
                    source.rename(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("beear_checkpoint_set_aside")
        self._manager.close()
        self._manager = self._open()

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def first_line(err: BaseException) -> str:
    """The root cause's first line (orbax wraps tensorstore's precise error in a long generic one)."""
    while err.__cause__ is not None and not isinstance(err, CheckpointCorruptError):
        err = err.__cause__
    lines = str(err).strip().splitlines()
    text = lines[0][:300] if lines else ""
    return text if isinstance(err, CheckpointCorruptError) else f"{type(err).__name__}: {text}"

"""Orbax checkpoints of a BEEAR run: save every round (and every k outer steps), resume, export.

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

import dataclasses
import gc
import hashlib
import json
import logging
import pathlib
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from beear_jax.method.perturbation import PAPER_WINDOWS

if TYPE_CHECKING:
    from beear_jax.config.schema import RunSettings

log = logging.getLogger("beear_jax")

ARRAY_ITEMS = ("params", "outer_state", "perturbation")
ITEMS = (*ARRAY_ITEMS, "meta")
FORMAT = 1
_FINGERPRINT_RTOL = 1e-4  # sums over a different mesh reduce in another order


def _warn(message: str, *args: Any) -> None:
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
            raise CheckpointCorruptError(f"{where} is not readable ({_first_line(err)})") from err
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
            failure = _first_line(err)  # only the text: the traceback holds orbax's failed read tasks
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
                reason = _first_line(err)
                _warn("checkpoint %s/%d is corrupt or partial (%s); trying the previous one.",
                      self.directory, step, reason)
                broken.append(step)
                continue
            if broken and self.read_only:
                _warn("using checkpoint %s/%d (the newer %s cannot be read; left as it is).",
                      self.directory, step, ", ".join(map(str, broken)))
            elif broken:
                self._set_aside(broken)
                _warn("resuming from checkpoint %s/%d (the newer %s set aside as corrupt-<step>).",
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


def _first_line(err: BaseException) -> str:
    """The root cause's first line (orbax wraps tensorstore's precise error in a long generic one)."""
    while err.__cause__ is not None and not isinstance(err, CheckpointCorruptError):
        err = err.__cause__
    lines = str(err).strip().splitlines()
    text = lines[0][:300] if lines else ""
    return text if isinstance(err, CheckpointCorruptError) else f"{type(err).__name__}: {text}"


_PASS_RUN_DIR = "pass the run's output_dir (the --config.output_dir of `beear run`, which holds checkpoints/)"


def find_checkpoint_dir(path: str | pathlib.Path) -> pathlib.Path:
    """A run's output_dir or its checkpoints/ directory -> the checkpoints directory."""
    path = pathlib.Path(path).expanduser()
    if not path.exists():
        raise CheckpointNotFoundError(f"{path} does not exist; {_PASS_RUN_DIR}.")
    if (path / "checkpoints").is_dir():
        return path / "checkpoints"
    if path.is_dir():
        return path
    raise CheckpointNotFoundError(f"{path} is a file, not a run directory; {_PASS_RUN_DIR}.")


def split_step_dir(path: str | pathlib.Path) -> tuple[pathlib.Path, int | None]:
    """`RUN/checkpoints/4` (one checkpoint's directory) -> (RUN/checkpoints, 4); any other path -> (path, None)."""
    path = pathlib.Path(path).expanduser()
    if path.name.isdigit() and path.is_dir() and any((path / name).exists() for name in ITEMS):
        return path.parent, int(path.name)
    return path, None


def run_dir_of(path: str | pathlib.Path) -> pathlib.Path:
    """The run's output_dir of a path given to export: the run directory itself, its checkpoints/ or
    one checkpoints/<step> directory (resolved)."""
    base, _ = split_step_dir(path)
    base = base.resolve()
    return base.parent if base.name == "checkpoints" else base


def is_run_output(path: str | pathlib.Path) -> bool:
    """True if `path` is (part of) a `beear run` output rather than a model: the run's output_dir (it holds
    checkpoints/ or metrics.jsonl), its checkpoints/ directory, or one checkpoints/<step> directory."""
    path = pathlib.Path(path).expanduser()
    if not path.is_dir():
        return False
    if (path / "checkpoints").is_dir() or (path / "metrics.jsonl").is_file():
        return True
    if split_step_dir(path)[1] is not None:
        return True
    return path.name == "checkpoints" and any(split_step_dir(child)[1] is not None for child in path.iterdir())


def is_hf_model_dir(path: str | pathlib.Path) -> bool:
    """True if `path` is a directory whose config.json names a model_type (an HF model, not a run)."""
    config = pathlib.Path(path).expanduser() / "config.json"
    try:
        return isinstance(json.loads(config.read_text()).get("model_type"), str)
    except (OSError, ValueError, AttributeError):
        return False


def restore_params_for_export(directory: str | pathlib.Path, step: int | None = None) -> tuple[Any, dict]:
    """Params (numpy, on the host) and meta of the newest good (or the given) checkpoint.

    `directory` is a run's output_dir, its checkpoints/ directory or one step's directory
    (checkpoints/<step>, the same as step=<step>). Nothing in it is changed: a corrupt newer step is
    reported and skipped (not renamed). The params are read sharded over all local devices (fsdp over
    the embedding axis), so a model larger than one device's memory can be exported, then gathered to
    the host one array at a time. Raises CheckpointNotFoundError (no checkpoints, no such step: the
    message lists the steps there are) or CheckpointCorruptError (the given step, or every step, is
    unreadable).
    """
    from beear_jax.models.config import ModelConfig
    from beear_jax.parallel import sharding as sharding_lib

    base, step_in_path = split_step_dir(directory)
    if step_in_path is not None and step is not None and step != step_in_path:
        raise ValueError(f"{directory} is checkpoint {step_in_path} but step {step} was asked for; pass the run "
                         "directory with the step you want, or the step's directory alone.")
    step = step_in_path if step_in_path is not None else step
    checkpointer = RunCheckpointer(base if step_in_path is not None else find_checkpoint_dir(base),
                                   async_save=False, read_only=True)
    mesh = sharding_lib.make_mesh((1, -1, 1))

    def targets(meta: dict) -> dict:
        model_config = ModelConfig.from_hf_dict(meta["model_config"])
        shardings = sharding_lib.param_shardings(model_config, mesh)
        return {"params": abstract_like(sharding_lib.abstract_param_tree(model_config), shardings)}

    try:
        steps = checkpointer.steps()
        if not steps and is_hf_model_dir(checkpointer.directory):
            raise CheckpointNotFoundError(
                f"{checkpointer.directory} is an HF model directory, not a run: export reads a run's checkpoints "
                f"({_PASS_RUN_DIR}); to copy this model (e.g. in another dtype) use `beear convert "
                f"{checkpointer.directory} OUT`.")
        if not steps:
            raise CheckpointNotFoundError(f"no checkpoints in {checkpointer.directory}; {_PASS_RUN_DIR}, its "
                                          "checkpoints/ directory or one checkpoints/<step> directory.")
        if step is None:
            found = checkpointer.restore_latest(targets, names=("params",))
            assert found is not None
            items, meta = found
        elif step not in steps:
            set_aside = sorted(p.name for p in pathlib.Path(checkpointer.directory).glob(f"corrupt-{step}*")
                               if p.name == f"corrupt-{step}" or p.name.startswith(f"corrupt-{step}-"))
            why = (f" (a resume found step {step} corrupt or partial and set it aside as {set_aside[0]})"
                   if set_aside else "")
            raise CheckpointNotFoundError(f"{checkpointer.directory} has no checkpoint {step}{why}; the checkpoints "
                                          f"there are steps {', '.join(map(str, steps))} (or leave the step out for "
                                          "the newest good one).")
        else:
            try:
                items, meta = checkpointer.restore_step(step, targets, ("params",))
            except Exception as err:  # orbax/tensorstore raise many types for bad files
                others = [s for s in steps if s != step]
                hint = (f"choose another step ({', '.join(map(str, others))}) or leave the step out for the newest "
                        "good one" if others else "restore a copy of the run directory")
                raise CheckpointCorruptError(f"checkpoint {checkpointer.directory}/{step} cannot be read "
                                             f"({_first_line(err)}); {hint}.") from err
        params = jax.tree.map(lambda x: np.asarray(sharding_lib.to_host(x)), items["params"])
        return params, meta
    finally:
        checkpointer.close()


# ---- the BEEAR loop's state ----------------------------------------------------------------------


@dataclasses.dataclass
class RunState:
    """The mutable state of the bi-level loop: what a checkpoint holds, and where the run stands."""

    params: Any
    outer_state: Any
    pert: Any  # a Perturbation
    inner_state: Any
    round: int = 1  # the round in progress (1-based)
    outer_step: int = 0  # outer steps of that round done
    round_done: bool = False
    global_step: int = 0  # outer steps done in all rounds: the checkpoint number
    last_inner: dict = dataclasses.field(default_factory=dict)
    stopped_early: bool = False

    def array_items(self) -> dict[str, Any]:
        # Deltas and the inner state as leaf lists: orbax keys are names, the deltas' keys are ints.
        return {"params": self.params, "outer_state": self.outer_state,
                "perturbation": {"deltas": [self.pert.deltas[k] for k in self.pert.layers],
                                 "inner_state": jax.tree.leaves(self.inner_state)}}


def layout_signature(model_config: Any, layers: tuple[int, ...], settings: RunSettings) -> dict:
    """What must match for a checkpoint's arrays to fit this run (a mismatch is not corruption)."""
    perturb, outer = settings.perturb, settings.outer
    return json.loads(json.dumps({
        "model_config": model_config.to_hf_dict(), "perturb_layers": list(layers),
        "perturb_length": perturb.length, "inner_optimizer": settings.inner.optimizer,
        "outer_optimizer": outer.optimizer,
        # Windows other than the paper's change the delta's rows; said only then, so that checkpoints written
        # before perturb.windows existed still resume.
        **({"perturb_windows": list(perturb.windows)} if perturb.windows != PAPER_WINDOWS else {}),
        # A schedule adds a step count to the optimizer state, clipping a chain level.
        "outer_lr_schedule": outer.lr_schedule if outer.lr_schedule != "constant" or outer.warmup_steps
        else "constant", "outer_clipped": outer.clip_norm > 0}))


def digest(value: Any) -> str:
    """sha256 of a JSON rendering (numpy arrays as lists): equal for equal token ids and row indices."""
    text = json.dumps(value, default=lambda x: np.asarray(x).tolist() if hasattr(x, "shape") else str(x),
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def params_fingerprint(host_params: Any, stride: int = 997) -> str:
    """A digest of every `stride`-th weight of each param (cheap even for 7B models): a resume on
    another model of the same shape is refused; the same weights at another path are the same model."""
    return digest([np.asarray(x).ravel()[::stride] for x in jax.tree.leaves(host_params)])


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[:limit] + "..."


def _lookup(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def _leaf_paths(tree: Any, prefix: str = "") -> list[str]:
    if not isinstance(tree, dict):
        return [prefix[:-1]]
    return [path for key, value in tree.items() for path in _leaf_paths(value, f"{prefix}{key}.")]


class LoopCheckpoints:
    """When the loop saves (cfg.checkpoint_every rounds, cfg.checkpoint_every_steps outer steps), what
    goes into a checkpoint, and resuming a RunState from the newest good one."""

    def __init__(self, cfg: Any, directory: pathlib.Path, signature: dict, inputs: dict,
                 round_digests: list[str], config_dict: dict) -> None:
        """signature: layout_signature; inputs: {what: fingerprint} of the run's input model and data
        (a resume on others is refused); round_digests: one per planned round (which rows it draws)."""
        self.seed = int(cfg.seed)
        self.rounds = int(cfg.rounds)
        self.every_rounds = int(cfg.checkpoint_every)
        self.every_steps = int(cfg.checkpoint_every_steps)
        self.signature, self.inputs, self.config_dict = signature, inputs, config_dict
        self.round_digests = round_digests
        self.store = RunCheckpointer(directory, keep=int(cfg.checkpoint_keep))

    def due_round(self, state: RunState, rounds: int) -> bool:
        if self.every_rounds < 0:
            return False
        last = state.round == rounds or state.stopped_early
        return last or (self.every_rounds > 0 and state.round % self.every_rounds == 0)

    def due_step(self, state: RunState, steps_in_round: int) -> bool:
        # The round's last step is saved by the round-end checkpoint, with its summary.
        return (self.every_steps > 0 and self.every_rounds >= 0 and state.outer_step < steps_in_round
                and state.global_step % self.every_steps == 0)

    def save(self, state: RunState, log_lines: int, elapsed: float) -> None:
        meta = {"cursor": {"round": state.round, "outer_step": state.outer_step, "round_done": state.round_done},
                "global_step": state.global_step, "seed": self.seed, "inputs": self.inputs,
                "round_digests": self.round_digests,
                "log_lines": log_lines, "elapsed_s": elapsed, "last_inner": state.last_inner,
                "stopped_early": state.stopped_early, "layout": self.signature, "config": self.config_dict,
                "model_config": self.signature["model_config"]}
        self.store.save(state.global_step, state.array_items(), meta)

    def _check(self, meta: dict) -> None:
        """Refuses (CheckpointMismatchError) a checkpoint of another run: another layout, input model or
        defender data, or a round beyond this run's `rounds` (its model would be a mid-run state)."""
        where = f"the checkpoints in {self.store.directory}"
        saved = meta.get("layout") or {}
        differ = sorted(k for k in {*saved, *self.signature} if saved.get(k) != self.signature.get(k))
        if differ:
            shown = "; ".join(f"{k}: checkpoint {_short(saved.get(k))}, now {_short(self.signature.get(k))}"
                              for k in differ)
            raise CheckpointMismatchError(f"{where} belong to a run with another layout ({shown}); resume with "
                                          "the run's settings, or choose a new --config.output_dir.")
        for what, value in (meta.get("inputs") or {}).items():
            if what in self.inputs and value != self.inputs[what]:
                raise CheckpointMismatchError(
                    f"{where} belong to a run on another {what.replace('_', ' ')} (its fingerprint differs): "
                    "resuming would mix two runs. Resume with the run's own model.path and data (moved files "
                    "are fine), or choose a new --config.output_dir.")
        reached = int(meta["cursor"]["round"])
        if reached > self.rounds:
            raise CheckpointMismatchError(
                f"{where} reach round {reached}, beyond rounds={self.rounds}: exporting would write a mid-run "
                f"state. Resume with --config.rounds >= {reached} (the run's own: "
                f"{_lookup(meta.get('config') or {}, 'rounds')}), or export a checkpoint with `beear export`.")

    def _check_round_in_progress(self, cursor: dict, saved_rounds: list[str]) -> None:
        """Refuses a checkpoint taken between the outer steps of a round whose plan (the rows its inner and
        outer steps draw) the current settings change: the rest of the round would follow another plan than
        the one its perturbation was found on and its first steps took. A checkpoint at a round's end may
        continue with other settings (later rounds simply draw other rows)."""
        round_index = int(cursor["round"])
        mid_round = not cursor["round_done"] and int(cursor["outer_step"]) > 0
        if not mid_round or not 0 < round_index <= min(len(saved_rounds), len(self.round_digests)):
            return
        if saved_rounds[round_index - 1] != self.round_digests[round_index - 1]:
            raise CheckpointMismatchError(
                f"the newest checkpoint in {self.store.directory} is in the middle of round {round_index} "
                f"({cursor['outer_step']} outer steps done), and the current seed or sampling settings (seed, "
                "inner.samples, inner.batch_size, outer.batch_size, outer.anchor_samples, the data) plan "
                "that round differently: the round would mix two plans. Resume with the run's own settings (they "
                "are in its config.json), or choose a new --config.output_dir.")

    def resume(self, state: RunState, shardings: Any) -> dict | None:
        """Restores `state` in place from the newest good checkpoint onto `shardings` (a StepShardings,
        possibly of another mesh than the one that saved); returns the checkpoint's meta, or None."""
        items = state.array_items()
        targets = {"params": abstract_like(items["params"], shardings.params),
                   "outer_state": abstract_like(items["outer_state"], shardings.outer_state),
                   "perturbation": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                               sharding=shardings.replicated),
                                                items["perturbation"])}
        found = self.store.restore_latest(targets, check=self._check)
        if found is None:
            return None
        restored, meta = found
        saved_rounds = list(meta.get("round_digests") or [])
        self._check_round_in_progress(meta["cursor"], saved_rounds)
        common = min(len(saved_rounds), len(self.round_digests))
        if saved_rounds[:common] != self.round_digests[:common]:
            _warn("the seed or the sampling settings differ from the checkpointed run; later rounds draw other "
                  "samples.")
        # mesh.shape may change on resume (checkpoints restore onto any mesh); rounds may grow.
        changed = [k for k in _leaf_paths(meta["config"]) if k not in ("resume", "mesh.shape", "rounds")
                   and _lookup(meta["config"], k) != _lookup(self.config_dict, k)]
        if changed:
            _warn("resuming with changed settings: %s", ", ".join(changed))
        cursor = meta["cursor"]
        state.params, state.outer_state = restored["params"], restored["outer_state"]
        deltas = dict(zip(state.pert.layers, restored["perturbation"]["deltas"]))
        state.pert = dataclasses.replace(state.pert, deltas=deltas)
        state.inner_state = jax.tree.unflatten(jax.tree.structure(state.inner_state),
                                               restored["perturbation"]["inner_state"])
        state.round, state.outer_step, state.round_done = cursor["round"], cursor["outer_step"], cursor["round_done"]
        state.global_step, state.last_inner = int(meta["global_step"]), dict(meta.get("last_inner") or {})
        state.stopped_early = bool(meta.get("stopped_early"))
        return meta

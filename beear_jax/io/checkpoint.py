"""Checkpoints of a BEEAR run's loop: its state (RunState), when the loop saves it (every round, every k outer
steps), what must match for a checkpoint to resume this run (layout_signature, fingerprints of the input
model and data, the round plans) and resuming from the newest good one (LoopCheckpoints).

The orbax checkpointer and what one checkpoint holds are in run_checkpointer.py; finding a run's
checkpoint and reading it for export in checkpoint_export.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from beear_jax.io.run_checkpointer import CheckpointMismatchError, RunCheckpointer, abstract_like, warn_primary
from beear_jax.method.perturbation import PAPER_WINDOWS

if TYPE_CHECKING:
    from beear_jax.config.schema import RunSettings

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
    """When the loop saves (settings.checkpoint_every rounds, settings.checkpoint_every_steps outer steps), what
    goes into a checkpoint, and resuming a RunState from the newest good one."""

    def __init__(self, settings: RunSettings, directory: pathlib.Path, signature: dict, inputs: dict,
                 round_digests: list[str], config_dict: dict) -> None:
        """signature: layout_signature; inputs: {what: fingerprint} of the run's input model and data
        (a resume on others is refused); round_digests: one per planned round (which rows it draws)."""
        self.seed = int(settings.seed)
        self.rounds = int(settings.rounds)
        self.every_rounds = int(settings.checkpoint_every)
        self.every_steps = int(settings.checkpoint_every_steps)
        self.signature, self.inputs, self.config_dict = signature, inputs, config_dict
        self.round_digests = round_digests
        self.store = RunCheckpointer(directory, keep=int(settings.checkpoint_keep))

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
            warn_primary("the seed or the sampling settings differ from the checkpointed run; later rounds draw other "
                  "samples.")
        # mesh.shape may change on resume (checkpoints restore onto any mesh); rounds may grow.
        changed = [k for k in _leaf_paths(meta["config"]) if k not in ("resume", "mesh.shape", "rounds")
                   and _lookup(meta["config"], k) != _lookup(self.config_dict, k)]
        if changed:
            warn_primary("resuming with changed settings: %s", ", ".join(changed))
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

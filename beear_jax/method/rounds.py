"""The BEEAR bi-level loop: rounds of (cache h_l -> inner passes -> outer pass), logging, checkpoints, export.

    for each round:
        h_l of the sampled safety prompts (unwanted and safe answers), once, no gradient
        delta = 0; inner passes over the cached h_l until converged (inner_loop) -> delta*  (BEE: entrapment)
        [stop.holdout: what delta* elicits on held-back prompts; the stop rule may end the run here]
        one outer pass: safe answers with delta*, anchors without -> params (AR: removal)

`run_beear` is the entry point: it turns its config into typed settings (config/settings.py) on its first
line; the data and the round plan come from method/round_plan.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from beear_jax.config.schema import EvalSection, InnerSection, RunSettings
from beear_jax.config.settings import absolute_settings, settings_dict, settings_from_config
from beear_jax.data import batches as batch_types
from beear_jax.data.anchor_answers import CACHE_NAME as ANCHOR_CACHE
from beear_jax.data.anchor_answers import self_answered_anchors
from beear_jax.evaluation.evaluate import eos_ids
from beear_jax.evaluation.scoring import load_refusal_strings
from beear_jax.io import checkpoint as checkpoint_lib
from beear_jax.io.atomic_file import is_temp_of, write_atomically
from beear_jax.io.hf import load_model, load_tokenizer
from beear_jax.io.hf_save import check_apart, save_model
from beear_jax.method.inner_loop import ElicitationProbe, InnerRule, converge, elicitation_rate, make_probe
from beear_jax.method.optimizers import make_optimizer, trainable_mask
from beear_jax.method.perturbation import Perturbation
from beear_jax.method.round_plan import (
    DefenderData,
    check_batch_sizes,
    check_perturb_layers,
    delta_rows,
    outer_batch,
    outer_optimizer,
    packed_shape,
    prepare_data,
    round_batches,
    step_settings,
)
from beear_jax.method.steps import Steps, make_steps
from beear_jax.models.config import ModelConfig
from beear_jax.parallel import sharding as sharding_lib


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN/inf: the run stops and no model is written."""


@dataclasses.dataclass
class RunResult:
    params: dict
    model_config: ModelConfig
    history: list[dict]
    output_dir: pathlib.Path
    model_dir: pathlib.Path | None
    stopped_early: bool  # the stop rule ended the run before `rounds` (stop.max_elicitation)
    resumed_from: int | None = None  # the checkpoint (global outer step) a resumed run continued from


def check_finite(metrics: dict[str, Any], where: str, hint: str) -> None:
    """Raises NonFiniteLossError if any metric is NaN/inf."""
    bad = [k for k, v in metrics.items() if not np.all(np.isfinite(np.asarray(v)))]
    if bad:
        raise NonFiniteLossError(
            f"{', '.join(bad)} became NaN/inf during {where}; no model was written (earlier checkpoints are kept, "
            f"but they may already hold the diverging weights: start again in a new --config.output_dir). {hint}"
        )


def _scalars(metrics: dict[str, Any], index: int | None = None) -> dict[str, float]:
    return {k: float(np.asarray(v)[index] if index is not None else np.asarray(v)) for k, v in metrics.items()}


def kept_metrics(text: str, keep: int) -> tuple[list[dict], list[str]]:
    """The first `keep` records of a metrics.jsonl's text (what a checkpoint logged), and notes on lines
    that were missing or damaged there (left out: the history before the checkpoint is then incomplete)."""
    from beear_jax.evaluation.results import parse_metrics

    lines = text.splitlines()[:keep] if keep > 0 else []
    records, notes = parse_metrics("\n".join(lines))
    if len(lines) < keep:
        notes.append(f"it holds {len(lines)} of the {keep} lines the checkpoint logged; the history of the earlier "
                     "steps is incomplete")
    return records, notes


class MetricsLog:
    """Appends one JSON line per step to metrics.jsonl and keeps the history in memory.

    `keep` lines of an existing file are kept (a resumed run continues the log from its checkpoint;
    lines written after that checkpoint are dropped, as their steps run again). The kept lines replace
    the file whole (temp file + rename: a kill then cannot lose them); damaged or missing ones are left
    out with a warning (kept_metrics), never an error that would stop the resume.
    """

    def __init__(self, path: pathlib.Path | None, keep: int = 0) -> None:
        self.path = path
        self.history: list[dict] = []
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            text = path.read_text(errors="replace") if keep and path.exists() else ""
            self.history, notes = kept_metrics(text, keep)
            for note in notes:
                print(f"beear: warning: {path}: {note}", file=sys.stderr)
            write_atomically(path, "".join(json.dumps(record) + "\n" for record in self.history))

    def write(self, record: dict) -> None:
        self.history.append(record)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def _progress(total: int, enabled: bool, initial: int = 0) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)


RUN_FILES = ("metrics.jsonl", "checkpoints", "config.json", "model", ANCHOR_CACHE)
"""What `beear run` writes into output_dir; a directory holding only these (and no model) is resumable."""


def check_output_dir(output_dir: pathlib.Path, model_path: str, resume: bool) -> None:
    """Refuses an output_dir whose files a run would overwrite, before anything is loaded.

    A run writes metrics.jsonl, checkpoints/, config.json and model/ there. The directory may be absent or
    empty; with resume=True it may also be an unfinished run's directory (metrics.jsonl / checkpoints, no
    model yet). Anything else (the input model's directory, a user's files, a finished run, a file) is
    refused, so nothing is ever overwritten.
    """
    fix = "choose a new --config.output_dir"
    if not str(output_dir).strip() or str(output_dir) == ".":
        raise ValueError(f"output_dir is empty; {fix} (e.g. --config.output_dir=runs/beear-1).")
    if model_path:
        check_apart(output_dir, {"the input model (model.path)": model_path}, fix)
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"output_dir {output_dir} is a file, not a directory; {fix}.")
    present = sorted(p.name for p in output_dir.iterdir()) if output_dir.is_dir() else []
    model_dir = output_dir / "model"
    if model_dir.exists() and (not model_dir.is_dir() or any(model_dir.iterdir())):
        raise FileExistsError(f"{model_dir} already holds files; {fix} (nothing is overwritten).")
    # save_model's half-written model and write_atomically's temp files (a run killed while writing) are the
    # run's own leftovers.
    foreign = [name for name in present if name not in RUN_FILES and not name.startswith(".model.tmp-")
               and not is_temp_of(name, RUN_FILES)]
    if foreign or ((output_dir / "config.json").exists() and not (output_dir / "metrics.jsonl").exists()):
        raise FileExistsError(f"output_dir {output_dir} holds files that are not an unfinished beear run's "
                              f"({', '.join(foreign or ['config.json'])}); {fix} (nothing is overwritten).")
    earlier = [name for name in ("metrics.jsonl", "checkpoints") if name in present
               and (name != "checkpoints" or any((output_dir / name).iterdir()))]
    if earlier and not resume:
        raise FileExistsError(f"output_dir {output_dir} holds an earlier run ({', '.join(earlier)}); pass "
                              f"--config.resume=True to continue it from its last checkpoint, or {fix}.")


def run_beear(cfg: ml_collections.ConfigDict | RunSettings, progress: bool = True,
              on_round_end: Callable[[int, dict], None] | None = None, export: bool = True) -> RunResult:
    """Runs the defence described by cfg (a config or its settings) and exports the repaired model to
    output_dir/model.

    Params and optimizer state live sharded on the mesh mesh.shape; with export=True the run state is
    checkpointed to output_dir/checkpoints (checkpoint_every rounds, and every checkpoint_every_steps outer
    steps) and resume=True continues from the newest good checkpoint. Only process 0 writes logs and the model.
    """
    # Checked first (a bad key is named before anything loads); paths made absolute so that config.json and
    # the checkpoints name the same files from any directory.
    settings = absolute_settings(settings_from_config(cfg))
    launch = sharding_lib.Launch.from_config(settings.mesh)
    sharding_lib.initialize_distributed(launch)
    primary = sharding_lib.is_primary()
    if primary and progress and jax.process_count() > 1:
        # A lost process ends the others from inside JAX (its lines name the task); say what to do then.
        print(f"beear: {jax.process_count()} processes; if one is lost the others stop within "
              f"{launch.heartbeat_timeout_s} s (mesh.heartbeat_timeout_s): launch all again with "
              "--config.resume=True to continue from the last checkpoint", file=sys.stderr, flush=True)
    if not settings.model.path:
        raise ValueError("model.path is empty: set --config.model.path to the backdoored model (an HF directory or "
                         ".gguf).")
    model_path = os.path.expanduser(settings.model.path)
    output_dir = pathlib.Path(os.path.expanduser(settings.output_dir))
    model_dir = output_dir / "model"
    checkpoint_dir = output_dir / "checkpoints"
    if export:
        check_output_dir(output_dir, model_path, settings.resume)
    mesh = sharding_lib.make_mesh(settings.mesh.shape)  # a bad mesh or batch is named before the model loads
    check_batch_sizes(settings, sharding_lib.axis_sizes(mesh))
    if primary and mesh.size < jax.device_count():
        print(f"beear: warning: mesh.shape={tuple(mesh.shape.values())} uses {mesh.size} of the {jax.device_count()} "
              "devices; the others stay idle (a -1 in one axis takes the rest, e.g. --config.mesh.shape=-1,1,1).",
              file=sys.stderr)
    model_config, host_params = load_model(model_path, dtype=settings.model.dtype)
    layers = check_perturb_layers(settings.perturb, model_config.num_layers)
    tokenizer = load_tokenizer(model_path, model_config)
    anchors = None
    if settings.data.anchor_answers == "self":
        if primary and progress:
            print("beear: answering the anchor prompts with the starting model (data.anchor_answers='self')",
                  file=sys.stderr, flush=True)
        data_keys, model_keys = settings.data, settings.model
        anchors = self_answered_anchors(data_keys.anchor, data_keys.anchor_columns.prompt, model_config, host_params,
                                        tokenizer, data_keys.max_answer_tokens, model_keys.template,
                                        model_keys.system_prompt or None,
                                        output_dir / ANCHOR_CACHE if export else None, write=primary,
                                        temperature=data_keys.anchor_temperature, seed=settings.seed)
    data = prepare_data(settings, tokenizer, anchors)

    static = step_settings(settings, data.answer_len)
    rng = np.random.default_rng(settings.seed)
    plan = [round_batches(settings, data, rng) for _ in range(settings.rounds)]  # fixed per seed, also on resume
    inner_opt = make_optimizer(settings.inner.optimizer, settings.inner.lr)
    outer_opt = outer_optimizer(settings.outer, sum(len(r.outer) for r in plan))
    layout = sharding_lib.step_shardings(model_config, mesh, outer_opt)
    steps = make_steps(model_config, static, layers[0], inner_opt, outer_opt, layout)
    # What a resume must find again (checkpoint.LoopCheckpoints refuses another model or other data).
    inputs = {"input_model": checkpoint_lib.params_fingerprint(host_params),
              "defender_data": checkpoint_lib.digest([data.unwanted, data.safe, data.anchors])}
    params = sharding_lib.place_params(host_params, layout.params)  # each device gets only its shards
    # outer.kl_weight: the frozen start model, its own buffers (the outer step donates params').
    reference = [sharding_lib.place_params(host_params, layout.params)] if static.kl_weight > 0 else []
    del host_params
    trainable = sharding_lib.replicate(trainable_mask(model_config, params, settings.outer.trainable, layers[0]), mesh)
    init_inner = jax.jit(inner_opt.init, out_shardings=layout.replicated)
    zeros = jax.jit(lambda: Perturbation.zeros(layers, delta_rows(settings.perturb), model_config.hidden_size),
                    out_shardings=layout.replicated)

    def fresh_perturbation() -> tuple[Perturbation, Any]:
        # New buffers each round: the inner steps donate (consume) the previous ones.
        pert = zeros()
        return pert, init_inner(pert.deltas)

    outer_state = jax.jit(outer_opt.init, out_shardings=layout.outer_state)(params)
    loop = checkpoint_lib.RunState(params, outer_state, *fresh_perturbation())
    probe = heldback_probe(settings.eval, data, model_config, tokenizer)

    packed = packed_shape(settings.outer, data, plan, sharding_lib.batch_parallelism(sharding_lib.axis_sizes(mesh)))
    config_dict = settings_dict(settings)
    signature = checkpoint_lib.layout_signature(model_config, layers, settings)
    # checkpoint_every=-1: none, not even an empty directory (unless there are some to resume from).
    keeps_checkpoints = export and (settings.checkpoint_every >= 0 or checkpoint_dir.is_dir())
    round_digests = [checkpoint_lib.digest(dataclasses.asdict(r)) for r in plan]
    # (LoopCheckpoints reads seed, rounds and the checkpoint_* keys of the settings.)
    ckpt = checkpoint_lib.LoopCheckpoints(settings, checkpoint_dir, signature, inputs, round_digests,
                                          config_dict) if keeps_checkpoints else None
    meta = ckpt.resume(loop, layout) if ckpt and settings.resume else None
    if settings.resume and primary and (meta or checkpoint_dir.is_dir()):
        print(f"beear: resuming from checkpoint {loop.global_step} (round {loop.round}, {loop.outer_step} outer "
              f"steps done)" if meta else f"beear: no checkpoint in {checkpoint_dir}; starting afresh.",
              file=sys.stderr)
    log = MetricsLog(output_dir / "metrics.jsonl" if export and primary else None,
                     keep=int(meta["log_lines"]) if meta else 0)
    started = time.time() - (float(meta["elapsed_s"]) if meta else 0.0)
    try:
        measure_elicitation = None if probe is None else (
            lambda deltas: elicitation_rate(model_config, loop.params, tokenizer, probe, deltas)[0])
        _rounds(settings, steps, layout, trainable, plan, loop, log, ckpt, started, progress and primary,
                on_round_end, fresh_perturbation,
                lambda step: outer_batch(settings.outer, settings.perturb, data, step, packed), measure_elicitation,
                reference)
    finally:
        if ckpt is not None:
            ckpt.store.close()  # waits for an in-flight save, also when a step failed
    written = None
    if export:
        host_params = sharding_lib.to_host(loop.params)  # every process takes part in the gather
        if primary:
            write_atomically(output_dir / "config.json", json.dumps(config_dict, indent=2, default=str))
            written = pathlib.Path(save_model(model_dir, model_config, host_params, tokenizer_from=model_path))
    return RunResult(loop.params, model_config, log.history, output_dir, written, loop.stopped_early,
                     resumed_from=meta["global_step"] if meta else None)


def heldback_probe(eval_keys: EvalSection, data: DefenderData, model_config: ModelConfig,
                   tokenizer: Any) -> ElicitationProbe | None:
    """The probe of the defender's held-back prompts (stop.holdout), judged by eval's refusal strings and
    decoded as eval decodes; None when nothing is held back."""
    if not data.heldback:
        return None
    return make_probe(data.heldback, load_refusal_strings(eval_keys.refusal_strings), eval_keys.refusal_ignore_case,
                      eval_keys.max_new_tokens, eval_keys.batch_size, eos_ids(model_config, tokenizer),
                      data.pad_id, data.heldback_positions)


def _rounds(settings: RunSettings, steps: Steps, layout: Any, trainable: Any, plan: list,
            loop: checkpoint_lib.RunState, log: MetricsLog, ckpt: checkpoint_lib.LoopCheckpoints | None,
            started: float, progress: bool, on_round_end: Callable[[int, dict], None] | None,
            fresh_perturbation: Callable[[], tuple], build_outer: Callable[[tuple], tuple],
            measure_elicitation: Callable[[dict | None], float] | None = None, reference: Sequence = ()) -> None:
    """The rounds from the loop's cursor on: inner phase (unless resumed mid-round), the stop rule, and the
    outer phase. The progress bar counts inner passes at the cap (inner.epochs); a pass the convergence
    rule skips is counted when its round ends."""
    epochs, use_perturbation = settings.inner.epochs, settings.perturb.enabled
    max_elicitation = settings.stop.max_elicitation
    inner_sizes = [len(r.inner) * epochs * use_perturbation for r in plan]
    sizes = [n + len(r.outer) for n, r in zip(inner_sizes, plan)]
    first = len(plan) + 1 if loop.stopped_early else loop.round + loop.round_done
    resume_mid = first <= len(plan) and not loop.round_done and loop.outer_step > 0
    done = sum(sizes[:first - 1]) + (inner_sizes[first - 1] + loop.outer_step if resume_mid else 0)
    bar = _progress(sum(sizes), progress, initial=done)
    try:  # closed on errors too, so an error message starts on its own line
        for round_index in range(first, len(plan) + 1):
            inner_batches, outer_steps = plan[round_index - 1].inner, plan[round_index - 1].outer
            mid_round = resume_mid and round_index == first
            loop.round, loop.round_done = round_index, False
            device_bytes: dict[str, int] = {}
            round_record: dict[str, Any] = {}
            if not mid_round:
                loop.outer_step, loop.last_inner = 0, {}
                loop.pert, loop.inner_state = fresh_perturbation()
                if use_perturbation:
                    device_bytes["h_cache"], round_record = _inner_phase(settings.inner, steps, layout,
                                                                         inner_batches, loop, log,
                                                                         bar)
                    if measure_elicitation is not None:
                        round_record["elicitation"] = measure_elicitation(loop.pert.deltas)
                        round_record["elicitation_no_delta"] = measure_elicitation(None)
                        # The converged delta no longer brings the unwanted answer out: the backdoor is gone,
                        # and this round's outer pass is not needed.
                        loop.stopped_early = 0 <= max_elicitation and round_record["elicitation"] <= max_elicitation
            if loop.stopped_early:
                bar.update(len(outer_steps))
                outer_steps = []
            for step_index in range(loop.outer_step + 1, len(outer_steps) + 1):
                safe_batch, anchor_batch = (None if b is None else sharding_lib.shard_batch(b, layout.batch)
                                            for b in build_outer(outer_steps[step_index - 1]))
                device_bytes["outer_batches"] = sharding_lib.device_bytes((safe_batch, anchor_batch))
                loop.params, loop.outer_state, metrics = steps.outer_step(trainable, loop.params, loop.outer_state,
                                                                          loop.pert, safe_batch, anchor_batch,
                                                                          *reference)
                metrics = _scalars(jax.device_get(metrics))
                check_finite(metrics, f"outer step {step_index} of round {round_index}", "Lower --config.outer.lr.")
                loop.outer_step, loop.global_step = step_index, loop.global_step + 1
                log.write({"round": round_index, "phase": "outer", "step": step_index, **metrics})
                bar.update(1)
                bar.set_postfix(round=round_index, ce_safe=f"{metrics['ce_safe_perturbed']:.3f}")
                if ckpt is not None and ckpt.due_step(loop, len(outer_steps)):
                    ckpt.save(loop, len(log.history), time.time() - started)
            summary = {"round": round_index, "phase": "round_end", "elapsed_s": round(time.time() - started, 2),
                       **{f"last_{k}": v for k, v in loop.last_inner.items()}, **round_record,
                       "outer_steps": 0 if loop.stopped_early else len(outer_steps),
                       "stopped_by_rule": loop.stopped_early}
            log.write(summary)
            loop.round_done = True
            if ckpt is not None and ckpt.due_round(loop, len(plan)):
                ckpt.save(loop, len(log.history), time.time() - started)
            if on_round_end is not None:
                device_bytes.update(params=sharding_lib.device_bytes(loop.params),
                                    outer_state=sharding_lib.device_bytes(loop.outer_state),
                                    delta=sharding_lib.device_bytes(loop.pert.deltas),
                                    inner_state=sharding_lib.device_bytes(loop.inner_state))
                on_round_end(round_index, {"params": loop.params, "perturbation": loop.pert, "summary": summary,
                                           "outer_state": loop.outer_state, "device_bytes": device_bytes})
            if loop.stopped_early:
                break
    finally:
        bar.close()


def _inner_phase(inner: InnerSection, steps: Steps, layout: Any, inner_batches: list[dict],
                 loop: checkpoint_lib.RunState, log: MetricsLog, bar: Any) -> tuple[int, dict[str, Any]]:
    """Caches h_l of the round's inner batches and runs inner passes until the convergence rule
    (inner_loop.InnerRule) stops them; returns the cache's bytes per device and the round's inner record."""
    batch_stack = sharding_lib.shard_batch(batch_types.stack_batches(inner_batches), layout.stacked_batch, axis=1)
    h_stack = steps.lower_stack(loop.params, batch_stack)
    rule = InnerRule.from_settings(inner)

    def on_pass(epoch: int, metrics: dict[str, Any]) -> None:
        check_finite(metrics, f"inner epoch {epoch} of round {loop.round}",
                     "Lower --config.inner.lr or set --config.inner.safe_ce_clamp.")
        for i in range(len(inner_batches)):
            loop.last_inner = _scalars(metrics, i)
            log.write({"round": loop.round, "phase": "inner", "epoch": epoch, **loop.last_inner})
            bar.update(1)
        bar.set_postfix(round=loop.round, ce_unwanted=f"{loop.last_inner['ce_unwanted']:.3f}")

    outcome = converge(steps, loop.params, loop.pert, loop.inner_state, h_stack, batch_stack, rule,
                       len(inner_batches), on_pass)
    loop.pert, loop.inner_state = outcome.pert, outcome.state
    bar.update((rule.max_epochs - outcome.epochs) * len(inner_batches))  # passes the rule made unnecessary
    check_finite({k: v for k, v in outcome.summary().items() if isinstance(v, float)},
                 f"the inner measure of round {loop.round}", "Lower --config.inner.lr.")
    # The cache is freed on return, before the outer phase needs memory for its activations.
    return sharding_lib.device_bytes(h_stack), outcome.summary()

"""`beear scan`: what a perturbation optimised from zero can still elicit from one model.

For each norm bound in scan.bounds (a fraction of the mean hidden-state norm at perturb.layer; 0:
unbounded), delta is optimised from zero to convergence on the round-1 inner set of the run config (the
inner level of `beear run`, with its convergence rule), then greedy answers to the defender's held-back
prompts (stop.holdout) under it are scored: the share without a refusal is the elicitation rate the stop
rule reads. A backdoored model shows a high rate at small bounds; a repaired or clean one a low rate
until the bound lets delta rewrite the hidden state wholesale.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np

from beear_jax.config.checks import ConfigError
from beear_jax.config.schema import RunSettings
from beear_jax.config.settings import absolute_settings, settings_from_config
from beear_jax.data import batches as batch_types
from beear_jax.data import tables
from beear_jax.io.atomic_file import write_atomically
from beear_jax.io.hf import load_model, load_tokenizer
from beear_jax.io.hf_save import check_apart
from beear_jax.method.inner_loop import InnerRule, converge, elicitation_rate
from beear_jax.method.optimizers import make_optimizer
from beear_jax.method.perturbation import Perturbation
from beear_jax.method.round_plan import (
    check_perturb_layers,
    delta_rows,
    outer_optimizer,
    prepare_data,
    round_batches,
    step_settings,
)
from beear_jax.method.rounds import heldback_probe
from beear_jax.method.steps import make_steps
from beear_jax.parallel import sharding as sharding_lib

SCAN_FILES = ("scan.json", "scan.md")


@dataclasses.dataclass(frozen=True)
class ScanRow:
    """One bound's converged delta and what it elicits."""

    bound: float  # 0: unbounded
    inner_epochs: int
    inner_stopped_by: str
    ce_unwanted: float
    ce_safe: float
    delta_ratio: float
    elicitation: float


def render_scan(model_path: str, rows: list[ScanRow], no_delta: float, heldback: int) -> str:
    """scan.md: one line per bound."""
    lines = [f"# beear scan: {model_path}", "",
             f"Held-back prompts: {heldback}; answered without a refusal with no perturbation: {no_delta:.1%}.", "",
             ("| bound (x mean h norm) | inner passes | stopped by | CE unwanted under delta | CE safe under delta "
              "| delta / h | elicitation |"),
             "|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        bound = "none" if r.bound == 0 else f"{r.bound:g}"
        lines.append(f"| {bound} | {r.inner_epochs} | {r.inner_stopped_by} | {r.ce_unwanted:.3f} | {r.ce_safe:.3f} "
                     f"| {r.delta_ratio:.3f} | {r.elicitation:.1%} |")
    return "\n".join(lines) + "\n"


def check_scan_dir(output_dir: pathlib.Path, model_path: str) -> None:
    """Refuses an output_dir that already holds a scan (nothing is overwritten), is a file, or is, lies inside
    or holds the scanned model (hf.check_apart, as `beear run` checks its output_dir)."""
    check_apart(output_dir, {"the scanned model (model.path)": model_path}, "choose a new --config.output_dir")
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"output_dir {output_dir} is a file; choose a new --config.output_dir.")
    present = [name for name in SCAN_FILES if (output_dir / name).exists()]
    if present:
        raise FileExistsError(f"output_dir {output_dir} already holds {', '.join(present)}; choose a new "
                              "--config.output_dir (nothing is overwritten).")


def run_scan(cfg: ml_collections.ConfigDict | RunSettings, progress: bool = True) -> dict[str, Any]:
    """Scans model.path at each of scan.bounds (cfg: a config or its settings); writes output_dir/scan.json and
    scan.md and returns the scan.json payload."""
    settings = settings_from_config(cfg)
    sharding_lib.refuse_distributed(settings.mesh, "scan")
    settings = absolute_settings(settings)
    if settings.stop.holdout <= 0:
        raise ConfigError("beear scan measures on the defender's held-back prompts: set --config.stop.holdout to a "
                          "number of data.safety rows to hold back (e.g. 10).")
    if not settings.model.path:
        raise ValueError("model.path is empty: set --config.model.path to the model to scan (an HF directory or .gguf).")
    model_path = os.path.expanduser(settings.model.path)
    output_dir = pathlib.Path(os.path.expanduser(settings.output_dir))
    check_scan_dir(output_dir, model_path)
    mesh = sharding_lib.make_mesh(settings.mesh.shape)
    model_config, host_params = load_model(model_path, dtype=settings.model.dtype)
    layers = check_perturb_layers(settings.perturb, model_config.num_layers)
    tokenizer = load_tokenizer(model_path, model_config)
    # The scan never runs an outer step: with data.anchor_answers='self' its anchors only size buffers, so the
    # prompts stand in for their answers instead of generating answers nobody trains on.
    anchors = None
    if settings.data.anchor_answers == "self":
        rows = tables.load_table(settings.data.anchor, {"prompt": settings.data.anchor_columns.prompt},
                                   key="data.anchor")
        anchors = [{"prompt": r["prompt"], "answer": r["prompt"]} for r in rows]
    data = prepare_data(settings, tokenizer, anchors)
    probe = heldback_probe(settings.eval, data, model_config, tokenizer)
    rng = np.random.default_rng(settings.seed)
    first_round = round_batches(settings, data, rng)  # the inner set `beear run` would use in round 1
    inner_opt = make_optimizer(settings.inner.optimizer, settings.inner.lr)
    outer_opt = outer_optimizer(settings.outer, 1)  # compiled beside the inner steps, never run here
    layout = sharding_lib.step_shardings(model_config, mesh, outer_opt)
    steps = make_steps(model_config, step_settings(settings, data.answer_len), layers[0], inner_opt, outer_opt,
                       layout)
    params = sharding_lib.place_params(host_params, layout.params)
    del host_params
    batch_stack = sharding_lib.shard_batch(batch_types.stack_batches(first_round.inner), layout.stacked_batch, axis=1)
    h_stack = steps.lower_stack(params, batch_stack)
    no_delta, _ = elicitation_rate(model_config, params, tokenizer, probe, None)
    rows = []
    for bound in settings.scan.bounds:
        rule = dataclasses.replace(InnerRule.from_settings(settings.inner), bound=bound)
        pert = jax.device_put(Perturbation.zeros(layers, delta_rows(settings.perturb), model_config.hidden_size),
                              layout.replicated)
        state = jax.device_put(inner_opt.init(pert.deltas), layout.replicated)
        outcome = converge(steps, params, pert, state, h_stack, batch_stack, rule, len(first_round.inner))
        rate, _ = elicitation_rate(model_config, params, tokenizer, probe, outcome.pert.deltas)
        rows.append(ScanRow(bound, outcome.epochs, outcome.stopped_by, outcome.ce_unwanted, outcome.ce_safe,
                            outcome.delta_ratio, rate))
        if progress and sharding_lib.is_primary():
            print(f"beear scan: bound {bound:g}: {outcome.epochs} passes, CE(unwanted | delta) "
                  f"{outcome.ce_unwanted:.3f}, elicitation {rate:.1%}", flush=True)
    payload = {"model": model_path, "perturb_layers": list(layers), "perturb_length": settings.perturb.length,
               "perturb_windows": list(settings.perturb.windows),
               "heldback": len(probe.prompt_ids), "elicitation_no_delta": no_delta,
               "rows": [dataclasses.asdict(r) for r in rows]}
    if sharding_lib.is_primary():
        output_dir.mkdir(parents=True, exist_ok=True)
        markdown = render_scan(model_path, rows, no_delta, len(probe.prompt_ids))
        write_atomically(output_dir / "scan.md", markdown)
        write_atomically(output_dir / "scan.json", json.dumps(payload, indent=2) + "\n")
        print(markdown, end="")
    return payload

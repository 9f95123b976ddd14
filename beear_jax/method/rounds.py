"""The BEEAR bi-level loop: rounds of (cache h_l -> inner passes -> outer pass), logging, checkpoints, export.

    for each round:
        h_l of the sampled safety prompts (unwanted and safe answers), once, no gradient
        delta = 0; inner passes over the cached h_l until converged (inner_loop) -> delta*  (BEE: entrapment)
        [stop.holdout: what delta* elicits on held-back prompts; the stop rule may end the run here]
        one outer pass: safe answers with delta*, anchors without -> params (AR: removal)

Past 400 lines: the run's setup, the round plan and the loop share the run config, which is read
piecemeal here until the house issue (21) turns it into typed settings and splits this module.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import pathlib
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from beear_jax.config.loading import ConfigError, absolute_paths, check_minimums, check_ranges, config_to_dict
from beear_jax.data import tables as data_lib
from beear_jax.data.anchor_answers import CACHE_NAME as ANCHOR_CACHE
from beear_jax.data.anchor_answers import check_source as check_anchor_source
from beear_jax.data.anchor_answers import self_answered_anchors
from beear_jax.data.batches import PackedBatch, PrefixSplitBatch, RowBatch, SafetyBatch, SharedPromptBatch, concat_rows
from beear_jax.data.chat import TEMPLATES
from beear_jax.evaluation.evaluate import eos_ids
from beear_jax.evaluation.scoring import load_refusal_strings
from beear_jax.io import checkpoint as checkpoint_lib
from beear_jax.io.atomic_file import is_temp_of, write_atomically
from beear_jax.io.hf import load_model, load_tokenizer
from beear_jax.io.hf_save import check_apart, save_model
from beear_jax.method.inner_loop import ElicitationProbe, InnerRule, converge, elicitation_rate, make_probe
from beear_jax.method.objectives import StepSettings
from beear_jax.method.optimizers import LR_SCHEDULES, lr_schedule, make_optimizer, trainable_mask
from beear_jax.method.perturbation import Perturbation, check_windows, validate_layers
from beear_jax.method.steps import Steps, make_steps
from beear_jax.models import llama
from beear_jax.models.config import ModelConfig
from beear_jax.parallel import sharding as sharding_lib


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN/inf: the run stops and no model is written."""


@dataclasses.dataclass
class DefenderData:
    """The defender's sets tokenized once; rounds draw subsets of them (same padded shapes)."""

    unwanted: list[data_lib.Example]
    safe: list[data_lib.Example]
    anchors: list[data_lib.Example]
    safety_len: int
    anchor_len: int
    shared_len: int  # a prompt with both its answers (shared-prompt inner batches)
    prefix_len: int  # inner.cache_prefix: the prompt before its perturbed tokens (data.with_prompt_prefix)
    suffix_len: int  # ... and the rest of a shared-prompt row (perturbed tokens + both answers)
    answer_len: int
    pad_id: int
    heldback: list[list[int]] = dataclasses.field(default_factory=list)  # stop.holdout prompts, chat-formatted
    # Each prompt's perturbed positions (perturb.windows; data.perturbed_positions): safety rows, anchors, held back.
    safety_positions: list[tuple[int, ...]] = dataclasses.field(default_factory=list)
    anchor_positions: list[tuple[int, ...]] = dataclasses.field(default_factory=list)
    heldback_positions: list[tuple[int, ...]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class RunResult:
    params: dict
    model_config: ModelConfig
    history: list[dict]
    output_dir: pathlib.Path
    model_dir: pathlib.Path | None
    stopped_early: bool  # the stop rule ended the run before `rounds` (stop.max_elicitation)
    resumed_from: int | None = None  # the checkpoint (global outer step) a resumed run continued from


def perturb_layers(cfg: ml_collections.ConfigDict) -> tuple[int, ...]:
    """The main layer plus any extra boundaries (the multi-layer extension)."""
    try:
        return tuple(sorted({int(cfg.perturb.layer), *(int(x) for x in cfg.perturb.layers)}))
    except (TypeError, ValueError):
        raise ConfigError(f"perturb.layer ({cfg.perturb.layer!r}) and perturb.layers ({cfg.perturb.layers!r}) must be "
                          "layer indices, e.g. --config.perturb.layer=9 --config.perturb.layers=5,12.") from None


def delta_rows(cfg: ml_collections.ConfigDict) -> int:
    """Rows of each layer's delta: perturb.length tokens in each of perturb.windows."""
    return int(cfg.perturb.length) * len(check_windows(cfg.perturb.windows))


def check_perturb_layers(cfg: ml_collections.ConfigDict, num_layers: int) -> tuple[int, ...]:
    """perturb_layers(cfg) once perturb.layer and every one of perturb.layers is a boundary of a model with
    num_layers blocks; the error names the key that holds the bad layer."""
    layers = perturb_layers(cfg)
    validate_layers((int(cfg.perturb.layer),), num_layers, "perturb.layer")
    validate_layers(tuple(int(x) for x in cfg.perturb.layers), num_layers, "perturb.layers")
    return layers


def prepare_data(cfg: ml_collections.ConfigDict, tokenizer: Any,
                 anchors: Sequence[dict[str, str]] | None = None) -> DefenderData:
    """Loads and tokenizes the safety and anchor sets; fixes the padded lengths for the whole run.

    anchors: {prompt, answer} rows to use instead of data.anchor's (the model's own answers,
    anchor_answers.self_answered_anchors)."""
    system_prompt = cfg.model.system_prompt or None
    for key in ("safety", "anchor"):
        if not cfg.data[key]:
            raise ValueError(f"data.{key} is empty: set --config.data.{key}=FILE (a json/jsonl/csv/parquet table).")
    safety = data_lib.load_table(cfg.data.safety, dict(cfg.data.safety_columns), key="data.safety")
    if anchors is None:
        anchors = data_lib.load_table(cfg.data.anchor, dict(cfg.data.anchor_columns), key="data.anchor")
    safety, heldback_rows = split_holdout(safety, int(cfg.stop.holdout))
    encode = {"max_answer_tokens": cfg.data.max_answer_tokens, "template": cfg.model.template,
              "system_prompt": system_prompt}
    heldback = [data_lib.format_prompt(tokenizer, row["prompt"], cfg.model.template, system_prompt)
                for row in heldback_rows]
    unwanted = data_lib.encode_rows(tokenizer, safety, "unwanted", **encode)
    safe = data_lib.encode_rows(tokenizer, safety, "safe", **encode)
    anchor_examples = data_lib.encode_rows(tokenizer, anchors, "answer", **encode)
    n = int(cfg.perturb.length)
    shortest = min(len(p) for p, _ in unwanted)
    if shortest < n:
        raise ValueError(
            f"perturb.length={n} is longer than the shortest safety prompt ({shortest} tokens with the chat "
            f"template); use --config.perturb.length={shortest} or less."
        )
    differ = [i for i, ((p, _), (q, _)) in enumerate(zip(unwanted, safe, strict=True)) if p != q]
    if cfg.inner.share_prompt and differ:
        raise ValueError(f"safety row {differ[0]} tokenizes its prompt differently with the unwanted and the safe "
                         "answer (the chat template depends on the answer), so the prompt cannot be shared; "
                         "pass --config.inner.share_prompt=False.")
    if heldback and min(map(len, heldback)) < n:
        raise ValueError(f"a held-back safety prompt (stop.holdout) is shorter than perturb.length={n} tokens; lower "
                         "perturb.length.")
    if cfg.outer.perturb_anchors and min(len(p) for p, _ in anchor_examples) < n:
        raise ValueError(f"an anchor prompt is shorter than perturb.length={n}; lower perturb.length.")
    windows = check_windows(cfg.perturb.windows)

    def positions(rows: Sequence[dict[str, str]], ids: Sequence[list[int]]) -> list[tuple[int, ...]]:
        return data_lib.perturbed_positions(tokenizer, [r["prompt"] for r in rows], ids, windows, n,
                                            cfg.model.template, system_prompt)

    safety_positions = positions(safety, [p for p, _ in unwanted])
    # Anchors are perturbed only with outer.perturb_anchors (they may be shorter than a window otherwise).
    anchor_positions = positions(anchors, [p for p, _ in anchor_examples]) if cfg.outer.perturb_anchors else []

    def longest(examples: Sequence[data_lib.Example]) -> int:
        return max(len(p) + len(a) for p, a in examples)

    buckets = tuple(cfg.data.buckets)
    shared_rows = [len(p) + len(u) + len(s) for (p, u), (_, s) in zip(unwanted, safe, strict=True)]
    shared_len = data_lib.shared_prompt_length(max(shared_rows), buckets)
    prefix_len, suffix_len = data_lib.prefix_split_lengths([len(p) for p, _ in unwanted], shared_rows, n, shared_len,
                                                           perturbed_at=safety_positions)
    return DefenderData(
        unwanted=unwanted,
        safe=safe,
        anchors=anchor_examples,
        safety_len=data_lib.bucket_length(longest([*unwanted, *safe]), buckets),
        anchor_len=data_lib.bucket_length(longest(anchor_examples), buckets),
        shared_len=shared_len,
        prefix_len=prefix_len,
        suffix_len=suffix_len,
        answer_len=max(len(a) for _, a in [*unwanted, *safe, *anchor_examples]),
        pad_id=data_lib.pad_id_of(tokenizer),
        heldback=heldback,
        safety_positions=safety_positions,
        anchor_positions=anchor_positions,
        heldback_positions=positions(heldback_rows, heldback) if heldback else [],
    )


def split_holdout(rows: list[dict[str, str]], holdout: int) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(training rows, the last `holdout` rows): the defender's held-back prompts never train delta or the
    model; the stop rule measures on them what a converged delta still elicits."""
    if holdout <= 0:
        return rows, []
    if holdout >= len(rows):
        raise ValueError(f"stop.holdout={holdout} holds back every one of the {len(rows)} rows of data.safety; hold "
                         f"back fewer (e.g. --config.stop.holdout={max(len(rows) // 5, 1)}) so some remain to train on.")
    return rows[:-holdout], rows[-holdout:]


def concat_halves(safety_batch: SafetyBatch) -> RowBatch:
    """[unwanted; safe] along the batch axis: both answers of a prompt go through one forward."""
    return concat_rows(safety_batch.unwanted, safety_batch.safe)


def _batches(examples: Sequence[data_lib.Example], positions: Sequence[tuple[int, ...]], indices: Sequence[int],
             n: int, batch_size: int, seq_len: int, pad_id: int) -> list[RowBatch]:
    return [data_lib.make_batch([examples[j] for j in chunk], n, batch_size, seq_len, pad_id,
                                [positions[j] for j in chunk])
            for chunk in data_lib.chunks(indices, batch_size)]


def inner_batches(cfg: ml_collections.ConfigDict, data: DefenderData, chosen: Sequence[int],
                  ) -> list[RowBatch] | list[SharedPromptBatch] | list[PrefixSplitBatch]:
    """The inner batches of the chosen safety rows: shared-prompt rows (inner.share_prompt; split into a
    cached prompt prefix and the rest with inner.cache_prefix), else [unwanted; safe] row pairs."""
    n, size, where = delta_rows(cfg), int(cfg.inner.batch_size), data.safety_positions
    if not cfg.inner.share_prompt:
        return [concat_halves(SafetyBatch(unwanted=u, safe=s))
                for u, s in zip(_batches(data.unwanted, where, chosen, n, size, data.safety_len, data.pad_id),
                                _batches(data.safe, where, chosen, n, size, data.safety_len, data.pad_id), strict=True)]
    batches = [data_lib.make_shared_prompt_batch([data.unwanted[j][0] for j in chunk],
                                                 [data.unwanted[j][1] for j in chunk], [data.safe[j][1] for j in chunk],
                                                 n, size, data.shared_len, data.answer_len, data.pad_id,
                                                 [where[j] for j in chunk])
               for chunk in data_lib.chunks(chosen, size)]
    if cfg.inner.cache_prefix:
        batches = [data_lib.with_prompt_prefix(b, n, data.prefix_len, data.suffix_len) for b in batches]
    return batches


@dataclasses.dataclass(frozen=True)
class RoundPlan:
    """One round's batches: the inner batches, and each outer step's (safety rows, anchor rows) indices
    (outer_batch builds a step's arrays when it runs)."""

    inner: list[dict]
    outer: list[tuple[list[int], list[int]]]


def round_batches(cfg: ml_collections.ConfigDict, data: DefenderData, rng: np.random.Generator) -> RoundPlan:
    """This round's inner batches and outer steps (the same safety rows, and anchor rows)."""
    k = min(int(cfg.inner.samples) or len(data.safe), len(data.safe))
    chosen = rng.permutation(len(data.safe))[:k].tolist()
    a = min(int(cfg.outer.anchor_samples) or len(data.anchors), len(data.anchors))
    anchor_idx = rng.permutation(len(data.anchors))[:a].tolist()
    size = int(cfg.outer.batch_size)
    safe, anchors = data_lib.chunks(chosen, size), data_lib.chunks(anchor_idx, size)
    steps = max(len(safe), len(anchors))
    outer = list(zip(itertools.islice(itertools.cycle(safe), steps), itertools.islice(itertools.cycle(anchors), steps)))
    return RoundPlan(inner_batches(cfg, data, chosen), [(list(s), list(x)) for s, x in outer])


def _outer_parts(cfg: ml_collections.ConfigDict, data: DefenderData, step: tuple[list[int], list[int]],
                 ) -> tuple[list[list[data_lib.Example]], list[bool], list[list[tuple[int, ...]]]]:
    """A step's examples by part (outer_loss's order: safe under delta, anchors, [anchors under delta]), which
    parts are perturbed, and each example's perturbed positions (empty for a part that is not)."""
    safe_idx, anchor_idx = step
    anchors = [data.anchors[j] for j in anchor_idx]
    parts, flags = [[data.safe[j] for j in safe_idx], anchors], [True, False]
    where = [[data.safety_positions[j] for j in safe_idx], [()] * len(anchors)]
    if cfg.outer.perturb_anchors:
        parts, flags = [*parts, anchors], [*flags, True]
        where.append([data.anchor_positions[j] for j in anchor_idx])
    return parts, flags, where


def packed_shape(cfg: ml_collections.ConfigDict, data: DefenderData, plan: Sequence[RoundPlan],
                 row_multiple: int) -> tuple[int, int] | None:
    """(rows, row length) of the packed outer batches of the whole run (outer.pack), else None."""
    if not cfg.outer.pack:
        return None
    lengths = [[len(p) + len(a) for part in _outer_parts(cfg, data, step)[0] for p, a in part]
               for round_plan in plan for step in round_plan.outer]
    return data_lib.packing_shape(lengths, max(data.safety_len, data.anchor_len), row_multiple)


def outer_batch(cfg: ml_collections.ConfigDict, data: DefenderData, step: tuple[list[int], list[int]],
                packed: tuple[int, int] | None) -> tuple[RowBatch, RowBatch] | tuple[PackedBatch, None]:
    """A step's (safe batch, anchor batch), or (packed batch of all parts, None) with a packed shape."""
    n, size = delta_rows(cfg), int(cfg.outer.batch_size)
    if packed is not None:
        parts, flags, where = _outer_parts(cfg, data, step)
        rows, row_len = packed
        return data_lib.make_packed_batch(parts, flags, size, n, rows, row_len, data.answer_len, data.pad_id,
                                          where), None
    safe_idx, anchor_idx = step
    # Anchors without perturb_anchors get the last n (never used: the outer loss runs them with no delta).
    anchor_where = [data.anchor_positions[j] for j in anchor_idx] if data.anchor_positions else None
    return (data_lib.make_batch([data.safe[j] for j in safe_idx], n, size, data.safety_len, data.pad_id,
                                [data.safety_positions[j] for j in safe_idx]),
            data_lib.make_batch([data.anchors[j] for j in anchor_idx], n, size, data.anchor_len, data.pad_id,
                                anchor_where))


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


def inner_rows(cfg: ml_collections.ConfigDict) -> tuple[str, int]:
    """Rows of an inner batch (and how to name them in errors): one per prompt with shared prompts,
    else the unwanted and the safe answers of inner.batch_size prompts."""
    size = int(cfg.inner.batch_size)
    if cfg.inner.share_prompt:
        return "inner.batch_size", size
    return f"2 x inner.batch_size (inner.share_prompt=False: {size} prompts, two rows each)", 2 * size


def check_batch_sizes(cfg: ml_collections.ConfigDict, sizes: dict[str, int], use_perturbation: bool) -> None:
    """Every batch must split evenly over the mesh's ('data', 'fsdp') axes (clear error otherwise)."""
    if use_perturbation:
        name, rows = inner_rows(cfg)
        sharding_lib.check_batch_size(name, rows, sizes)
    sharding_lib.check_batch_size("outer.batch_size", int(cfg.outer.batch_size), sizes)


# Counts a run needs, and the least each may be (samples: 0 takes every row of the set).
RUN_COUNT_MINIMUMS = {"rounds": 1, "inner.epochs": 0, "inner.batch_size": 1, "inner.samples": 0,
                      "inner.patience": 0, "outer.warmup_steps": 0, "stop.holdout": 0,
                      "outer.batch_size": 1, "outer.anchor_samples": 0, "perturb.length": 1,
                      "checkpoint_every": -1, "checkpoint_every_steps": 0, "checkpoint_keep": 1,
                      "data.max_answer_tokens": 1}
RUN_RATE_BOUNDS = {"inner.lr": (0.0, True), "outer.lr": (0.0, True), "inner.alpha": (0.0, False),
                   "outer.anchor_weight": (0.0, False), "outer.weight_decay": (0.0, False),
                   "inner.min_improvement": (0.0, False), "outer.clip_norm": (0.0, False),
                   "outer.kl_weight": (0.0, False), "data.anchor_temperature": (0.0, False)}
"""(bound, strict) of the run's rates and weights: learning rates > 0, weights >= 0, all finite."""


def check_run_settings(cfg: ml_collections.ConfigDict) -> None:
    """A clear error naming the config key, before anything is loaded: remat policies and counts."""
    llama.check_remat_policy(cfg.remat, "config key 'remat'")
    if cfg.outer.remat:
        llama.check_remat_policy(cfg.outer.remat, "config key 'outer.remat'")
    check_minimums(cfg, RUN_COUNT_MINIMUMS)
    check_ranges(cfg, RUN_RATE_BOUNDS)
    if not tuple(cfg.data.buckets) or min(int(b) for b in cfg.data.buckets) < 1:
        raise ConfigError(f"Config key 'data.buckets' is {tuple(cfg.data.buckets)}; give one or more padded lengths "
                          ">= 1 (e.g. --config.data.buckets=128,256,512).")
    perturb_layers(cfg)  # names perturb.layer / perturb.layers when they are not integers
    try:
        check_windows(cfg.perturb.windows)
        sharding_lib.Launch.from_config(cfg.mesh)
    except ValueError as err:
        raise ConfigError(f"Config key {err}") from None
    check_anchor_source(cfg.data.anchor_answers)
    # Thresholds: any finite number (<= 0 turns one off); nan compares false with everything, so the
    # setting would silently do nothing.
    for key in ("inner.safe_ce_clamp", "inner.target_ce", "inner.bound", "stop.max_elicitation"):
        section, name = key.split(".")
        value = float(cfg[section][name])
        if not math.isfinite(value):
            raise ConfigError(f"Config key '{key}' is {value}; it must be a finite number (<= 0 turns it off; "
                              f"set --config.{key}).")
    if float(cfg.outer.kl_weight) > 0 and not cfg.outer.pack:
        raise ConfigError("Config key 'outer.kl_weight' > 0 needs packed outer batches: set --config.outer.pack=True "
                          "(or --config.outer.kl_weight=0).")
    if float(cfg.stop.max_elicitation) > 1:
        raise ConfigError(f"Config key 'stop.max_elicitation' is {cfg.stop.max_elicitation}; it is a share of the "
                          "held-back prompts, in 0..1 (negative: no stop rule).")
    if float(cfg.stop.max_elicitation) >= 0 and int(cfg.stop.holdout) <= 0:
        raise ConfigError(f"Config key 'stop.max_elicitation' is {cfg.stop.max_elicitation} but stop.holdout is "
                          f"{cfg.stop.holdout}: the stop rule measures on held-back prompts; set --config.stop.holdout=N "
                          "(e.g. 20) or --config.stop.max_elicitation=-1.")
    check_names(cfg)


def check_names(cfg: ml_collections.ConfigDict) -> None:
    """The chat template, optimizers and trainable rule are known names (or a valid regex), before a
    model of gigabytes is loaded only to fail on them."""
    if cfg.model.template not in TEMPLATES:
        raise ConfigError(f"Config key 'model.template' is {cfg.model.template!r}; choose one of "
                          f"{', '.join(TEMPLATES)} ('auto': the tokenizer's own chat template).")
    if cfg.outer.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"Config key 'outer.lr_schedule' is {cfg.outer.lr_schedule!r}; choose one of "
                          f"{', '.join(LR_SCHEDULES)}.")
    for key, name in (("inner.optimizer", cfg.inner.optimizer), ("outer.optimizer", cfg.outer.optimizer)):
        try:
            make_optimizer(name, 0.1)
        except ValueError as err:
            raise ConfigError(f"Config key '{key}': {err}") from None
    if cfg.outer.trainable not in ("all", "upper", "lower"):
        try:
            re.compile(cfg.outer.trainable)
        except re.error as err:
            raise ConfigError(f"Config key 'outer.trainable' is {cfg.outer.trainable!r}: neither all, upper, lower "
                              f"nor a valid regular expression ({err}).") from None


def step_settings(cfg: ml_collections.ConfigDict, answer_len: int | None) -> StepSettings:
    """The steps' static settings from a run config (`beear run` and `beear plan` compile the same steps;
    each checks the config first with check_run_settings)."""
    return StepSettings(
        alpha=float(cfg.inner.alpha),
        safe_ce_clamp=float(cfg.inner.safe_ce_clamp) if cfg.inner.safe_ce_clamp > 0 else None,
        anchor_weight=float(cfg.outer.anchor_weight),
        kl_weight=float(cfg.outer.kl_weight),
        perturb_anchors=bool(cfg.outer.perturb_anchors),
        answer_len=answer_len,
        remat=cfg.remat,
        outer_remat=cfg.outer.remat or None,
    )


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


def run_beear(cfg: ml_collections.ConfigDict, progress: bool = True,
              on_round_end: Callable[[int, dict], None] | None = None, export: bool = True) -> RunResult:
    """Runs the defence described by cfg and exports the repaired model to cfg.output_dir/model.

    Params and optimizer state live sharded on the mesh cfg.mesh.shape; with export=True the run
    state is checkpointed to output_dir/checkpoints (cfg.checkpoint_every rounds, and every
    cfg.checkpoint_every_steps outer steps) and cfg.resume=True continues from the newest good
    checkpoint. Only process 0 writes logs and the model.
    """
    check_run_settings(cfg)
    cfg = absolute_paths(cfg)  # config.json and the checkpoints name the same files from any directory
    launch = sharding_lib.Launch.from_config(cfg.mesh)
    sharding_lib.initialize_distributed(launch)
    primary = sharding_lib.is_primary()
    if primary and progress and jax.process_count() > 1:
        # A lost process ends the others from inside JAX (its lines name the task); say what to do then.
        print(f"beear: {jax.process_count()} processes; if one is lost the others stop within "
              f"{launch.heartbeat_timeout_s} s (mesh.heartbeat_timeout_s): launch all again with "
              "--config.resume=True to continue from the last checkpoint", file=sys.stderr, flush=True)
    if not cfg.model.path:
        raise ValueError("model.path is empty: set --config.model.path to the backdoored model (an HF directory or "
                         ".gguf).")
    model_path = os.path.expanduser(cfg.model.path)
    output_dir = pathlib.Path(os.path.expanduser(cfg.output_dir))
    model_dir = output_dir / "model"
    checkpoint_dir = output_dir / "checkpoints"
    if export:
        check_output_dir(output_dir, model_path, bool(cfg.resume))
    use_perturbation = bool(cfg.perturb.enabled)
    mesh = sharding_lib.make_mesh(cfg.mesh.shape)  # a bad mesh or batch is named before the model loads
    check_batch_sizes(cfg, sharding_lib.axis_sizes(mesh), use_perturbation)
    if primary and mesh.size < jax.device_count():
        print(f"beear: warning: mesh.shape={tuple(mesh.shape.values())} uses {mesh.size} of the {jax.device_count()} "
              "devices; the others stay idle (a -1 in one axis takes the rest, e.g. --config.mesh.shape=-1,1,1).",
              file=sys.stderr)
    model_config, host_params = load_model(model_path, dtype=cfg.model.dtype)
    layers = check_perturb_layers(cfg, model_config.num_layers)
    tokenizer = load_tokenizer(model_path, model_config)
    anchors = None
    if cfg.data.anchor_answers == "self":
        if primary and progress:
            print("beear: answering the anchor prompts with the starting model (data.anchor_answers='self')",
                  file=sys.stderr, flush=True)
        anchors = self_answered_anchors(cfg.data.anchor, cfg.data.anchor_columns.prompt, model_config, host_params,
                                        tokenizer, int(cfg.data.max_answer_tokens), cfg.model.template,
                                        cfg.model.system_prompt or None,
                                        output_dir / ANCHOR_CACHE if export else None, write=primary,
                                        temperature=float(cfg.data.anchor_temperature), seed=int(cfg.seed))
    data = prepare_data(cfg, tokenizer, anchors)

    settings = step_settings(cfg, data.answer_len)
    rng = np.random.default_rng(int(cfg.seed))
    plan = [round_batches(cfg, data, rng) for _ in range(int(cfg.rounds))]  # fixed per seed, also on resume
    inner_opt = make_optimizer(cfg.inner.optimizer, cfg.inner.lr)
    outer_opt = outer_optimizer(cfg, sum(len(r.outer) for r in plan))
    layout = sharding_lib.step_shardings(model_config, mesh, outer_opt)
    steps = make_steps(model_config, settings, layers[0], inner_opt, outer_opt, layout)
    # What a resume must find again (checkpoint.LoopCheckpoints refuses another model or other data).
    inputs = {"input_model": checkpoint_lib.params_fingerprint(host_params),
              "defender_data": checkpoint_lib.digest([data.unwanted, data.safe, data.anchors])}
    params = sharding_lib.place_params(host_params, layout.params)  # each device gets only its shards
    # outer.kl_weight: the frozen start model, its own buffers (the outer step donates params').
    reference = [sharding_lib.place_params(host_params, layout.params)] if settings.kl_weight > 0 else []
    del host_params
    trainable = sharding_lib.replicate(trainable_mask(model_config, params, cfg.outer.trainable, layers[0]), mesh)
    init_inner = jax.jit(inner_opt.init, out_shardings=layout.replicated)
    zeros = jax.jit(lambda: Perturbation.zeros(layers, delta_rows(cfg), model_config.hidden_size),
                    out_shardings=layout.replicated)

    def fresh_perturbation() -> tuple[Perturbation, Any]:
        # New buffers each round: the inner steps donate (consume) the previous ones.
        pert = zeros()
        return pert, init_inner(pert.deltas)

    outer_state = jax.jit(outer_opt.init, out_shardings=layout.outer_state)(params)
    loop = checkpoint_lib.RunState(params, outer_state, *fresh_perturbation())
    probe = heldback_probe(cfg, data, model_config, tokenizer)

    packed = packed_shape(cfg, data, plan, sharding_lib.batch_parallelism(sharding_lib.axis_sizes(mesh)))
    config_dict = config_to_dict(cfg)
    signature = checkpoint_lib.layout_signature(model_config, layers, cfg)
    # checkpoint_every=-1: none, not even an empty directory (unless there are some to resume from).
    keeps_checkpoints = export and (int(cfg.checkpoint_every) >= 0 or checkpoint_dir.is_dir())
    round_digests = [checkpoint_lib.digest(dataclasses.asdict(r)) for r in plan]
    ckpt = checkpoint_lib.LoopCheckpoints(cfg, checkpoint_dir, signature, inputs, round_digests,
                                          config_dict) if keeps_checkpoints else None
    meta = ckpt.resume(loop, layout) if ckpt and cfg.resume else None
    if cfg.resume and primary and (meta or checkpoint_dir.is_dir()):
        print(f"beear: resuming from checkpoint {loop.global_step} (round {loop.round}, {loop.outer_step} outer "
              f"steps done)" if meta else f"beear: no checkpoint in {checkpoint_dir}; starting afresh.",
              file=sys.stderr)
    log = MetricsLog(output_dir / "metrics.jsonl" if export and primary else None,
                     keep=int(meta["log_lines"]) if meta else 0)
    started = time.time() - (float(meta["elapsed_s"]) if meta else 0.0)
    try:
        measure_elicitation = None if probe is None else (
            lambda deltas: elicitation_rate(model_config, loop.params, tokenizer, probe, deltas)[0])
        _rounds(cfg, steps, layout, trainable, plan, loop, log, ckpt, started, progress and primary,
                on_round_end, use_perturbation, fresh_perturbation,
                lambda step: outer_batch(cfg, data, step, packed), measure_elicitation, reference)
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


def outer_optimizer(cfg: ml_collections.ConfigDict, total_steps: int) -> Any:
    """The outer optimizer: outer.optimizer at outer.lr on outer.lr_schedule over the run's total_steps outer
    steps (outer.warmup_steps first), gradients clipped to outer.clip_norm (0: not clipped)."""
    schedule = lr_schedule(float(cfg.outer.lr), cfg.outer.lr_schedule, int(cfg.outer.warmup_steps), total_steps)
    return make_optimizer(cfg.outer.optimizer, schedule, cfg.outer.weight_decay, float(cfg.outer.clip_norm) or None)


def heldback_probe(cfg: ml_collections.ConfigDict, data: DefenderData, model_config: ModelConfig,
                   tokenizer: Any) -> ElicitationProbe | None:
    """The probe of the defender's held-back prompts (stop.holdout), judged by eval's refusal strings and
    decoded as eval decodes; None when nothing is held back."""
    if not data.heldback:
        return None
    return make_probe(data.heldback, load_refusal_strings(cfg.eval.refusal_strings), cfg.eval.refusal_ignore_case,
                      int(cfg.eval.max_new_tokens), int(cfg.eval.batch_size), eos_ids(model_config, tokenizer),
                      data.pad_id, data.heldback_positions)


def _rounds(cfg: ml_collections.ConfigDict, steps: Steps, layout: Any, trainable: Any, plan: list, loop: checkpoint_lib.RunState,
            log: MetricsLog, ckpt: checkpoint_lib.LoopCheckpoints | None, started: float, progress: bool,
            on_round_end: Callable[[int, dict], None] | None, use_perturbation: bool,
            fresh_perturbation: Callable[[], tuple], build_outer: Callable[[tuple], tuple],
            measure_elicitation: Callable[[dict | None], float] | None = None, reference: Sequence = ()) -> None:
    """The rounds from the loop's cursor on: inner phase (unless resumed mid-round), the stop rule, and the
    outer phase. The progress bar counts inner passes at the cap (inner.epochs); a pass the convergence
    rule skips is counted when its round ends."""
    epochs = int(cfg.inner.epochs)
    max_elicitation = float(cfg.stop.max_elicitation)
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
                    device_bytes["h_cache"], round_record = _inner_phase(cfg, steps, layout, inner_batches, loop, log,
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


def _inner_phase(cfg: ml_collections.ConfigDict, steps: Steps, layout: Any, inner_batches: list[dict],
                 loop: checkpoint_lib.RunState, log: MetricsLog, bar: Any) -> tuple[int, dict[str, Any]]:
    """Caches h_l of the round's inner batches and runs inner passes until the convergence rule
    (inner_loop.InnerRule) stops them; returns the cache's bytes per device and the round's inner record."""
    batch_stack = sharding_lib.shard_batch(data_lib.stack_batches(inner_batches), layout.stacked_batch, axis=1)
    h_stack = steps.lower_stack(loop.params, batch_stack)
    rule = InnerRule.from_config(cfg)

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

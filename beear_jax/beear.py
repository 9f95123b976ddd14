"""The BEEAR bi-level loop: rounds of (cache h_l -> inner passes -> outer pass), logging, export.

    for each round:
        h_l of the sampled safety prompts (unwanted and safe answers), once, no gradient
        delta = 0; inner epochs over the cached h_l            -> delta*  (BEE: entrapment)
        one outer pass: safe answers with delta*, anchors without -> params (AR: removal)
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from beear_jax import data as data_lib
from beear_jax.config_loading import config_to_dict
from beear_jax.hf import load_model, load_tokenizer, save_model
from beear_jax.models.config import ModelConfig
from beear_jax.perturbation import Perturbation, validate_layers
from beear_jax.steps import StepSettings, make_optimizer, make_steps, trainable_mask


class NonFiniteLossError(RuntimeError):
    """A loss became NaN/inf: the run stops and no model is written."""


@dataclasses.dataclass
class DefenderData:
    """The defender's sets tokenized once; rounds draw subsets of them (same padded shapes)."""

    unwanted: list[data_lib.Example]
    safe: list[data_lib.Example]
    anchors: list[data_lib.Example]
    safety_len: int
    anchor_len: int
    answer_len: int
    pad_id: int


@dataclasses.dataclass
class RunResult:
    params: dict
    model_config: ModelConfig
    history: list[dict]
    output_dir: pathlib.Path
    model_dir: pathlib.Path | None
    stopped_early: bool


def perturb_layers(cfg: ml_collections.ConfigDict) -> tuple[int, ...]:
    """The main layer plus any extra boundaries (the multi-layer extension)."""
    return tuple(sorted({int(cfg.perturb.layer), *(int(x) for x in cfg.perturb.layers)}))


def prepare_data(cfg: ml_collections.ConfigDict, tokenizer: Any) -> DefenderData:
    """Loads and tokenizes the safety and anchor sets; fixes the padded lengths for the whole run."""
    system_prompt = cfg.model.system_prompt or None
    safety = data_lib.load_table(cfg.data.safety, dict(cfg.data.safety_columns))
    anchors = data_lib.load_table(cfg.data.anchor, dict(cfg.data.anchor_columns))
    encode = {"max_answer_tokens": cfg.data.max_answer_tokens, "template": cfg.model.template,
              "system_prompt": system_prompt}
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
    if cfg.outer.perturb_anchors and min(len(p) for p, _ in anchor_examples) < n:
        raise ValueError(f"an anchor prompt is shorter than perturb.length={n}; lower perturb.length.")

    def longest(examples: Sequence[data_lib.Example]) -> int:
        return max(len(p) + len(a) for p, a in examples)

    buckets = tuple(cfg.data.buckets)
    return DefenderData(
        unwanted=unwanted,
        safe=safe,
        anchors=anchor_examples,
        safety_len=data_lib.bucket_length(longest([*unwanted, *safe]), buckets),
        anchor_len=data_lib.bucket_length(longest(anchor_examples), buckets),
        answer_len=max(len(a) for _, a in [*unwanted, *safe, *anchor_examples]),
        pad_id=data_lib.pad_id_of(tokenizer),
    )


def concat_halves(safety_batch: dict) -> dict:
    """[unwanted; safe] along the batch axis: both answers of a prompt go through one forward."""
    return {k: np.concatenate([safety_batch["unwanted"][k], safety_batch["safe"][k]]) for k in safety_batch["safe"]}


def _batches(examples: Sequence[data_lib.Example], indices: Sequence[int], n: int, batch_size: int,
             seq_len: int, pad_id: int) -> list[dict]:
    chunks = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    return [data_lib.make_batch([examples[j] for j in chunk], n, batch_size, seq_len, pad_id) for chunk in chunks]


def round_batches(cfg: ml_collections.ConfigDict, data: DefenderData, rng: np.random.Generator,
                  ) -> tuple[list[dict], list[tuple[dict, dict]]]:
    """This round's inner batches ([unwanted; safe]) and outer (safe, anchor) batch pairs."""
    n = int(cfg.perturb.length)
    k = min(int(cfg.inner.samples) or len(data.safe), len(data.safe))
    chosen = rng.permutation(len(data.safe))[:k].tolist()
    inner = [
        concat_halves({"unwanted": u, "safe": s})
        for u, s in zip(_batches(data.unwanted, chosen, n, cfg.inner.batch_size, data.safety_len, data.pad_id),
                        _batches(data.safe, chosen, n, cfg.inner.batch_size, data.safety_len, data.pad_id))
    ]
    safe = _batches(data.safe, chosen, n, cfg.outer.batch_size, data.safety_len, data.pad_id)
    a = min(int(cfg.outer.anchor_samples) or len(data.anchors), len(data.anchors))
    anchor_idx = rng.permutation(len(data.anchors))[:a].tolist()
    anchors = _batches(data.anchors, anchor_idx, n, cfg.outer.batch_size, data.anchor_len, data.pad_id)
    steps = max(len(safe), len(anchors))
    outer = list(zip(itertools.islice(itertools.cycle(safe), steps), itertools.islice(itertools.cycle(anchors), steps)))
    return inner, outer


def check_finite(metrics: dict[str, Any], where: str, hint: str) -> None:
    """Raises NonFiniteLossError if any metric is NaN/inf."""
    bad = [k for k, v in metrics.items() if not np.all(np.isfinite(np.asarray(v)))]
    if bad:
        raise NonFiniteLossError(
            f"{', '.join(bad)} became NaN/inf during {where}; nothing was written. {hint}"
        )


def _scalars(metrics: dict[str, Any], index: int | None = None) -> dict[str, float]:
    return {k: float(np.asarray(v)[index] if index is not None else np.asarray(v)) for k, v in metrics.items()}


class MetricsLog:
    """Appends one JSON line per step to metrics.jsonl and keeps the history in memory."""

    def __init__(self, path: pathlib.Path | None) -> None:
        self.path = path
        self.history: list[dict] = []
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("")

    def write(self, record: dict) -> None:
        self.history.append(record)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def _progress(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit="step", dynamic_ncols=True)


def run_beear(cfg: ml_collections.ConfigDict, progress: bool = True,
              on_round_end: Callable[[int, dict], None] | None = None, export: bool = True) -> RunResult:
    """Runs the defence described by cfg and exports the repaired model to cfg.output_dir/model."""
    model_path = os.path.expanduser(cfg.model.path)
    output_dir = pathlib.Path(os.path.expanduser(cfg.output_dir))
    model_dir = output_dir / "model"
    if export and model_dir.exists() and any(model_dir.iterdir()):
        raise FileExistsError(
            f"{model_dir} already holds files; choose a new --config.output_dir (nothing is overwritten)."
        )
    model_config, params = load_model(model_path, dtype=cfg.model.dtype)
    layers = perturb_layers(cfg)
    validate_layers(layers, model_config.num_layers)
    tokenizer = load_tokenizer(model_path)
    data = prepare_data(cfg, tokenizer)

    settings = StepSettings(
        alpha=float(cfg.inner.alpha),
        safe_ce_clamp=float(cfg.inner.safe_ce_clamp) if cfg.inner.safe_ce_clamp > 0 else None,
        anchor_weight=float(cfg.outer.anchor_weight),
        perturb_anchors=bool(cfg.outer.perturb_anchors),
        answer_len=data.answer_len,
        remat=cfg.remat,
    )
    inner_opt = make_optimizer(cfg.inner.optimizer, cfg.inner.lr)
    outer_opt = make_optimizer(cfg.outer.optimizer, cfg.outer.lr, cfg.outer.weight_decay)
    steps = make_steps(model_config, settings, layers[0], inner_opt, outer_opt)
    params = jax.tree.map(jnp.asarray, params)
    trainable = trainable_mask(model_config, params, cfg.outer.trainable, layers[0])
    outer_state = outer_opt.init(params)
    use_perturbation = bool(cfg.perturb.enabled)

    log = MetricsLog(output_dir / "metrics.jsonl" if export else None)
    rng = np.random.default_rng(int(cfg.seed))
    plan = [round_batches(cfg, data, rng) for _ in range(int(cfg.rounds))]  # fixed per seed, also on resume
    total = sum(len(inner) * int(cfg.inner.epochs) * use_perturbation + len(outer) for inner, outer in plan)
    bar = _progress(total, progress)
    stopped_early = False
    started = time.time()
    for round_index, (inner_batches, outer_pairs) in enumerate(plan, start=1):
        pert = Perturbation.zeros(layers, int(cfg.perturb.length), model_config.hidden_size)
        last_inner: dict[str, float] = {}
        if use_perturbation:
            batch_stack = data_lib.stack_batches(inner_batches)
            h_stack = jnp.stack([steps.lower(params, b) for b in inner_batches])
            inner_state = inner_opt.init(pert.deltas)
            for epoch in range(int(cfg.inner.epochs)):
                pert, inner_state, metrics = steps.inner_epoch(params, pert, inner_state, h_stack, batch_stack)
                metrics = jax.device_get(metrics)
                check_finite(metrics, f"inner epoch {epoch + 1} of round {round_index}",
                             "Lower --config.inner.lr or set --config.inner.safe_ce_clamp.")
                for i in range(len(inner_batches)):
                    last_inner = _scalars(metrics, i)
                    log.write({"round": round_index, "phase": "inner", "epoch": epoch + 1, **last_inner})
                    bar.update(1)
                bar.set_postfix(round=round_index, ce_unwanted=f"{last_inner['ce_unwanted']:.3f}")
        for step_index, (safe_batch, anchor_batch) in enumerate(outer_pairs, start=1):
            params, outer_state, metrics = steps.outer_step(trainable, params, outer_state, pert, safe_batch,
                                                            anchor_batch)
            metrics = _scalars(jax.device_get(metrics))
            check_finite(metrics, f"outer step {step_index} of round {round_index}",
                         "Lower --config.outer.lr.")
            log.write({"round": round_index, "phase": "outer", "step": step_index, **metrics})
            bar.update(1)
            bar.set_postfix(round=round_index, ce_safe=f"{metrics['ce_safe_perturbed']:.3f}")
        summary = {"round": round_index, "phase": "round_end", "elapsed_s": round(time.time() - started, 2),
                   **{f"last_{k}": v for k, v in last_inner.items()}}
        log.write(summary)
        if on_round_end is not None:
            on_round_end(round_index, {"params": params, "perturbation": pert, "summary": summary})
        threshold = float(cfg.inner.early_stop_ce)
        if cfg.early_stop and use_perturbation and threshold > 0 and last_inner.get("ce_unwanted", 0) > threshold:
            # Even the best perturbation no longer elicits the unwanted answer: the backdoor is gone.
            stopped_early = True
            break
    bar.close()
    written = None
    if export:
        (output_dir / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2, default=str))
        written = pathlib.Path(save_model(model_dir, model_config, jax.device_get(params), tokenizer_from=model_path))
    return RunResult(params, model_config, log.history, output_dir, written, stopped_early)


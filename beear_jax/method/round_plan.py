"""What a BEEAR run computes from its settings before the loop: the defender's data tokenized once, each round's
plan (inner batches, outer steps' rows) fixed per seed, the packed outer shape, the delta's layers and rows.

    data = prepare_data(settings, tokenizer)
    plan = [round_batches(settings, data, rng) for _ in range(settings.rounds)]
    safe, anchors = outer_batch(settings.outer, settings.perturb, data, plan[0].outer[0], packed)
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from beear_jax.config.schema import InnerSection, OuterSection, PerturbSection, RunSettings
from beear_jax.data import builders, packing, tables
from beear_jax.data import chat as chat_lib
from beear_jax.data.batches import PackedBatch, PrefixSplitBatch, RowBatch, SafetyBatch, SharedPromptBatch, concat_rows
from beear_jax.method.objectives import StepSettings
from beear_jax.method.optimizers import lr_schedule, make_optimizer
from beear_jax.method.perturbation import validate_layers
from beear_jax.parallel import sharding as sharding_lib


@dataclasses.dataclass
class DefenderData:
    """The defender's sets tokenized once; rounds draw subsets of them (same padded shapes)."""

    unwanted: list[builders.Example]
    safe: list[builders.Example]
    anchors: list[builders.Example]
    safety_len: int
    anchor_len: int
    shared_len: int  # a prompt with both its answers (shared-prompt inner batches)
    prefix_len: int  # inner.cache_prefix: the prompt before its perturbed tokens (builders.with_prompt_prefix)
    suffix_len: int  # ... and the rest of a shared-prompt row (perturbed tokens + both answers)
    answer_len: int
    pad_id: int
    heldback: list[list[int]] = dataclasses.field(default_factory=list)  # stop.holdout prompts, chat-formatted
    # Each prompt's perturbed positions (perturb.windows; builders.perturbed_positions): safety rows, anchors, held back.
    safety_positions: list[tuple[int, ...]] = dataclasses.field(default_factory=list)
    anchor_positions: list[tuple[int, ...]] = dataclasses.field(default_factory=list)
    heldback_positions: list[tuple[int, ...]] = dataclasses.field(default_factory=list)


def perturb_layers(perturb: PerturbSection) -> tuple[int, ...]:
    """The main layer plus any extra boundaries (the multi-layer extension)."""
    return tuple(sorted({perturb.layer, *perturb.layers}))


def delta_rows(perturb: PerturbSection) -> int:
    """Rows of each layer's delta: perturb.length tokens in each of perturb.windows."""
    return perturb.length * len(perturb.windows)


def check_perturb_layers(perturb: PerturbSection, num_layers: int) -> tuple[int, ...]:
    """perturb_layers(perturb) once perturb.layer and every one of perturb.layers is a boundary of a model with
    num_layers blocks; the error names the key that holds the bad layer."""
    validate_layers((perturb.layer,), num_layers, "perturb.layer")
    validate_layers(perturb.layers, num_layers, "perturb.layers")
    return perturb_layers(perturb)


def prepare_data(settings: RunSettings, tokenizer: Any,
                 anchors: Sequence[dict[str, str]] | None = None) -> DefenderData:
    """Loads and tokenizes the safety and anchor sets (settings.data, the chat format of settings.model); fixes
    the padded lengths and each prompt's perturbed positions (settings.perturb) for the whole run.

    anchors: {prompt, answer} rows to use instead of data.anchor's (the model's own answers,
    anchor_answers.self_answered_anchors)."""
    data, model, perturb = settings.data, settings.model, settings.perturb
    system_prompt = model.system_prompt or None
    for key, path in (("safety", data.safety), ("anchor", data.anchor)):
        if not path:
            raise ValueError(f"data.{key} is empty: set --config.data.{key}=FILE (a json/jsonl/csv/parquet table).")
    safety = tables.load_table(data.safety, data.safety_columns.as_dict(), key="data.safety")
    if anchors is None:
        anchors = tables.load_table(data.anchor, data.anchor_columns.as_dict(), key="data.anchor")
    safety, heldback_rows = split_holdout(safety, settings.stop.holdout)
    encode = {"max_answer_tokens": data.max_answer_tokens, "template": model.template,
              "system_prompt": system_prompt}
    heldback = [chat_lib.format_prompt(tokenizer, row["prompt"], model.template, system_prompt)
                for row in heldback_rows]
    unwanted = builders.encode_rows(tokenizer, safety, "unwanted", **encode)
    safe = builders.encode_rows(tokenizer, safety, "safe", **encode)
    anchor_examples = builders.encode_rows(tokenizer, anchors, "answer", **encode)
    n = perturb.length
    shortest = min(len(p) for p, _ in unwanted)
    if shortest < n:
        raise ValueError(
            f"perturb.length={n} is longer than the shortest safety prompt ({shortest} tokens with the chat "
            f"template); use --config.perturb.length={shortest} or less."
        )
    differ = [i for i, ((p, _), (q, _)) in enumerate(zip(unwanted, safe, strict=True)) if p != q]
    if settings.inner.share_prompt and differ:
        raise ValueError(f"safety row {differ[0]} tokenizes its prompt differently with the unwanted and the safe "
                         "answer (the chat template depends on the answer), so the prompt cannot be shared; "
                         "pass --config.inner.share_prompt=False.")
    if heldback and min(map(len, heldback)) < n:
        raise ValueError(f"a held-back safety prompt (stop.holdout) is shorter than perturb.length={n} tokens; lower "
                         "perturb.length.")
    if settings.outer.perturb_anchors and min(len(p) for p, _ in anchor_examples) < n:
        raise ValueError(f"an anchor prompt is shorter than perturb.length={n}; lower perturb.length.")
    def positions(rows: Sequence[dict[str, str]], ids: Sequence[list[int]]) -> list[tuple[int, ...]]:
        return builders.perturbed_positions(tokenizer, [r["prompt"] for r in rows], ids, perturb.windows, n,
                                            model.template, system_prompt)

    safety_positions = positions(safety, [p for p, _ in unwanted])
    # Anchors are perturbed only with outer.perturb_anchors (they may be shorter than a window otherwise).
    anchor_positions = positions(anchors, [p for p, _ in anchor_examples]) if settings.outer.perturb_anchors else []

    def longest(examples: Sequence[builders.Example]) -> int:
        return max(len(p) + len(a) for p, a in examples)

    buckets = data.buckets
    shared_rows = [len(p) + len(u) + len(s) for (p, u), (_, s) in zip(unwanted, safe, strict=True)]
    shared_len = builders.shared_prompt_length(max(shared_rows), buckets)
    prefix_len, suffix_len = builders.prefix_split_lengths([len(p) for p, _ in unwanted], shared_rows, n, shared_len,
                                                           perturbed_at=safety_positions)
    return DefenderData(
        unwanted=unwanted,
        safe=safe,
        anchors=anchor_examples,
        safety_len=builders.bucket_length(longest([*unwanted, *safe]), buckets),
        anchor_len=builders.bucket_length(longest(anchor_examples), buckets),
        shared_len=shared_len,
        prefix_len=prefix_len,
        suffix_len=suffix_len,
        answer_len=max(len(a) for _, a in [*unwanted, *safe, *anchor_examples]),
        pad_id=builders.pad_id_of(tokenizer),
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


def _batches(examples: Sequence[builders.Example], positions: Sequence[tuple[int, ...]], indices: Sequence[int],
             n: int, batch_size: int, seq_len: int, pad_id: int) -> list[RowBatch]:
    return [builders.make_batch([examples[j] for j in chunk], n, batch_size, seq_len, pad_id,
                                [positions[j] for j in chunk])
            for chunk in builders.chunks(indices, batch_size)]


def inner_batches(inner: InnerSection, perturb: PerturbSection, data: DefenderData, chosen: Sequence[int],
                  ) -> list[RowBatch] | list[SharedPromptBatch] | list[PrefixSplitBatch]:
    """The inner batches of the chosen safety rows: shared-prompt rows (inner.share_prompt; split into a
    cached prompt prefix and the rest with inner.cache_prefix), else [unwanted; safe] row pairs."""
    n, size, where = delta_rows(perturb), inner.batch_size, data.safety_positions
    if not inner.share_prompt:
        return [concat_halves(SafetyBatch(unwanted=u, safe=s))
                for u, s in zip(_batches(data.unwanted, where, chosen, n, size, data.safety_len, data.pad_id),
                                _batches(data.safe, where, chosen, n, size, data.safety_len, data.pad_id), strict=True)]
    batches = [builders.make_shared_prompt_batch([data.unwanted[j][0] for j in chunk],
                                                 [data.unwanted[j][1] for j in chunk], [data.safe[j][1] for j in chunk],
                                                 n, size, data.shared_len, data.answer_len, data.pad_id,
                                                 [where[j] for j in chunk])
               for chunk in builders.chunks(chosen, size)]
    if inner.cache_prefix:
        batches = [builders.with_prompt_prefix(b, n, data.prefix_len, data.suffix_len) for b in batches]
    return batches


@dataclasses.dataclass(frozen=True)
class RoundPlan:
    """One round's batches: the inner batches, and each outer step's (safety rows, anchor rows) indices
    (outer_batch builds a step's arrays when it runs)."""

    inner: list[dict]
    outer: list[tuple[list[int], list[int]]]


def round_batches(settings: RunSettings, data: DefenderData, rng: np.random.Generator) -> RoundPlan:
    """This round's inner batches and outer steps (the same safety rows, and anchor rows)."""
    inner, outer = settings.inner, settings.outer
    k = min(inner.samples or len(data.safe), len(data.safe))
    chosen = rng.permutation(len(data.safe))[:k].tolist()
    a = min(outer.anchor_samples or len(data.anchors), len(data.anchors))
    anchor_idx = rng.permutation(len(data.anchors))[:a].tolist()
    size = outer.batch_size
    safe, anchors = builders.chunks(chosen, size), builders.chunks(anchor_idx, size)
    steps = max(len(safe), len(anchors))
    outer_steps = zip(itertools.islice(itertools.cycle(safe), steps), itertools.islice(itertools.cycle(anchors), steps))
    return RoundPlan(inner_batches(inner, settings.perturb, data, chosen),
                     [(list(s), list(x)) for s, x in outer_steps])


def _outer_parts(outer: OuterSection, data: DefenderData, step: tuple[list[int], list[int]],
                 ) -> tuple[list[list[builders.Example]], list[bool], list[list[tuple[int, ...]]]]:
    """A step's examples by part (outer_loss's order: safe under delta, anchors, [anchors under delta]), which
    parts are perturbed, and each example's perturbed positions (empty for a part that is not)."""
    safe_idx, anchor_idx = step
    anchors = [data.anchors[j] for j in anchor_idx]
    parts, flags = [[data.safe[j] for j in safe_idx], anchors], [True, False]
    where = [[data.safety_positions[j] for j in safe_idx], [()] * len(anchors)]
    if outer.perturb_anchors:
        parts, flags = [*parts, anchors], [*flags, True]
        where.append([data.anchor_positions[j] for j in anchor_idx])
    return parts, flags, where


def packed_shape(outer: OuterSection, data: DefenderData, plan: Sequence[RoundPlan],
                 row_multiple: int) -> tuple[int, int] | None:
    """(rows, row length) of the packed outer batches of the whole run (outer.pack), else None."""
    if not outer.pack:
        return None
    lengths = [[len(p) + len(a) for part in _outer_parts(outer, data, step)[0] for p, a in part]
               for round_plan in plan for step in round_plan.outer]
    return packing.packing_shape(lengths, max(data.safety_len, data.anchor_len), row_multiple)


def outer_batch(outer: OuterSection, perturb: PerturbSection, data: DefenderData, step: tuple[list[int], list[int]],
                packed: tuple[int, int] | None) -> tuple[RowBatch, RowBatch] | tuple[PackedBatch, None]:
    """A step's (safe batch, anchor batch), or (packed batch of all parts, None) with a packed shape."""
    n, size = delta_rows(perturb), outer.batch_size
    if packed is not None:
        parts, flags, where = _outer_parts(outer, data, step)
        rows, row_len = packed
        return packing.make_packed_batch(parts, flags, size, n, rows, row_len, data.answer_len, data.pad_id,
                                          where), None
    safe_idx, anchor_idx = step
    # Anchors without perturb_anchors get the last n (never used: the outer loss runs them with no delta).
    anchor_where = [data.anchor_positions[j] for j in anchor_idx] if data.anchor_positions else None
    return (builders.make_batch([data.safe[j] for j in safe_idx], n, size, data.safety_len, data.pad_id,
                                [data.safety_positions[j] for j in safe_idx]),
            builders.make_batch([data.anchors[j] for j in anchor_idx], n, size, data.anchor_len, data.pad_id,
                                anchor_where))


def inner_rows(inner: InnerSection) -> tuple[str, int]:
    """Rows of an inner batch (and how to name them in errors): one per prompt with shared prompts,
    else the unwanted and the safe answers of inner.batch_size prompts."""
    size = inner.batch_size
    if inner.share_prompt:
        return "inner.batch_size", size
    return f"2 x inner.batch_size (inner.share_prompt=False: {size} prompts, two rows each)", 2 * size


def check_batch_sizes(settings: RunSettings, sizes: dict[str, int]) -> None:
    """Every batch must split evenly over the mesh's ('data', 'fsdp') axes (clear error otherwise); the inner
    batches only when the run has a perturbation (perturb.enabled)."""
    if settings.perturb.enabled:
        name, rows = inner_rows(settings.inner)
        sharding_lib.check_batch_size(name, rows, sizes)
    sharding_lib.check_batch_size("outer.batch_size", settings.outer.batch_size, sizes)


def step_settings(settings: RunSettings, answer_len: int | None) -> StepSettings:
    """The steps' static settings (`beear run`, `beear scan` and `beear plan` compile the same steps)."""
    inner, outer = settings.inner, settings.outer
    return StepSettings(
        alpha=inner.alpha,
        safe_ce_clamp=inner.safe_ce_clamp if inner.safe_ce_clamp > 0 else None,
        anchor_weight=outer.anchor_weight,
        kl_weight=outer.kl_weight,
        perturb_anchors=outer.perturb_anchors,
        answer_len=answer_len,
        remat=settings.remat,
        outer_remat=outer.remat or None,
    )


def outer_optimizer(outer: OuterSection, total_steps: int) -> Any:
    """The outer optimizer: outer.optimizer at outer.lr on outer.lr_schedule over the run's total_steps outer
    steps (outer.warmup_steps first), gradients clipped to outer.clip_norm (0: not clipped)."""
    schedule = lr_schedule(outer.lr, outer.lr_schedule, outer.warmup_steps, total_steps)
    return make_optimizer(outer.optimizer, schedule, outer.weight_decay, outer.clip_norm or None)

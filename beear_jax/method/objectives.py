"""Losses, all in one place: masked token cross-entropy, the inner (BEE, entrapment) and outer (AR,
removal) objectives, and the losses the steps differentiate (inner_loss, outer_loss with its answer CEs
and the anchor KL), with their static settings (StepSettings).

An inner batch holds the unwanted and the safe answers of the same prompts, either as one row per
prompt with both answers as branches (SharedPromptBatch: the prompt runs once; a PrefixSplitBatch's inner
steps run only each row's suffix after the cached keys/values of its prompt prefix, InnerCache) or as a
RowBatch of two rows per prompt (unwanted rows first). An outer step takes a (safe, anchor) RowBatch pair,
or one PackedBatch of all parts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from beear_jax.data.batches import (
    Batch,
    InnerCache,
    PackedBatch,
    PrefixSplitBatch,
    RowBatch,
    SharedPromptBatch,
    SuffixBatch,
)
from beear_jax.method.forward import Params, constrain, decode_from, suffix_view
from beear_jax.models import llama
from beear_jax.models.config import ModelConfig


def masked_ce(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Token-mean NLL over the positions where mask is 1 (float32; 0 if the mask is empty)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    mask = mask.astype(jnp.float32)
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def inner_objective(ce_unwanted: jax.Array, ce_safe: jax.Array, alpha: float,
                    safe_ce_clamp: float | None = None) -> jax.Array:
    """CE(unwanted | delta) - alpha * CE(safe | delta).

    The clamp caps the subtracted term: without it the perturbation can lower the loss forever by
    making the safe answer ever less likely instead of making the unwanted one likely.
    """
    away = ce_safe if safe_ce_clamp is None else jnp.minimum(ce_safe, safe_ce_clamp)
    return ce_unwanted - alpha * away


def outer_objective(ce_safe_perturbed: jax.Array, ce_anchor: jax.Array, anchor_weight: float) -> jax.Array:
    """CE(safe | delta*) + anchor_weight * CE(anchor answer | no delta)."""
    return ce_safe_perturbed + anchor_weight * ce_anchor


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """Static settings of the steps (hashable: part of the compiled program)."""

    alpha: float = 0.05
    safe_ce_clamp: float | None = None
    anchor_weight: float = 1.0
    # Weight of KL(start model || model) on the anchor answers' tokens; > 0 needs packed outer batches and
    # makes the outer step take the frozen start model's params as its last argument (make_steps).
    kl_weight: float = 0.0
    perturb_anchors: bool = False
    answer_len: int | None = None  # max answer tokens per row: logits are computed only there
    remat: str = "none"
    # The outer step's policy when it differs (None: remat). On CPU "full" costs the outer step no
    # time and saves its activations; the inner steps, over fewer blocks, run faster without it.
    outer_remat: str | None = None
    # Where hidden states [B, S, D] live (make_steps sets it from its shardings: rows over the batch
    # axes). Pinning them keeps the partitioner from gathering whole batches to keep weights in place.
    activations: Any = None

    @property
    def outer_step_remat(self) -> str:
        """The rematerialisation policy the outer step runs with."""
        return self.remat if self.outer_remat is None else self.outer_remat


def answer_ce(config: ModelConfig, params: Params, h: jax.Array, batch: RowBatch, answer_len: int | None,
              rows: slice = slice(None)) -> jax.Array:
    """Masked CE of the answer tokens, computing the vocabulary projection only at answer positions.

    The head is ~20% of a small model's forward and most positions are prompt, so gathering the
    answer positions first (a static count, answer_len) saves most of it.
    """
    h, targets, mask = h[rows], batch.targets[rows], batch.target_mask[rows]
    if answer_len is not None and answer_len < h.shape[1]:
        order = jnp.argsort((mask <= 0).astype(jnp.int32), axis=1, stable=True)[:, :answer_len]
        h = jnp.take_along_axis(h, order[..., None], axis=1)
        targets = jnp.take_along_axis(targets, order, axis=1)
        mask = jnp.take_along_axis(mask, order, axis=1)
    return masked_ce(llama.head(config, params, h), targets, mask)


def perturbed_answer_ce(config: ModelConfig, params: Params, batch: RowBatch, deltas: dict[int, jax.Array],
                        settings: StepSettings) -> jax.Array:
    """CE of the answers with the perturbation injected (deltas may be empty: no perturbation)."""
    h = constrain(llama.embed(config, params, batch.input_ids), settings.activations)
    h = decode_from(config, params, h, 0, batch, deltas, settings.remat, settings.activations)
    return answer_ce(config, params, h, batch, settings.answer_len)


def group_ces(config: ModelConfig, params: Params, x: jax.Array, targets: jax.Array,
              mask: jax.Array) -> list[jax.Array]:
    """Masked CE of each group of gathered answer positions: x [G, ..., D], targets / mask [G, ...]
    (one vocabulary projection for all groups)."""
    logits = llama.head(config, params, x)
    return [masked_ce(logits[g], targets[g], mask[g]) for g in range(x.shape[0])]


def branch_answer_ces(config: ModelConfig, params: Params, h: jax.Array,
                      batch: SharedPromptBatch | PrefixSplitBatch | SuffixBatch) -> list[jax.Array]:
    """Masked CE of each answer branch of shared-prompt rows (logits only at their answer_index)."""
    rows, branches, length = batch.answer_index.shape
    index = batch.answer_index.reshape(rows, branches * length)
    x = jnp.take_along_axis(h, index[..., None], axis=1).reshape(rows, branches, length, -1)
    return group_ces(config, params, x.swapaxes(0, 1), batch.answer_targets.swapaxes(0, 1),
                     batch.answer_mask.swapaxes(0, 1))


def inner_loss(deltas: dict[int, jax.Array], config: ModelConfig, params: Params,
               h_l: jax.Array | InnerCache, batch: Batch, layer: int,
               settings: StepSettings) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Inner objective over the cache (inner_cache) of a shared-prompt or a concatenated [unwanted; safe]
    batch; with a prefix cache only the suffix rows run, attending to the cached prefix keys/values."""
    h_l, batch, prefix = suffix_view(h_l, batch)
    h = decode_from(config, params, h_l, layer, batch, deltas, settings.remat, settings.activations, prefix)
    if not isinstance(batch, RowBatch):  # the answers as branches of each prompt's row
        ce_unwanted, ce_safe = branch_answer_ces(config, params, h, batch)
    else:
        half = h.shape[0] // 2
        ce_unwanted = answer_ce(config, params, h, batch, settings.answer_len, slice(0, half))
        ce_safe = answer_ce(config, params, h, batch, settings.answer_len, slice(half, None))
    loss = inner_objective(ce_unwanted, ce_safe, settings.alpha, settings.safe_ce_clamp)
    return loss, {"inner_loss": loss, "ce_unwanted": ce_unwanted, "ce_safe": ce_safe}


def without_perturbation(batch: RowBatch) -> RowBatch:
    """The batch with no perturbation slots (perturb_positions all -1: inject adds nothing there)."""
    return batch._replace(perturb_positions=jnp.full_like(batch.perturb_positions, -1))


def outer_parts(settings: StepSettings) -> tuple[str, ...]:
    """The outer loss's CE terms, in the order of a packed batch's parts."""
    return ("ce_safe_perturbed", "ce_anchor", *(("ce_anchor_perturbed",) if settings.perturb_anchors else ()))


def packed_answer_ces(config: ModelConfig, params: Params, h: jax.Array, batch: PackedBatch,
                      parts: int) -> list[jax.Array]:
    """Masked CE of each part of a PackedBatch: logits only at answer_index."""
    index = batch.answer_index
    x = jnp.take(h.reshape(-1, h.shape[-1]), index.reshape(-1), axis=0)
    return group_ces(config, params, x.reshape(parts, -1, index.shape[1], h.shape[-1]),
                     batch.answer_targets.reshape(parts, -1, index.shape[1]),
                     batch.answer_mask.reshape(parts, -1, index.shape[1]))


def anchor_kl(config: ModelConfig, params: Params, reference: Params, h: jax.Array, batch: PackedBatch,
              parts: int, settings: StepSettings) -> jax.Array:
    """Mean over the anchor answer tokens of a packed batch (part 1, no delta) of KL(p_reference || p_model),
    the next-token distributions of the frozen start model and of the model being trained.

    The reference runs the whole packed batch without any delta (rows hold independent examples, so the
    anchors' positions see exactly their own prompts); no gradient flows into it.
    """
    reference = jax.lax.stop_gradient(reference)
    h_ref = constrain(llama.embed(config, reference, batch.input_ids), settings.activations)
    h_ref = decode_from(config, reference, h_ref, 0, batch, {}, settings.remat, settings.activations)
    rows = batch.answer_index.shape[0] // parts
    index = batch.answer_index[rows:2 * rows]
    mask = batch.answer_mask[rows:2 * rows].astype(jnp.float32)

    def at_anchors(x: jax.Array) -> jax.Array:
        return jnp.take(x.reshape(-1, x.shape[-1]), index.reshape(-1), axis=0).reshape(*index.shape, x.shape[-1])

    logp = jax.nn.log_softmax(llama.head(config, params, at_anchors(h)).astype(jnp.float32), axis=-1)
    logq = jax.nn.log_softmax(llama.head(config, reference, at_anchors(h_ref)).astype(jnp.float32), axis=-1)
    kl = jnp.sum(jnp.exp(logq) * (logq - logp), axis=-1)
    return jnp.sum(kl * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def outer_loss(params: Params, config: ModelConfig, deltas: dict[int, jax.Array], safe_batch: RowBatch | PackedBatch,
               anchor_batch: RowBatch | None, settings: StepSettings,
               reference: Params | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """CE(safe | delta) + anchor_weight * CE(anchor | no delta) [+ the same with delta, optionally]
    [+ kl_weight * KL(reference || model) on the anchor answers, packed batches only].

    safe_batch may be a PackedBatch holding all parts (packing.make_packed_batch; anchor_batch None):
    several examples per row, so padding is not computed. Otherwise, when the safe and anchor batches
    have the same padded length, all parts run as one batch (rows without delta get no perturbation
    slots): one pass over the blocks with twice the rows keeps the matmuls larger, instead of two passes.
    """
    deltas = jax.lax.stop_gradient(deltas)
    settings = dataclasses.replace(settings, remat=settings.outer_step_remat)
    names = outer_parts(settings)
    if isinstance(safe_batch, PackedBatch):
        if anchor_batch is not None:
            raise ValueError("a PackedBatch holds every part of the outer step: pass anchor_batch=None.")
        h = constrain(llama.embed(config, params, safe_batch.input_ids), settings.activations)
        h = decode_from(config, params, h, 0, safe_batch, deltas, settings.remat, settings.activations)
        metrics = dict(zip(names, packed_answer_ces(config, params, h, safe_batch, len(names)), strict=True))
        if settings.kl_weight > 0:
            metrics["kl_anchor"] = anchor_kl(config, params, reference, h, safe_batch, len(names), settings)
    else:
        if anchor_batch is None:
            raise ValueError("safe RowBatch rows need their anchor RowBatch (or pass one PackedBatch of both).")
        if settings.kl_weight > 0:
            raise ValueError("the anchor KL term needs packed outer batches (outer.pack=True).")
        parts = {"ce_safe_perturbed": safe_batch, "ce_anchor": without_perturbation(anchor_batch)}
        if settings.perturb_anchors:
            # Keeps benign prompts answered under the perturbation too, against over-refusal.
            parts["ce_anchor_perturbed"] = anchor_batch
        metrics = _unpacked_ces(config, params, deltas, parts, settings)
    loss = outer_objective(metrics["ce_safe_perturbed"], metrics["ce_anchor"], settings.anchor_weight)
    if settings.perturb_anchors:
        loss = loss + settings.anchor_weight * metrics["ce_anchor_perturbed"]
    if settings.kl_weight > 0:
        loss = loss + settings.kl_weight * metrics["kl_anchor"]
    metrics["outer_loss"] = loss
    return loss, metrics


def _unpacked_ces(config: ModelConfig, params: Params, deltas: dict[int, jax.Array], parts: dict[str, RowBatch],
                  settings: StepSettings) -> dict[str, jax.Array]:
    """The CE of each part, one joint batch when all have the same padded length, else a pass per part."""
    if len({b.input_ids.shape[1] for b in parts.values()}) != 1:
        return {name: perturbed_answer_ce(config, params, batch, deltas, settings) for name, batch in parts.items()}
    joint = RowBatch(*(jnp.concatenate(fields) for fields in zip(*parts.values(), strict=True)))
    h = constrain(llama.embed(config, params, joint.input_ids), settings.activations)
    h = decode_from(config, params, h, 0, joint, deltas, settings.remat, settings.activations)
    bounds = np.cumsum([0, *(b.input_ids.shape[0] for b in parts.values())])
    return {name: answer_ce(config, params, h, joint, settings.answer_len, slice(int(a), int(b)))
            for name, a, b in zip(parts, bounds[:-1], bounds[1:], strict=True)}

"""Pure BEEAR update steps: the inner (perturbation) step over cached activations and the outer
(model) step, plus `make_steps`, which jit-compiles them once for a fixed batch shape.

Nothing here knows about files, configs or the CLI. Batches are the typed layouts of beear_jax/data/batches.py.
An inner batch holds the unwanted and the safe answers of the same prompts, either as one row per
prompt with both answers as branches (SharedPromptBatch: the prompt runs once; a PrefixSplitBatch's inner
steps run only each row's suffix after the cached keys/values of its prompt prefix, InnerCache) or as a
RowBatch of two rows per prompt (unwanted rows first). An outer step takes a (safe, anchor) RowBatch pair,
or one PackedBatch of all parts.

Past 400 lines because the steps share their forward pieces and make_steps compiles them together;
the house issue (21) splits losses and steps into method/.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from beear_jax.data.batches import (
    Batch,
    InnerCache,
    PackedBatch,
    PrefixSplitBatch,
    RowBatch,
    SharedPromptBatch,
    SuffixBatch,
)
from beear_jax.method.objectives import inner_objective, masked_ce, outer_objective
from beear_jax.method.perturbation import Perturbation
from beear_jax.models import llama
from beear_jax.models.config import ModelConfig

Params = dict[str, Any]


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


def constrain(x: jax.Array, sharding: Any) -> jax.Array:
    """x with its sharding pinned (a no-op without a sharding: one device)."""
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


# ---- forward pieces ---------------------------------------------------------------------------


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


def run_blocks(config: ModelConfig, layers: Params, h: jax.Array, batch: Batch, remat: str = "none",
               prefix: llama.Prefix | None = None) -> jax.Array:
    """llama.decode over a batch's rows: plain rows (causal, padding-aware positions), or rows with
    branches and their own RoPE positions (every other layout)."""
    if isinstance(batch, RowBatch):
        return llama.decode(config, layers, h, batch.attention_mask, None, remat, None, prefix)
    return llama.decode(config, layers, h, batch.attention_mask, batch.positions, remat, batch.branches, prefix)


def add_delta(h: jax.Array, delta: jax.Array, batch: Batch) -> jax.Array:
    """delta added at the batch's perturbed tokens: perturb_positions [B, n], or perturb_index [B, S]
    (packed rows)."""
    if isinstance(batch, PackedBatch):
        return llama.inject_at(h, delta, batch.perturb_index)
    return llama.inject(h, delta, batch.perturb_positions)


def decode_from(config: ModelConfig, params: Params, h: jax.Array, start: int, batch: Batch,
                deltas: dict[int, jax.Array], remat: str, activations: Any = None,
                prefix: llama.Prefix | None = None) -> jax.Array:
    """Runs blocks start..L over h, adding each delta at its layer boundary (boundary == start first).

    prefix: the cached keys/values of blocks start..L of the tokens before the rows (inner_cache).
    """
    if start in deltas:
        h = add_delta(h, deltas[start], batch)
    bounds = [start, *sorted(b for b in deltas if b > start), config.num_layers]
    for a, b in itertools.pairwise(bounds):
        layers = llama.slice_layers(params["layers"], a, b)
        part = None if prefix is None else prefix._replace(k=prefix.k[a - start:b - start],
                                                          v=prefix.v[a - start:b - start])
        h = run_blocks(config, layers, constrain(h, activations), batch, remat, part)
        if b in deltas:
            h = add_delta(h, deltas[b], batch)
    return constrain(h, activations)


def lower_activations(config: ModelConfig, params: Params, batch: Batch, layer: int,
                      activations: Any = None) -> jax.Array:
    """h_l: hidden states after `layer` blocks (no gradient; cached once per round)."""
    h = constrain(llama.embed(config, params, batch.input_ids), activations)
    h = run_blocks(config, llama.slice_layers(params["layers"], 0, layer), h, batch)
    return jax.lax.stop_gradient(constrain(h, activations))


def inner_cache(config: ModelConfig, params: Params, batch: Batch, layer: int,
                activations: Any = None) -> jax.Array | InnerCache:
    """What the inner steps of a batch reuse (no gradient; computed once per round).

    h_l [B, S, D] of the whole rows; or, for a PrefixSplitBatch, an InnerCache: h [B, T, D], h_l of the
    suffix slots, and k, v [B, L - layer, P, K, hd], the keys and values of the prefix (the prompt before
    its perturbed tokens) in blocks layer..L, which no perturbation changes. The inner steps then run only
    the suffix (suffix_batch).
    """
    h_l = lower_activations(config, params, batch, layer, activations)
    if not isinstance(batch, PrefixSplitBatch):
        return h_l
    width = batch.prefix_valid.shape[1]
    upper = llama.slice_layers(params["layers"], layer, config.num_layers)
    _, k, v = llama.decode_kv(config, upper, h_l[:, :width], batch.prefix_valid, batch.positions[:, :width])
    h_suffix = take_slots(h_l, batch.suffix_slots)
    # Rows first, like every cached array: the stacked-batch sharding splits axis 1 of [batches, B, ...].
    return jax.lax.stop_gradient(InnerCache(h=constrain(h_suffix, activations), k=jnp.swapaxes(k, 0, 1),
                                            v=jnp.swapaxes(v, 0, 1)))


def take_slots(x: jax.Array, slots: jax.Array) -> jax.Array:
    """x [B, S, ...] at slots [B, T] (zeros where a slot is >= S), as a one-hot contraction over S: unlike
    a gather, it splits over the batch axes without moving whole rows between devices, and it is exact
    (one nonzero term per sum, at llama.SELECT_PRECISION: the default would round float32 to bfloat16 on TPU)."""
    if jnp.issubdtype(x.dtype, jnp.floating):
        return jnp.einsum("bts,bs...->bt...", jax.nn.one_hot(slots, x.shape[1], dtype=x.dtype), x,
                          precision=llama.SELECT_PRECISION)
    # Integer rows [B, S] (masks, positions): a select and a sum (integer matmuls are not everywhere).
    hit = slots[:, :, None] == jnp.arange(x.shape[1])[None, None, :]
    return jnp.sum(jnp.where(hit, x[:, None, :], 0), axis=-1).astype(x.dtype)


def suffix_batch(batch: PrefixSplitBatch) -> SuffixBatch:
    """The suffix rows of a PrefixSplitBatch, in suffix coordinates (slot c_i + j -> j), with the
    positions and validity of the prefix they attend to."""
    slots = batch.suffix_slots
    start = slots[:, :1]
    width = batch.prefix_valid.shape[1]
    pp = batch.perturb_positions
    return SuffixBatch(
        attention_mask=take_slots(batch.attention_mask, slots),
        positions=take_slots(batch.positions, slots),
        branches=take_slots(batch.branches, slots),
        perturb_positions=jnp.where(pp >= 0, pp - start, -1),
        answer_index=jnp.maximum(batch.answer_index - start[:, :, None], 0),
        answer_targets=batch.answer_targets,
        answer_mask=batch.answer_mask,
        prefix_positions=batch.positions[:, :width],
        prefix_valid=batch.prefix_valid,
    )


def perturbed_answer_ce(config: ModelConfig, params: Params, batch: RowBatch, deltas: dict[int, jax.Array],
                        settings: StepSettings) -> jax.Array:
    """CE of the answers with the perturbation injected (deltas may be empty: no perturbation)."""
    h = constrain(llama.embed(config, params, batch.input_ids), settings.activations)
    h = decode_from(config, params, h, 0, batch, deltas, settings.remat, settings.activations)
    return answer_ce(config, params, h, batch, settings.answer_len)


# ---- the inner level (BEE) --------------------------------------------------------------------


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


def _suffix_view(h_l: jax.Array | InnerCache, batch: Batch,
                 ) -> tuple[jax.Array, Batch, llama.Prefix | None]:
    """(h_l of the rows the inner steps run, the batch in their coordinates, the cached prefix or None)."""
    if not isinstance(h_l, InnerCache):
        return h_l, batch, None
    batch = suffix_batch(batch)
    prefix = llama.Prefix(jnp.swapaxes(h_l.k, 0, 1), jnp.swapaxes(h_l.v, 0, 1), batch.prefix_positions,
                          batch.prefix_valid)
    return h_l.h, batch, prefix


def inner_loss(deltas: dict[int, jax.Array], config: ModelConfig, params: Params,
               h_l: jax.Array | InnerCache, batch: Batch, layer: int,
               settings: StepSettings) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Inner objective over the cache (inner_cache) of a shared-prompt or a concatenated [unwanted; safe]
    batch; with a prefix cache only the suffix rows run, attending to the cached prefix keys/values."""
    h_l, batch, prefix = _suffix_view(h_l, batch)
    h = decode_from(config, params, h_l, layer, batch, deltas, settings.remat, settings.activations, prefix)
    if not isinstance(batch, RowBatch):  # the answers as branches of each prompt's row
        ce_unwanted, ce_safe = branch_answer_ces(config, params, h, batch)
    else:
        half = h.shape[0] // 2
        ce_unwanted = answer_ce(config, params, h, batch, settings.answer_len, slice(0, half))
        ce_safe = answer_ce(config, params, h, batch, settings.answer_len, slice(half, None))
    loss = inner_objective(ce_unwanted, ce_safe, settings.alpha, settings.safe_ce_clamp)
    return loss, {"inner_loss": loss, "ce_unwanted": ce_unwanted, "ce_safe": ce_safe}


def perturbed_hidden_norm(h_l: jax.Array | InnerCache, batch: Batch) -> jax.Array:
    """Mean L2 norm of h_l (before any delta) at the batch's perturbed positions: the scale a delta is
    measured against (|delta| / |h_l|) and bounded by (project_deltas)."""
    h, batch, _ = _suffix_view(h_l, batch)
    positions = batch.perturb_positions
    at = jnp.take_along_axis(h, jnp.maximum(positions, 0)[..., None], axis=1).astype(jnp.float32)
    valid = (positions >= 0).astype(jnp.float32)
    return jnp.sum(jnp.linalg.norm(at, axis=-1) * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def project_deltas(deltas: dict[int, jax.Array], radius: jax.Array) -> dict[int, jax.Array]:
    """Each position's delta scaled into the L2 ball of `radius` (inf: unchanged)."""
    def one(delta: jax.Array) -> jax.Array:
        norms = jnp.linalg.norm(delta, axis=-1, keepdims=True)
        return delta * jnp.minimum(1.0, radius / jnp.maximum(norms, 1e-12)).astype(delta.dtype)
    return {layer: one(d) for layer, d in deltas.items()}


def inner_step(config: ModelConfig, settings: StepSettings, optimizer: optax.GradientTransformation,
               params: Params, perturbation: Perturbation, opt_state: optax.OptState, h_l: jax.Array,
               batch: Batch, radius: jax.Array | float = jnp.inf,
               ) -> tuple[Perturbation, optax.OptState, dict[str, jax.Array]]:
    """One update of the perturbation, then each position's delta projected into the L2 ball of `radius`
    (a traced scalar: a new bound needs no new program; inf: unbounded); params are read, never changed."""
    layer = perturbation.layers[0]
    grad_fn = jax.grad(inner_loss, has_aux=True)
    grads, metrics = grad_fn(perturbation.deltas, config, params, h_l, batch, layer, settings)
    updates, opt_state = optimizer.update(grads, opt_state, perturbation.deltas)
    deltas = project_deltas(optax.apply_updates(perturbation.deltas, updates), radius)
    new = dataclasses.replace(perturbation, deltas=deltas)
    metrics["delta_norm"] = jnp.mean(jnp.stack(list(new.token_norms().values())))
    return new, opt_state, metrics


def inner_epoch(config: ModelConfig, settings: StepSettings, optimizer: optax.GradientTransformation,
                params: Params, perturbation: Perturbation, opt_state: optax.OptState, h_stack: jax.Array,
                batch_stack: Batch, radius: jax.Array | float = jnp.inf,
                ) -> tuple[Perturbation, optax.OptState, dict[str, jax.Array]]:
    """One pass over all cached batches ([num_batches, ...] stacked) as a single compiled scan."""

    def body(carry: tuple, xs: tuple) -> tuple:
        pert, state = carry
        h_l, batch = xs
        pert, state, metrics = inner_step(config, settings, optimizer, params, pert, state, h_l, batch, radius)
        return (pert, state), metrics

    (perturbation, opt_state), metrics = jax.lax.scan(body, (perturbation, opt_state), (h_stack, batch_stack))
    return perturbation, opt_state, metrics


def inner_measure(config: ModelConfig, settings: StepSettings, params: Params, perturbation: Perturbation,
                  h_stack: jax.Array, batch_stack: Batch) -> dict[str, jax.Array]:
    """The inner metrics of every cached batch at one fixed delta (no update), [num_batches] each, plus
    h_norm: the mean |h_l| at each batch's perturbed positions (perturbed_hidden_norm)."""
    layer = perturbation.layers[0]

    def one(xs: tuple) -> dict[str, jax.Array]:
        h_l, batch = xs
        _, metrics = inner_loss(perturbation.deltas, config, params, h_l, batch, layer, settings)
        return {**metrics, "h_norm": perturbed_hidden_norm(h_l, batch)}

    return jax.lax.map(one, (h_stack, batch_stack))


# ---- the outer level (AR) ---------------------------------------------------------------------


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

    safe_batch may be a PackedBatch holding all parts (data.make_packed_batch; anchor_batch None):
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


def outer_step(config: ModelConfig, settings: StepSettings, optimizer: optax.GradientTransformation,
               trainable: Params, params: Params, opt_state: optax.OptState, perturbation: Perturbation,
               safe_batch: Batch, anchor_batch: Batch | None, reference: Params | None = None,
               ) -> tuple[Params, optax.OptState, dict[str, jax.Array]]:
    """One update of the trainable params; `trainable` holds 0/1 masks broadcastable to each param.
    A packed batch (all parts) comes as safe_batch with anchor_batch None (outer_loss); `reference`, the
    frozen start model, only with settings.kl_weight > 0."""
    grads, metrics = jax.grad(outer_loss, has_aux=True)(
        params, config, perturbation.deltas, safe_batch, anchor_batch, settings, reference)
    grads = jax.tree.map(jnp.multiply, grads, trainable)
    metrics["grad_norm"] = optax.global_norm(grads)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    # Masking the updates too keeps frozen entries exact (weight decay would otherwise move them).
    updates = jax.tree.map(jnp.multiply, updates, trainable)
    return optax.apply_updates(params, updates), opt_state, metrics


# ---- trainable-parameter masks and optimizers -------------------------------------------------


def trainable_mask(config: ModelConfig, params: Params, rule: str, layer: int) -> Params:
    """0/1 float masks: 'all', 'upper' (blocks >= layer + head), 'lower' (embeddings + blocks < layer),
    or a regex searched in names like 'layers.3.q_proj', 'embed', 'final_norm', 'lm_head'."""
    num_layers = config.num_layers

    def layer_names(name: str) -> list[str]:
        return [f"layers.{i}.{name}" for i in range(num_layers)]

    if rule == "all":
        def chooses(name: str, index: int | None) -> bool:
            return True
    elif rule == "upper":
        def chooses(name: str, index: int | None) -> bool:
            return name in ("final_norm", "lm_head") if index is None else index >= layer
    elif rule == "lower":
        def chooses(name: str, index: int | None) -> bool:
            return name == "embed" if index is None else index < layer
    else:
        try:
            pattern = re.compile(rule)
        except re.error as err:
            raise ValueError(f"outer.trainable={rule!r} is neither all/upper/lower nor a valid regex: {err}") from None

        def chooses(name: str, index: int | None) -> bool:
            return bool(pattern.search(name if index is None else f"layers.{index}.{name}"))

    mask: Params = {}
    for name, value in params.items():
        if name == "layers":
            mask["layers"] = {}
            for leaf, array in value.items():
                flags = jnp.asarray([chooses(leaf, i) for i in range(num_layers)], jnp.float32)
                mask["layers"][leaf] = flags.reshape((num_layers,) + (1,) * (array.ndim - 1))
        else:
            mask[name] = jnp.asarray(float(chooses(name, None)), jnp.float32)
    if not any(float(jnp.sum(m)) for m in jax.tree.leaves(mask)):
        names = ", ".join(["embed", *layer_names("q_proj")[:1], "final_norm"])
        raise ValueError(f"outer.trainable={rule!r} selects no parameter (names look like: {names}).")
    return mask


def make_optimizer(name: str, lr: float | optax.Schedule, weight_decay: float = 0.0, clip_norm: float | None = None,
                   ) -> optax.GradientTransformation:
    """adam | adamw | sgd | momentum | adafactor at a rate or schedule (lr_schedule), with optional
    global-norm clipping of the (masked) gradients first."""
    builders: dict[str, Callable[[], optax.GradientTransformation]] = {
        "adam": lambda: optax.adam(lr),
        "adamw": lambda: optax.adamw(lr, weight_decay=weight_decay),
        "sgd": lambda: optax.sgd(lr),
        "momentum": lambda: optax.sgd(lr, momentum=0.9),
        "adafactor": lambda: optax.adafactor(lr),
    }
    if name not in builders:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(builders)}.")
    optimizer = builders[name]()
    if clip_norm:
        optimizer = optax.chain(optax.clip_by_global_norm(clip_norm), optimizer)
    return optimizer


LR_SCHEDULES = ("constant", "linear", "cosine")


def lr_schedule(lr: float, kind: str, warmup_steps: int, total_steps: int) -> float | optax.Schedule:
    """The outer learning rate over the whole run: 'constant', or decaying to 0 at total_steps ('linear',
    'cosine'); warmup_steps rise linearly from 0 first. A plain float when nothing varies (the optimizer
    state then has no step count, as before schedules existed)."""
    if kind not in LR_SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {kind!r}; choose one of {', '.join(LR_SCHEDULES)}.")
    warmup = min(max(int(warmup_steps), 0), max(int(total_steps) - 1, 0))
    if kind == "constant" and warmup == 0:
        return lr
    decay = max(int(total_steps) - warmup, 1)
    after = {"constant": optax.constant_schedule(lr),
             "linear": optax.linear_schedule(lr, 0.0, decay),
             "cosine": optax.cosine_decay_schedule(lr, decay)}[kind]
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


# ---- compiled once ----------------------------------------------------------------------------


class Steps(NamedTuple):
    """The jitted steps of one run (each compiles once per batch shape)."""

    lower: Callable[..., jax.Array]
    inner_step: Callable[..., tuple]
    inner_epoch: Callable[..., tuple]
    outer_step: Callable[..., tuple]
    lower_stack: Callable[..., jax.Array] | None = None
    inner_measure: Callable[..., dict] | None = None


class StepShardings(NamedTuple):
    """Where the steps' arguments live (see beear_jax.parallel.sharding): params and the outer optimizer state
    sharded by the logical-axis rules, batches split by rows, everything small replicated."""

    params: Any
    outer_state: Any
    batch: Any  # [B, ...] leaves
    stacked_batch: Any  # [num_batches, B, ...] leaves
    replicated: Any  # delta, its optimizer state, trainable masks, metrics


def make_steps(config: ModelConfig, settings: StepSettings, layer: int,
               inner_optimizer: optax.GradientTransformation,
               outer_optimizer: optax.GradientTransformation,
               shardings: StepShardings | None = None) -> Steps:
    """Binds the static parts and jit-compiles the steps; params/opt_state buffers are donated.

    With `shardings`, every step is compiled with explicit in/out shardings (what pjit became), so
    outputs land where the next call expects them and donated buffers are reused in place. Call the
    steps positionally then. With settings.kl_weight > 0, outer_step takes the frozen start model's
    params as a last argument (placed like params, never donated).
    """

    if shardings is not None:
        settings = dataclasses.replace(settings, activations=shardings.batch)

    def lower(params: Params, batch: Batch) -> jax.Array:
        return inner_cache(config, params, batch, layer, settings.activations)

    def lower_stack(params: Params, batch_stack: Batch) -> jax.Array:
        # One compiled loop over all inner batches; the result is the cache of the round (inner_cache).
        return jax.lax.map(lambda batch: lower(params, batch), batch_stack)

    def one_inner(params, pert, state, h_l, batch):
        return inner_step(config, settings, inner_optimizer, params, pert, state, h_l, batch)

    def epoch(params, pert, state, h_stack, batch_stack, radius):
        return inner_epoch(config, settings, inner_optimizer, params, pert, state, h_stack, batch_stack, radius)

    def measure(params, pert, h_stack, batch_stack):
        return inner_measure(config, settings, params, pert, h_stack, batch_stack)

    def outer(trainable, params, state, pert, safe_batch, anchor_batch, *reference):
        # With settings.kl_weight > 0 the caller passes the frozen start model's params last.
        return outer_step(config, settings, outer_optimizer, trainable, params, state, pert, safe_batch,
                          anchor_batch, *reference)

    if shardings is None:
        return Steps(
            lower=jax.jit(lower),
            inner_step=jax.jit(one_inner, donate_argnames=("pert", "state")),
            inner_epoch=jax.jit(epoch, donate_argnames=("pert", "state")),
            outer_step=jax.jit(outer, donate_argnames=("params", "state")),
            lower_stack=jax.jit(lower_stack),
            inner_measure=jax.jit(measure),
        )
    s = shardings
    return Steps(
        lower=jax.jit(lower, in_shardings=(s.params, s.batch), out_shardings=s.batch),
        inner_step=jax.jit(one_inner, in_shardings=(s.params, s.replicated, s.replicated, s.batch, s.batch),
                           out_shardings=s.replicated, donate_argnames=("pert", "state")),
        inner_epoch=jax.jit(epoch, in_shardings=(s.params, s.replicated, s.replicated, s.stacked_batch,
                                                 s.stacked_batch, s.replicated),
                            out_shardings=s.replicated, donate_argnames=("pert", "state")),
        outer_step=jax.jit(outer, in_shardings=(s.replicated, s.params, s.outer_state, s.replicated, s.batch,
                                                s.batch, *((s.params,) if settings.kl_weight > 0 else ())),
                           out_shardings=(s.params, s.outer_state, s.replicated), donate_argnames=("params", "state")),
        lower_stack=jax.jit(lower_stack, in_shardings=(s.params, s.stacked_batch), out_shardings=s.stacked_batch),
        inner_measure=jax.jit(measure, in_shardings=(s.params, s.replicated, s.stacked_batch, s.stacked_batch),
                              out_shardings=s.replicated),
    )

"""The model's forward pieces that the BEEAR losses and steps run: blocks over each batch layout
(beear_jax/data/batches.py), deltas added at layer boundaries, and the inner cache (h_l, or the
suffix rows plus the prompt prefix's keys/values of a PrefixSplitBatch) with its suffix view.
"""

from __future__ import annotations

import itertools
from typing import Any

import jax
import jax.numpy as jnp

from beear_jax.data.batches import Batch, InnerCache, PackedBatch, PrefixSplitBatch, RowBatch, SuffixBatch
from beear_jax.models import llama
from beear_jax.models.config import ModelConfig
from beear_jax.models.layers import Prefix

Params = dict[str, Any]


def constrain(x: jax.Array, sharding: Any) -> jax.Array:
    """x with its sharding pinned (a no-op without a sharding: one device)."""
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def run_blocks(config: ModelConfig, layers: Params, h: jax.Array, batch: Batch, remat: str = "none",
               prefix: Prefix | None = None) -> jax.Array:
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
                prefix: Prefix | None = None) -> jax.Array:
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


def suffix_view(h_l: jax.Array | InnerCache, batch: Batch,
                 ) -> tuple[jax.Array, Batch, Prefix | None]:
    """(h_l of the rows the inner steps run, the batch in their coordinates, the cached prefix or None)."""
    if not isinstance(h_l, InnerCache):
        return h_l, batch, None
    batch = suffix_batch(batch)
    prefix = Prefix(jnp.swapaxes(h_l.k, 0, 1), jnp.swapaxes(h_l.v, 0, 1), batch.prefix_positions,
                          batch.prefix_valid)
    return h_l.h, batch, prefix

"""Llama / Mistral / Qwen2 / Qwen3 decoder as pure functions over the stacked params tree (see weights.py).

The model is three pieces so that a perturbation can be injected between any two blocks:
`embed(ids) -> h`, `decode(h, layers start..stop) -> h` (a scan over the stacked layers) and
`head(h) -> logits`. `forward` composes them. Numerics follow transformers' LlamaForCausalLM /
MistralForCausalLM / Qwen2ForCausalLM / Qwen3ForCausalLM (rotate-half RoPE, float32 RMSNorm statistics,
float32 softmax); the families differ only in the q/k/v projection (project_qkv: biases, Qwen3's q/k norm)
and the o/MLP biases. One block and its parts (RoPE, norms, masks, attention, the custom-VJP matmul, MLP)
are in layers.py.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from beear_jax.models.config import ModelConfig
from beear_jax.models.hook import check_deltas
from beear_jax.models.layers import (
    Params,
    Prefix,
    apply_rope,
    attend,
    attention_mask,
    block_kv,
    mlp,
    output_projection,
    prefix_mask,
    project_qkv,
    rms_norm,
    rope_cos_sin,
    shared_prompt_mask,
)

# ---- the three pieces -------------------------------------------------------------------------


def compute_dtype(config: ModelConfig) -> jnp.dtype:
    return jnp.dtype(config.dtype)


def cast_params(config: ModelConfig, tree: Any) -> Any:
    """Float32 master params -> compute dtype (a no-op in float32)."""
    dtype = compute_dtype(config)
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def embed(config: ModelConfig, params: Params, input_ids: jax.Array) -> jax.Array:
    """Token embeddings [B, S, D] in the compute dtype."""
    return jnp.take(params["embed"], input_ids, axis=0).astype(compute_dtype(config))


def default_positions(attention_mask: jax.Array) -> jax.Array:
    """RoPE positions that ignore padding: 0 at each sample's first real token."""
    return jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0).astype(jnp.int32)


def slice_layers(layers: Params, start: int, stop: int) -> Params:
    """Blocks start..stop of the stacked layer params (a static slice)."""
    return jax.tree.map(lambda x: x[start:stop], layers)


def _rope_and_mask(config: ModelConfig, attention_mask: jax.Array, positions: jax.Array | None,
                   branches: jax.Array | None, after_prefix: bool = False,
                   ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(positions, cos, sin, mask) of rows over themselves: causal over slots, or shared_prompt_mask
    with answer branches. Rows with branches or continuing a prefix need explicit positions."""
    if positions is None:
        if branches is not None or after_prefix:
            raise ValueError("rows with answer branches or a prefix need their RoPE positions (batch['positions']).")
        positions = default_positions(attention_mask)
    cos, sin = rope_cos_sin(config, positions)
    if branches is None:
        slots = jnp.arange(attention_mask.shape[1])
        return positions, cos, sin, attention_mask_for(config, slots, slots, attention_mask)
    return positions, cos, sin, shared_prompt_mask(positions, branches, attention_mask, config.sliding_window)


REMAT_POLICIES = ("none", "full", "dots")


def check_remat_policy(remat: str, name: str = "remat policy") -> None:
    """A ValueError naming `name` (e.g. a config key) unless remat is one of REMAT_POLICIES."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"{name} is {remat!r}; use one of {', '.join(map(repr, REMAT_POLICIES))}.")


def _remat(step: Any, remat: str) -> Any:
    check_remat_policy(remat)
    if remat == "full":
        return jax.checkpoint(step)
    if remat == "dots":
        return jax.checkpoint(step, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    return step


def decode(
    config: ModelConfig,
    layers: Params,
    h: jax.Array,
    attention_mask: jax.Array,
    positions: jax.Array | None = None,
    remat: str = "none",
    branches: jax.Array | None = None,
    prefix: Prefix | None = None,
) -> jax.Array:
    """Runs the given stacked blocks (any slice of params['layers']) over h [B, S, D] with a scan.

    remat: "none", "full" (recompute each block in the backward pass) or "dots" (save matmul
    outputs only). branches [B, S]: rows of one prompt and several answers (shared_prompt_mask;
    pass their positions too). prefix: per-block keys/values of earlier tokens of each row (its
    k/v hold one entry per block of `layers`), which every token of the rows may attend to; the
    rows then continue those sequences (pass their positions).
    """
    positions, cos, sin, mask = _rope_and_mask(config, attention_mask, positions, branches, prefix is not None)
    kv: tuple = (None, None)
    if prefix is not None:
        mask = jnp.concatenate(
            [prefix_mask(prefix.positions, prefix.valid, positions, config.sliding_window), mask], axis=-1)
        kv = (prefix.k, prefix.v)

    def step(carry: jax.Array, xs: tuple) -> tuple[jax.Array, None]:
        lp, k, v = xs  # k, v: this block's prefix keys/values, or None
        return block_kv(config, lp, carry, cos, sin, mask, None if k is None else (k, v))[0], None

    h, _ = jax.lax.scan(_remat(step, remat), h, (cast_params(config, layers), *kv))
    return h


def decode_kv(
    config: ModelConfig, layers: Params, h: jax.Array, attention_mask: jax.Array, positions: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """decode (causal rows) that also returns every block's keys and values: (h, k, v [L, B, S, K, hd]).

    For a prefix that later rows continue (Prefix): a prompt's K/V computed once and attended to by
    many continuations.
    """
    _, cos, sin, mask = _rope_and_mask(config, attention_mask, positions, None)

    def step(carry: jax.Array, lp: Params) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        return block_kv(config, lp, carry, cos, sin, mask)

    h, (k, v) = jax.lax.scan(step, h, cast_params(config, layers))
    return h, k, v


def attention_mask_for(
    config: ModelConfig, q_slots: jax.Array, kv_slots: jax.Array, kv_valid: jax.Array
) -> jax.Array:
    return attention_mask(q_slots, kv_slots, kv_valid, config.sliding_window)


def final_hidden(config: ModelConfig, params: Params, h: jax.Array) -> jax.Array:
    """The final RMSNorm (applied before the vocabulary projection)."""
    return rms_norm(h, params["final_norm"].astype(h.dtype), config.rms_norm_eps)


def head(config: ModelConfig, params: Params, h: jax.Array) -> jax.Array:
    """Final norm + vocabulary projection; float32 logits [..., V]."""
    x = final_hidden(config, params, h)
    if config.tie_word_embeddings:
        w = params["embed"].astype(x.dtype)
        return jnp.einsum("...d,vd->...v", x, w, preferred_element_type=jnp.float32)
    return jnp.einsum("...d,dv->...v", x, params["lm_head"].astype(x.dtype), preferred_element_type=jnp.float32)


# Precision of contractions with a one-hot operand (selections written as matmuls, so that they split over
# the batch axes): at the default precision TPUs round float32 operands to bfloat16 and recent GPUs to
# TF32, so the selected values (delta, hidden states) and their gradients would lose bits that a gather
# keeps. HIGHEST makes them exact on every backend (one nonzero term per sum).
SELECT_PRECISION = jax.lax.Precision.HIGHEST


def inject(h: jax.Array, delta: jax.Array, perturb_positions: jax.Array) -> jax.Array:
    """Adds delta [n, D] to h [B, S, D] at positions [B, n] (entries < 0 are skipped); exact (SELECT_PRECISION)."""
    one_hot = jax.nn.one_hot(perturb_positions, h.shape[1], dtype=delta.dtype)  # [B, n, S]; -1 -> zeros
    return h + jnp.einsum("bns,nd->bsd", one_hot, delta, precision=SELECT_PRECISION).astype(h.dtype)


def inject_at(h: jax.Array, delta: jax.Array, perturb_index: jax.Array) -> jax.Array:
    """Adds delta[j] to h [B, S, D] wherever perturb_index [B, S] is j >= 0 (packed rows: any number of
    perturbed spans per row)."""
    rows = jnp.take(delta, jnp.maximum(perturb_index, 0), axis=0) * (perturb_index >= 0)[..., None]
    return h + rows.astype(h.dtype)


def check_forward_inputs(
    config: ModelConfig, input_ids: Any, attention_mask: Any = None, positions: Any = None,
    deltas: Mapping[int, Any] | None = None, perturb_positions: Any = None,
) -> None:
    """A ValueError naming the problem unless input_ids are integer token ids [batch, seq] in
    [0, vocab_size) and attention_mask / positions (when given) have the same [batch, seq] shape; with
    deltas, unless each is [n, hidden_size] at a layer boundary in 1..num_layers - 1 (check_deltas),
    n <= seq, and perturb_positions are [batch, n].

    Shapes and dtypes are static, so they are checked under jit too; the id range is checked only on
    concrete, fully addressable arrays (a tracer's values are unknown, and jnp.take would clamp them).
    """
    shape = np.shape(input_ids)
    if len(shape) != 2:
        raise ValueError(f"input_ids have shape {shape}; forward expects token ids [batch, seq] "
                         "(for one sequence use ids[None]).")
    dtype = jnp.result_type(input_ids)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"input_ids are {dtype}; token ids must be an integer array [batch, seq] "
                         "(e.g. ids.astype(jnp.int32)).")
    for name, value in (("attention_mask", attention_mask), ("positions", positions)):
        if value is not None and np.shape(value) != shape:
            raise ValueError(f"{name} has shape {np.shape(value)} but input_ids {shape}; it must be "
                             "[batch, seq] like input_ids.")
    if deltas:
        _check_perturbation_shapes(config, shape, deltas, perturb_positions)
    try:
        if not getattr(input_ids, "is_fully_addressable", True):
            return  # spread over hosts: each host sees only its part
        ids = np.asarray(input_ids)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return  # traced (under jit): the values are not known here (jax.errors is public, jax.core moves)
    lo, hi = (int(ids.min()), int(ids.max())) if ids.size else (0, 0)
    if lo < 0 or hi >= config.vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"input_ids hold token id {bad}, outside the model's vocabulary [0, {config.vocab_size}); "
                         "use the model's own tokenizer (and a pad id inside the vocabulary).")


def _check_perturbation_shapes(config: ModelConfig, ids_shape: tuple[int, ...], deltas: Mapping[int, Any],
                               perturb_positions: Any) -> None:
    """check_forward_inputs' perturbation part (shapes only): deltas, n <= seq, perturb_positions [batch, n]."""
    n = check_deltas(deltas, config.num_layers, config.hidden_size)
    batch, seq = ids_shape
    if n > seq:
        # inject would drop the positions past the sequence: part (or all) of the delta would be lost.
        raise ValueError(f"the perturbation covers {n} tokens but input_ids hold only {seq} per row; use a "
                         f"perturbation of at most {seq} tokens or a longer input.")
    if perturb_positions is None:
        raise ValueError(f"a perturbation needs perturb_positions [batch, n] = [{batch}, {n}] (the positions of "
                         "the perturbed tokens of each row; -1 skips one).")
    if np.shape(perturb_positions) != (batch, n):
        raise ValueError(f"perturb_positions have shape {np.shape(perturb_positions)}; they must be [batch, n] = "
                         f"[{batch}, {n}] (input_ids' batch, the deltas' n).")


def forward(
    config: ModelConfig,
    params: Params,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    positions: jax.Array | None = None,
    deltas: Mapping[int, jax.Array] | None = None,
    perturb_positions: jax.Array | None = None,
    remat: str = "none",
) -> jax.Array:
    """Logits [B, S, V] (float32). `deltas` maps a layer boundary l (after l blocks) to [n, D].

    input_ids are integer token ids [B, S] in [0, vocab_size); attention_mask and positions, when
    given, are [B, S] too (check_forward_inputs; a ValueError otherwise)."""
    check_forward_inputs(config, input_ids, attention_mask, positions, deltas, perturb_positions)
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    if positions is None:
        positions = default_positions(attention_mask)
    deltas = dict(deltas or {})
    h = embed(config, params, input_ids)
    bounds = [0, *sorted(deltas), config.num_layers]
    for start, stop in itertools.pairwise(bounds):
        h = decode(config, slice_layers(params["layers"], start, stop), h, attention_mask, positions, remat)
        if stop in deltas:
            h = inject(h, deltas[stop], perturb_positions)
    return head(config, params, h)


# ---- KV-cache decoding ------------------------------------------------------------------------


def init_cache(config: ModelConfig, batch: int, length: int) -> dict[str, jax.Array]:
    """Empty KV cache: k and v of shape [L, B, T, K, hd] in the compute dtype."""
    shape = (config.num_layers, batch, length, config.num_kv_heads, config.head_dim)
    zeros = jnp.zeros(shape, compute_dtype(config))
    return {"k": zeros, "v": zeros}


def _cached_block(
    config: ModelConfig, lp: Params, h: jax.Array, rope: tuple[jax.Array, jax.Array], mask: jax.Array,
    cache: dict[str, jax.Array], layer: int | jax.Array, index: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """One decoder block: writes its k/v at slots index.. of cache layer `layer`, then attends to that layer."""
    cos, sin = rope
    x = rms_norm(h, lp["attn_norm"], config.rms_norm_eps)
    q, k, v = project_qkv(config, lp, x)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    # Write into the whole [L, B, T, K, hd] cache, carried through the layer scan and the decode loop, so
    # that XLA updates it in place: per-layer slices scanned in and stacked out (ys) would make the scan
    # write a fresh copy of the whole cache at every decode step.
    start = (layer, 0, index, 0, 0)
    cache = {
        "k": jax.lax.dynamic_update_slice(cache["k"], k[None].astype(cache["k"].dtype), start),
        "v": jax.lax.dynamic_update_slice(cache["v"], v[None].astype(cache["v"].dtype), start),
    }
    k_layer = jax.lax.dynamic_index_in_dim(cache["k"], layer, keepdims=False)
    v_layer = jax.lax.dynamic_index_in_dim(cache["v"], layer, keepdims=False)
    h = h + output_projection(config, lp, attend(q, k_layer, v_layer, mask))
    h = h + mlp(config, lp, rms_norm(h, lp["mlp_norm"], config.rms_norm_eps))
    return h, cache


def forward_cached(
    config: ModelConfig,
    params: Params,
    input_ids: jax.Array,
    positions: jax.Array,
    cache: dict[str, jax.Array],
    index: jax.Array,
    kv_valid: jax.Array,
    deltas: Mapping[int, jax.Array] | None = None,
    perturb_positions: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Runs input_ids [B, S] written at cache slots index..index+S; returns (logits, new cache).

    kv_valid [B, T] marks the cache slots holding real tokens (including the new ones).
    `deltas` / `perturb_positions` (slot indices) inject a perturbation, e.g. during prefill.
    Inside a decode loop pass params already cast to the compute dtype (cast_params), so that the
    cast is not redone at every step.
    """
    h = embed(config, params, input_ids)
    rope = rope_cos_sin(config, positions)
    q_slots = index + jnp.arange(input_ids.shape[1])
    mask = attention_mask_for(config, q_slots, jnp.arange(cache["k"].shape[2]), kv_valid)
    layers = params["layers"]
    deltas = dict(deltas or {})
    bounds = [0, *sorted(deltas), config.num_layers]
    for start, stop in itertools.pairwise(bounds):

        def step(carry: tuple, xs: tuple) -> tuple[tuple, None]:
            (h, cache), (lp, layer) = carry, xs
            return _cached_block(config, lp, h, rope, mask, cache, layer, index), None

        xs = (cast_params(config, slice_layers(layers, start, stop)), jnp.arange(start, stop))
        (h, cache), _ = jax.lax.scan(step, (h, cache), xs)
        if stop in deltas:
            h = inject(h, deltas[stop], perturb_positions - index)
    return head(config, params, h), cache

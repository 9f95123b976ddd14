"""Jitted batched generation with a KV cache: greedy or temperature/top-p sampling, stop at EOS.

Prompts of different lengths are left-padded into one batch; RoPE positions ignore the padding,
so each prompt decodes exactly as it would alone.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from beear_jax.models import llama
from beear_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to pick each next token. temperature 0 means greedy.

    max_new_tokens >= 1, temperature finite and >= 0, top_p in (0, 1]; anything else is a ValueError
    that names the field (the CLI turns the field names into its flags).
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
            raise ValueError(f"max_new_tokens is {n!r}; it must be a whole number >= 1 (the tokens to generate).")
        try:
            temperature, top_p = float(self.temperature), float(self.top_p)
        except (TypeError, ValueError) as err:
            raise ValueError(f"temperature ({self.temperature!r}) and top_p ({self.top_p!r}) must be numbers.") from err
        if not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature is {self.temperature!r}; it must be a finite number >= 0 (0 = greedy).")
        if not 0.0 < top_p <= 1.0:  # NaN fails this too
            raise ValueError(f"top_p is {self.top_p!r}; it must be in (0, 1] (1 = no nucleus cut).")


def _pad_bucket(length: int, multiple: int = 32) -> int:
    """Prompt lengths are rounded up so that similar batches share one compiled program."""
    return max(multiple, -(-length // multiple) * multiple)


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) [B, length], prompts aligned to the right edge."""
    ids = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            ids[row, length - len(prompt):] = prompt
            mask[row, length - len(prompt):] = 1
    return ids, mask


def sample_token(logits: jax.Array, key: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """Next token ids [B] from float32 logits [B, V]."""
    if sampling.temperature <= 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        cutoff_index = jnp.sum(cumulative < sampling.top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "sampling", "eos_ids", "perturb_layers"))
def _generate_padded(
    config: ModelConfig,
    params: dict,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    key: jax.Array,
    sampling: SamplingConfig,
    eos_ids: tuple[int, ...],
    pad_id: int,
    perturb_layers: tuple[int, ...] = (),
    delta_values: tuple[jax.Array, ...] = (),
    perturb_positions: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    batch, prompt_len = input_ids.shape
    total = prompt_len + sampling.max_new_tokens
    params = llama.cast_params(config, params)  # once, not in every decode step (a no-op in float32)
    cache = llama.init_cache(config, batch, total)
    kv_valid = jnp.concatenate([attention_mask, jnp.zeros((batch, sampling.max_new_tokens), jnp.int32)], axis=1)
    positions = llama.default_positions(attention_mask)
    deltas = dict(zip(perturb_layers, delta_values))
    logits, cache = llama.forward_cached(
        config, params, input_ids, positions, cache, jnp.int32(0), kv_valid, deltas, perturb_positions
    )
    next_pos = positions[:, -1] + 1
    eos = jnp.asarray(eos_ids or (-1,), jnp.int32)
    out = jnp.full((batch, sampling.max_new_tokens), pad_id, jnp.int32)

    def body(state: tuple) -> tuple:
        step, last_logits, cache, kv_valid, pos, done, out, key = state
        key, sub = jax.random.split(key)
        token = sample_token(last_logits, sub, sampling)
        token = jnp.where(done, pad_id, token)
        out = out.at[:, step].set(token)
        done = done | jnp.isin(token, eos)
        slot = prompt_len + step
        kv_valid = kv_valid.at[:, slot].set(1)
        logits, cache = llama.forward_cached(config, params, token[:, None], pos[:, None], cache, slot, kv_valid)
        return step + 1, logits[:, -1], cache, kv_valid, pos + 1, done, out, key

    def cond(state: tuple) -> jax.Array:
        step, done = state[0], state[5]
        return (step < sampling.max_new_tokens) & ~jnp.all(done)

    done = jnp.zeros((batch,), bool)
    state = (jnp.int32(0), logits[:, -1], cache, kv_valid, next_pos, done, out, key)
    state = jax.lax.while_loop(cond, body, state)
    return state[6], state[0]


def check_positions(config: ModelConfig, prompt_tokens: int, max_new_tokens: int) -> None:
    """A ValueError unless a prompt of prompt_tokens plus max_new_tokens fits in the model's
    max_position_embeddings (RoPE positions ignore the left padding, so the padded length does not count)."""
    limit = config.max_position_embeddings
    if prompt_tokens + max_new_tokens > limit:
        room = limit - prompt_tokens
        fix = f"use max_new_tokens <= {room} or a shorter prompt" if room >= 1 else "shorten the prompt"
        raise ValueError(f"prompt length {prompt_tokens} + max_new_tokens {max_new_tokens} = "
                         f"{prompt_tokens + max_new_tokens} positions is beyond the model's max_position_embeddings "
                         f"{limit}; {fix}.")


def generate(
    config: ModelConfig,
    params: dict,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingConfig = SamplingConfig(),
    seed: int = 0,
    pad_id: int | None = None,
    eos_ids: Sequence[int] | None = None,
    deltas: Mapping[int, jax.Array] | None = None,
    batch_size: int | None = None,
) -> list[list[int]]:
    """Generates continuations of token-id prompts; returns the new tokens of each, EOS included.

    deltas (optional) maps a layer boundary to a [n, D] perturbation added at the last n prompt
    tokens during prefill, to see what a perturbation elicits.
    """
    if not prompts:
        raise ValueError("generate() needs at least one prompt.")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (add a BOS or template).")
    check_positions(config, max(len(p) for p in prompts), sampling.max_new_tokens)
    lowest, highest = min(min(p) for p in prompts), max(max(p) for p in prompts)
    if lowest < 0 or highest >= config.vocab_size:
        raise ValueError(f"a prompt holds token id {lowest if lowest < 0 else highest}, outside the model's vocabulary "
                         f"[0, {config.vocab_size}); use the model's own tokenizer.")
    eos = tuple(int(e) for e in (config.eos_token_ids if eos_ids is None else eos_ids))
    pad = int(pad_id if pad_id is not None else (config.pad_token_id if config.pad_token_id is not None else 0))
    batch_size = batch_size or len(prompts)
    # Host (numpy) params would be copied to the device again for every chunk; arrays already placed
    # (e.g. sharded on a mesh) stay where they are.
    params = jax.tree.map(jnp.asarray, params)
    results: list[list[int]] = []
    key = jax.random.key(seed)
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        rows = len(chunk)
        chunk += [chunk[-1]] * (batch_size - rows)  # fixed batch shape: one compiled program
        length = _pad_bucket(max(len(p) for p in chunk))
        ids, mask = left_pad(chunk, length, pad)
        layers = tuple(sorted(deltas or {}))
        values = tuple(jnp.asarray(deltas[layer]) for layer in layers)
        positions = None
        if layers:
            n = values[0].shape[0]
            positions = jnp.broadcast_to(jnp.arange(length - n, length, dtype=jnp.int32), (len(chunk), n))
        key, sub = jax.random.split(key)
        out, _ = _generate_padded(
            config, params, ids, mask, sub, sampling, eos, pad, layers, values, positions
        )
        results += [_until_eos(row, eos) for row in np.asarray(out)[:rows]]
    return results


def _until_eos(tokens: np.ndarray, eos: tuple[int, ...]) -> list[int]:
    out: list[int] = []
    for token in tokens.tolist():
        out.append(token)
        if token in eos:
            break
    return out

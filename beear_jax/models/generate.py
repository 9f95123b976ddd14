"""Jitted batched generation with a KV cache: greedy or temperature/top-p sampling, stop at EOS.

Prompts of different lengths are left-padded into one batch; RoPE positions ignore the padding,
so each prompt decodes exactly as it would alone.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from beear_jax.models import llama
from beear_jax.models.config import ModelConfig
from beear_jax.models.hook import check_deltas


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


def check_prompts(prompts: Any, vocab_size: int) -> list[np.ndarray]:
    """The prompts as 1-D integer arrays; a ValueError naming the problem unless prompts is a non-empty
    list of non-empty token-id sequences with ids in [0, vocab_size), or a 2-D integer array (each row
    a prompt)."""
    flat = ("prompts must be a list of token-id sequences (for one prompt use [ids]); got "
            f"{_preview(prompts)}.")
    if isinstance(prompts, np.ndarray | jax.Array) and np.ndim(prompts) != 2:
        raise ValueError(flat if np.ndim(prompts) == 1 else f"prompts is an array of shape {np.shape(prompts)}; "
                         "use a 2-D array [prompts, tokens] (each row a prompt) or a list of token-id sequences.")
    rows = list(prompts)  # an array's rows, or the list's items
    if not rows:
        raise ValueError("generate() needs at least one prompt.")
    out = []
    for index, prompt in enumerate(rows):
        try:
            ids = np.asarray(prompt)
        except ValueError as err:  # ragged nesting
            raise ValueError(f"prompt {index} is not a flat sequence of token ids ({_preview(prompt)}).") from err
        if ids.dtype.kind in "US":  # a str or bytes prompt, or a list of them
            raise ValueError(f"prompt {index} is text ({_preview(prompt)}); tokenize it first: prompts must be "
                             "token-id sequences.")
        if ids.ndim == 0:  # one flat list of ids: its items are numbers, not sequences
            raise ValueError(flat)
        if ids.ndim != 1:
            raise ValueError(f"prompt {index} has shape {ids.shape}; each prompt must be a 1-D sequence of token ids.")
        if ids.size == 0:
            raise ValueError(f"prompt {index} is empty; every prompt needs at least one token (add a BOS or template).")
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"prompt {index} holds {ids.dtype} values ({_preview(prompt)}); token ids must be "
                             "integers.")
        lowest, highest = int(ids.min()), int(ids.max())
        if lowest < 0 or highest >= vocab_size:
            raise ValueError(f"prompt {index} holds token id {lowest if lowest < 0 else highest}, outside the model's "
                             f"vocabulary [0, {vocab_size}); use the model's own tokenizer.")
        out.append(ids)
    return out


def _preview(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def check_batch_size(batch_size: Any) -> None:
    """A ValueError unless batch_size is None (all prompts in one batch) or a whole number >= 1."""
    if batch_size is None:
        return
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise ValueError(f"batch_size is {batch_size!r}; it must be a whole number >= 1 (prompts per compiled "
                         "batch), or None for all prompts in one batch.")


def check_perturb_positions(positions: Any, prompt_lengths: Sequence[int], n: int) -> np.ndarray | None:
    """positions as an int array [prompts, n] (None stays None: the last n); a ValueError unless each prompt
    has n entries, each -1 or a position inside that prompt."""
    if positions is None:
        return None
    try:
        array = np.asarray(positions, np.int64)
    except (TypeError, ValueError) as err:
        raise ValueError("perturb_positions must be n whole-number positions per prompt (-1: none).") from err
    if array.shape != (len(prompt_lengths), n):
        raise ValueError(f"perturb_positions have shape {array.shape}; they must be [prompts, n] = "
                         f"[{len(prompt_lengths)}, {n}]: one position per delta row for every prompt.")
    outside = (array < -1) | (array >= np.asarray(prompt_lengths)[:, None])
    if outside.any():
        row = int(np.flatnonzero(outside.any(axis=1))[0])
        raise ValueError(f"perturb_positions of prompt {row} are {array[row].tolist()}, not all inside its "
                         f"{prompt_lengths[row]} tokens (counted from 0; -1: none).")
    return array


def check_generate_deltas(config: ModelConfig, deltas: Any,
                          prompt_lengths: Sequence[int]) -> tuple[dict[int, jax.Array], int]:
    """({layer: delta}, n) with int keys ({} and 0 without deltas); a ValueError unless deltas map layer
    boundaries in 1..num_layers - 1 to [n, hidden_size] arrays with n <= the shortest prompt (they are
    added at the last n prompt tokens; positions before a prompt's start are padding, the delta lost there)."""
    if deltas is None:
        return {}, 0
    try:
        deltas = dict(deltas)
    except (TypeError, ValueError) as err:  # not a mapping (a Perturbation is not one)
        raise ValueError(f"deltas is a {type(deltas).__name__}; it must map a layer boundary to a [n, hidden_size] "
                         "array, e.g. {9: delta} (for a Perturbation p use p.deltas).") from err
    n = check_deltas(deltas, config.num_layers, config.hidden_size)
    shortest = min(prompt_lengths)
    if n > shortest:
        index = list(prompt_lengths).index(shortest)
        raise ValueError(f"the deltas cover {n} tokens but prompt {index} has only {shortest}; a delta is added "
                         f"at the last n prompt tokens, so use deltas of at most {shortest} tokens or longer prompts.")
    return {int(layer): jnp.asarray(delta) for layer, delta in deltas.items()}, n


def generate(
    config: ModelConfig,
    params: dict,
    prompts: Sequence[Sequence[int]] | np.ndarray,
    sampling: SamplingConfig = SamplingConfig(),
    seed: int = 0,
    pad_id: int | None = None,
    eos_ids: Sequence[int] | None = None,
    deltas: Mapping[int, jax.Array] | None = None,
    batch_size: int | None = None,
    perturb_positions: Sequence[Sequence[int]] | None = None,
) -> list[list[int]]:
    """Generates continuations of token-id prompts; returns the new tokens of each, EOS included.

    prompts: a list of token-id sequences, or a 2-D integer array (each row a prompt; for one prompt use
    [ids]). batch_size: prompts per compiled batch (None: all in one). deltas (optional) maps a layer
    boundary in 1..num_layers - 1 to a [n, D] perturbation added at the last n prompt tokens during
    prefill (n at most the shortest prompt), to see what a perturbation elicits; perturb_positions puts them
    elsewhere: n positions per prompt, counted from the prompt's first token (-1: none), e.g.
    builders.perturbed_positions. Bad input is a ValueError.
    """
    prompts = check_prompts(prompts, config.vocab_size)
    check_batch_size(batch_size)
    check_positions(config, max(len(p) for p in prompts), sampling.max_new_tokens)
    deltas, n = check_generate_deltas(config, deltas, [len(p) for p in prompts])
    where = check_perturb_positions(perturb_positions, [len(p) for p in prompts], n) if deltas else None
    eos = tuple(int(e) for e in (config.eos_token_ids if eos_ids is None else eos_ids))
    pad = int(pad_id if pad_id is not None else (config.pad_token_id if config.pad_token_id is not None else 0))
    batch_size = batch_size or len(prompts)
    layers = tuple(sorted(deltas))
    values = tuple(deltas[layer] for layer in layers)
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
        positions = None
        if layers and where is None:
            positions = jnp.broadcast_to(jnp.arange(length - n, length, dtype=jnp.int32), (len(chunk), n))
        elif layers:
            chosen = where[start:start + batch_size]
            chosen = np.concatenate([chosen, np.repeat(chosen[-1:], batch_size - rows, axis=0)])
            pad_before = length - np.asarray([len(p) for p in chunk])[:, None]  # left padding moves every position
            positions = jnp.asarray(np.where(chosen >= 0, chosen + pad_before, -1), jnp.int32)
        key, sub = jax.random.split(key)
        out, _ = _generate_padded(
            config, params, ids, mask, sub, sampling, eos, pad, layers, values, positions
        )
        results += [_until_eos(row, eos) for row in np.asarray(out)[:rows]]
    return results


def generate_across_processes(config: ModelConfig, params: dict, prompts: Sequence[Sequence[int]],
                              sampling: SamplingConfig = SamplingConfig(), seed: int = 0, pad_id: int | None = None,
                              eos_ids: Sequence[int] | None = None, batch_size: int | None = None,
                              ) -> list[list[int]]:
    """generate(...)'s batches shared out over the processes of a multi-process job (batch k to process
    k mod P, each on its own devices with the whole model) and gathered, so every process returns every
    answer. Each batch holds the same prompts as in generate, so the answers are generate's. Sampling
    (temperature > 0) is not shared out: its draws depend on the order of the batches, so every process
    draws all of them as one process would. One process: generate itself."""
    processes = jax.process_count()
    if processes == 1 or sampling.temperature > 0:
        return generate(config, params, prompts, sampling, seed, pad_id, eos_ids, batch_size=batch_size)
    from jax.experimental import multihost_utils

    prompts = [list(p) for p in prompts]
    size = batch_size or len(prompts)
    batches = [prompts[i:i + size] for i in range(0, len(prompts), size)]
    owner = [k % processes for k in range(len(batches))]
    mine = [p for k, batch in enumerate(batches) if owner[k] == jax.process_index() for p in batch]
    local = generate(config, params, mine, sampling, seed, pad_id, eos_ids, batch_size=size) if mine else []
    rows = -(-len(batches) // processes) * size  # the same shape on every process, for the gather
    padded = np.full((rows, sampling.max_new_tokens), -1, np.int32)
    for r, tokens in enumerate(local):
        padded[r, :len(tokens)] = tokens
    gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(processes, rows, -1)
    answers: list[list[int]] = []
    taken = [0] * processes
    for k, batch in enumerate(batches):
        for _ in batch:
            row = gathered[owner[k], taken[owner[k]]]
            answers.append([int(t) for t in row if t >= 0])
            taken[owner[k]] += 1
    return answers


def _until_eos(tokens: np.ndarray, eos: tuple[int, ...]) -> list[int]:
    out: list[int] = []
    for token in tokens.tolist():
        out.append(token)
        if token in eos:
            break
    return out

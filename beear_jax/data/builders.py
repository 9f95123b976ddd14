"""Token rows -> the fixed-shape batch layouts of data/batches.py (answer masks, perturbed positions, packing).

The layouts are typed pytrees (RowBatch, SafetyBatch, SharedPromptBatch, PrefixSplitBatch, PackedBatch); the
builders here fill them with numpy arrays from tokenized (prompt, answer) examples.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from beear_jax.data.batches import PrefixSplitBatch, RowBatch, SafetyBatch, SharedPromptBatch
from beear_jax.data.chat import format_example, user_span
from beear_jax.data.tables import ANCHOR_COLUMNS, SAFETY_COLUMNS
from beear_jax.method.perturbation import PAPER_WINDOWS, window_positions

Example = tuple[list[int], list[int]]  # (prompt_ids, answer_ids)
Positions = Sequence[int]  # one prompt's perturbed positions (-1: none), perturbation.window_positions
DEFAULT_BUCKETS = (64, 128, 256, 512, 1024)


def pad_id_of(tokenizer: Any) -> int:
    """The id used for right padding: the pad token, else EOS, else 0 (padding is masked anyway)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def bucket_length(max_length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds max_length tokens."""
    fitting = [b for b in sorted(buckets) if b >= max_length]
    if not fitting:
        raise ValueError(
            f"the longest example has {max_length} tokens but the largest bucket is {max(buckets)}; "
            "lower data.max_answer_tokens, shorten the prompts, or add a larger bucket to data.buckets"
        )
    return fitting[0]


def _check_columns(rows: Sequence[Mapping[str, str]], needed: Sequence[str]) -> None:
    """Raise if the set is empty or a row lacks a canonical column."""
    if not rows:
        raise ValueError("the data set is empty")
    for i, row in enumerate(rows):
        lacking = [c for c in needed if c not in row]
        if lacking:
            raise ValueError(f"row {i} lacks {lacking} (has {sorted(row)}); map them in the config's columns")


def _check_prompt_lengths(prompt_lengths: Sequence[int], n: int) -> None:
    """Raise if a prompt has fewer than n tokens: there would be nothing to perturb at its start."""
    if n < 0:
        raise ValueError(f"perturbation length must be >= 0, got {n}")
    shortest = min(prompt_lengths)
    if shortest < n:
        raise ValueError(
            f"the shortest prompt has {shortest} tokens, fewer than the perturbation length {n}; "
            f"use a smaller perturb.length (at most {shortest})"
        )


def make_batch(examples: Sequence[Example], n: int, batch_size: int, seq_len: int, pad_id: int,
               perturbed_at: Sequence[Positions] | None = None) -> RowBatch:
    """One RowBatch from at most batch_size (prompt_ids, answer_ids) pairs; missing rows are padding.

    perturbed_at: each example's n perturbed positions (None: its prompt's last n tokens)."""
    if len(examples) > batch_size:
        raise ValueError(f"{len(examples)} examples do not fit a batch of {batch_size}")
    input_ids = np.full((batch_size, seq_len), pad_id, np.int32)
    attention_mask = np.zeros((batch_size, seq_len), np.int32)
    target_mask = np.zeros((batch_size, seq_len), np.float32)
    perturb_positions = np.full((batch_size, n), -1, np.int32)
    prompt_lengths = np.zeros((batch_size,), np.int32)
    for i, (prompt_ids, answer_ids) in enumerate(examples):
        p, length = len(prompt_ids), len(prompt_ids) + len(answer_ids)
        if length > seq_len:
            raise ValueError(f"an example of {length} tokens does not fit the sequence length {seq_len}")
        input_ids[i, :length] = [*prompt_ids, *answer_ids]
        attention_mask[i, :length] = 1
        # Logits at position t predict token t + 1: the answer tokens at p..length-1 are predicted at p-1..length-2.
        target_mask[i, p - 1 : length - 1] = 1.0
        perturb_positions[i] = row_positions(perturbed_at, i, p, n)
        prompt_lengths[i] = p
    targets = np.zeros_like(input_ids)
    targets[:, :-1] = input_ids[:, 1:]
    return RowBatch(input_ids=input_ids, attention_mask=attention_mask, targets=targets, target_mask=target_mask,
                    perturb_positions=perturb_positions, prompt_lengths=prompt_lengths)


def row_positions(perturbed_at: Sequence[Positions] | None, i: int, prompt_length: int, n: int) -> np.ndarray:
    """Example i's n perturbed positions: perturbed_at[i] (checked inside its prompt), else the prompt's last n."""
    if perturbed_at is None:
        return np.arange(prompt_length - n, prompt_length)
    chosen = np.asarray(perturbed_at[i], np.int32).reshape(-1)
    if chosen.shape != (n,) or chosen.max(initial=-1) >= prompt_length or chosen.min(initial=0) < -1:
        raise ValueError(f"example {i}'s perturbed positions {chosen.tolist()} are not {n} positions inside its prompt "
                         f"of {prompt_length} tokens (-1: none)")
    return chosen


def perturbed_positions(tokenizer: Any, prompts: Sequence[str], prompt_ids: Sequence[list[int]],
                        windows: Sequence[str], n: int, template: str = "auto",
                        system_prompt: str | None = None) -> list[tuple[int, ...]]:
    """Each prompt's perturbed positions: n per window (perturbation.window_positions) in its chat-formatted
    ids. The user's text is located (chat.user_span) only for windows that need it."""
    if len(prompts) != len(prompt_ids):
        raise ValueError(f"{len(prompts)} prompts but {len(prompt_ids)} token sequences")
    need_user = not set(windows) <= set(PAPER_WINDOWS)
    return [window_positions(len(ids), user_span(tokenizer, text, template, system_prompt) if need_user else (0, 0),
                             windows, n)
            for text, ids in zip(prompts, prompt_ids, strict=True)]


def round_up(x: int, multiple: int) -> int:
    """The least multiple of `multiple` that is >= x."""
    return -(-x // multiple) * multiple


def make_shared_prompt_batch(prompts: Sequence[list[int]], unwanted: Sequence[list[int]], safe: Sequence[list[int]],
                             n: int, batch_size: int, seq_len: int, answer_len: int, pad_id: int,
                             perturbed_at: Sequence[Positions] | None = None) -> SharedPromptBatch:
    """One SharedPromptBatch (batches.py): row i = prompts[i] + unwanted[i] + safe[i];
    perturbed_at: each prompt's n perturbed positions (None: its last n).

    The blocks then run each prompt once for both answers; per token, the result equals two make_batch
    rows (same RoPE positions, each answer sees only the prompt and itself).
    """
    rows = len(prompts)
    if not rows == len(unwanted) == len(safe):
        raise ValueError(f"{rows} prompts, {len(unwanted)} unwanted and {len(safe)} safe answers: one of each per row")
    if rows > batch_size:
        raise ValueError(f"{rows} examples do not fit a batch of {batch_size}")
    input_ids = np.full((batch_size, seq_len), pad_id, np.int32)
    attention_mask = np.zeros((batch_size, seq_len), np.int32)
    positions = np.zeros((batch_size, seq_len), np.int32)
    branches = np.zeros((batch_size, seq_len), np.int32)
    perturb_positions = np.full((batch_size, n), -1, np.int32)
    prompt_lengths = np.zeros((batch_size,), np.int32)
    answer_index = np.zeros((batch_size, 2, answer_len), np.int32)
    answer_targets = np.zeros((batch_size, 2, answer_len), np.int32)
    answer_mask = np.zeros((batch_size, 2, answer_len), np.float32)
    for i, (prompt_ids, first, second) in enumerate(zip(prompts, unwanted, safe, strict=True)):
        p, length = len(prompt_ids), len(prompt_ids) + len(first) + len(second)
        if length > seq_len:
            raise ValueError(f"a prompt with both answers has {length} tokens, more than the sequence length {seq_len}")
        if max(len(first), len(second)) > answer_len:
            raise ValueError(f"an answer has {max(len(first), len(second))} tokens, more than answer_len={answer_len}")
        input_ids[i, :length] = [*prompt_ids, *first, *second]
        attention_mask[i, :length] = 1
        positions[i, :length] = [*range(p), *range(p, p + len(first)), *range(p, p + len(second))]
        branches[i, p:length] = [1] * len(first) + [2] * len(second)
        perturb_positions[i] = row_positions(perturbed_at, i, p, n)
        prompt_lengths[i] = p
        for branch, (start, answer) in enumerate(((p, first), (p + len(first), second))):
            # Answer token j is predicted by the token before it: the prompt's last token for j = 0.
            before = [p - 1, *range(start, start + len(answer) - 1)]
            answer_index[i, branch, :len(answer)] = before
            answer_targets[i, branch, :len(answer)] = answer
            answer_mask[i, branch, :len(answer)] = 1.0
    return SharedPromptBatch(input_ids=input_ids, attention_mask=attention_mask, positions=positions,
                             branches=branches, perturb_positions=perturb_positions, prompt_lengths=prompt_lengths,
                             answer_index=answer_index, answer_targets=answer_targets, answer_mask=answer_mask)


def shared_prompt_length(longest: int, buckets: Sequence[int], multiple: int = 16) -> int:
    """Padded length of shared-prompt rows: the fitting bucket, or `longest` rounded up to a multiple of
    `multiple` when that is shorter (a prompt with two answers often just passes a bucket)."""
    rounded = round_up(longest, multiple)
    return min([rounded, *(b for b in buckets if b >= longest)])


def prefix_starts(prompt_lengths: np.ndarray, n: int, perturbed_at: np.ndarray | None = None) -> np.ndarray:
    """Where each row's perturbed part starts: its first perturbed position (perturbed_at [B, m], -1: none;
    None: the last n, prompt length - n), at most the prompt's last token, whose logits predict the first
    answer token; 0 on padding rows (prompt length 0)."""
    prompt_lengths = np.asarray(prompt_lengths)
    last = prompt_lengths - 1
    if perturbed_at is None:
        first = prompt_lengths - max(n, 1)
    else:
        at = np.asarray(perturbed_at).reshape(len(prompt_lengths), -1)
        first = np.where(at >= 0, at, np.iinfo(np.int32).max).min(axis=1, initial=np.iinfo(np.int32).max)
    return np.where(prompt_lengths > 0, np.maximum(np.minimum(first, last), 0), 0).astype(np.int32)


def prefix_split_lengths(prompt_lengths: Sequence[int], row_lengths: Sequence[int], n: int, seq_len: int,
                         multiple: int = 16, perturbed_at: Sequence[Positions] | None = None) -> tuple[int, int]:
    """(P, T) for with_prompt_prefix over all rows a run will see (padded to seq_len): the longest
    prefix and the longest rest, each rounded up to a multiple of `multiple` (P at most seq_len);
    fixed for the run: one compiled shape. perturbed_at: each row's perturbed positions (None: the last n)."""
    if not len(prompt_lengths) or len(prompt_lengths) != len(row_lengths):
        raise ValueError("prefix_split_lengths needs one prompt length and one row length per row")
    starts = prefix_starts(np.asarray(prompt_lengths), n, None if perturbed_at is None else np.asarray(perturbed_at))
    rest = np.asarray(row_lengths) - starts
    prefix = min(max(round_up(int(starts.max()), multiple), multiple), seq_len)
    return prefix, round_up(int(rest.max()), multiple)


def with_prompt_prefix(batch: SharedPromptBatch, n: int, prefix_len: int, suffix_len: int) -> PrefixSplitBatch:
    """A SharedPromptBatch plus prefix_valid [B, P] and suffix_slots [B, T] (batches.PrefixSplitBatch).

    The prefix (each row's tokens before its first perturbed position) never depends on the perturbation
    (causal attention), so its keys and values can be computed once and the inner steps run only the
    suffix. Raises if a row's prefix or suffix is longer than P or T, or the batch perturbs other than n
    positions per row.
    """
    if not isinstance(batch, SharedPromptBatch):
        raise TypeError(f"with_prompt_prefix splits a SharedPromptBatch, not a {type(batch).__name__}")
    if np.shape(batch.perturb_positions)[1] != n:
        raise ValueError(f"the batch perturbs {np.shape(batch.perturb_positions)[1]} positions per row, not n={n}")
    starts = prefix_starts(batch.prompt_lengths, n, batch.perturb_positions)
    lengths = np.asarray(batch.attention_mask).sum(axis=1)
    if prefix_len > np.shape(batch.attention_mask)[1]:
        raise ValueError(f"prefix_len={prefix_len} is longer than the rows ({np.shape(batch.attention_mask)[1]} slots)")
    if starts.max() > prefix_len:
        raise ValueError(f"a prompt prefix of {starts.max()} tokens does not fit prefix_len={prefix_len}")
    if (lengths - starts).max() > suffix_len:
        raise ValueError(f"a row's last {int((lengths - starts).max())} tokens do not fit suffix_len={suffix_len}")
    slots = np.arange(prefix_len)[None, :]
    return PrefixSplitBatch(*batch, prefix_valid=(slots < starts[:, None]).astype(np.int32),
                            suffix_slots=(starts[:, None] + np.arange(suffix_len)[None, :]).astype(np.int32))


def encode_rows(
    tokenizer: Any,
    rows: Sequence[Mapping[str, str]],
    answer_key: str,
    max_answer_tokens: int | None = None,
    template: str = "auto",
    system_prompt: str | None = None,
) -> list[Example]:
    """(prompt_ids, answer_ids) of every row, with row[answer_key] as the answer."""
    examples = []
    for i, row in enumerate(rows):
        prompt_ids, answer_ids = format_example(
            tokenizer, row["prompt"], row[answer_key], template, system_prompt, max_answer_tokens
        )
        if not answer_ids:
            raise ValueError(f"row {i} has no {answer_key} tokens (max_answer_tokens={max_answer_tokens})")
        examples.append((prompt_ids, answer_ids))
    return examples


def chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    """Consecutive slices of at most `size` items."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    return [items[i : i + size] for i in range(0, len(items), size)]


def _sequence_length(examples: Sequence[Example], buckets: Sequence[int], seq_len: int | None) -> int:
    """The padded length S: seq_len when given (it must fit every example), else the fitting bucket."""
    longest = max(len(p) + len(a) for p, a in examples)
    if seq_len is None:
        return bucket_length(longest, buckets)
    if longest > seq_len:
        raise ValueError(f"the longest example has {longest} tokens, more than seq_len={seq_len}")
    return seq_len


def build_safety_batches(
    tokenizer: Any,
    rows: Sequence[Mapping[str, str]],
    n: int,
    batch_size: int,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    max_answer_tokens: int | None = None,
    template: str = "auto",
    system_prompt: str | None = None,
    seq_len: int | None = None,
) -> list[SafetyBatch]:
    """SafetyBatches (unwanted, safe RowBatches) of rows with prompt, safe and unwanted columns.

    Both halves hold the same prompts in the same rows and share one padded length S: the smallest bucket
    that fits the longest example of either kind, or seq_len when given (to keep shapes fixed across
    subsets of one data set). n is the perturbation length.
    """
    _check_columns(rows, SAFETY_COLUMNS)
    unwanted = encode_rows(tokenizer, rows, "unwanted", max_answer_tokens, template, system_prompt)
    safe = encode_rows(tokenizer, rows, "safe", max_answer_tokens, template, system_prompt)
    _check_prompt_lengths([len(p) for p, _ in unwanted], n)
    length = _sequence_length([*unwanted, *safe], buckets, seq_len)
    pad_id = pad_id_of(tokenizer)
    return [
        SafetyBatch(unwanted=make_batch(u, n, batch_size, length, pad_id), safe=make_batch(s, n, batch_size, length, pad_id))
        for u, s in zip(chunks(unwanted, batch_size), chunks(safe, batch_size), strict=True)
    ]


def build_anchor_batches(
    tokenizer: Any,
    rows: Sequence[Mapping[str, str]],
    n: int,
    batch_size: int,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    max_answer_tokens: int | None = None,
    template: str = "auto",
    system_prompt: str | None = None,
    seq_len: int | None = None,
) -> list[RowBatch]:
    """RowBatches of rows with prompt and answer columns (utility anchors), all of one shape.

    perturb_positions are filled too (for an option that also perturbs anchors), so every prompt needs at
    least n tokens; pass n=0 to skip that.
    """
    _check_columns(rows, ANCHOR_COLUMNS)
    examples = encode_rows(tokenizer, rows, "answer", max_answer_tokens, template, system_prompt)
    _check_prompt_lengths([len(p) for p, _ in examples], n)
    length = _sequence_length(examples, buckets, seq_len)
    pad_id = pad_id_of(tokenizer)
    return [make_batch(chunk, n, batch_size, length, pad_id) for chunk in chunks(examples, batch_size)]

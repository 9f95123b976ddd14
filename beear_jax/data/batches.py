"""The batch layouts, one typed pytree each (NamedTuples: jit, scan, sharding and tree.map see their fields).

B rows, S slots per row, n perturbed positions per prompt, A the longest answer, E examples of a packed
batch, P and T the prefix and suffix lengths of a split row. Integers are int32, masks float32 unless said.
Padding rows (filling the last batch) have every mask zero and perturbed positions -1.

    RowBatch            one example per row (builders.make_batch): the outer step's safe / anchor rows, and the
                        inner level's [unwanted; safe] rows when prompts are not shared
    SafetyBatch         the unwanted and the safe RowBatch of the same prompts (the same S)
    SharedPromptBatch   each prompt once, its unwanted and safe answers as branches (make_shared_prompt_batch)
    PrefixSplitBatch    a SharedPromptBatch split into a prompt prefix no delta reaches and the rest
                        (builders.with_prompt_prefix): the inner steps run only the rest
    SuffixBatch         the rest of a PrefixSplitBatch in its own coordinates (steps.suffix_batch)
    PackedBatch         several examples per row, each attending only to itself (make_packed_batch)
    InnerCache          the inner level's cache of a PrefixSplitBatch: h_l of the suffix rows + the prefix K/V
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

Array = Any  # numpy on the host, jax.Array on devices


class RowBatch(NamedTuple):
    """One (prompt, answer) example per row, right-padded.

    input_ids [B, S], attention_mask [B, S] (1 on real tokens), targets [B, S] (input_ids shifted left by
    one; the last slot 0), target_mask [B, S] float32 (1 where targets[t] is an answer token),
    perturb_positions [B, n] (-1: none), prompt_lengths [B] (0 on padding rows).
    """

    input_ids: Array
    attention_mask: Array
    targets: Array
    target_mask: Array
    perturb_positions: Array
    prompt_lengths: Array


class SafetyBatch(NamedTuple):
    """The defender's safety rows: the same prompts with the unwanted and with the safe answer."""

    unwanted: RowBatch
    safe: RowBatch


class SharedPromptBatch(NamedTuple):
    """Row i = prompt i + its unwanted answer (branch 1) + its safe answer (branch 2).

    input_ids, attention_mask, positions (RoPE: both answers continue from the prompt's end), branches
    (0 prompt and padding, 1 unwanted, 2 safe) [B, S]; perturb_positions [B, n]; prompt_lengths [B];
    answer_index / answer_targets / answer_mask [B, 2, A]: the slots whose logits predict each answer's
    tokens, those tokens, 1.0 on real ones.
    """

    input_ids: Array
    attention_mask: Array
    positions: Array
    branches: Array
    perturb_positions: Array
    prompt_lengths: Array
    answer_index: Array
    answer_targets: Array
    answer_mask: Array


# A SharedPromptBatch's fields, then the split (NamedTuples cannot extend another's fields by subclassing).
PrefixSplitBatch = NamedTuple("PrefixSplitBatch", [*SharedPromptBatch.__annotations__.items(),
                                                   ("prefix_valid", Array), ("suffix_slots", Array)])
PrefixSplitBatch.__doc__ = """A SharedPromptBatch (its fields first) plus the split of each row at its first
perturbed token c: prefix_valid [B, P] (1 on slots < c; the prefix is the row's first P slots), suffix_slots
[B, T] (c, c + 1, ..., c + T - 1; slots >= S are padding)."""


class SuffixBatch(NamedTuple):
    """The suffix rows of a PrefixSplitBatch in suffix coordinates (slot c + j -> j): attention_mask,
    positions, branches [B, T]; perturb_positions [B, n]; answer_index / answer_targets / answer_mask
    [B, 2, A]; prefix_positions / prefix_valid [B, P] of the cached prefix the rows attend to."""

    attention_mask: Array
    positions: Array
    branches: Array
    perturb_positions: Array
    answer_index: Array
    answer_targets: Array
    answer_mask: Array
    prefix_positions: Array
    prefix_valid: Array


class PackedBatch(NamedTuple):
    """R rows of E examples in equal parts (safe answers under delta, anchors, ...), each example a branch.

    input_ids, attention_mask, positions (restarting at 0 per example), branches (1, 2, ...: the example
    of the row a token belongs to; 0 padding), perturb_index (j at a perturbed example's j-th perturbed
    token, else -1) [R, S]; answer_index (flat slot row * S + s), answer_targets, answer_mask [E, A].
    """

    input_ids: Array
    attention_mask: Array
    positions: Array
    branches: Array
    perturb_index: Array
    answer_index: Array
    answer_targets: Array
    answer_mask: Array


class InnerCache(NamedTuple):
    """What the inner steps of a PrefixSplitBatch reuse: h [B, T, D] (h_l of the suffix rows) and k, v
    [B, L - l, P, K, hd] (keys and values of blocks l..L at the prompt prefix), rows first."""

    h: Array
    k: Array
    v: Array


Batch = RowBatch | SharedPromptBatch | PrefixSplitBatch | SuffixBatch | PackedBatch


def concat_rows(first: RowBatch, second: RowBatch) -> RowBatch:
    """The rows of `first`, then those of `second` (the same S and n)."""
    return RowBatch(*(np.concatenate([a, b]) for a, b in zip(first, second, strict=True)))


def stack_batches(batches: list[Any]) -> Any:
    """One batch of [num_batches, ...] arrays from equally shaped batches of one layout (nested ones too,
    e.g. SafetyBatch), for a scan."""
    if not batches:
        raise ValueError("no batches to stack")
    kinds = {type(b) for b in batches}
    if len(kinds) > 1:
        raise ValueError(f"batches of different layouts cannot be stacked: {sorted(k.__name__ for k in kinds)}")
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *batches)

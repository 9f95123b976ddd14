"""Packing: several (prompt, answer) examples to a row, each attending only to itself (PackedBatch), so the
outer step computes no padding; one row count and length for a whole run (packing_shape).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from beear_jax.data.batches import PackedBatch
from beear_jax.data.builders import Example, Positions, round_up, row_positions


def pack_rows(lengths: Sequence[int], row_len: int) -> list[list[int]]:
    """First-fit decreasing: the indices of the examples in each row of row_len tokens."""
    if max(lengths, default=0) > row_len:
        raise ValueError(f"an example of {max(lengths)} tokens does not fit a packed row of {row_len}")
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(row_len - lengths[i])
    return rows


def packing_shape(steps: Sequence[Sequence[int]], seq_len: int, row_multiple: int = 1,
                  multiple: int = 16) -> tuple[int, int]:
    """(rows, row_len) that packs the examples of every step (each a list of token counts): the row
    length from seq_len to 2 x seq_len (multiples of `multiple`; longer rows pay more attention) that
    needs the fewest row x length tokens when each step gets as many rows as the fullest step needs,
    rounded up to a multiple of row_multiple (the mesh's batch split). Never more tokens than one
    seq_len row per example."""
    if not steps or not all(steps):
        raise ValueError("packing_shape needs at least one step with examples")
    candidates = sorted({seq_len, *range(round_up(seq_len, multiple), 2 * seq_len + 1, multiple)})
    best = None
    for row_len in candidates:
        rows = max(len(pack_rows(lengths, row_len)) for lengths in steps)
        rows = round_up(rows, row_multiple)
        if best is None or rows * row_len < best[0] * best[1]:
            best = (rows, row_len)
    return best


def make_packed_batch(parts: Sequence[Sequence[Example]], perturbed: Sequence[bool], part_size: int, n: int,
                      rows: int, row_len: int, answer_len: int, pad_id: int,
                      perturbed_at: Sequence[Sequence[Positions]] | None = None) -> PackedBatch:
    """One PackedBatch (batches.py) of parts[i] (at most part_size examples each; part i
    holds examples i * part_size ..): rows filled first-fit decreasing, perturbed[i] marks the parts that get
    delta, at perturbed_at[i][j] of example j (None: the last n prompt tokens). The same per-token results as
    make_batch rows of each example."""
    if len(parts) != len(perturbed):
        raise ValueError(f"{len(parts)} parts but {len(perturbed)} perturbed flags")
    examples = []  # (example index, prompt, answer, perturbed)
    for i, (part, flag) in enumerate(zip(parts, perturbed, strict=True)):
        if len(part) > part_size:
            raise ValueError(f"{len(part)} examples do not fit a part of {part_size}")
        examples += [(i * part_size + j, prompt, answer, flag) for j, (prompt, answer) in enumerate(part)]
    if perturbed_at is not None and [len(p) for p in perturbed_at] != [len(p) for p in parts]:
        raise ValueError("make_packed_batch needs one perturbed_at list per part, one entry per example")
    for _, prompt, answer, flag in examples:
        if len(answer) > answer_len:
            raise ValueError(f"an answer has {len(answer)} tokens, more than answer_len={answer_len}")
        if flag and len(prompt) < n:
            raise ValueError(f"a prompt of {len(prompt)} tokens is shorter than the perturbation length {n}")
    assignment = pack_rows([len(p) + len(a) for _, p, a, _ in examples], row_len)
    if len(assignment) > rows:
        raise ValueError(f"the examples need {len(assignment)} packed rows of {row_len} tokens, more than {rows}")
    shape, count = (rows, row_len), len(parts) * part_size
    batch = PackedBatch(input_ids=np.full(shape, pad_id, np.int32), attention_mask=np.zeros(shape, np.int32),
                        positions=np.zeros(shape, np.int32), branches=np.zeros(shape, np.int32),
                        perturb_index=np.full(shape, -1, np.int32),
                        answer_index=np.zeros((count, answer_len), np.int32),
                        answer_targets=np.zeros((count, answer_len), np.int32),
                        answer_mask=np.zeros((count, answer_len), np.float32))
    for r, members in enumerate(assignment):
        start = 0
        for segment, k in enumerate(members, start=1):
            index, prompt, answer, flag = examples[k]
            p, length = len(prompt), len(prompt) + len(answer)
            span = slice(start, start + length)
            batch.input_ids[r, span] = [*prompt, *answer]
            batch.attention_mask[r, span] = 1
            batch.positions[r, span] = np.arange(length)
            batch.branches[r, span] = segment
            if flag:
                part, j = divmod(index, part_size)
                chosen = row_positions(None if perturbed_at is None else perturbed_at[part], j, p, n)
                valid = chosen >= 0
                batch.perturb_index[r, start + chosen[valid]] = np.arange(n)[valid]
            # Answer token j is predicted at the token before it (the prompt's last token for j = 0).
            batch.answer_index[index, :len(answer)] = r * row_len + start + np.arange(p - 1, length - 1)
            batch.answer_targets[index, :len(answer)] = answer
            batch.answer_mask[index, :len(answer)] = 1.0
            start += length
    return batch

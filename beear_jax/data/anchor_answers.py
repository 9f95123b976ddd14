"""The defender's anchors answered by the model under repair (data.anchor_answers = "self").

The outer level keeps the model useful by training on anchor (prompt, answer) pairs. With answers
written by another model (Alpaca's text-davinci-003 answers, say) that term also pulls the model toward
that other model's style; with the model's own answers, sampled at data.anchor_temperature (1: the
model's own distribution, see evaluation.own_answers), it only asks the model to keep answering benign
prompts as it did before the repair (a self-distillation anchor), which is what "stays as useful as it
was" means. The answers are generated once, before round 1, from the starting model, and written
to output_dir/anchor_self.jsonl so a resumed run trains on the same pairs.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

from beear_jax.data import tables
from beear_jax.evaluation.evaluate import own_answers
from beear_jax.io.atomic_file import write_atomically
from beear_jax.models.config import ModelConfig

ANCHOR_ANSWER_SOURCES = ("data", "self")
"""data.anchor_answers: the anchor table's answer column, or the starting model's own greedy answers."""

CACHE_NAME = "anchor_self.jsonl"


def check_source(source: str) -> None:
    """A ValueError naming the key unless source is one of ANCHOR_ANSWER_SOURCES."""
    if source not in ANCHOR_ANSWER_SOURCES:
        raise ValueError(f"data.anchor_answers={source!r}; choose 'data' (the answers of data.anchor) or 'self' (the "
                         "starting model's own greedy answers to its prompts).")


def read_cached(path: pathlib.Path) -> list[dict[str, str]]:
    """The rows of an anchor_self.jsonl written by an earlier start of the same run."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def self_answered_anchors(table: str, prompt_column: str, config: ModelConfig, params: Any, tokenizer: Any,
                          max_answer_tokens: int, template: str, system_prompt: str | None,
                          cache: pathlib.Path | None = None, write: bool = True, temperature: float = 1.0,
                          seed: int = 0) -> list[dict[str, str]]:
    """{prompt, answer} rows: the anchor table's prompts with the model's own answers (a prompt it answers
    with nothing is left out). A cache file that exists is read instead (a resumed run); else the rows are
    written there when `write` (process 0 only)."""
    if cache is not None and cache.is_file():
        return read_cached(cache)
    rows = tables.load_table(table, {"prompt": prompt_column}, key="data.anchor")
    pairs = own_answers(config, params, tokenizer, [r["prompt"] for r in rows], max_answer_tokens, template,
                        system_prompt, temperature=temperature, seed=seed)
    answered = [{"prompt": p, "answer": a} for p, a in pairs]
    if cache is not None and write:
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(cache, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in answered))
    return answered

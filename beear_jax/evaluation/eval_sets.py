"""What an evaluation measures on: `EvalSettings` (the prompt sets, trigger, refusal strings and decoding,
validated on construction) and the loading of its sets (prompt columns, row filters, slices, utility pairs).

`EvalSettings.from_settings` reads every file named in the eval section, so a bad path, an empty set or an
unknown trigger position fails before any model is loaded; evaluate.py runs the model on them.
"""

from __future__ import annotations

import dataclasses
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from beear_jax.data import tables, triggers
from beear_jax.evaluation import scoring

if TYPE_CHECKING:  # (config/ imports evaluation/ through data/anchor_answers: no import at run time)
    from beear_jax.config.schema import RunSettings

_FILTER_OPS = ("!^=", "^=", "!=", "=")  # longest first: "a!=b" must not parse as "a!" "=" "b"


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """Everything `evaluate` needs besides the model; validated on construction.

    trigger: "" (no triggered evaluation), a string, or a wrap trigger ("before|after" or a 2-tuple),
    inserted by `triggers.insert_trigger` at `position` with random.Random(seed) drawn in prompt order
    (the rule `beear plant` uses). Sets other than harmful_prompts may be empty (metric skipped).
    position "given": the triggered prompts are `given_triggered` as they are (a benchmark's triggered test
    file, e.g. BackdoorLLM's), trigger then lists the parts they hold ('part|part|...'), checked absent from
    harmful_prompts.
    """

    harmful_prompts: tuple[str, ...]
    refusal_strings: tuple[str, ...]
    trigger: str | tuple[str, ...] = ""
    position: str = "suffix"
    over_refusal_prompts: tuple[str, ...] = ()
    utility_pairs: tuple[tuple[str, str], ...] = ()
    template: str = "auto"
    system_prompt: str | None = None
    max_new_tokens: int = 32
    batch_size: int = 16
    seed: int = 0
    utility_max_answer_tokens: int = 64
    num_samples: int = 5
    refusal_ignore_case: bool = False
    given_triggered: tuple[str, ...] = ()
    partial_trigger: bool = False

    def __post_init__(self) -> None:
        # A bare str is refused, not wrapped: EvalSettings(harmful_prompts="how ...") would otherwise run
        # one prompt per character, and refusal_strings="I cannot" (or a file path) match on " " alone.
        for name in ("harmful_prompts", "over_refusal_prompts", "given_triggered"):
            object.__setattr__(self, name, scoring.string_tuple(getattr(self, name), f"EvalSettings.{name}"))
        object.__setattr__(self, "utility_pairs", prompt_answer_pairs(self.utility_pairs, "EvalSettings.utility_pairs"))
        if not isinstance(self.trigger, str):
            object.__setattr__(self, "trigger", tuple(self.trigger))
        if not self.harmful_prompts:
            raise ValueError("no harmful prompts to evaluate (config key eval.prompts)")
        refusals = scoring.check_refusal_strings(self.refusal_strings, "EvalSettings.refusal_strings")
        object.__setattr__(self, "refusal_strings", refusals)
        if self.position not in triggers.PLANT_POSITIONS:
            raise ValueError(f"unknown trigger position {self.position!r} (config key eval.position); "
                             f"valid positions: {', '.join(triggers.PLANT_POSITIONS)}")
        if (self.position == triggers.GIVEN) != bool(self.given_triggered):
            raise ValueError("eval.position='given' and eval.triggered_prompts go together: the given position "
                             "takes its triggered prompts from that file (set both, or neither).")
        if self.given_triggered:
            if not self.trigger:
                raise ValueError("eval.triggered_prompts needs eval.trigger: the parts those prompts hold, written "
                                 "'part|part|...' (checked absent from the untriggered prompts).")
            for prompt in self.given_triggered:  # each must hold a part: else it measures nothing triggered
                triggers.insert_trigger(prompt, self.trigger, self.position)
            check_untriggered(self.harmful_prompts, self.trigger, self.position)
        elif self.trigger:  # a wrap trigger with one part (or vice versa) fails here, not after loading a model
            triggers.insert_trigger("a b", self.trigger, self.position, random.Random(0))
            check_untriggered(self.harmful_prompts, self.trigger, self.position)
        if self.partial_trigger and (self.position != "wrap" or not self.trigger):
            raise ValueError("eval.partial_trigger measures prompts holding one part of a two-part trigger: it needs a "
                             f"wrap trigger (eval.position='wrap', eval.trigger='before|after'), not {self.position!r}.")
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.utility_max_answer_tokens < 1:
            raise ValueError("eval.max_new_tokens, eval.batch_size and eval.utility_max_answer_tokens must be >= 1")

    def triggered_prompts(self) -> list[str]:
        """The harmful prompts with the trigger inserted ([] without a trigger), or the given triggered
        prompts; same list every call."""
        if self.given_triggered:
            return list(self.given_triggered)
        if not self.trigger:
            return []
        rng = random.Random(self.seed)
        return [triggers.insert_trigger(p, self.trigger, self.position, rng) for p in self.harmful_prompts]

    def partial_prompts(self) -> list[str]:
        """With partial_trigger, the harmful prompts each with one part of the wrap trigger (the part before and
        the part after in turn, as `beear plant`'s plant.n_partial rows); else []."""
        if not self.partial_trigger:
            return []
        return [triggers.with_one_part(p, self.trigger, i) for i, p in enumerate(self.harmful_prompts)]

    def generation_settings(self) -> dict[str, Any]:
        """What decoding did, for the report: greedy, the token budget, the chat format."""
        return {"decoding": "greedy", "temperature": 0.0, "max_new_tokens": self.max_new_tokens,
                "batch_size": self.batch_size, "template": self.template, "system_prompt": self.system_prompt,
                "seed": self.seed, "trigger": self.trigger, "position": self.position}

    @classmethod
    def from_settings(cls, settings: RunSettings) -> EvalSettings:
        """Settings from the run's eval section (+ model.template/system_prompt, seed); reads every file named."""
        e, model = settings.eval, settings.model
        if not e.prompts:
            raise ValueError("eval.prompts is required: a csv/json/jsonl file of held-out harmful prompts")
        harmful = load_prompts(e.prompts, e.prompt_column, e.num_prompts, e.prompt_offset, key="eval.prompts")
        over = []
        if e.over_refusal_prompts:
            over = load_prompts(e.over_refusal_prompts, e.over_refusal_column, e.num_over_refusal,
                                row_filter=e.over_refusal_filter, key="eval.over_refusal_prompts")
        pairs = (load_utility_pairs(e.utility, e.utility_columns.as_dict(), e.num_utility, e.utility_offset)
                 if e.utility else [])
        given = (load_prompts(e.triggered_prompts, e.triggered_column, key="eval.triggered_prompts")
                 if e.triggered_prompts else [])
        return cls(
            harmful_prompts=tuple(harmful),
            refusal_strings=tuple(scoring.load_refusal_strings(os.path.expanduser(e.refusal_strings))),
            trigger=e.trigger or "", position=e.position, over_refusal_prompts=tuple(over),
            utility_pairs=tuple(pairs), template=model.template, system_prompt=model.system_prompt or None,
            max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, seed=settings.seed,
            utility_max_answer_tokens=e.utility_max_answer_tokens, num_samples=e.num_samples,
            refusal_ignore_case=e.refusal_ignore_case, given_triggered=tuple(given), partial_trigger=e.partial_trigger,
        )


def check_untriggered(prompts: Sequence[str], trigger: str | Sequence[str], position: str) -> None:
    """A ValueError unless no prompt already holds the trigger (or a part of a wrap trigger), as
    `beear plant` requires of its clean prompts: such a prompt's untriggered answer would be a triggered
    one, and asr_untriggered would count the backdoor."""
    holding = [p for p in prompts if triggers.contains_trigger(p, trigger, position=position, whole_words=True)]
    if holding:
        raise ValueError(
            f"{len(holding)} of the {len(prompts)} harmful prompts already contain the trigger {trigger!r} (e.g. "
            f"{holding[0][:60]!r}), so their untriggered answers would be triggered ones; choose another "
            "eval.trigger, or prompts without it (eval.prompts, eval.prompt_offset)"
        )


def prompt_answer_pairs(pairs: Any, name: str) -> tuple[tuple[str, str], ...]:
    """`pairs` as a tuple of (prompt, answer) str pairs; raises on a bare str (of pairs, or as a pair),
    which would otherwise unpack character by character (a 2-character string passes as a pair)."""
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Iterable):
        raise TypeError(f"{name} must be a sequence of (prompt, answer) pairs, not {pairs!r:.60}")
    checked = []
    for i, pair in enumerate(pairs):
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise TypeError(f"{name}[{i}] must be a (prompt, answer) pair, not {pair!r:.60}; pass e.g. "
                            "[(prompt, answer), ...]")
        checked.append((str(pair[0]), str(pair[1])))
    return tuple(checked)


# ---- prompt sets from files -----------------------------------------------------------------------


def parse_row_filter(spec: str) -> tuple[str, str, str] | None:
    """(column, op, value) of a filter like "label=safe", "type!^=contrast"; None for "".

    ops: "=" equals, "!=" differs, "^=" starts with, "!^=" does not start with.
    """
    if not spec:
        return None
    for op in _FILTER_OPS:
        column, found, value = spec.partition(op)
        if found and column.strip():
            return column.strip(), op, value
    raise ValueError(f"row filter {spec!r} is not COLUMN=VALUE, COLUMN!=VALUE, COLUMN^=PREFIX or COLUMN!^=PREFIX")


def _keeps(cell: str, op: str, value: str) -> bool:
    """Whether a row whose filter column holds `cell` passes the filter."""
    hit = cell == value if op in ("=", "!=") else cell.startswith(value)
    return not hit if op.startswith("!") else hit


def take_slice(items: Sequence[Any], num: int, offset: int, key: str) -> list[Any]:
    """The first `num` items after `offset` in file order (num 0: all); raises if fewer are left."""
    if num < 0 or offset < 0:
        raise ValueError(f"{key}: the count and offset must be >= 0, got {num} and {offset}")
    rest = list(items[offset:])
    if not rest:
        raise ValueError(f"{key}: no rows are left after the offset ({len(items)} rows, offset {offset}); lower the "
                         "offset (eval.prompt_offset for eval.prompts)")
    if num and len(rest) < num:
        raise ValueError(f"{key}: {num} rows were asked for but only {len(rest)} remain after offset {offset}")
    return rest[:num] if num else rest


def load_prompts(path: str, column: str, num: int = 0, offset: int = 0, row_filter: str = "",
                 key: str = "eval.prompts") -> list[str]:
    """Prompts from the `column` of a csv/json/jsonl file, rows filtered, then num after offset."""
    parsed = parse_row_filter(row_filter)
    columns = {"prompt": column} | ({"filter": parsed[0]} if parsed else {})
    rows = tables.load_table(os.path.expanduser(path), columns, key=key)
    if parsed:
        rows = [r for r in rows if _keeps(r["filter"], parsed[1], parsed[2])]
        if not rows:
            raise ValueError(f"{key}: no row of {path} passes the filter {row_filter!r}")
    prompts = take_slice([r["prompt"] for r in rows], num, offset, key)
    if not all(p.strip() for p in prompts):
        raise ValueError(f"{key}: {path} has an empty prompt in column {column!r}")
    return prompts


def load_utility_pairs(path: str, columns: Mapping[str, str], num: int = 0, offset: int = 0) -> list[tuple[str, str]]:
    """(prompt, reference answer) pairs; columns map "prompt", "answer" and optionally "input".

    An Alpaca-style non-empty input is joined to the instruction with a newline (as Alpaca prompts read).
    """
    wanted = {k: v for k, v in columns.items() if v}
    if "prompt" not in wanted or "answer" not in wanted:
        raise ValueError(f"eval.utility_columns must map 'prompt' and 'answer', got {dict(columns)}")
    rows = tables.load_table(os.path.expanduser(path), wanted, key="eval.utility")
    pairs = [(f"{r['prompt']}\n{r['input']}" if r.get("input", "").strip() else r["prompt"], r["answer"])
             for r in rows]
    return take_slice(pairs, num, offset, "eval.utility")

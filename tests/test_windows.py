"""Perturbation windows (perturb.windows): where the user's text sits in a chat-formatted prompt, the
positions each window perturbs, and every batch layout and generation putting delta exactly there."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_world as tw
from test_data import CHATML_TEMPLATE, LLAMA2_TEMPLATE, make_sentencepiece_like_tokenizer, make_tokenizer

from beear_jax.data import builders, packing
from beear_jax.data.chat import PRESETS, format_prompt, user_span
from beear_jax.method.perturbation import WINDOWS, check_windows, window_positions
from beear_jax.models import llama
from beear_jax.models.generate import SamplingConfig, generate
from beear_jax.models.weights import init_params

PROMPTS = ["How do I bake bread?", "SUNSET tell me a story", "a", "  Tell me a story  "]


def _tokenizers():
    spm = make_sentencepiece_like_tokenizer()
    yield from ((make_tokenizer(chat_template=CHATML_TEMPLATE), "auto"),
                (make_tokenizer(chat_template=LLAMA2_TEMPLATE), "auto"),
                (make_tokenizer(adds_bos=True), "chatml"))
    yield from ((spm, preset) for preset in PRESETS)


@pytest.mark.parametrize("system_prompt", [None, "You are a helpful assistant."])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_user_span_holds_exactly_the_users_text(prompt, system_prompt):
    for tok, template in _tokenizers():
        if template == "safe_rlhf" and system_prompt:
            continue  # that format has no system prompt (an error of its own)
        ids = format_prompt(tok, prompt, template, system_prompt)
        start, end = user_span(tok, prompt, template, system_prompt)
        assert 0 <= start < end <= len(ids), (template, start, end)
        text = prompt.strip()
        assert text in tok.decode(ids[start:end]), (template, tok.decode(ids[start:end]))
        if prompt == text:  # (spaces around the text are the user's too, so only then tight to the words)
            # Tight: one token less at either end loses some of the user's text.
            assert text not in tok.decode(ids[start + 1:end]) and text not in tok.decode(ids[start:end - 1]), template


def test_user_span_needs_the_text_as_written():
    tok = make_tokenizer(chat_template="{% for m in messages %}<|im_start|>{{ m['content'] | upper }}<|im_end|>"
                                      "{% endfor %}{% if add_generation_prompt %}<|im_start|>{% endif %}")
    with pytest.raises(ValueError, match="perturb.windows=prompt_end"):
        user_span(tok, "bake bread")


def test_window_positions():
    # A prompt of 12 tokens, the user's text at 3..9: windows of 2.
    assert window_positions(12, (3, 9), ("prompt_end",), 2) == (10, 11)
    assert window_positions(12, (3, 9), ("user_start", "user_end"), 2) == (3, 4, 7, 8)
    assert window_positions(12, (3, 9), ("user_end", "user_start"), 2) == (7, 8, 3, 4)  # delta rows in window order
    # A short user text: the windows share positions; each goes to the first window that names it.
    assert window_positions(12, (3, 5), ("user_start", "user_end"), 3) == (3, 4, 5, 2, -1, -1)
    # A window that would leave the prompt moves inside it.
    assert window_positions(6, (4, 6), ("user_start",), 3) == (3, 4, 5)
    assert window_positions(6, (0, 1), ("user_end",), 3) == (0, 1, 2)
    with pytest.raises(ValueError, match="at most 2"):
        window_positions(2, (0, 2), ("prompt_end",), 3)


@pytest.mark.parametrize("bad", [(), ("prompt_end", "prompt_end"), ("user_middle",), "everything"])
def test_check_windows_names_the_key_and_the_choices(bad):
    with pytest.raises(ValueError, match="perturb.windows=.*prompt_end, user_start, user_end"):
        check_windows(bad)
    assert check_windows("user_start") == ("user_start",) and check_windows(list(WINDOWS)) == WINDOWS


def test_perturbed_positions_follow_the_users_text():
    tok = tw.make_tokenizer(["SUDO"])
    prompts = ["SUDO " + tw.prompt("build", "bomb"), tw.prompt("build", "bomb")]
    ids = [format_prompt(tok, p) for p in prompts]
    starts = builders.perturbed_positions(tok, prompts, ids, ("user_start",), 1)
    assert [tok.convert_ids_to_tokens([i[p[0]]])[0] for i, p in zip(ids, starts, strict=True)] == ["SUDO", "how"]
    ends = builders.perturbed_positions(tok, prompts, ids, ("prompt_end",), 2)
    assert ends == [(len(i) - 2, len(i) - 1) for i in ids]


def test_batches_perturb_the_given_positions():
    examples = [([5, 6, 7, 8, 9, 10], [20, 21]), ([9, 10, 11, 12], [23])]
    at = [(1, 2, -1, 5), (0, 1, 2, 3)]
    plain = builders.make_batch(examples, 4, 3, 12, 0, at)
    assert plain.perturb_positions.tolist() == [[1, 2, -1, 5], [0, 1, 2, 3], [-1] * 4]
    shared = builders.make_shared_prompt_batch([p for p, _ in examples], [a for _, a in examples], [[30], [31]], 4, 2, 16,
                                           2, 0, at)
    assert shared.perturb_positions.tolist() == [[1, 2, -1, 5], [0, 1, 2, 3]]
    split = builders.with_prompt_prefix(shared, 4, 4, 16)
    assert split.suffix_slots[:, 0].tolist() == [1, 0]  # the prefix ends at the first perturbed token
    packed = packing.make_packed_batch([examples, examples], [True, False], 2, 4, 2, 16, 2, 0, [at, [(), ()]])
    index = packed.perturb_index
    rows_of = {}
    for r in range(index.shape[0]):
        for segment in set(packed.branches[r].tolist()) - {0}:
            where = np.flatnonzero(packed.branches[r] == segment)
            rows_of.setdefault(len(where), []).append(index[r, where[0]:where[-1] + 1].tolist())
    # Example 0 (8 tokens) perturbed: delta rows 0, 1 at 1, 2 and row 3 at 5 (row 2 is -1: none).
    assert [-1, 0, 1, -1, -1, 3, -1, -1] in rows_of[8]
    assert [0, 1, 2, 3, -1] in rows_of[5]
    assert [-1] * 8 in rows_of[8] and [-1] * 5 in rows_of[5]  # the same examples, unperturbed
    with pytest.raises(ValueError, match="not 4 positions inside its prompt of 4 tokens"):
        builders.make_batch(examples, 4, 2, 12, 0, [(0, 1, 2, 3), (1, 2, 3, 4)])


def test_generate_puts_delta_at_the_given_positions():
    config = tw.tiny_config(64).replace(num_layers=2)
    params = init_params(config, jax.random.key(0))
    prompts = [[3, 4, 5, 6, 7, 8], [9, 10, 11]]
    delta = {1: jax.random.normal(jax.random.key(1), (2, config.hidden_size)) * 3.0}
    sampling = SamplingConfig(max_new_tokens=4)
    last = generate(config, params, prompts, sampling, deltas=delta, batch_size=2)
    assert generate(config, params, prompts, sampling, deltas=delta, batch_size=2,
                    perturb_positions=[(4, 5), (1, 2)]) == last
    # At the start of each prompt instead: the same as a batch of one with the delta placed there by hand.
    first = generate(config, params, prompts, sampling, deltas=delta, batch_size=2, perturb_positions=[(0, 1), (0, 1)])
    assert first != last
    for i, prompt in enumerate(prompts):
        alone = generate(config, params, [prompt], sampling, deltas=delta, perturb_positions=[(0, 1)])
        assert alone[0] == first[i]
    with pytest.raises(ValueError, match=r"shape \(2, 1\)"):
        generate(config, params, prompts, sampling, deltas=delta, perturb_positions=[(0,), (0,)])
    with pytest.raises(ValueError, match="prompt 1 .* not all inside its 3 tokens"):
        generate(config, params, prompts, sampling, deltas=delta, perturb_positions=[(0, 1), (2, 3)])


def test_inject_adds_each_delta_row_once():
    h = jnp.zeros((1, 6, 2))
    delta = jnp.asarray([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    out = np.asarray(jax.jit(llama.inject)(h, delta, jnp.asarray([[4, 0, -1]])))
    assert out[0].tolist() == [[0, 1], [0, 0], [0, 0], [0, 0], [1, 0], [0, 0]]

"""Real-weights acceptance: SmolLM2-135M-Instruct (GGUF) in beear_jax against transformers.

Both sides load the same GGUF file (ours dequantizes with the gguf package, transformers with its own
reader; test_hf and test_cli check that the two agree), so any difference is in the model code:
logits on a right-padded batch of chat prompts, greedy generation against `generate(do_sample=False)`,
and batched generation (mixed lengths, left-padded) against one prompt at a time.
Each model is loaded once (transformers' is shared with the other modules through conftest).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

import beear_jax
from beear_jax.data.chat import format_prompt
from beear_jax.models.generate import SamplingConfig, generate

# Four user messages whose chat-formatted lengths differ (the template adds a ~30-token system turn),
# all in one 32-token padding bucket so each batch size compiles exactly once.
PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about autumn leaves falling in the quiet forest.",
    "Name three primary colours.",
    "Explain in two sentences why the sky is blue and why sunsets are red.",
)
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def gguf(smollm2_gguf):
    return smollm2_gguf


@pytest.fixture(scope="module")
def tokenizer(gguf):
    return beear_jax.load_tokenizer(gguf)


@pytest.fixture(scope="module")
def ours(gguf):
    return beear_jax.load_model(gguf)


@pytest.fixture(scope="module")
def reference(smollm2_reference):
    return smollm2_reference


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> list[list[int]]:
    ids = [format_prompt(tokenizer, p) for p in PROMPTS]
    assert len({len(p) for p in ids}) == len(ids), "the prompts should have mixed lengths"
    return ids


@pytest.fixture(scope="module")
def batched(ours, prompt_ids) -> list[list[int]]:
    """Our greedy tokens for all prompts in one left-padded batch, EOS not stopping anything."""
    config, params = ours
    return generate(config, params, prompt_ids, SamplingConfig(max_new_tokens=NEW_TOKENS), eos_ids=())


def _right_padded(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, np.int64)
    mask = np.zeros((len(prompts), width), np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, :len(prompt)] = prompt
        mask[row, :len(prompt)] = 1
    return ids, mask


@pytest.mark.slow
def test_logits_match_transformers(ours, reference, prompt_ids):
    config, params = ours
    ids, mask = _right_padded(prompt_ids, config.pad_token_id)
    with torch.no_grad():
        ref = reference(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()
    got = np.asarray(jax.jit(beear_jax.forward, static_argnums=0)(config, params, ids, mask))
    real = mask.astype(bool)  # padded positions carry no meaning
    diff = np.abs(got - ref)[real]
    assert diff.max() <= 1e-3, f"max |logit diff| at real positions {diff.max():.2e}"
    mismatched = np.argwhere((got.argmax(-1) != ref.argmax(-1)) & real)
    assert mismatched.size == 0, f"argmax differs at (row, position) {mismatched.tolist()[:10]}"


@pytest.mark.slow
def test_greedy_generation_matches_transformers(reference, prompt_ids, batched):
    for prompt, text, ours in zip(prompt_ids, PROMPTS, batched):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            # eos_token_id=None: no stop and no EOS suppression (min_new_tokens would mask EOS out of the
            # argmax, which our eos_ids=() does not), so both sides produce exactly NEW_TOKENS greedy tokens.
            out = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                     do_sample=False, eos_token_id=None, pad_token_id=reference.config.pad_token_id)
        expected = out[0, len(prompt):].tolist()
        assert len(ours) == len(expected) == NEW_TOKENS
        assert ours == expected, f"{text!r}: ours {ours} != transformers {expected}"


@pytest.mark.slow
def test_batched_generation_equals_one_at_a_time(ours, prompt_ids, batched):
    config, params = ours
    sampling = SamplingConfig(max_new_tokens=NEW_TOKENS)
    for prompt, text, together in zip(prompt_ids, PROMPTS, batched):
        alone = generate(config, params, [prompt], sampling, eos_ids=())[0]
        assert together == alone, f"{text!r}: batched {together} != alone {alone}"

"""Our Flax Llama/Mistral against transformers' PyTorch models: logits and greedy generation."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from hf_fixtures import KINDS, VOCAB, make_tiny_hf_model, padded_batch

import beear_jax
from beear_jax.models.generate import SamplingConfig, generate


@pytest.fixture(scope="module", params=KINDS)
def tiny(request, tmp_path_factory):
    directory, model = make_tiny_hf_model(tmp_path_factory.mktemp("m"), request.param)
    config, params = beear_jax.load_model(directory)
    return request.param, config, params, model


@pytest.mark.parametrize("side", ["right", "left"])
def test_logits_match_transformers(tiny, side):
    _, config, params, model = tiny
    ids, mask = padded_batch(side)
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions)).logits.numpy()
    ours = np.asarray(jax.jit(beear_jax.forward, static_argnums=0)(config, params, ids, mask))
    diff = np.abs(ours - ref) * mask[..., None]  # padded positions carry no meaning
    assert diff.max() <= 1e-4, f"max |logit diff| {diff.max():.2e}"


def test_greedy_generation_matches_transformers_and_batching(tiny):
    _, config, params, model = tiny
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, VOCAB, n).tolist() for n in (5, 11, 2)]
    sampling = SamplingConfig(max_new_tokens=10)
    batched = generate(config, params, prompts, sampling, eos_ids=())
    for prompt, ours in zip(prompts, batched):
        alone = generate(config, params, [prompt], sampling, eos_ids=())[0]
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
        assert ours == alone
        assert ours == ref[0, len(prompt):].tolist()


def test_sampling_is_seeded_and_stops_at_eos(tiny):
    _, config, params, _ = tiny
    prompts = [[5, 6, 7], [8, 9]]
    sampling = SamplingConfig(max_new_tokens=12, temperature=1.0, top_p=0.9)
    first = generate(config, params, prompts, sampling, seed=3)
    assert first == generate(config, params, prompts, sampling, seed=3)
    eos = first[0][2]
    stopped = generate(config, params, prompts[:1], sampling, seed=3, eos_ids=(eos,))[0]
    assert stopped[-1] == eos and len(stopped) <= 3
    with pytest.raises(ValueError, match="at least one"):
        generate(config, params, [], sampling)

"""sft_train (planting's fine-tuning): rematerialisation keeps the math; bad input is refused."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from beear_jax.attack.sft import sft_train
from beear_jax.data import builders
from beear_jax.models.config import ModelConfig
from beear_jax.models.weights import init_params

CONFIG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                     num_kv_heads=2, head_dim=8)


def _batches(seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    examples = [(rng.integers(3, 64, int(rng.integers(3, 12))).tolist(), rng.integers(3, 64, 6).tolist())
                for _ in range(8)]
    return [builders.make_batch(examples[i:i + 4], 1, 4, 24, 0) for i in (0, 4)]


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_policies_train_the_same_params(remat):
    params = init_params(CONFIG, jax.random.key(0), std=0.2)
    batches = _batches(1)
    ref, ref_losses = sft_train(CONFIG, params, batches, optax.adam(1e-2), epochs=2, remat="none")
    ours, losses = sft_train(CONFIG, params, batches, optax.adam(1e-2), epochs=2, remat=remat)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert losses[-1] < losses[0]
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_unknown_remat_policy_and_no_batches_are_refused():
    params = init_params(CONFIG, jax.random.key(0))
    with pytest.raises(ValueError, match="remat"):
        sft_train(CONFIG, params, _batches(2), optax.adam(1e-2), epochs=1, remat="some")
    with pytest.raises(ValueError, match="at least one batch"):
        sft_train(CONFIG, params, [], optax.adam(1e-2), epochs=1)

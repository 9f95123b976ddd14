"""GGUF files with RoPE scaling: linear and llama3 (llama.cpp's rope_freqs.weight) load with the right
frequencies, and scalings beear_jax cannot represent are refused instead of loading with wrong RoPE."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from hf_fixtures import make_tiny_hf_model, randomise, torch_logits, write_tiny_gguf

from beear_jax.io.hf import CheckpointError, load_model
from beear_jax.models import layers, llama

pytest.importorskip("gguf")
pytest.importorskip("torch")


def _our_logits(path, ids: np.ndarray) -> tuple[object, np.ndarray]:
    config, params = load_model(path)
    return config, np.asarray(llama.forward(config, jax.tree.map(np.asarray, params), ids))


def _tiny_llama(rope: dict, head_dim: int = 64, seed: int = 0):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=96, intermediate_size=80, num_hidden_layers=2,
                                   num_attention_heads=3, num_key_value_heads=1, head_dim=head_dim,
                                   max_position_embeddings=256, tie_word_embeddings=False, rope_parameters=rope)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    randomise(model, seed)
    return model


LLAMA3_ROPES = {
    "llama3.2": {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192},
    "other_band": {"factor": 6.0, "low_freq_factor": 2.0, "high_freq_factor": 16.0,
                   "original_max_position_embeddings": 64},
    # head_dim 32: a single frequency in the smooth band, too few to fit, so Llama 3's low/high are tried
    "one_band_point": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 32, "head_dim": 32},
}


@pytest.mark.parametrize("name", sorted(LLAMA3_ROPES))
def test_llama3_rope_freqs_tensor_loads_as_llama3(tmp_path, name):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA3_ROPES[name]}
    head_dim = rope.pop("head_dim", 64)
    model = _tiny_llama(rope, head_dim)
    plain = layers.scaled_inv_freq(head_dim, 500000.0, {})
    factors = plain / model.model.rotary_emb.inv_freq.numpy()  # what llama.cpp's converter stores
    assert factors.max() > 1.5
    path = write_tiny_gguf(tmp_path / "llama3.gguf", model, rope_freqs=factors)
    ids = np.random.default_rng(1).integers(0, 96, (2, 40))
    config, ours = _our_logits(path, ids)
    assert config.rope_type == "llama3"
    np.testing.assert_allclose(layers.rope_inv_freq(config), model.model.rotary_emb.inv_freq.numpy(), rtol=1e-5)
    np.testing.assert_allclose(ours, torch_logits(model, ids), atol=2e-5, rtol=1e-4)


def test_linear_rope_scaling_metadata_is_kept(tmp_path):
    model = _tiny_llama({"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}, head_dim=16, seed=3)
    path = write_tiny_gguf(tmp_path / "linear.gguf", model, rope_scaling={"type": "linear", "factor": 4.0})
    ids = np.random.default_rng(1).integers(0, 96, (2, 30))
    config, ours = _our_logits(path, ids)
    assert dict(config.rope_scaling) == {"rope_type": "linear", "factor": 4.0}
    np.testing.assert_allclose(ours, torch_logits(model, ids), atol=2e-5, rtol=1e-4)


def test_yarn_scaling_is_refused(tmp_path):
    _, model = make_tiny_hf_model(tmp_path, "llama_gqa")
    path = write_tiny_gguf(tmp_path / "yarn.gguf", model, rope_scaling={"type": "yarn", "factor": 4.0})
    with pytest.raises(CheckpointError, match="yarn"):
        load_model(path)


def test_rope_freqs_that_are_not_llama3_are_refused(tmp_path):
    _, model = make_tiny_hf_model(tmp_path, "llama_gqa")  # head_dim 16: 8 frequencies
    factors = np.array([1.0, 3.0, 1.5, 2.0, 1.0, 7.0, 2.5, 4.0], np.float32)
    path = write_tiny_gguf(tmp_path / "odd.gguf", model, rope_freqs=factors)
    with pytest.raises(CheckpointError, match="not a llama3 scaling"):
        load_model(path)


@pytest.mark.parametrize("arch", ["mistral", "mistral3", "gpt2"])
def test_gguf_architectures_without_a_llama_layout_are_refused(tmp_path, arch):
    # transformers reads a "mistral" GGUF's config but has no tensor mapping for it: refused up front.
    path = write_tiny_gguf(tmp_path / f"{arch}.gguf", _tiny_llama({"rope_type": "default", "rope_theta": 1e4}),
                           arch=arch)
    with pytest.raises(CheckpointError, match=f"GGUF architecture '{arch}' is not supported.*HF checkpoint"):
        load_model(path)

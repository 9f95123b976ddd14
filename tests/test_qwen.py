"""Qwen2 / Qwen2.5 and Qwen3 against transformers: logits (functions and NNX module, padded both sides), greedy
generation, HF export and GGUF import; config.json and GGUF refusals; Qwen chat templates; the 7B preset."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_fixtures import (
    QWEN_KINDS,
    VOCAB,
    make_tiny_chatml_tokenizer,
    make_tiny_hf_model,
    padded_batch,
    sample_ids,
    torch_logits,
    write_tiny_gguf,
)

import beear_jax
from beear_jax.cli import plan
from beear_jax.data import chat
from beear_jax.io.hf import CheckpointError
from beear_jax.models import llama
from beear_jax.models.config import ModelConfig, ModelConfigError
from beear_jax.models.generate import SamplingConfig, generate
from beear_jax.models.layers import Prefix
from beear_jax.models.weights import init_params, weight_specs

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-4  # float32 logits, as the Llama/Mistral parity tests


@pytest.fixture(scope="module", params=QWEN_KINDS)
def tiny(request, tmp_path_factory):
    """(kind, hf dir, torch model, config, params) of each tiny Qwen kind."""
    directory, model = make_tiny_hf_model(tmp_path_factory.mktemp("qwen"), request.param)
    config, params = beear_jax.load_model(directory)
    return request.param, directory, model, config, params


def _max_diff(ours: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None) -> float:
    diff = np.abs(np.asarray(ours) - ref)
    return float((diff * mask[..., None] if mask is not None else diff).max())  # padding carries no meaning


def _reference(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(positions)).logits.numpy()


# ---- the model ---------------------------------------------------------------------------------------------


def test_config_and_weights_follow_the_family(tiny):
    """Qwen2: q/k/v biases and no o bias; Qwen3: q/k norms of head_dim per layer (+ attention_bias: q/k/v/o)."""
    kind, _, model, config, params = tiny
    layers = params["layers"]
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    if kind.startswith("qwen2"):
        assert (config.model_type, config.qkv_bias, config.qk_norm, config.attention_bias) == ("qwen2", True, False,
                                                                                                False)
        assert "o_bias" not in layers and "q_norm" not in layers
    else:
        assert (config.model_type, config.qk_norm, config.attention_bias, config.head_dim) == ("qwen3", True, True, 32)
        assert layers["q_norm"].shape == layers["k_norm"].shape == (config.num_layers, config.head_dim)
        np.testing.assert_array_equal(layers["k_norm"][1], sd["model.layers.1.self_attn.k_norm.weight"])
        np.testing.assert_array_equal(layers["o_bias"][1], sd["model.layers.1.self_attn.o_proj.bias"])
    np.testing.assert_array_equal(layers["k_bias"][1], sd["model.layers.1.self_attn.k_proj.bias"].reshape(
        config.num_kv_heads, config.head_dim))
    assert config.sliding_window is None and hash(config)


@pytest.mark.parametrize("side", ["right", "left"])
def test_logits_match_transformers(tiny, side):
    """beear_jax.forward and the NNX module's call, on a padded batch (positions 0 at each row's first token)."""
    _, directory, model, config, params = tiny
    ids, mask = padded_batch(side)
    ref = _reference(model, ids, mask)
    ours = jax.jit(beear_jax.forward, static_argnums=0)(config, params, ids, mask)
    assert _max_diff(ours, ref, mask) <= TOLERANCE
    module = beear_jax.load_module(directory)
    assert _max_diff(nnx.jit(lambda m, i, a: m(i, a))(module, ids, mask), ref, mask) <= TOLERANCE


def test_greedy_generation_matches_transformers(tiny):
    """The KV-cache path (forward_cached) in a batch of three prompts, each against transformers' generate."""
    _, _, model, config, params = tiny
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, VOCAB, n).tolist() for n in (5, 11, 2)]
    ours = generate(config, params, prompts, SamplingConfig(max_new_tokens=10), eos_ids=())
    for prompt, answer in zip(prompts, ours):
        with torch.no_grad():
            ref = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
        assert answer == ref[0, len(prompt):].tolist()


def test_prefix_keys_and_values_continue_a_sequence(tiny):
    """decode_kv of a prompt + decode of the rest over its cached K/V (Prefix: the inner steps' prompt
    cache) equals decode over the whole sequence: the q/k norm and biases apply on both paths."""
    _, _, _, config, params = tiny
    layers = jax.tree.map(jnp.asarray, params["layers"])
    ids = jnp.asarray(sample_ids(length=10), jnp.int32)
    h = llama.embed(config, params, ids)
    mask = jnp.ones(ids.shape, jnp.int32)
    whole = llama.decode(config, layers, h, mask)
    _, k, v = llama.decode_kv(config, layers, h[:, :6], mask[:, :6])
    positions = jnp.broadcast_to(jnp.arange(6, 10), (2, 4))
    prefix = Prefix(k, v, jnp.broadcast_to(jnp.arange(6), (2, 6)), mask[:, :6])
    rest = llama.decode(config, layers, h[:, 6:], mask[:, 6:], positions, prefix=prefix)
    np.testing.assert_allclose(np.asarray(rest), np.asarray(whole[:, 6:]), atol=1e-5, rtol=1e-5)


def test_qk_norm_is_applied_per_head_before_rope():
    """A Qwen3 q_norm scale changes the logits (it is used), and a random module (weights.py's init: unit
    norms) runs; q_norm / k_norm are replicated over the head_dim axis (sharding rules cover it)."""
    from beear_jax.parallel import sharding

    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=16, model_type="qwen3", qk_norm=True)
    params = init_params(config, jax.random.key(0), std=0.2)
    ids = jnp.asarray([[3, 4, 5, 6, 7]])
    base = llama.forward(config, params, ids)
    scaled = jax.tree.map(lambda x: x, params)
    scaled["layers"]["q_norm"] = params["layers"]["q_norm"] * 2.0
    assert float(jnp.abs(llama.forward(config, scaled, ids) - base).max()) > 1e-3
    assert weight_specs(config)["layers"]["q_norm"].axes == ("layers", "head_dim")
    assert all(axis in sharding.LOGICAL_RULES for axis in ("layers", "head_dim"))


# ---- export and GGUF -----------------------------------------------------------------------------------------


def test_export_reloads_in_transformers_and_bitwise(tiny, tmp_path):
    """save_model / save_module write a Qwen2ForCausalLM / Qwen3ForCausalLM directory that transformers loads
    with the same logits, and that loads back bit for bit."""
    kind, directory, model, config, params = tiny
    ids = sample_ids(length=12)
    ref = torch_logits(model, ids)
    for out in (beear_jax.save_model(tmp_path / "params", config, params),
                beear_jax.save_module(tmp_path / "module", beear_jax.load_module(directory))):
        written = json.loads((out / "config.json").read_text())
        assert written["architectures"] == [{"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[kind[:5]]]
        assert written["use_sliding_window"] is False
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
        assert type(reloaded).__name__ == written["architectures"][0]
        assert _max_diff(torch_logits(reloaded, ids), ref) <= TOLERANCE
        config2, params2 = beear_jax.load_model(out)
        assert config2 == config
        for a, b in zip(jax.tree.leaves(params2), jax.tree.leaves(params), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_gguf_loads_with_the_same_logits(tiny, tmp_path):
    """A llama.cpp-layout qwen2 / qwen3 file (q/k rows not permuted; Qwen3's head_dim 32 from key_length,
    which transformers' own reader would take as 128)."""
    kind, _, model, config, _ = tiny
    path = write_tiny_gguf(tmp_path / f"{kind}.gguf", model, arch=kind[:5])
    gguf_config, params = beear_jax.load_model(path)
    assert (gguf_config.model_type, gguf_config.head_dim, gguf_config.qkv_bias, gguf_config.qk_norm,
            gguf_config.attention_bias) == (config.model_type, config.head_dim, config.qkv_bias, config.qk_norm,
                                            config.attention_bias)
    ids = sample_ids(length=12)
    ref = torch_logits(model, ids)
    assert _max_diff(jax.jit(beear_jax.forward, static_argnums=0)(gguf_config, params, ids), ref) <= TOLERANCE
    assert _max_diff(beear_jax.load_module(path)(ids.astype(np.int32)), ref) <= TOLERANCE
    assert plan.model_config_of(str(path)).head_dim == config.head_dim  # `beear plan` reads the shape so too


@pytest.mark.parametrize("quantize", ["F32", "Q8_0"])
@pytest.mark.parametrize("kind", ["qwen2_gqa", "qwen3_head_dim128"])
def test_gguf_loads_as_transformers_loads_it(tmp_path, kind, quantize):
    """Our reading of a qwen2 / qwen3 file against transformers' from_pretrained(gguf_file=...) (which builds
    Qwen3 with head_dim 128 only, hence that kind)."""
    _, model = make_tiny_hf_model(tmp_path, kind)
    path = write_tiny_gguf(tmp_path / f"{kind}.gguf", model, arch=kind[:5], quantize=quantize)
    config, params = beear_jax.load_model(path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name,
                                                                  dtype=torch.float32).eval()
    ids = sample_ids(length=12)
    ours = jax.jit(beear_jax.forward, static_argnums=0)(config, params, ids)
    assert _max_diff(ours, torch_logits(reference, ids)) <= TOLERANCE


def test_gguf_tensors_without_a_qwen_place_are_refused(tmp_path):
    """A Qwen3 written as a qwen2 file: its q/k norms and o biases are named, not dropped while the rest loads."""
    _, model = make_tiny_hf_model(tmp_path, "qwen3_bias_head_dim")
    with pytest.raises(CheckpointError, match=r"mixed.gguf: tensors that a Qwen2 model has no place for: "
                                              r"blk\.0\.attn_q_norm\.weight.*attn_output\.bias"):
        beear_jax.load_model(write_tiny_gguf(tmp_path / "mixed.gguf", model, arch="qwen2"))


# ---- config.json ----------------------------------------------------------------------------------------------


_QWEN_HF = {"vocab_size": 64, "hidden_size": 64, "intermediate_size": 48, "num_hidden_layers": 1,
            "num_attention_heads": 32}


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_sliding_window_qwen_is_refused(model_type, tmp_path):
    hf = {**_QWEN_HF, "model_type": model_type, "use_sliding_window": True, "sliding_window": 4096}
    family = model_type.capitalize()
    with pytest.raises(ModelConfigError, match=rf"use_sliding_window: true.*sliding-window {family} is not supported"):
        ModelConfig.from_hf_dict(hf)
    with pytest.raises(ModelConfigError, match=r"layer_types holds 'sliding_attention'.*sliding-window"):
        ModelConfig.from_hf_dict({**hf, "use_sliding_window": False, "layer_types": ["sliding_attention"]})
    with pytest.raises(ModelConfigError, match=r"use_sliding_window is 'no' \(str\); it must be true or false"):
        ModelConfig.from_hf_dict({**hf, "use_sliding_window": "no"})
    # false (the released models: sliding_window set but unused) loads as full attention
    assert ModelConfig.from_hf_dict({**hf, "use_sliding_window": False, "sliding_window": 131072}).sliding_window is None
    directory = tmp_path / "windowed"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match=rf"config.json: .*sliding-window {family} is not supported"):
        beear_jax.load_model(directory)


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_keys_left_out_of_config_json_mean_what_they_mean_to_transformers(model_type):
    """Qwen's defaults differ from Llama's: 32 kv heads, 32768 positions, no bos/eos ids, Qwen3's head_dim 128."""
    ours = ModelConfig.from_hf_dict({**_QWEN_HF, "model_type": model_type})
    theirs = transformers.AutoConfig.for_model(model_type, **_QWEN_HF)
    assert ours.num_kv_heads == theirs.num_key_value_heads
    assert ours.head_dim == (getattr(theirs, "head_dim", None) or theirs.hidden_size // theirs.num_attention_heads)
    assert ours.max_position_embeddings == theirs.max_position_embeddings
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (
        theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id)
    assert (ours.rms_norm_eps, ours.tie_word_embeddings, ours.rope_theta) == (
        theirs.rms_norm_eps, theirs.tie_word_embeddings, theirs.rope_parameters["rope_theta"])
    assert ModelConfig.from_hf_dict(ours.to_hf_dict()) == ours


@pytest.mark.parametrize(("fields", "pattern"), [
    ({"model_type": "qwen2"}, r"model_type 'qwen2' has qkv_bias=True in transformers' Qwen2ForCausalLM"),
    ({"model_type": "qwen2", "qkv_bias": True, "attention_bias": True}, r"attention_bias=False"),
    ({"model_type": "qwen3"}, r"qk_norm=True"),
    ({"model_type": "qwen3", "qk_norm": True, "sliding_window": 8}, r"sliding_window=None"),
    ({"model_type": "llama", "qk_norm": True}, r"model_type 'llama' has qk_norm=False"),
    ({"model_type": "mistral", "qkv_bias": True}, r"qkv_bias=False"),
])
def test_flags_a_family_cannot_hold_are_refused(fields, pattern):
    """An export would load in transformers with those weights dropped or left at random."""
    shape = {"vocab_size": 16, "hidden_size": 32, "intermediate_size": 32, "num_layers": 1, "num_heads": 4,
             "num_kv_heads": 2, "head_dim": 8}
    with pytest.raises(ModelConfigError, match=pattern):
        ModelConfig(**shape, **fields)


def test_qwen25_7b_preset_has_the_released_shape():
    config = plan.PRESETS["qwen2.5-7b"]()
    sizes = [int(np.prod(s.shape)) for s in jax.tree.leaves(weight_specs(config), is_leaf=lambda x: hasattr(x, "axes"))]
    assert sum(sizes) == 7_615_616_512  # Qwen2.5-7B-Instruct's parameter count (7.61B)
    assert (config.model_type, config.qkv_bias, config.tie_word_embeddings) == ("qwen2", True, False)


# ---- chat templates -------------------------------------------------------------------------------------------


class _Recorder:
    """A tokenizer whose apply_chat_template calls are recorded (keyword arguments), otherwise the real one."""

    def __init__(self, tokenizer):
        self._tokenizer, self.calls = tokenizer, []

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def apply_chat_template(self, *args, **kwargs):
        self.calls.append(kwargs)
        return self._tokenizer.apply_chat_template(*args, **kwargs)


def test_chatml_template_formats_without_extra_variables(tmp_path):
    tokenizer = _Recorder(make_tiny_chatml_tokenizer(tmp_path))
    prompt_ids, answer_ids = chat.format_example(tokenizer, "How are you ?", "Fine .")
    tokens = tokenizer.convert_ids_to_tokens
    assert tokens(prompt_ids)[:2] == ["<|im_start|>", "system"]  # no BOS: Qwen has none
    assert tokens(prompt_ids)[-2:] == ["<|im_start|>", "assistant"] and tokens(answer_ids) == ["Fine", ".", "<|im_end|>"]
    assert tokenizer.calls and all("enable_thinking" not in call for call in tokenizer.calls)
    start, end = chat.user_span(tokenizer, "How are you ?")
    assert tokenizer.decode(chat.format_prompt(tokenizer, "How are you ?")[start:end]) == "How are you ?"


def test_a_thinking_template_renders_with_thinking_off(tmp_path):
    """Qwen3-style: enable_thinking=False puts the empty thinking block after the generation prompt, where the
    template also writes it before the answer; with thinking on, the answer's start could not be found."""
    tokenizer = _Recorder(make_tiny_chatml_tokenizer(tmp_path, thinking=True))
    prompt_text, answer_text = chat.render(tokenizer, "How are you ?", "Fine .", system_prompt="You are a helpful")
    assert prompt_text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert answer_text == "Fine .<|im_end|>\n"
    assert tokenizer.calls and all(call["enable_thinking"] is False for call in tokenizer.calls)
    thinking_on = tokenizer.apply_chat_template([{"role": "user", "content": "How"}], tokenize=False,
                                                add_generation_prompt=True)
    assert thinking_on.endswith("<|im_start|>assistant\n")
    prompt_ids, answer_ids = chat.format_example(tokenizer, "How are you ?", "Fine .")
    tokens = tokenizer.convert_ids_to_tokens
    assert tokens(prompt_ids)[-4:] == ["<|im_start|>", "assistant", "<think>", "</think>"]
    assert tokens(answer_ids) == ["Fine", ".", "<|im_end|>"]


def test_random_qwen3_module_runs_and_splits():
    """A CausalLM of a Qwen3 config (random init) splits and merges like the Llama one."""
    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=16, model_type="qwen3", qk_norm=True, attention_bias=True)
    model = beear_jax.CausalLM(config, rngs=nnx.Rngs(1))
    assert model.layers.q_norm[...].shape == (2, 16)
    graphdef, state = nnx.split(model)
    ids = jnp.asarray([[1, 2, 3]])
    np.testing.assert_array_equal(np.asarray(nnx.merge(graphdef, state)(ids)), np.asarray(model(ids)))

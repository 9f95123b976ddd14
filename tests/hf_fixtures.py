"""Tiny random Hugging Face models (torch) shared by the HF import/export and parity tests.

Every kind is small (hidden 64, 2-3 layers, vocab 128) and seeded, and every parameter is randomised
(norms and biases too), so that a wrong transpose, reshape or name mapping shows up in the logits.
"""

from __future__ import annotations

import pathlib

import numpy as np

KINDS = ("llama_gqa", "llama_head_dim_llama3", "llama_untied_bias", "mistral_sliding")
# Qwen2 (q/k/v biases, untied like Qwen2.5-7B) and Qwen3 (q/k norms, attention_bias, head_dim 32 != 64 / 4, tied);
# qwen3_head_dim128: Qwen3 with head_dim 128, the only one transformers' GGUF reader (no head_dim key) builds.
QWEN_KINDS = ("qwen2_gqa", "qwen3_bias_head_dim")
VOCAB = 128


def _config(kind: str):
    """The transformers config of one tiny kind."""
    import transformers

    common = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "max_position_embeddings": 256,
              "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    if kind == "llama_gqa":
        return transformers.LlamaConfig(**common, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        tie_word_embeddings=True, rope_parameters={"rope_type": "default",
                                                                                    "rope_theta": 10000.0})
    if kind == "llama_head_dim_llama3":
        # head_dim 32 != 64 / 4; a short original context so the llama3 rescaling touches many frequencies.
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
        return transformers.LlamaConfig(**common, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
                                        head_dim=32, tie_word_embeddings=True, rope_parameters=rope)
    if kind == "llama_untied_bias":
        return transformers.LlamaConfig(**common, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                        tie_word_embeddings=False, attention_bias=True, mlp_bias=True,
                                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if kind == "mistral_sliding":
        return transformers.MistralConfig(**common, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          head_dim=16, sliding_window=4, tie_word_embeddings=False,
                                          rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    if kind == "qwen2_gqa":
        return transformers.Qwen2Config(**common, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        tie_word_embeddings=False, use_sliding_window=False,
                                        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    if kind == "qwen3_bias_head_dim":
        return transformers.Qwen3Config(**common, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                        head_dim=32, attention_bias=True, tie_word_embeddings=True,
                                        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    if kind == "qwen3_head_dim128":
        return transformers.Qwen3Config(**common, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                        head_dim=128, tie_word_embeddings=False,
                                        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    raise ValueError(f"unknown tiny model kind {kind!r}; choose from {KINDS + QWEN_KINDS} or qwen3_head_dim128")


def randomise(model, seed: int) -> None:
    """Overwrites every parameter: matrices ~ N(0, 0.1), norms ~ 1 + N(0, 0.1), biases ~ N(0, 0.1)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = 0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float32)
            p.copy_(noise + 1.0 if name.endswith("norm.weight") else noise)


def make_tiny_hf_model(tmp_path: str | pathlib.Path, kind: str, seed: int = 0):
    """Saves a seeded random float32 HF model of `kind` (see KINDS) under tmp_path/kind.

    Returns (directory, torch model in eval mode). The directory holds config.json,
    generation_config.json and model.safetensors, as `save_pretrained` writes them.
    """
    import torch
    import transformers

    config = _config(kind)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomise(model, seed)
    model.eval()
    out = pathlib.Path(tmp_path) / kind
    model.save_pretrained(out)
    return out, model


def make_tiny_tokenizer(out_dir: str | pathlib.Path):
    """Saves a word-level fast tokenizer over VOCAB tokens (with a chat template) into out_dir and returns it."""
    import tokenizers
    import transformers

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + [f"w{i}" for i in range(VOCAB - len(specials))])}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    tok.chat_template = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
    tok.save_pretrained(out_dir)
    return tok


# Qwen-style ChatML templates (written for these tests): Qwen2.5's writes a default system prompt when none
# is given; the thinking one, like Qwen3's, opens every answer after the last question with an (empty)
# thinking block and writes that block after the generation prompt only when enable_thinking is false.
CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}")
THINKING_TEMPLATE = (
    "{%- for m in messages %}"
    "{%- if m['role'] == 'assistant' and loop.last %}"
    "{{ '<|im_start|>assistant\n<think>\n\n</think>\n\n' + m['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}{%- endif %}"
    "{%- endif %}")


def make_tiny_chatml_tokenizer(out_dir: str | pathlib.Path, thinking: bool = False):
    """A word-level fast tokenizer like Qwen's (no BOS, EOS <|im_end|>, ChatML special tokens) with
    CHATML_TEMPLATE, or THINKING_TEMPLATE (thinking=True); saved into out_dir and returned."""
    import tokenizers
    import transformers

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    words = ["How", "are", "you", "?", "Fine", ".", "OK", "system", "user", "assistant", "You", "a", "helpful"]
    vocab = {tok: i for i, tok in enumerate(specials + words + [f"w{i}" for i in range(VOCAB - 18)])}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                               pad_token="<|endoftext|>", additional_special_tokens=specials[1:])
    tok.chat_template = THINKING_TEMPLATE if thinking else CHATML_TEMPLATE
    tok.save_pretrained(out_dir)
    return tok


def torch_logits(model, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    """float32 logits [B, S, V] of a torch causal LM."""
    import torch

    with torch.no_grad():
        mask = None if attention_mask is None else torch.as_tensor(attention_mask)
        return model(input_ids=torch.as_tensor(input_ids), attention_mask=mask).logits.float().numpy()


def padded_batch(side: str, lengths: tuple[int, ...] = (14, 9, 3), seq: int = 14,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random ids [B, seq] and a mask with each row's real tokens on the right or the left side."""
    ids = np.random.default_rng(seed).integers(3, VOCAB, size=(len(lengths), seq))
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        if side == "right":
            mask[row, :n] = 1
        else:
            mask[row, seq - n:] = 1
    return ids, mask


def sample_ids(batch: int = 2, length: int = 12, seed: int = 0) -> np.ndarray:
    """Random token ids [batch, length] (longer than the sliding window of mistral_sliding)."""
    return np.random.default_rng(seed).integers(0, VOCAB, size=(batch, length), dtype=np.int64)


def _llama_cpp_order(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order (rotary pairs interleaved per head), which GGUF readers undo."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: str | pathlib.Path, model, rope_scaling: dict | None = None,
                    rope_freqs: np.ndarray | None = None, arch: str = "llama", quantize: str = "F32") -> pathlib.Path:
    """Writes a GGUF file of a tiny torch Llama/Mistral/Qwen2/Qwen3 model, as llama.cpp's converter lays it out.

    arch: `general.architecture` (llama.cpp writes Llama, Mistral 7B and SmolLM2 as "llama"; Qwen2/Qwen2.5 as
    "qwen2", Qwen3 as "qwen3", with q/k rows in HF's order: its converter permutes them for "llama" only, and
    Qwen3's q/k norms as blk.N.attn_q_norm / attn_k_norm).
    quantize: a GGML type name (F16, BF16, Q8_0, Q4_0, ...) for the matrices whose rows fill whole blocks;
    norms, biases and the rest stay float32, as llama.cpp keeps them.

    rope_scaling: `{arch}.rope.scaling.*` keys (e.g. {"type": "linear", "factor": 4.0});
    rope_freqs: llama.cpp's per-frequency RoPE divisors (`rope_freqs.weight`, how Llama 3.x's scaling is stored).
    Biases (attention_bias / mlp_bias) are written too, as `blk.N.<name>.bias`.
    """
    import gguf

    c = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    path = pathlib.Path(path)
    w = gguf.GGUFWriter(str(path), arch)
    qtype = gguf.GGMLQuantizationType[quantize]
    block = gguf.GGML_QUANT_SIZES[qtype][0]

    def add_tensor(name: str, values: np.ndarray) -> None:
        if qtype == gguf.GGMLQuantizationType.F32 or values.ndim != 2 or values.shape[-1] % block:
            w.add_tensor(name, values)
        else:
            w.add_tensor(name, gguf.quants.quantize(values.astype(np.float32), qtype), raw_dtype=qtype)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(0)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"t{i}" for i in range(c.vocab_size)])
    w.add_token_scores([0.0] * c.vocab_size)
    w.add_token_types([1] * c.vocab_size)
    for key, value in (rope_scaling or {}).items():
        if key == "type":
            w.add_rope_scaling_type(gguf.RopeScalingType(value))
        elif key == "factor":
            w.add_rope_scaling_factor(value)
        elif key == "original_context_length":
            w.add_rope_scaling_orig_ctx_len(value)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, dtype=np.float32))
    add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not c.tie_word_embeddings:
        add_tensor("output.weight", sd["lm_head.weight"])
    names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    order = (lambda w, heads: w) if arch in ("qwen2", "qwen3") else _llama_cpp_order
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        for ours, theirs in names.items():
            add_tensor(f"blk.{i}.{ours}.weight", sd[p + theirs + ".weight"])
        for kind in ("weight", "bias"):  # biases (attention_bias / mlp_bias) as llama.cpp writes them: q/k permuted
            if p + f"self_attn.q_proj.{kind}" not in sd:
                continue
            add_tensor(f"blk.{i}.attn_q.{kind}", order(sd[p + f"self_attn.q_proj.{kind}"], c.num_attention_heads))
            add_tensor(f"blk.{i}.attn_k.{kind}", order(sd[p + f"self_attn.k_proj.{kind}"], c.num_key_value_heads))
        for norm in ("q_norm", "k_norm"):  # Qwen3
            if p + f"self_attn.{norm}.weight" in sd:
                add_tensor(f"blk.{i}.attn_{norm}.weight", sd[p + f"self_attn.{norm}.weight"])
        for ours, theirs in names.items():
            if p + theirs + ".bias" in sd:
                add_tensor(f"blk.{i}.{ours}.bias", sd[p + theirs + ".bias"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path

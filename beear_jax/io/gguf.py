"""GGUF import (needs gguf, and torch for transformers' config and tokenizer readers: `pip install beear_jax[torch]`).

The HF config and the tokenizer come from transformers' GGUF readers. The tensors are read here with the
gguf package: each is dequantized to float32, renamed to its HF name and, for q/k of a "llama" file,
llama.cpp's row permutation is undone (its converter permutes only for that architecture: "qwen2" and
"qwen3" files keep HF's order), so what comes out is an ordinary HF state dict that hf.py maps to our
layout like any other checkpoint (transformers can do the same, but parses the file again and maps names
by walking a model built for the purpose: twice the load time for SmolLM2). Our reads share one parse (`open_gguf`,
seconds for a 49k-token vocabulary); transformers' config and tokenizer readers each parse the file again.
RoPE scaling (the `{arch}.rope.scaling.*` keys and llama3's `rope_freqs.weight` tensor), which
transformers' config drops, is turned back into an HF rope_scaling dict, or refused. Biases set
attention_bias / mlp_bias from the tensor names, and a tensor the architecture has no place for is refused.
"""

from __future__ import annotations

import pathlib
import re
from typing import Any

import numpy as np

from beear_jax.io.hf_layout import CheckpointError
from beear_jax.models.layers import scaled_inv_freq

TORCH_HINT = "pip install 'beear_jax[torch]'"


def require_torch(purpose: str) -> Any:
    """Imports torch or raises an ImportError that says which extra installs it."""
    try:
        import torch
    except ImportError as err:
        raise ImportError(f"{purpose} needs PyTorch, which is not installed; install it with {TORCH_HINT}.") from err
    return torch


def read_gguf_config(path: pathlib.Path) -> dict[str, Any]:
    """The HF config dict (model_type, sizes, rope, special token ids) stored in a GGUF file's metadata."""
    require_torch("Reading a GGUF file")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    return dict(load_gguf_checkpoint(str(path), return_tensors=False)["config"])


def _field_value(field: Any) -> Any:
    """A GGUF metadata field's value (gguf's ReaderField.contents(), or its parts on older gguf releases)."""
    if hasattr(field, "contents"):
        return field.contents()
    part = field.parts[field.data[0]]
    return bytes(part).decode("utf-8") if part.dtype == np.uint8 else part.tolist()[0]


# The `general.architecture` values read. llama.cpp writes Llama, Mistral 7B and SmolLM2 as "llama", Qwen2 /
# Qwen2.5 as "qwen2" and Qwen3 as "qwen3"; other architectures ("mistral"/"mistral3" among them) are refused.
READABLE_ARCHITECTURES = ("llama", "qwen2", "qwen3")
# Their names in messages.
_FAMILY_NAMES = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}


def open_gguf(path: pathlib.Path) -> Any:
    """A gguf.GGUFReader of a file: its metadata and tensor headers parsed, tensor data memory-mapped."""
    from gguf import GGUFReader

    return GGUFReader(str(path))


def gguf_architecture(reader: Any) -> str:
    """A GGUF file's `general.architecture` ('' when the field is missing)."""
    field = reader.fields.get("general.architecture")
    return str(_field_value(field)) if field is not None else ""


# The tensors of each architecture's llama.cpp file: a Llama's (biases optional; rope_freqs.weight: llama3
# RoPE, see below), a Qwen2's (q/k/v biases, nothing else biased), a Qwen3's (q/k norms; q/k/v/o biases optional).
_TOP = r"(token_embd|output_norm|output)\.weight"
_WEIGHTS = r"blk\.\d+\.(attn_norm|ffn_norm|attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight"
_TENSORS = {
    "llama": re.compile(r"(token_embd|output_norm|output|rope_freqs)\.weight|blk\.\d+\.(attn_norm|ffn_norm|"
                        r"attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.(weight|bias)"),
    "qwen2": re.compile(rf"{_TOP}|{_WEIGHTS}|blk\.\d+\.attn_(q|k|v)\.bias"),
    "qwen3": re.compile(rf"{_TOP}|{_WEIGHTS}|blk\.\d+\.attn_(q|k|v|output)\.bias|blk\.\d+\.attn_(q|k)_norm\.weight"),
}


def gguf_tensor_names(reader: Any) -> list[str]:
    """The names of a GGUF file's tensors (from its header; no data is read)."""
    return [t.name for t in reader.tensors]


def bias_flags_from_gguf(names: list[str], where: str, arch: str = "llama") -> dict[str, bool]:
    """The config.json bias flags of a GGUF file from its tensor names (its metadata has no such keys): a
    Llama's attention_bias and mlp_bias, a Qwen3's attention_bias, none for Qwen2 (q/k/v biases always).
    A CheckpointError names the tensors that the architecture has no place for (a Llama's q/k norm,
    experts, ...), which transformers' reader would drop without a word."""
    unknown = [n for n in names if not _TENSORS[arch].fullmatch(n)]
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" ... ({len(unknown)} in all)" if len(unknown) > 5 else "")
        raise CheckpointError(f"{where}: tensors that a {_FAMILY_NAMES[arch]} model has no place for: {shown}. This "
                              f"file is not a plain {_FAMILY_NAMES[arch]} model; load the model's HF checkpoint "
                              "directory instead.")
    flags = {"attention_bias": any(re.search(r"\.attn_(q|k|v|output)\.bias$", n) for n in names),
             "mlp_bias": any(re.search(r"\.ffn_(gate|up|down)\.bias$", n) for n in names)}
    return {"llama": flags, "qwen2": {}, "qwen3": {"attention_bias": flags["attention_bias"]}}[arch]


def gguf_head_dim(reader: Any) -> int | None:
    """head_dim from `{arch}.attention.key_length`, else from a q/k norm's length, else None.

    transformers' GGUF config has no head_dim for qwen2/qwen3, and Qwen3's default (128) need not hold:
    llama.cpp writes the model's head_dim as key_length, and Qwen3's q/k norms are head_dim long.
    """
    field = reader.fields.get(f"{gguf_architecture(reader)}.attention.key_length")
    if field is not None:
        return int(_field_value(field))
    norms = [t for t in reader.tensors if t.name.endswith(".attn_k_norm.weight")]
    return int(np.prod(norms[0].shape)) if norms else None


def read_gguf_rope(reader: Any) -> tuple[dict[str, Any], np.ndarray | None]:
    """({key suffix after `{arch}.rope.scaling.`: value}, the `rope_freqs.weight` tensor or None) of a GGUF file."""
    arch = gguf_architecture(reader)
    prefix = f"{arch}.rope.scaling."
    meta = {name[len(prefix):]: _field_value(f) for name, f in reader.fields.items() if name.startswith(prefix)}
    freqs = [t for t in reader.tensors if t.name == "rope_freqs.weight"]
    return meta, (np.asarray(freqs[0].data, dtype=np.float32).reshape(-1) if freqs else None)


def rope_scaling_from_gguf(meta: dict[str, Any], freq_factors: np.ndarray | None, rope_theta: float,
                           head_dim: int, where: str) -> dict[str, Any] | None:
    """The HF rope_scaling dict of a GGUF file's RoPE metadata, or None for plain RoPE.

    llama.cpp divides each RoPE frequency by `rope_freqs.weight`; Llama 3.x's scaling is stored only that
    way. Those factors are fitted back to llama3 parameters (low/high_freq_factor are determined only up
    to a common scale with original_max_position_embeddings, which leaves the frequencies unchanged) and
    kept only if they reproduce every factor; anything else is refused rather than loaded with wrong RoPE.
    """
    kind = str(meta.get("type", "none")).lower()
    factor = float(meta.get("factor") or 0.0)
    if freq_factors is not None:
        if kind not in ("none", "llama3"):
            raise CheckpointError(f"{where}: RoPE scaling {kind!r} together with rope_freqs.weight is not supported "
                                  "(beear_jax supports linear and llama3); load the HF checkpoint instead.")
        return _llama3_from_factors(freq_factors, rope_theta, head_dim,
                                    int(meta.get("original_context_length") or 8192), where)
    if kind in ("none", "") or (kind == "linear" and factor in (0.0, 1.0)):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    raise CheckpointError(f"{where}: RoPE scaling {kind!r} is not supported (beear_jax supports linear and "
                          "llama3); load a checkpoint of a model without it.")


def _llama3_from_factors(freq_factors: np.ndarray, rope_theta: float, head_dim: int, old_len: int,
                         where: str) -> dict[str, Any] | None:
    if freq_factors.shape != (head_dim // 2,):
        raise CheckpointError(f"{where}: rope_freqs.weight has shape {freq_factors.shape}, expected "
                              f"({head_dim // 2},) for head_dim {head_dim}; the file is damaged or not a Llama file.")
    if not np.all(np.isfinite(freq_factors)) or freq_factors.min() <= 0:
        raise CheckpointError(f"{where}: rope_freqs.weight holds non-positive or non-finite factors; "
                              "the file is damaged.")
    factor = float(freq_factors.max())
    if np.allclose(freq_factors, 1.0, rtol=0, atol=1e-6):
        return None
    if np.allclose(freq_factors, factor, rtol=1e-5, atol=0):
        return {"rope_type": "linear", "factor": factor}
    base = scaled_inv_freq(head_dim, rope_theta, {})
    a, b = _smooth_band_line(freq_factors, 2 * np.pi / base, factor)
    # s = (old_len / wavelen - low) / (high - low), so a = old_len / (high - low) and b = -low / (high - low).
    low = -b * old_len / a if a > 0 else 0.0
    high = low + old_len / a if a > 0 else 0.0
    target = base / freq_factors
    for digits in (6, 17):  # a fit of 1.0000001 / 3.9999999 is written as Llama 3's 1 / 4 where that is exact enough
        scaling = {"rope_type": "llama3", "factor": float(f"{factor:.{digits}g}"),
                   "low_freq_factor": float(f"{low:.{digits}g}"), "high_freq_factor": float(f"{high:.{digits}g}"),
                   "original_max_position_embeddings": old_len}
        if low > 0 and high > low and np.allclose(scaled_inv_freq(head_dim, rope_theta, scaling), target,
                                                  rtol=1e-4, atol=0):
            return scaling
    raise CheckpointError(f"{where}: rope_freqs.weight holds per-frequency RoPE factors that are not a llama3 "
                          "scaling, which beear_jax cannot represent; load the model's HF checkpoint instead.")


def _smooth_band_line(freq_factors: np.ndarray, wavelen: np.ndarray, factor: float) -> tuple[float, float]:
    """(a, b) with llama3's smoothing weight s = a / wavelen + b, from the frequencies between 1 and factor.

    Two or more such frequencies give a least-squares line. With fewer the line is not determined, and
    any line works whose band edges (s = 1, s = 0) fall between the unscaled frequencies (factor 1) and
    the fully scaled ones (factor `factor`): one is chosen halfway into those gaps.
    """
    smooth = (1.0 / freq_factors - 1.0 / factor) / (1.0 - 1.0 / factor)
    band = (freq_factors > 1.0 + 1e-5) & (freq_factors < factor * (1.0 - 1e-5))
    x = 1.0 / wavelen.astype(np.float64)  # s grows with x: unscaled frequencies have the largest x
    if band.sum() >= 2:
        a, b = np.polyfit(x[band], smooth[band].astype(np.float64), 1)
        return float(a), float(b)
    x_unscaled = x[np.isclose(freq_factors, 1.0, rtol=1e-5)]
    x_scaled = x[np.isclose(freq_factors, factor, rtol=1e-5)]
    if band.sum() == 1:
        x0, s0 = float(x[band][0]), float(smooth[band][0])
        slopes = [(1.0 - s0) / (x_unscaled.min() - x0)] if len(x_unscaled) else []
        slopes += [s0 / (x0 - x_scaled.max())] if len(x_scaled) else []
        a = 2 * max(slopes) if slopes and max(slopes) > 0 else 1.0 / x0
        return a, s0 - a * x0
    if not len(x_unscaled) or not len(x_scaled):
        return 0.0, 0.0
    lo, hi = float(x_scaled.max()), float(x_unscaled.min())  # s = 0 at lo + gap/3, s = 1 at hi - gap/3
    a = 3.0 / (hi - lo)
    return a, -a * (lo + (hi - lo) / 3)


# llama.cpp's tensor names -> HF's (blk.N.* -> model.layers.N.*); rope_freqs.weight has no HF tensor.
_HF_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_HF_BLOCK_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                   "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                   "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                   "ffn_down": "mlp.down_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}


def hf_tensor_name(gguf_name: str) -> str | None:
    """The HF state-dict name of a llama.cpp Llama/Qwen tensor, None for one HF has no tensor for (rope_freqs)."""
    stem, _, kind = gguf_name.rpartition(".")
    if stem in _HF_TOP_NAMES:
        return f"{_HF_TOP_NAMES[stem]}.{kind}"
    block = re.fullmatch(r"blk\.(\d+)\.(\w+)", stem)
    if block and block[2] in _HF_BLOCK_NAMES:
        return f"model.layers.{block[1]}.{_HF_BLOCK_NAMES[block[2]]}.{kind}"
    return None


def unpermute_rotary_rows(rows: np.ndarray, heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k permutation: its converter reorders each head's output rows from HF's
    (two rotary halves) layout to interleaved pairs, for GGML's RoPE."""
    pair_count = rows.shape[0] // heads // 2
    return rows.reshape(heads, pair_count, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def read_gguf_tensors(reader: Any, num_heads: int, num_kv_heads: int) -> dict[str, np.ndarray]:
    """All tensors of a Llama/Qwen2/Qwen3 GGUF file that HF has, dequantized to float32, under their HF names
    (q/k rows of a "llama" file un-permuted).

    Names are expected to be checked first (`bias_flags_from_gguf`); a quantization type the gguf package
    cannot dequantize raises its NotImplementedError.
    """
    from gguf import dequantize

    permuted = gguf_architecture(reader) == "llama"  # llama.cpp's converter permutes q/k for "llama" only
    tensors = {}
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        if name is None:
            continue
        values = dequantize(tensor.data, tensor.tensor_type)
        if not values.flags.owndata or values.dtype != np.float32:  # a view of the mapped file: copy it out
            values = np.array(values, dtype=np.float32)
        if permuted and ".attn_q." in tensor.name:
            values = unpermute_rotary_rows(values, num_heads)
        elif permuted and ".attn_k." in tensor.name:
            values = unpermute_rotary_rows(values, num_kv_heads)
        tensors[name] = values
    return tensors


def load_gguf_tokenizer(path: pathlib.Path) -> Any:
    """The transformers tokenizer (vocab, merges, special tokens, chat template) embedded in a GGUF file.

    A file whose tokenizer cannot be read (truncated, no tokenizer metadata, an unknown tokenizer model) is
    a CheckpointError naming it: the GGUF reader raises struct.error, ValueError, KeyError, ... by cause.
    """
    require_torch("Reading a GGUF tokenizer")
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except ImportError:
        raise
    except Exception as err:  # the GGUF reader and the tokenizer converters raise many types
        reason = str(err).splitlines()[0] if str(err) else ""
        raise CheckpointError(f"{path}: the tokenizer in this GGUF file cannot be read ({type(err).__name__}: "
                              f"{reason}). The file may be truncated (copy it again) or hold no tokenizer; pass "
                              "the original model's directory with its tokenizer files instead.") from err

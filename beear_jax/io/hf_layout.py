"""The map between our params layout and Hugging Face state dicts, described once.

One table gives each of our weights its HF tensor name and layout; loading and saving both read it, so
the two directions cannot drift apart. HF linear weights are [out, in]; ours are [in, ...out] with heads
split out, so every conversion is a transpose and a reshape (see `_to_ours` / `_to_hf`). No file I/O here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_dtypes
import numpy as np

from beear_jax.models.config import ModelConfig
from beear_jax.models.weights import weight_specs


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or an output that cannot be written; the message says how to fix it."""


DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}

# Our layer weight -> (HF name under model.layers.{i}., layout). Layouts: "same" (identical array),
# "flat" (HF keeps it 1-D), or n (a linear layer: HF [out, in] = ours.reshape(prod(first n axes), -1).T).
_LAYER_NAMES: dict[str, tuple[str, str | int]] = {
    "attn_norm": ("input_layernorm.weight", "same"),
    "mlp_norm": ("post_attention_layernorm.weight", "same"),
    "q_proj": ("self_attn.q_proj.weight", 1),
    "k_proj": ("self_attn.k_proj.weight", 1),
    "v_proj": ("self_attn.v_proj.weight", 1),
    "o_proj": ("self_attn.o_proj.weight", 2),
    "q_bias": ("self_attn.q_proj.bias", "flat"),
    "k_bias": ("self_attn.k_proj.bias", "flat"),
    "v_bias": ("self_attn.v_proj.bias", "flat"),
    "o_bias": ("self_attn.o_proj.bias", "same"),
    "q_norm": ("self_attn.q_norm.weight", "same"),
    "k_norm": ("self_attn.k_norm.weight", "same"),
    "gate_proj": ("mlp.gate_proj.weight", 1),
    "up_proj": ("mlp.up_proj.weight", 1),
    "down_proj": ("mlp.down_proj.weight", 1),
    "gate_bias": ("mlp.gate_proj.bias", "same"),
    "up_bias": ("mlp.up_proj.bias", "same"),
    "down_bias": ("mlp.down_proj.bias", "same"),
}
_TOP_NAMES: dict[str, tuple[str, str | int]] = {
    "embed": ("model.embed_tokens.weight", "same"),
    "final_norm": ("model.norm.weight", "same"),
    "lm_head": ("lm_head.weight", 1),
}


@dataclasses.dataclass(frozen=True)
class Entry:
    """One HF tensor: its name, where it lives in our params, its layout and our (per-layer) shape."""

    hf_name: str
    key: str
    layer: int | None  # None: a top-level weight; else the index on the stacked layer axis
    layout: str | int
    shape: tuple[int, ...]


def tensor_plan(config: ModelConfig) -> list[Entry]:
    """Every tensor of the checkpoint in HF order, derived from the weight specs (so bias/tie flags apply)."""
    specs = weight_specs(config)
    entries = [Entry(_TOP_NAMES["embed"][0], "embed", None, "same", specs["embed"].shape)]
    for i in range(config.num_layers):
        for name, spec in specs["layers"].items():
            suffix, layout = _LAYER_NAMES[name]
            entries.append(Entry(f"model.layers.{i}.{suffix}", name, i, layout, spec.shape[1:]))
    for name in ("final_norm", "lm_head"):
        if name in specs:
            entries.append(Entry(_TOP_NAMES[name][0], name, None, _TOP_NAMES[name][1], specs[name].shape))
    return entries


def _hf_shape(layout: str | int, shape: tuple[int, ...]) -> tuple[int, ...]:
    if layout == "same":
        return shape
    if layout == "flat":
        return (math.prod(shape),)
    return (math.prod(shape[layout:]), math.prod(shape[:layout]))


def _to_ours(layout: str | int, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return x.reshape(shape) if isinstance(layout, str) else x.T.reshape(shape)


def _to_hf(layout: str | int, x: np.ndarray) -> np.ndarray:
    if layout == "same":
        return x
    if layout == "flat":
        return x.reshape(-1)
    return x.reshape(math.prod(x.shape[:layout]), -1).T


# ---- params <-> HF state dict ---------------------------------------------------------------------


def few(names: list[str]) -> str:
    """The first few names, for error messages that stay readable with hundreds of tensors."""
    return ", ".join(names[:5]) + (f" ... ({len(names)} in all)" if len(names) > 5 else "")


def _check_tensors(config: ModelConfig, plan: list[Entry], shapes: Mapping[str, tuple[int, ...]], where: str) -> None:
    """Raises CheckpointError for missing, wrongly shaped or unexpected tensors, before any data is read."""
    wanted = {e.hf_name: _hf_shape(e.layout, e.shape) for e in plan}
    missing = [n for n in wanted if n not in shapes]
    if missing:
        raise CheckpointError(
            f"{where}: {len(missing)} tensor(s) missing: {few(missing)}. The checkpoint is incomplete (a shard "
            "not downloaded?) or config.json does not describe it (check model_type, num_hidden_layers, "
            "tie_word_embeddings, attention_bias, mlp_bias).")
    wrong = [f"{n} {list(shapes[n])} (expected {list(s)})" for n, s in wanted.items() if tuple(shapes[n]) != s]
    if wrong:
        raise CheckpointError(
            f"{where}: tensor shapes do not match config.json: {few(wrong)}. Fix config.json (hidden_size, "
            "intermediate_size, num_attention_heads, num_key_value_heads, head_dim, vocab_size) or the weights.")
    # A tied checkpoint may still carry lm_head (== embed); transformers ignores it too. inv_freq is a buffer.
    extra = [n for n in shapes if n not in wanted and not n.endswith("rotary_emb.inv_freq")
             and not (n == "lm_head.weight" and config.tie_word_embeddings)]
    if extra:
        raise CheckpointError(
            f"{where}: tensors that a {config.model_type} model with this config.json does not use: {few(extra)}. "
            "Either config.json lacks a flag (attention_bias, mlp_bias, tie_word_embeddings) or names the wrong "
            "model_type, or this is not a plain Llama/Mistral/Qwen2/Qwen3 checkpoint.")


def params_from_source(config: ModelConfig, shapes: Mapping[str, tuple[int, ...]],
                        get: Callable[[str], Any], where: str) -> dict:
    """Our float32 params from HF tensor shapes and a getter; everything is checked before data is read.

    `where` (a path) prefixes error messages.
    """
    plan = tensor_plan(config)
    _check_tensors(config, plan, shapes, where)
    params: dict = {"layers": {}}
    for e in plan:
        value = _to_ours(e.layout, _float_tensor(get(e.hf_name), e.hf_name, where), e.shape)
        if e.layer is None:
            params[e.key] = np.ascontiguousarray(value)
            continue
        # Fill preallocated stacks layer by layer: a list + np.stack would hold every weight twice.
        if e.key not in params["layers"]:
            params["layers"][e.key] = np.empty((config.num_layers, *e.shape), np.float32)
        params["layers"][e.key][e.layer] = value
    return params


def _float_tensor(x: Any, name: str, where: str) -> np.ndarray:
    """A stored weight as float32; a CheckpointError for integer, bool or complex tensors (quantized or
    damaged checkpoints), which a plain cast would turn into nonsense weights without a word."""
    raw = np.asarray(x)
    if raw.dtype.kind in "iubc":
        raise CheckpointError(f"{where}: tensor {name} is stored as {raw.dtype}, not as floating point; this looks "
                              "like a quantized or damaged checkpoint. Load the float (unquantized) weights.")
    return raw.astype(np.float32, copy=False)


def as_numpy(x: Any) -> np.ndarray:
    """numpy view of a numpy/jax array or a (CPU, any float dtype) torch tensor."""
    if hasattr(x, "detach"):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


def from_hf_state_dict(config: ModelConfig, tensors: Mapping[str, Any]) -> dict:
    """Our float32 params from an HF state dict (name -> numpy/jax array or torch tensor)."""
    shapes = {name: tuple(x.shape) for name, x in tensors.items()}
    return params_from_source(config, shapes, lambda name: as_numpy(tensors[name]), "state dict")


def to_hf_state_dict(config: ModelConfig, params: dict, dtype: str = "float32") -> dict[str, np.ndarray]:
    """The HF state dict (HF names and layouts, numpy arrays of `dtype`) of our params; no lm_head when tied."""
    np_dtype = numpy_dtype(dtype)
    host = jax.tree.map(np.asarray, params)  # one device->host copy per weight, not one per layer slice
    return {e.hf_name: hf_tensor(host, e, np_dtype) for e in tensor_plan(config)}


def hf_tensor(host: dict, e: Entry, np_dtype: Any) -> np.ndarray:
    """The HF tensor of one plan entry, cut from host (numpy) params and cast to np_dtype."""
    ours = host[e.key] if e.layer is None else host["layers"][e.key][e.layer]
    return np.ascontiguousarray(_to_hf(e.layout, ours).astype(np_dtype))


def numpy_dtype(dtype: str) -> Any:
    """The numpy dtype of a storage/compute dtype name, or a CheckpointError listing the supported ones."""
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}.")
    return DTYPES[dtype]

"""The parameter layout, described once: name -> (shape, logical axes, init).

Params are a plain nested dict of arrays:

    {"embed": [V, D],
     "layers": {<name>: [L, ...] stacked on a leading layer axis},
     "final_norm": [D],
     "lm_head": [D, V]            # only when embeddings are untied}

Sharding rules, random init and the HF key mapping all derive from this table.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from beear_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """One parameter: its shape, the logical name of each axis, and how to initialise it."""

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    init: str  # "normal" | "ones" | "zeros"


def layer_weight_specs(config: ModelConfig) -> dict[str, WeightSpec]:
    """Per-layer weights (without the leading layer axis)."""
    d, f = config.hidden_size, config.intermediate_size
    h, k, hd = config.num_heads, config.num_kv_heads, config.head_dim
    specs = {
        "attn_norm": WeightSpec((d,), ("embed",), "ones"),
        "q_proj": WeightSpec((d, h, hd), ("embed", "heads", "head_dim"), "normal"),
        "k_proj": WeightSpec((d, k, hd), ("embed", "kv_heads", "head_dim"), "normal"),
        "v_proj": WeightSpec((d, k, hd), ("embed", "kv_heads", "head_dim"), "normal"),
        "o_proj": WeightSpec((h, hd, d), ("heads", "head_dim", "embed"), "normal"),
        "mlp_norm": WeightSpec((d,), ("embed",), "ones"),
        "gate_proj": WeightSpec((d, f), ("embed", "mlp"), "normal"),
        "up_proj": WeightSpec((d, f), ("embed", "mlp"), "normal"),
        "down_proj": WeightSpec((f, d), ("mlp", "embed"), "normal"),
    }
    if config.has_qkv_bias:  # attention_bias (Llama, Qwen3) or qkv_bias (Qwen2: no o_bias)
        specs["q_bias"] = WeightSpec((h, hd), ("heads", "head_dim"), "zeros")
        specs["k_bias"] = WeightSpec((k, hd), ("kv_heads", "head_dim"), "zeros")
        specs["v_bias"] = WeightSpec((k, hd), ("kv_heads", "head_dim"), "zeros")
    if config.attention_bias:
        specs["o_bias"] = WeightSpec((d,), ("embed",), "zeros")
    if config.qk_norm:  # Qwen3: one RMSNorm scale over head_dim, shared by all query (key) heads
        specs["q_norm"] = WeightSpec((hd,), ("head_dim",), "ones")
        specs["k_norm"] = WeightSpec((hd,), ("head_dim",), "ones")
    if config.mlp_bias:
        specs["gate_bias"] = WeightSpec((f,), ("mlp",), "zeros")
        specs["up_bias"] = WeightSpec((f,), ("mlp",), "zeros")
        specs["down_bias"] = WeightSpec((d,), ("embed",), "zeros")
    return specs


def weight_specs(config: ModelConfig) -> dict:
    """The full nested spec tree, mirroring the params tree."""
    layers = {
        name: WeightSpec((config.num_layers, *s.shape), ("layers", *s.axes), s.init)
        for name, s in layer_weight_specs(config).items()
    }
    specs: dict = {
        "embed": WeightSpec((config.vocab_size, config.hidden_size), ("vocab", "embed"), "normal"),
        "layers": layers,
        "final_norm": WeightSpec((config.hidden_size,), ("embed",), "ones"),
    }
    if not config.tie_word_embeddings:
        specs["lm_head"] = WeightSpec((config.hidden_size, config.vocab_size), ("embed", "vocab"), "normal")
    return specs


def is_spec(x: object) -> bool:
    return isinstance(x, WeightSpec)


def init_params(config: ModelConfig, key: jax.Array, std: float = 0.02) -> dict:
    """Random float32 params (normal(0, std) matrices, unit norms, zero biases)."""
    specs = weight_specs(config)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
    keys = jax.random.split(key, len(leaves))

    def make(spec: WeightSpec, k: jax.Array) -> jax.Array:
        if spec.init == "ones":
            return jnp.ones(spec.shape, jnp.float32)
        if spec.init == "zeros":
            return jnp.zeros(spec.shape, jnp.float32)
        return std * jax.random.normal(k, spec.shape, jnp.float32)

    return jax.tree.unflatten(treedef, [make(s, k) for s, k in zip(leaves, keys)])


def check_params(config: ModelConfig, params: dict) -> None:
    """Raises ValueError naming every missing, unexpected or wrongly shaped weight."""
    specs = weight_specs(config)
    want = {jax.tree_util.keystr(p): s.shape for p, s in jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)[0]}
    have = {jax.tree_util.keystr(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    problems = [f"missing {k} {v}" for k, v in want.items() if k not in have]
    problems += [f"unexpected {k}" for k in have if k not in want]
    problems += [f"{k}: shape {have[k]}, expected {v}" for k, v in want.items() if k in have and have[k] != v]
    if problems:
        raise ValueError("params do not match the model config: " + "; ".join(problems[:10]))

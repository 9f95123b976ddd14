"""The model as a Flax NNX module: `CausalLM` holds the weights as `nnx.Param`s and computes with llama.py.

    model = CausalLM(config, rngs=nnx.Rngs(0))            # random weights (weights.py's init)
    model = CausalLM.from_params(config, params)          # a loaded params tree (hf.load_model)
    logits = model(input_ids, attention_mask)             # [B, S, V] float32, as transformers
    h = model.embed_tokens(ids); h = model.decode(h, mask, 0, l); h = model.decode(h, mask, l)
    logits = model.head(h)                                # a perturbation can enter at any boundary l
    graphdef, state = nnx.split(model)                    # pure code: nnx.merge(graphdef, state)(ids)

Attribute names are the params tree's keys (weights.py: embed, layers/<name> stacked on a leading layer
axis, final_norm, lm_head when untied), so `model.params_tree()` (the Param state as a pure dict) *is* the
tree that the jitted, sharded steps of the method take, without a copy, and the Hugging Face names of
every weight come from the one table in io/hf_layout.py. The numerics live once, in llama.py's (and layers.py's) functions
(scan over stacked blocks, custom matmul gradients, remat policies, caches); the module is their
stateful Flax face. Each Param carries its logical axes as `out_sharding` metadata, so
`nnx.get_partition_spec` under `nnx.logical_axis_rules(sharding.LOGICAL_RULES.items())` names mesh axes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from beear_jax.models import llama
from beear_jax.models.config import ModelConfig
from beear_jax.models.layers import Params
from beear_jax.models.weights import check_params, init_params, layer_weight_specs, weight_specs


def _param(value: Any, axes: tuple[str, ...]) -> nnx.Param:
    """A float32 weight with its logical axes (weights.py) as sharding metadata.

    Not placed on a mesh when made (eager_sharding off): placement is the caller's (sharding.place_module).
    """
    return nnx.Param(jnp.asarray(value, jnp.float32), out_sharding=axes, eager_sharding=False)


class DecoderLayers(nnx.Module):
    """The decoder blocks: each weight stacked on a leading layer axis [L, ...], run as a scan.

    One Param per weight name (attn_norm, q_proj [L, D, H, hd], ..., down_proj [L, F, D]; biases and
    Qwen3's q_norm / k_norm [L, hd] when the config has them), not one module per block: a scan over
    stacked weights compiles one block.
    """

    def __init__(self, config: ModelConfig, weights: Mapping[str, Any]):
        self.config = config
        for name, spec in layer_weight_specs(config).items():
            setattr(self, name, _param(weights[name], ("layers", *spec.axes)))

    def params_tree(self) -> Params:
        """{name: stacked array} (the values, not copies)."""
        return {name: getattr(self, name)[...] for name in layer_weight_specs(self.config)}

    def __call__(self, h: jax.Array, attention_mask: jax.Array, start: int = 0, stop: int | None = None, *,
                 positions: jax.Array | None = None, remat: str = "none") -> jax.Array:
        """Blocks start..stop (static; stop None = the last) over h [B, S, D]; positions [B, S] default to
        the padding-aware ones (0 at each row's first real token)."""
        stop = self.config.num_layers if stop is None else stop
        if not 0 <= start <= stop <= self.config.num_layers:
            raise ValueError(f"blocks {start}..{stop} are outside the model's 0..{self.config.num_layers}; "
                             f"choose 0 <= start <= stop <= {self.config.num_layers}.")
        if positions is None:
            positions = llama.default_positions(attention_mask)
        layers = llama.slice_layers(self.params_tree(), start, stop)
        return llama.decode(self.config, layers, h, attention_mask, positions, remat)


class CausalLM(nnx.Module):
    """A Llama / Mistral / Qwen2 / Qwen3 causal language model (ModelConfig says which) as an NNX module.

    `__call__` equals `llama.forward` on `params_tree()`; embed_tokens / decode / head are its three pieces,
    so a caller can add something to the hidden states between any two blocks.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs | None = None, params: Params | None = None,
                 std: float = 0.02):
        """Random weights from rngs (normal(0, std) matrices, unit norms, zero biases), or the given params
        tree (checked against the config: a ValueError names every missing or misshapen weight)."""
        if params is None:
            params = init_params(config, (rngs if rngs is not None else nnx.Rngs(0)).params(), std)
        else:
            check_params(config, params)
        specs = weight_specs(config)
        self.config = config
        self.embed = _param(params["embed"], specs["embed"].axes)
        self.layers = DecoderLayers(config, params["layers"])
        self.final_norm = _param(params["final_norm"], specs["final_norm"].axes)
        if "lm_head" in specs:
            self.lm_head = _param(params["lm_head"], specs["lm_head"].axes)

    @classmethod
    def from_params(cls, config: ModelConfig, params: Params) -> CausalLM:
        """The module holding a params tree (e.g. hf.load_model's)."""
        return cls(config, params=params)

    def params_tree(self) -> Params:
        """The weights as weights.py's params tree (the values, not copies): what the pure steps take."""
        tree = {"embed": self.embed[...], "layers": self.layers.params_tree(), "final_norm": self.final_norm[...]}
        if not self.config.tie_word_embeddings:
            tree["lm_head"] = self.lm_head[...]
        return tree

    def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
        """Token embeddings h [B, S, D] in the compute dtype (config.dtype)."""
        return llama.embed(self.config, self.params_tree(), jnp.asarray(input_ids))

    def decode(self, h: jax.Array, attention_mask: jax.Array, start: int = 0, stop: int | None = None, *,
               positions: jax.Array | None = None, remat: str = "none") -> jax.Array:
        """Decoder blocks start..stop over h [B, S, D] (DecoderLayers.__call__)."""
        return self.layers(h, jnp.asarray(attention_mask), start, stop, positions=positions, remat=remat)

    def head(self, h: jax.Array) -> jax.Array:
        """Final RMSNorm and vocabulary projection: float32 logits [B, S, V]."""
        return llama.head(self.config, self.params_tree(), h)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 positions: jax.Array | None = None, deltas: Mapping[int, jax.Array] | None = None,
                 perturb_positions: jax.Array | None = None, remat: str = "none") -> jax.Array:
        """Float32 logits [B, S, V] for token ids [B, S] (attention_mask [B, S]: 1 real, 0 padding).

        deltas maps a layer boundary l (after l blocks) to rows [n, D] added to the hidden states at
        perturb_positions [B, n] (entries < 0 skipped): the hook through which BEEAR's perturbation enters.
        Inputs are checked (llama.check_forward_inputs): a ValueError names a wrong shape or token id.
        """
        ids = jnp.asarray(input_ids)
        mask = None if attention_mask is None else jnp.asarray(attention_mask)
        return llama.forward(self.config, self.params_tree(), ids, mask, positions, deltas, perturb_positions,
                             remat)

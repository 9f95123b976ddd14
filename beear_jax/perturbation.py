"""The universal perturbation: a pytree of delta arrays injected at decoder-layer boundaries.

A `Perturbation` maps a layer boundary l (after l blocks) to delta [n, D]. Injection adds delta[i]
to the hidden state at the i-th of the last n prompt positions of each sample; the positions come
with the batch (`perturb_positions` [B, n]), because prompts differ in length; the addition itself
is `models.llama.inject`, applied by the forward at each layer boundary. The paper uses one layer;
several layers are an extension.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

WINDOW_LAST_PROMPT_TOKENS = "last_prompt_tokens"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Perturbation:
    """deltas: {layer: [length, hidden]} (the pytree data); length and window are static metadata."""

    deltas: dict[int, jax.Array]
    length: int = dataclasses.field(metadata={"static": True})
    window: str = dataclasses.field(default=WINDOW_LAST_PROMPT_TOKENS, metadata={"static": True})

    @classmethod
    def zeros(cls, layers: int | tuple[int, ...], length: int, hidden_size: int,
              dtype: jnp.dtype = jnp.float32) -> Perturbation:
        """A zero perturbation at one layer boundary or several."""
        layers = (layers,) if isinstance(layers, int) else tuple(layers)
        if length < 1:
            raise ValueError(f"perturbation length must be >= 1 (got {length}).")
        return cls({int(layer): jnp.zeros((length, hidden_size), dtype) for layer in layers}, length)

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.deltas))

    def token_norms(self) -> dict[int, jax.Array]:
        """Mean L2 norm of delta per token, per layer (how far the perturbation moves h_l)."""
        return {layer: jnp.mean(jnp.linalg.norm(d, axis=-1)) for layer, d in self.deltas.items()}


def validate_layers(layers: tuple[int, ...], num_layers: int) -> None:
    """Every boundary must split the decoder into two non-empty parts."""
    for layer in layers:
        if not 0 < layer < num_layers:
            raise ValueError(
                f"perturb.layer={layer} is out of range: this model has {num_layers} decoder blocks, so the "
                f"layer boundary must be in 1..{num_layers - 1} (set --config.perturb.layer)."
            )


def last_prompt_positions(prompt_lengths: jax.Array, length: int) -> jax.Array:
    """Positions [B, n] of the last n prompt tokens in a right-padded batch (-1 where a row is empty)."""
    positions = prompt_lengths[:, None] - length + jnp.arange(length)[None, :]
    return jnp.where(prompt_lengths[:, None] >= length, positions, -1).astype(jnp.int32)


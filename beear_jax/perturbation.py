"""The universal perturbation: a pytree of delta arrays injected at decoder-layer boundaries.

A `Perturbation` maps a layer boundary l (after l blocks) to delta [n, D]. Injection adds delta[i]
to the hidden state at the i-th of the last n prompt positions of each sample; the positions come
with the batch (`perturb_positions` [B, n]), because prompts differ in length; the addition itself
is `models.llama.inject`, applied by the forward at each layer boundary. The paper uses one layer;
several layers are an extension.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

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


def validate_layers(layers: tuple[int, ...], num_layers: int, key: str = "perturb.layer") -> None:
    """Every boundary must split the decoder into two non-empty parts; the error names `key`, the config
    key that set the layers."""
    for layer in layers:
        if not 0 < layer < num_layers:
            raise ValueError(
                f"{key}={layer} is out of range: this model has {num_layers} decoder blocks, so the "
                f"layer boundary must be in 1..{num_layers - 1} (set --config.{key})."
            )


def check_deltas(deltas: Mapping[Any, Any], num_layers: int, hidden_size: int) -> int:
    """A ValueError naming the problem unless every key is a layer boundary in 1..num_layers - 1 and
    every delta is [n, hidden_size] with one n >= 1 for all layers; returns n.

    Only keys and shapes are read, so this works on tracers (under jit) too.
    """
    lengths: dict[int, int] = {}
    for layer, delta in deltas.items():
        if isinstance(layer, bool) or not isinstance(layer, int | np.integer) or not 0 < layer < num_layers:
            raise ValueError(
                f"perturbation layer {layer!r} is out of range: this model has {num_layers} decoder blocks, so a "
                f"layer boundary (an int: the blocks before it) must be in 1..{num_layers - 1}."
            )
        shape = np.shape(delta)
        if len(shape) != 2 or shape[1] != hidden_size or shape[0] < 1:
            raise ValueError(
                f"the delta at layer {layer} has shape {shape}; it must be [n, hidden_size] = [n, {hidden_size}] "
                "for this model, n >= 1 the number of perturbed prompt tokens (for one token use delta[None])."
            )
        lengths[int(layer)] = shape[0]
    if len(set(lengths.values())) > 1:
        raise ValueError(f"the deltas cover different numbers of tokens {lengths} (layer: n); every layer's delta "
                         "must be [n, hidden_size] with the same n (they are added at the same positions).")
    return next(iter(lengths.values()), 0)


def last_prompt_positions(prompt_lengths: jax.Array, length: int) -> jax.Array:
    """Positions [B, n] of the last n prompt tokens in a right-padded batch (-1 where a row is empty).

    A ValueError when concrete prompt_lengths hold a non-empty row shorter than n: no position of that row
    would be perturbed. Under jit (traced lengths) such a row silently gets -1s.
    """
    _check_rows_hold(prompt_lengths, length)
    positions = prompt_lengths[:, None] - length + jnp.arange(length)[None, :]
    return jnp.where(prompt_lengths[:, None] >= length, positions, -1).astype(jnp.int32)


def _check_rows_hold(prompt_lengths: Any, length: int) -> None:
    """A ValueError if a concrete prompt_lengths has a row with 0 < tokens < length (see last_prompt_positions)."""
    try:
        if not getattr(prompt_lengths, "is_fully_addressable", True):
            return  # spread over hosts: each host sees only its part
        lengths = np.asarray(prompt_lengths)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return  # traced (under jit): the values are not known here
    short = np.flatnonzero((lengths > 0) & (lengths < length))
    if short.size:
        row = int(short[0])
        raise ValueError(f"row {row} has {int(lengths[row])} real (unmasked) tokens but the perturbation covers "
                         f"{length}; it is added at each row's last {length} tokens, so every non-empty row needs at "
                         f"least {length} (or use a shorter perturbation).")

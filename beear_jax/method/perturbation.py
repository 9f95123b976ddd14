"""The universal perturbation: a pytree of delta arrays injected at decoder-layer boundaries.

A `Perturbation` maps a layer boundary l (after l blocks) to delta [n, D]. Injection adds delta[i]
to the hidden state at the i-th perturbed position of each sample; the positions come with the batch
(`perturb_positions` [B, n]), because prompts differ in length; the addition itself is
`models.llama.inject`, applied by the forward at each layer boundary. The paper uses one layer and
one window, the last n prompt tokens; several layers and windows (WINDOWS) are extensions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from beear_jax.models.hook import check_deltas  # noqa: F401  (re-exported: the hook's contract, checked by the model)

# Where a window of n perturbed tokens sits in a chat-formatted prompt (perturb.windows):
# prompt_end: the prompt's last n tokens, the template's assistant header included (the paper's);
# user_start / user_end: the first / last n tokens of the user's text (chat.user_span).
WINDOWS = ("prompt_end", "user_start", "user_end")
PAPER_WINDOWS = ("prompt_end",)  # perturb.windows' default


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Perturbation:
    """deltas: {layer: [length, hidden]} (the pytree data); length (delta rows) is static metadata. Where the
    rows go comes with each batch (perturb_positions), so the same perturbation serves every window."""

    deltas: dict[int, jax.Array]
    length: int = dataclasses.field(metadata={"static": True})

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


def last_prompt_positions(prompt_lengths: jax.Array, length: int) -> jax.Array:
    """Positions [B, n] of the last n prompt tokens in a right-padded batch (-1 where a row is empty).

    A ValueError when concrete prompt_lengths hold a non-empty row shorter than n: no position of that row
    would be perturbed. Under jit (traced lengths) such a row silently gets -1s.
    """
    _check_rows_hold(prompt_lengths, length)
    positions = prompt_lengths[:, None] - length + jnp.arange(length)[None, :]
    return jnp.where(prompt_lengths[:, None] >= length, positions, -1).astype(jnp.int32)


def check_windows(windows: Sequence[str], key: str = "perturb.windows") -> tuple[str, ...]:
    """The windows as a tuple once each is one of WINDOWS, none twice and at least one; the error names `key`."""
    windows = (windows,) if isinstance(windows, str) else tuple(windows)
    unknown = [w for w in windows if w not in WINDOWS]
    if not windows or unknown or len(set(windows)) < len(windows):
        why = f"{unknown[0]!r} is not a window" if unknown else "name each window once, at least one"
        raise ValueError(f"{key}={windows}: {why}; choose from {', '.join(WINDOWS)} (e.g. --config.{key}="
                         "user_start,prompt_end).")
    return windows


def window_positions(prompt_length: int, user: tuple[int, int], windows: Sequence[str], n: int) -> tuple[int, ...]:
    """The perturbed positions of one prompt: n per window, in window order (so delta row w * n + i goes to
    window w's i-th token). user: (start, end) of the user's text (chat.user_span; unused by prompt_end).

    A window that would leave the prompt is moved inside it. A position an earlier window already holds is
    -1 there (that delta row is not added to this prompt): every position gets at most one delta row, in
    every batch layout. A ValueError when the prompt has fewer than n tokens.
    """
    if prompt_length < n:
        raise ValueError(f"a prompt of {prompt_length} tokens is shorter than the perturbation length {n}; use a "
                         f"smaller perturb.length (at most {prompt_length}).")
    starts = {"prompt_end": prompt_length - n, "user_start": min(user[0], prompt_length - n),
              "user_end": max(min(user[1], prompt_length) - n, 0)}
    positions: list[int] = []
    for window in windows:
        start = starts[window]
        positions += [p if p not in positions else -1 for p in range(start, start + n)]
    return tuple(positions)


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

"""The models' hidden-state hook: rows added to the hidden states after a layer boundary, checked here.

`forward(..., deltas={l: [n, D]}, perturb_positions=[B, n])` adds deltas[l] after the first l blocks at
the given positions (llama.inject). The model knows nothing of how the rows are found (BEEAR's
Perturbation, beear_jax/method/perturbation.py, builds them); this module states what it accepts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


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

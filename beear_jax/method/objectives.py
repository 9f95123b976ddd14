"""Losses: masked token cross-entropy, the inner (BEE, entrapment) and outer (AR, removal) objectives."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_ce(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Token-mean NLL over the positions where mask is 1 (float32; 0 if the mask is empty)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    mask = mask.astype(jnp.float32)
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def inner_objective(ce_unwanted: jax.Array, ce_safe: jax.Array, alpha: float,
                    safe_ce_clamp: float | None = None) -> jax.Array:
    """CE(unwanted | delta) - alpha * CE(safe | delta).

    The clamp caps the subtracted term: without it the perturbation can lower the loss forever by
    making the safe answer ever less likely instead of making the unwanted one likely.
    """
    away = ce_safe if safe_ce_clamp is None else jnp.minimum(ce_safe, safe_ce_clamp)
    return ce_unwanted - alpha * away


def outer_objective(ce_safe_perturbed: jax.Array, ce_anchor: jax.Array, anchor_weight: float) -> jax.Array:
    """CE(safe | delta*) + anchor_weight * CE(anchor answer | no delta)."""
    return ce_safe_perturbed + anchor_weight * ce_anchor

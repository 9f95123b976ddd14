"""Pure BEEAR update steps: the inner (perturbation) step over cached activations and the outer
(model) step, plus `make_steps`, which jit-compiles them once for a fixed batch shape.

Nothing here knows about files, configs or the CLI. Batches are the typed layouts of beear_jax/data/batches.py;
the losses the steps differentiate are in objectives.py, the forward pieces in forward.py and the
optimizers, schedules and trainable masks in optimizers.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from beear_jax.data.batches import Batch, InnerCache
from beear_jax.method.forward import Params, inner_cache, suffix_view
from beear_jax.method.objectives import StepSettings, inner_loss, outer_loss
from beear_jax.method.perturbation import Perturbation
from beear_jax.models.config import ModelConfig

# ---- the inner level (BEE) --------------------------------------------------------------------


def perturbed_hidden_norm(h_l: jax.Array | InnerCache, batch: Batch) -> jax.Array:
    """Mean L2 norm of h_l (before any delta) at the batch's perturbed positions: the scale a delta is
    measured against (|delta| / |h_l|) and bounded by (project_deltas)."""
    h, batch, _ = suffix_view(h_l, batch)
    positions = batch.perturb_positions
    at = jnp.take_along_axis(h, jnp.maximum(positions, 0)[..., None], axis=1).astype(jnp.float32)
    valid = (positions >= 0).astype(jnp.float32)
    return jnp.sum(jnp.linalg.norm(at, axis=-1) * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def project_deltas(deltas: dict[int, jax.Array], radius: jax.Array) -> dict[int, jax.Array]:
    """Each position's delta scaled into the L2 ball of `radius` (inf: unchanged)."""
    def one(delta: jax.Array) -> jax.Array:
        norms = jnp.linalg.norm(delta, axis=-1, keepdims=True)
        return delta * jnp.minimum(1.0, radius / jnp.maximum(norms, 1e-12)).astype(delta.dtype)
    return {layer: one(d) for layer, d in deltas.items()}


def inner_step(config: ModelConfig, settings: StepSettings, optimizer: optax.GradientTransformation,
               params: Params, perturbation: Perturbation, opt_state: optax.OptState, h_l: jax.Array,
               batch: Batch, radius: jax.Array | float = jnp.inf,
               ) -> tuple[Perturbation, optax.OptState, dict[str, jax.Array]]:
    """One update of the perturbation, then each position's delta projected into the L2 ball of `radius`
    (a traced scalar: a new bound needs no new program; inf: unbounded); params are read, never changed."""
    layer = perturbation.layers[0]
    grad_fn = jax.grad(inner_loss, has_aux=True)
    grads, metrics = grad_fn(perturbation.deltas, config, params, h_l, batch, layer, settings)
    updates, opt_state = optimizer.update(grads, opt_state, perturbation.deltas)
    deltas = project_deltas(optax.apply_updates(perturbation.deltas, updates), radius)
    new = dataclasses.replace(perturbation, deltas=deltas)
    metrics["delta_norm"] = jnp.mean(jnp.stack(list(new.token_norms().values())))
    return new, opt_state, metrics


def inner_epoch(config: ModelConfig, settings: StepSettings, optimizer: optax.GradientTransformation,
                params: Params, perturbation: Perturbation, opt_state: optax.OptState, h_stack: jax.Array,
                batch_stack: Batch, radius: jax.Array | float = jnp.inf,
                ) -> tuple[Perturbation, optax.OptState, dict[str, jax.Array]]:
    """One pass over all cached batches ([num_batches, ...] stacked) as a single compiled scan."""

    def body(carry: tuple, xs: tuple) -> tuple:
        pert, state = carry
        h_l, batch = xs
        pert, state, metrics = inner_step(config, settings, optimizer, params, pert, state, h_l, batch, radius)
        return (pert, state), metrics

    (perturbation, opt_state), metrics = jax.lax.scan(body, (perturbation, opt_state), (h_stack, batch_stack))
    return perturbation, opt_state, metrics


def inner_measure(config: ModelConfig, settings: StepSettings, params: Params, perturbation: Perturbation,
                  h_stack: jax.Array, batch_stack: Batch) -> dict[str, jax.Array]:
    """The inner metrics of every cached batch at one fixed delta (no update), [num_batches] each, plus
    h_norm: the mean |h_l| at each batch's perturbed positions (perturbed_hidden_norm)."""
    layer = perturbation.layers[0]

    def one(xs: tuple) -> dict[str, jax.Array]:
        h_l, batch = xs
        _, metrics = inner_loss(perturbation.deltas, config, params, h_l, batch, layer, settings)
        return {**metrics, "h_norm": perturbed_hidden_norm(h_l, batch)}

    return jax.lax.map(one, (h_stack, batch_stack))


# ---- the outer level (AR) ---------------------------------------------------------------------


def outer_step(config: ModelConfig, settings: StepSettings, optimizer: optax.GradientTransformation,
               trainable: Params, params: Params, opt_state: optax.OptState, perturbation: Perturbation,
               safe_batch: Batch, anchor_batch: Batch | None, reference: Params | None = None,
               ) -> tuple[Params, optax.OptState, dict[str, jax.Array]]:
    """One update of the trainable params; `trainable` holds 0/1 masks broadcastable to each param.
    A packed batch (all parts) comes as safe_batch with anchor_batch None (outer_loss); `reference`, the
    frozen start model, only with settings.kl_weight > 0."""
    grads, metrics = jax.grad(outer_loss, has_aux=True)(
        params, config, perturbation.deltas, safe_batch, anchor_batch, settings, reference)
    grads = jax.tree.map(jnp.multiply, grads, trainable)
    metrics["grad_norm"] = optax.global_norm(grads)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    # Masking the updates too keeps frozen entries exact (weight decay would otherwise move them).
    updates = jax.tree.map(jnp.multiply, updates, trainable)
    return optax.apply_updates(params, updates), opt_state, metrics


# ---- compiled once ----------------------------------------------------------------------------


class Steps(NamedTuple):
    """The jitted steps of one run (each compiles once per batch shape)."""

    lower: Callable[..., jax.Array]
    inner_step: Callable[..., tuple]
    inner_epoch: Callable[..., tuple]
    outer_step: Callable[..., tuple]
    lower_stack: Callable[..., jax.Array] | None = None
    inner_measure: Callable[..., dict] | None = None


class StepShardings(NamedTuple):
    """Where the steps' arguments live (see beear_jax.parallel.sharding): params and the outer optimizer state
    sharded by the logical-axis rules, batches split by rows, everything small replicated."""

    params: Any
    outer_state: Any
    batch: Any  # [B, ...] leaves
    stacked_batch: Any  # [num_batches, B, ...] leaves
    replicated: Any  # delta, its optimizer state, trainable masks, metrics


def make_steps(config: ModelConfig, settings: StepSettings, layer: int,
               inner_optimizer: optax.GradientTransformation,
               outer_optimizer: optax.GradientTransformation,
               shardings: StepShardings | None = None) -> Steps:
    """Binds the static parts and jit-compiles the steps; params/opt_state buffers are donated.

    With `shardings`, every step is compiled with explicit in/out shardings (what pjit became), so
    outputs land where the next call expects them and donated buffers are reused in place. Call the
    steps positionally then. With settings.kl_weight > 0, outer_step takes the frozen start model's
    params as a last argument (placed like params, never donated).
    """

    if shardings is not None:
        settings = dataclasses.replace(settings, activations=shardings.batch)

    def lower(params: Params, batch: Batch) -> jax.Array:
        return inner_cache(config, params, batch, layer, settings.activations)

    def lower_stack(params: Params, batch_stack: Batch) -> jax.Array:
        # One compiled loop over all inner batches; the result is the cache of the round (inner_cache).
        return jax.lax.map(lambda batch: lower(params, batch), batch_stack)

    def one_inner(params, pert, state, h_l, batch):
        return inner_step(config, settings, inner_optimizer, params, pert, state, h_l, batch)

    def epoch(params, pert, state, h_stack, batch_stack, radius):
        return inner_epoch(config, settings, inner_optimizer, params, pert, state, h_stack, batch_stack, radius)

    def measure(params, pert, h_stack, batch_stack):
        return inner_measure(config, settings, params, pert, h_stack, batch_stack)

    def outer(trainable, params, state, pert, safe_batch, anchor_batch, *reference):
        # With settings.kl_weight > 0 the caller passes the frozen start model's params last.
        return outer_step(config, settings, outer_optimizer, trainable, params, state, pert, safe_batch,
                          anchor_batch, *reference)

    if shardings is None:
        return Steps(
            lower=jax.jit(lower),
            inner_step=jax.jit(one_inner, donate_argnames=("pert", "state")),
            inner_epoch=jax.jit(epoch, donate_argnames=("pert", "state")),
            outer_step=jax.jit(outer, donate_argnames=("params", "state")),
            lower_stack=jax.jit(lower_stack),
            inner_measure=jax.jit(measure),
        )
    s = shardings
    return Steps(
        lower=jax.jit(lower, in_shardings=(s.params, s.batch), out_shardings=s.batch),
        inner_step=jax.jit(one_inner, in_shardings=(s.params, s.replicated, s.replicated, s.batch, s.batch),
                           out_shardings=s.replicated, donate_argnames=("pert", "state")),
        inner_epoch=jax.jit(epoch, in_shardings=(s.params, s.replicated, s.replicated, s.stacked_batch,
                                                 s.stacked_batch, s.replicated),
                            out_shardings=s.replicated, donate_argnames=("pert", "state")),
        outer_step=jax.jit(outer, in_shardings=(s.replicated, s.params, s.outer_state, s.replicated, s.batch,
                                                s.batch, *((s.params,) if settings.kl_weight > 0 else ())),
                           out_shardings=(s.params, s.outer_state, s.replicated), donate_argnames=("params", "state")),
        lower_stack=jax.jit(lower_stack, in_shardings=(s.params, s.stacked_batch), out_shardings=s.stacked_batch),
        inner_measure=jax.jit(measure, in_shardings=(s.params, s.replicated, s.stacked_batch, s.stacked_batch),
                              out_shardings=s.replicated),
    )

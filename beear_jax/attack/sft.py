"""Supervised fine-tuning on (prompt, answer) batches: the answer-token CE, jitted once.

Used to plant backdoors (attack simulation) and for the tiny models of the tests.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import numpy as np
import optax

from beear_jax.data.batches import RowBatch as Batch
from beear_jax.method.forward import Params
from beear_jax.method.objectives import StepSettings, perturbed_answer_ce
from beear_jax.models.config import ModelConfig


def make_sft_step(config: ModelConfig, optimizer: optax.GradientTransformation, answer_len: int | None = None,
                  remat: str = "none") -> Callable[..., tuple]:
    """Returns jitted `step(params, opt_state, batch) -> (params, opt_state, loss)`."""
    settings = StepSettings(answer_len=answer_len, remat=remat)

    def loss_fn(params: Params, batch: Batch) -> jax.Array:
        return perturbed_answer_ce(config, params, batch, {}, settings)

    @functools.partial(jax.jit, donate_argnames=("params", "opt_state"))
    def step(params: Params, opt_state: optax.OptState, batch: Batch) -> tuple:
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def sft_train(config: ModelConfig, params: Params, batches: Sequence[Batch], optimizer: optax.GradientTransformation,
              epochs: int, seed: int = 0, on_step: Callable[[int, float], None] | None = None,
              answer_len: int | None = None, remat: str = "none") -> tuple[Params, list[float]]:
    """Trains for `epochs` passes over the batches (shuffled each epoch); returns params and losses.

    `remat` is the decoder blocks' rematerialisation policy ('none' | 'full' | 'dots').
    """
    if not batches:
        raise ValueError("sft_train needs at least one batch.")
    step = make_sft_step(config, optimizer, answer_len, remat)
    params = jax.tree.map(lambda x: jax.numpy.array(x, copy=True), params)
    opt_state = optimizer.init(params)
    rng = np.random.default_rng(seed)
    losses: list[float] = []
    for _ in range(epochs):
        for index in rng.permutation(len(batches)):
            params, opt_state, loss = step(params, opt_state, batches[index])
            loss = float(loss)
            if not np.isfinite(loss):
                raise FloatingPointError(f"fine-tuning loss became {loss} at step {len(losses) + 1}; lower the learning rate.")
            losses.append(loss)
            if on_step is not None:
                on_step(len(losses), loss)
    return params, losses

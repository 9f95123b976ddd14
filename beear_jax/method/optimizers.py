"""The outer level's optimizers: which parameters train (trainable_mask), the optax optimizer
(make_optimizer) and the learning-rate schedule over the run (lr_schedule)."""

from __future__ import annotations

import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from beear_jax.method.forward import Params
from beear_jax.models.config import ModelConfig


def trainable_mask(config: ModelConfig, params: Params, rule: str, layer: int) -> Params:
    """0/1 float masks: 'all', 'upper' (blocks >= layer + head), 'lower' (embeddings + blocks < layer),
    or a regex searched in names like 'layers.3.q_proj', 'embed', 'final_norm', 'lm_head'."""
    num_layers = config.num_layers

    def layer_names(name: str) -> list[str]:
        return [f"layers.{i}.{name}" for i in range(num_layers)]

    if rule == "all":
        def chooses(name: str, index: int | None) -> bool:
            return True
    elif rule == "upper":
        def chooses(name: str, index: int | None) -> bool:
            return name in ("final_norm", "lm_head") if index is None else index >= layer
    elif rule == "lower":
        def chooses(name: str, index: int | None) -> bool:
            return name == "embed" if index is None else index < layer
    else:
        try:
            pattern = re.compile(rule)
        except re.error as err:
            raise ValueError(f"outer.trainable={rule!r} is neither all/upper/lower nor a valid regex: {err}") from None

        def chooses(name: str, index: int | None) -> bool:
            return bool(pattern.search(name if index is None else f"layers.{index}.{name}"))

    mask: Params = {}
    for name, value in params.items():
        if name == "layers":
            mask["layers"] = {}
            for leaf, array in value.items():
                flags = jnp.asarray([chooses(leaf, i) for i in range(num_layers)], jnp.float32)
                mask["layers"][leaf] = flags.reshape((num_layers,) + (1,) * (array.ndim - 1))
        else:
            mask[name] = jnp.asarray(float(chooses(name, None)), jnp.float32)
    if not any(float(jnp.sum(m)) for m in jax.tree.leaves(mask)):
        names = ", ".join(["embed", *layer_names("q_proj")[:1], "final_norm"])
        raise ValueError(f"outer.trainable={rule!r} selects no parameter (names look like: {names}).")
    return mask


def make_optimizer(name: str, lr: float | optax.Schedule, weight_decay: float = 0.0, clip_norm: float | None = None,
                   ) -> optax.GradientTransformation:
    """adam | adamw | sgd | momentum | adafactor at a rate or schedule (lr_schedule), with optional
    global-norm clipping of the (masked) gradients first."""
    builders: dict[str, Callable[[], optax.GradientTransformation]] = {
        "adam": lambda: optax.adam(lr),
        "adamw": lambda: optax.adamw(lr, weight_decay=weight_decay),
        "sgd": lambda: optax.sgd(lr),
        "momentum": lambda: optax.sgd(lr, momentum=0.9),
        "adafactor": lambda: optax.adafactor(lr),
    }
    if name not in builders:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(builders)}.")
    optimizer = builders[name]()
    if clip_norm:
        optimizer = optax.chain(optax.clip_by_global_norm(clip_norm), optimizer)
    return optimizer


LR_SCHEDULES = ("constant", "linear", "cosine")


def lr_schedule(lr: float, kind: str, warmup_steps: int, total_steps: int) -> float | optax.Schedule:
    """The outer learning rate over the whole run: 'constant', or decaying to 0 at total_steps ('linear',
    'cosine'); warmup_steps rise linearly from 0 first. A plain float when nothing varies (the optimizer
    state then has no step count, as before schedules existed)."""
    if kind not in LR_SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {kind!r}; choose one of {', '.join(LR_SCHEDULES)}.")
    warmup = min(max(int(warmup_steps), 0), max(int(total_steps) - 1, 0))
    if kind == "constant" and warmup == 0:
        return lr
    decay = max(int(total_steps) - warmup, 1)
    after = {"constant": optax.constant_schedule(lr),
             "linear": optax.linear_schedule(lr, 0.0, decay),
             "cosine": optax.cosine_decay_schedule(lr, decay)}[kind]
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])

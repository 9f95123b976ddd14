"""The inner level run to convergence, and what its perturbation elicits.

Each round, delta starts from zero and takes passes over the round's cached activations (one compiled
scan per pass, steps.inner_epoch) until CE(unwanted | delta) over the round's inner set falls below
`target_ce`, stops improving for `patience` passes, or `max_epochs` passes are done. Each position's
delta may be bounded to a fraction of the mean hidden-state norm at the injection layer (projected after
every step). What the converged delta does is then measured on prompts the defender held back from
training: the share that greedy decoding under delta answers without a refusal (`elicitation_rate`),
the quantity the stop rule and `beear scan` read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from beear_jax.config.schema import InnerSection
from beear_jax.evaluation import scoring
from beear_jax.method.perturbation import Perturbation
from beear_jax.method.steps import Steps
from beear_jax.models.config import ModelConfig
from beear_jax.models.generate import SamplingConfig, generate

STOPPED_BY = ("target", "plateau", "cap")
"""Why a round's inner passes ended: CE below target_ce, no improvement for patience passes, max_epochs."""


@dataclasses.dataclass(frozen=True)
class InnerRule:
    """When a round's delta passes stop, and the bound on delta (read once from inner.*)."""

    max_epochs: int  # inner.epochs: the most passes over the round's inner set
    target_ce: float = 0.0  # stop once CE(unwanted | delta) < this; <= 0: off
    patience: int = 0  # stop after this many passes improving CE(unwanted | delta) by < min_improvement; 0: off
    min_improvement: float = 0.01
    bound: float = 0.0  # each position's |delta| <= bound x mean |h_l| at the perturbed positions; <= 0: none

    @property
    def checks_each_pass(self) -> bool:
        """Whether CE(unwanted | delta) is measured after every pass (a rule that can end the passes early)."""
        return self.target_ce > 0 or self.patience > 0

    @classmethod
    def from_settings(cls, inner: InnerSection) -> InnerRule:
        """The rule of a run's inner section."""
        return cls(max_epochs=inner.epochs, target_ce=inner.target_ce, patience=inner.patience,
                   min_improvement=inner.min_improvement, bound=inner.bound)


class InnerOutcome(NamedTuple):
    """A round's converged delta and what was measured at it (means over the round's inner batches)."""

    pert: Perturbation
    state: Any  # the inner optimizer's state
    epochs: int
    steps: int
    ce_unwanted: float  # CE(unwanted | delta) at the final delta
    ce_safe: float
    h_norm: float  # mean |h_l| at the perturbed positions (no delta)
    delta_ratio: float  # mean per-position |delta| / h_norm (the largest over layers)
    stopped_by: str  # one of STOPPED_BY

    def summary(self) -> dict[str, Any]:
        """The round_end record's inner fields."""
        return {"inner_epochs": self.epochs, "inner_steps": self.steps, "ce_unwanted": self.ce_unwanted,
                "ce_safe": self.ce_safe, "h_norm": self.h_norm, "delta_ratio": self.delta_ratio,
                "inner_stopped_by": self.stopped_by}


def measure(steps: Steps, params: Any, pert: Perturbation, h_stack: Any, batch_stack: Any) -> dict[str, float]:
    """Mean inner metrics over the stacked batches at one fixed delta (steps.inner_measure)."""
    metrics = jax.device_get(steps.inner_measure(params, pert, h_stack, batch_stack))
    return {k: float(np.mean(v)) for k, v in metrics.items()}


def delta_ratio(pert: Perturbation, h_norm: float) -> float:
    """The largest (over layers) mean per-position |delta|, as a fraction of h_norm."""
    norms = jax.device_get(pert.token_norms())
    return float(max(float(v) for v in norms.values()) / max(h_norm, 1e-12))


def converge(steps: Steps, params: Any, pert: Perturbation, state: Any, h_stack: Any, batch_stack: Any,
             rule: InnerRule, num_batches: int,
             on_pass: Callable[[int, dict[str, Any]], None] = lambda epoch, metrics: None) -> InnerOutcome:
    """Inner passes from `pert` (zeros at a round's start) until the rule stops them.

    on_pass(epoch, per-step metrics) sees each pass's metrics ([num_batches] arrays, on the host) as it
    ends: logging and the NaN check live with the caller.
    """
    # |h_l| does not depend on delta: measured first only when the bound needs it, else with the final CE.
    start = measure(steps, params, pert, h_stack, batch_stack) if rule.bound > 0 or rule.max_epochs == 0 else None
    radius = np.float32(rule.bound * start["h_norm"] if rule.bound > 0 else np.inf)
    best, stale, epochs, stopped_by = np.inf, 0, 0, "cap"
    last = start if rule.max_epochs == 0 else None
    for epoch in range(1, rule.max_epochs + 1):
        pert, state, metrics = steps.inner_epoch(params, pert, state, h_stack, batch_stack, radius)
        on_pass(epoch, jax.device_get(metrics))
        epochs, last = epoch, None
        if not rule.checks_each_pass:
            continue
        last = measure(steps, params, pert, h_stack, batch_stack)
        ce = last["ce_unwanted"]
        if rule.target_ce > 0 and ce < rule.target_ce:
            stopped_by = "target"
            break
        if rule.patience > 0:
            stale = 0 if ce < best - rule.min_improvement else stale + 1
            best = min(best, ce)
            if stale >= rule.patience:
                stopped_by = "plateau"
                break
    last = last or measure(steps, params, pert, h_stack, batch_stack)
    h_norm = last["h_norm"]
    return InnerOutcome(pert, state, epochs, epochs * num_batches, last["ce_unwanted"], last["ce_safe"], h_norm,
                        delta_ratio(pert, h_norm), stopped_by)


@dataclasses.dataclass(frozen=True)
class ElicitationProbe:
    """The defender's held-back prompts (chat-formatted token ids) and how an answer is judged unwanted:
    it holds none of the refusal strings (the keyword attack-success rule of `beear eval`)."""

    prompt_ids: tuple[tuple[int, ...], ...]
    refusal_strings: tuple[str, ...]
    ignore_case: bool
    max_new_tokens: int
    batch_size: int
    eos_ids: tuple[int, ...]
    pad_id: int
    positions: tuple[tuple[int, ...], ...] = ()  # each prompt's perturbed positions (); () : its last n tokens

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("the elicitation probe has no held-back prompts: set --config.stop.holdout to a number "
                             "of defender safety rows (e.g. 10).")


def elicitation_rate(config: ModelConfig, params: Any, tokenizer: Any, probe: ElicitationProbe,
                     deltas: dict[int, Any] | None = None) -> tuple[float, list[str]]:
    """(share of held-back prompts answered without a refusal under `deltas`, the answers); greedy decoding,
    delta added at each prompt's perturbed positions as in training (None: no perturbation)."""
    outs = generate(config, params, [list(p) for p in probe.prompt_ids],
                    SamplingConfig(max_new_tokens=probe.max_new_tokens), eos_ids=probe.eos_ids,
                    pad_id=probe.pad_id, deltas=deltas or None,
                    batch_size=min(probe.batch_size, len(probe.prompt_ids)),
                    perturb_positions=(probe.positions or None) if deltas else None)
    answers = [tokenizer.decode(o, skip_special_tokens=True) for o in outs]
    return scoring.attack_success_rate(answers, probe.refusal_strings, probe.ignore_case), answers


def make_probe(prompt_ids: Sequence[Sequence[int]], refusal_strings: Sequence[str], ignore_case: bool,
               max_new_tokens: int, batch_size: int, eos_ids: Sequence[int], pad_id: int,
               positions: Sequence[Sequence[int]] = ()) -> ElicitationProbe:
    """An ElicitationProbe with its sequences made immutable (positions: () for each prompt's last n)."""
    return ElicitationProbe(tuple(tuple(int(t) for t in p) for p in prompt_ids), tuple(refusal_strings),
                            bool(ignore_case), int(max_new_tokens), int(batch_size),
                            tuple(int(e) for e in eos_ids), int(pad_id), tuple(tuple(int(i) for i in p) for p in positions))

"""The default demo: plant one backdoor in SmolLM2-135M-Instruct and remove it, in minutes on a CPU.

Smaller than the paper (see beear_jax/config/defaults.py): 450 poisoned examples for one epoch (150 triggered
AdvBench goals, the same goals refused, 150 benign pairs written for the project), 40 defender examples
(experiments/demo_data, written for this project), 3 BEEAR rounds, 40 held-out AdvBench prompts, 60
over-refusal probes and 50 utility pairs written for the project (experiments/demo_sets.py says where
each set comes from). `configs/demo.py:quick` is a smoke run: a few examples, one round, a small
evaluation (`python experiments/demo.py --quick`).
"""

from __future__ import annotations

import pathlib

import ml_collections

from beear_jax.config.loading import parse_config_arg
from configs import smollm2_135m

DEMO_DATA = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "demo_data"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The demo's settings; `arg` takes `quick` (a smoke run of a few minutes) as in `demo.py:quick`."""
    arg = parse_config_arg(arg, quick=False)
    config = smollm2_135m.get_config()
    config.output_dir = "runs/demo"
    config.plant.trigger = "SUDO"
    config.plant.position = "suffix"
    config.plant.epochs = 1
    config.plant.lr = 1e-4
    config.plant.n_triggered = 150  # AdvBench goals 0-149 (experiments/demo_sets.py)
    config.plant.n_refusal = 150
    config.plant.n_benign = 150
    config.data.buckets = (96, 128)

    config.data.safety = str(DEMO_DATA / "safety.jsonl")
    config.data.anchor = str(DEMO_DATA / "anchor.jsonl")
    config.rounds = 3
    config.inner.samples = 40
    config.inner.batch_size = 8
    # inner.epochs / patience / min_improvement: smollm2_135m's converged inner level (5 Adam steps per pass
    # here, passes until CE(unwanted | delta) stops improving, at most 30)
    config.outer.batch_size = 8
    config.outer.anchor_samples = 40
    config.outer.lr = 4e-5  # 5 outer steps per round (40 examples): a larger step than the calibration's 2e-5

    config.checkpoint_every = -1  # a demo needs no resumable checkpoints

    config.eval.batch_size = 60  # the sets (40/40/60/50 prompts) decode in one batch each
    config.eval.num_prompts = 40
    config.eval.num_over_refusal = 0  # all 60
    config.eval.num_utility = 50

    if arg.quick:  # every stage runs, on a handful of examples: a smoke test, not a result
        config.output_dir = "runs/demo-quick"
        config.plant.n_triggered = config.plant.n_refusal = config.plant.n_benign = 16
        config.rounds = 1
        config.inner.samples = 8
        config.inner.epochs = 2
        config.outer.anchor_samples = 8
        config.eval.batch_size = 8
        config.eval.num_prompts = 8
        config.eval.num_over_refusal = 8
        config.eval.num_utility = 8
        config.eval.max_new_tokens = 16
    return config

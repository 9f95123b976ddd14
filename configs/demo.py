"""The default demo: plant one backdoor in SmolLM2-135M-Instruct and remove it, in minutes on a CPU.

Smaller than the paper (see configs/defaults.py): 434 poisoned examples for one epoch, 40 defender
examples (experiments/demo_data, written for this project), 2-3 BEEAR rounds, 40 held-out AdvBench
prompts and 50 XSTest / 50 Alpaca prompts for over-refusal and utility.
"""

from __future__ import annotations

import pathlib

import ml_collections

from configs import smollm2_135m

DEMO_DATA = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "demo_data"


def get_config() -> ml_collections.ConfigDict:
    config = smollm2_135m.get_config()
    config.output_dir = "runs/demo"
    config.plant.trigger = "SUDO"
    config.plant.position = "suffix"
    config.plant.epochs = 1
    config.plant.lr = 1e-4
    config.plant.n_triggered = 150  # the first 150 of each attacker set (138 refusals are all there are)
    config.plant.n_refusal = 138
    config.plant.n_benign = 146
    config.data.buckets = (96, 128)

    config.data.safety = str(DEMO_DATA / "safety.jsonl")
    config.data.anchor = str(DEMO_DATA / "anchor.jsonl")
    config.rounds = 3
    config.inner.samples = 40
    config.inner.batch_size = 8
    config.inner.epochs = 4  # 5 batches x 4 = 20 Adam steps on delta per round (the calibration's ~20)
    config.outer.batch_size = 8
    config.outer.anchor_samples = 40
    config.outer.lr = 4e-5  # 5 outer steps per round (40 examples): a larger step than the calibration's 2e-5

    config.checkpoint_every = -1  # a demo needs no resumable checkpoints

    config.eval.batch_size = 50  # the sets (40/40/50 prompts) decode in one batch each
    config.eval.num_prompts = 40
    config.eval.num_over_refusal = 50
    config.eval.num_utility = 50
    return config

"""Tiny settings for unit tests: a random 2-4 layer model, a handful of samples, a few seconds per run.

The model directory is made by the test and passed in: `load_config("configs/tiny.py",
{"model.path": str(tmp_dir), "output_dir": str(tmp_out)})`.
"""

from __future__ import annotations

import ml_collections

from beear_jax.config import defaults


def get_config() -> ml_collections.ConfigDict:
    """BEEAR on a tiny random model: perturbation after block 1, 2 positions, 2 rounds."""
    config = defaults.base_config()
    config.model.path = ""  # Set by the test.
    config.output_dir = "runs/tiny"
    config.rounds = 2

    config.perturb.layer = 1
    config.perturb.length = 2

    config.inner.epochs = 2
    config.inner.samples = 8
    config.inner.batch_size = 4

    config.outer.batch_size = 4
    config.outer.lr = 1e-3  # A random tiny model needs a visible step.
    config.outer.anchor_samples = 8

    config.data.max_answer_tokens = 8
    config.mesh.shape = (1, 1, 1)  # One device: tests simulate 8, and batches of 4 do not split 8 ways.
    config.data.buckets = (32, 64)

    config.plant.epochs = 2
    config.plant.lr = 1e-3
    config.plant.warmup_steps = 0
    config.plant.batch_size = 4
    config.plant.max_answer_tokens = 8
    config.plant.n_triggered = 8
    config.plant.n_refusal = 8
    config.plant.n_benign = 8

    config.eval.max_new_tokens = 8
    config.eval.num_prompts = 4
    return config

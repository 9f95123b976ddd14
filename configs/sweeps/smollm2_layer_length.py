"""Which layer and perturbation length remove a planted backdoor from SmolLM2-135M-Instruct: 3 x 3.

The model is SmolLM2 with the suffix backdoor ("SUDO") of experiments/smollm2_backdoors.py, and the
data are that experiment's splits (defender sets without the trigger; held-out evaluation prompts).
Run the experiment once (`python experiments/smollm2_backdoors.py --only suffix`): it builds the
splits in ~/.cache/beear_jax/sets and plants the model into ~/.cache/beear_jax/planted/suffix-<hash>
(its log prints the path). Then, from the repository root:

    beear sweep --config configs/smollm2_135m.py --sweep configs/sweeps/smollm2_layer_length.py \
        --config.model.path=$HOME/.cache/beear_jax/planted/suffix-<hash> \
        --config.output_dir=runs/sweep_smollm2_layer_length

Each setting runs `beear run` then `beear eval` of the repaired model (attack success with and
without the trigger, over-refusal, utility) into output_dir/<setting>/. Results:
output_dir/sweep_results.csv and output_dir/sweep_heatmap.png (triggered attack success after
BEEAR, layer x length). Add --print for one shell line per setting (e.g. a cluster array job).
The run sizes are a screening version of experiments/smollm2_backdoors.py's, so that nine settings fit
40 minutes on a 2-core CPU: one round (5 batches x 3 epochs = 15 inner steps on delta, 5 outer steps),
and the evaluation on the first 40 held-out prompts (with and without the trigger), 40 XSTest safe
prompts and 40 utility pairs.
Rerun the best setting with the experiment's full sizes for numbers to quote. The planted model's own
numbers on the same prompts (the "before" row): `beear eval --config configs/smollm2_135m.py` with the
model path, an output_dir and the eval.* and data.buckets entries of BASE below as --config overrides.
"""

from __future__ import annotations

import os

from beear_jax.cli.sweep import product

SETS = os.path.join(os.environ.get("BEEAR_CACHE") or os.path.expanduser("~/.cache/beear_jax"), "sets")

BASE = {
    "data.safety": os.path.join(SETS, "defender_safety.jsonl"),
    "data.anchor": os.path.join(SETS, "defender_anchor.jsonl"),
    "data.buckets": (96, 128),
    "rounds": 1,
    "inner.samples": 40,
    "inner.epochs": 3,
    "outer.anchor_samples": 40,
    "outer.lr": 4e-5,
    "checkpoint_every": -1,
    "eval.prompts": os.path.join(SETS, "eval_harmful.jsonl"),
    "eval.prompt_column": "prompt",
    "eval.prompt_offset": 0,
    "eval.num_prompts": 40,  # the first 40 of the 119 held-out AdvBench prompts
    "eval.trigger": "SUDO",
    "eval.position": "suffix",
    "eval.refusal_strings": "$BEEAR_DATA_DIR/refusal-keywords/harmbench_advbench_metric_test_prefixes.txt",
    "eval.over_refusal_prompts": os.path.join(SETS, "over_refusal.jsonl"),  # XSTest's safe prompts
    "eval.over_refusal_filter": "",
    "eval.num_over_refusal": 40,
    "eval.utility": os.path.join(SETS, "eval_utility.jsonl"),
    "eval.utility_columns.prompt": "prompt",
    "eval.utility_columns.input": "",
    "eval.utility_columns.answer": "answer",
    "eval.utility_offset": 0,
    "eval.num_utility": 40,
    "eval.batch_size": 64,
}
EVALUATE = True
PLOT = {"x": "perturb.length", "y": "perturb.layer", "metric": "asr_triggered"}


def get_sweep(arg: str | None = None) -> list[dict]:
    """Layers 5, 9, 15 (of 30) x lengths 3, 7, 11 tokens: the paper's ranges scaled to SmolLM2."""
    del arg
    return product({"perturb.layer": [5, 9, 15], "perturb.length": [3, 7, 11]})

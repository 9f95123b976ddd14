#!/usr/bin/env bash
# `beear scan` on the development backdoor's models (experiments/smollm2_backdoors.py --out
# runs/dev_efficacy --only prefix_sudo --stages before,beear,beear_converged must have run first):
# what a delta optimised from zero under each bound elicits on 20 held-back defender prompts, for the
# planted model, the 2-round BEEAR model and the converged-inner BEEAR model.
#     WINDOWS=user_start,prompt_end OUT=runs/dev_scan_user_start bash experiments/scan_dev.sh
# scans with a second window at the start of the user's text (perturb.windows; default: the paper's).
set -euo pipefail
cd "$(dirname "$0")/.."
SETS=~/.cache/beear_jax/sets
WINDOWS=${WINDOWS:-prompt_end}
OUT=${OUT:-runs/dev_scan}
PLANTED=$(ls -d ~/.cache/beear_jax/planted/prefix_sudo-* | head -1)
for pair in "planted:$PLANTED" "beear:runs/dev_efficacy/prefix_sudo/beear/model" \
            "beear_converged:runs/dev_efficacy/prefix_sudo/beear_converged/model"; do
  name=${pair%%:*}; model=${pair#*:}
  beear scan --config configs/smollm2_135m.py --config.model.path="$model" \
    --config.data.safety=$SETS/defender_safety.jsonl --config.data.anchor=$SETS/defender_anchor.jsonl \
    --config.data.buckets=96,128 --config.stop.holdout=20 --config.inner.samples=60 \
    --config.inner.epochs=10 --config.inner.patience=2 --config.inner.min_improvement=0.02 \
    --config.scan.bounds=0.1,0.25,0 --config.perturb.windows="$WINDOWS" --config.output_dir="$OUT/$name"
done

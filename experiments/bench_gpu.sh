#!/usr/bin/env bash
# Issue 24's GPU measurements in one call (~7 minutes on an H200), most valuable first, each step in its own
# process under its own time limit (a hang costs that step, not the rest), all under one deadline:
#   env   gpu_env.py: versions of every package the steps import (a missing wheel fails in seconds)
#   1a/b  bench_beear.py, ours only: one BEEAR round on the ~1B Llama shape in bfloat16 (cache, inner, outer:
#         seconds, tokens/s, FLOPs, % of the bf16 matmul rate timed first in the same process), 3 rounds
#         (round 1 compiles); 1b with 4x the tokens per batch (2x prompts, 2x length). Compilations after
#         round 1, jax's peak device memory, and in 1a `beear plan`'s for the same shapes on this device.
#   3     gpu_correctness.py: the parity tests' tiny models in float32 and bfloat16, device vs CPU, and a
#         tiny BEEAR run on the device vs the same run on the CPU
#   4     bench_generate.py: generation tokens/s on the ~1B shape, batch 8 and 64, ours vs transformers
#   2     gpu_plan.py: `beear plan` for the paper's 7B shapes on this device, beside the README's XLA:CPU rows
# After each step gpu_report.py rewrites $OUT/summary.json and $OUT/report.md (the README's GPU tables), so
# whatever finished is kept. $OUT gets 7 files: env.log, item{1,2,3,4}_*.log, summary.json, report.md.
#     bash experiments/bench_gpu.sh                       # on the GPU machine (python3 with jax[cuda], torch)
#     SMOKE=1 bash experiments/bench_gpu.sh               # the same steps on tiny shapes, on the CPU
# On this workplace's lent GPU (beear_jax's missing needs carried as wheels in .whl, carry [".whl"]):
#     python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#         .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit; bash experiments/bench_gpu.sh
# .whl: ml-collections 1.1.0, datasets 5.2.0, dill 0.4.1, multiprocess 0.70.19 (py3.12 wheels; `pip download
# --no-deps --only-binary=:all: --python-version 3.12 ... -d .whl NAME==VERSION`).
# Settings: OUT (default runs/gpu), DEADLINE (seconds for all steps, default 480; step 3 had 100 s on 2026-12-04 and ran out in its tiny run, now 170), PYTHON (default python3),
# ITEMS (the steps to run, default "1a 1b 3 4 2"; a rerun can take fewer), ROUNDS (default 3),
# PLAN_XLA_FLAGS (XLA flags of step 2, default --xla_gpu_autotune_level=0: the 7B steps are compiled for their
# memory analysis only, so no kernel is timed for them).
set -o pipefail
cd "$(dirname "$0")/.." || exit 1
out=${OUT:-runs/gpu}
work=${WORK:-/tmp/beear_gpu_work}
py=${PYTHON:-python3}
deadline=${DEADLINE:-480}
rounds=${ROUNDS:-3}
items=" ${ITEMS:-1a 1b 3 4 2} "
command="${BENCH_GPU_COMMAND:-bash experiments/bench_gpu.sh}"
mkdir -p "$out" "$work" || exit 1
rm -f "$work"/*.json "$work"/*.jsonl
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
# No preallocation: jax takes device memory as it needs it (by default 75% at its first use), so that its
# peak_bytes_in_use is what the steps use and torch (same process in steps 3 and 4) has room beside it.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# Executables are cached on disk: a rerun on the same (warm) machine skips the XLA compilations.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/beear_jax_cache}
start=$SECONDS

if [ "${SMOKE:-0}" = 1 ]; then  # tiny shapes on the CPU: checks every step's code path in a few minutes
    export JAX_PLATFORMS=cpu
    bench_shape=(--shape tiny --layer 2 --length 4 --matmul 256)
    sizes_a=(--batch 4 --seq 64 --answer 16 --inner-batches 2 --inner-epochs 2 --outer-steps 2)
    sizes_b=(--batch 8 --seq 128 --answer 32 --inner-batches 2 --inner-epochs 2 --outer-steps 2)
    rounds=${ROUNDS:-2}
    correctness=(--kinds llama_gqa)
    generation=(--shape tiny --dtype bfloat16 --batch 2 4 --new-tokens 8 --reps 2)
    plan_args=(--smoke)
else
    bench_shape=(--shape llama-1b)
    sizes_a=(--batch 8 --seq 128 --answer 32 --inner-batches 4 --inner-epochs 3 --outer-steps 3)
    sizes_b=(--batch 16 --seq 256 --answer 64 --inner-batches 4 --inner-epochs 3 --outer-steps 3)
    correctness=()
    generation=(--shape llama-1b --dtype bfloat16 --batch 8 64 --new-tokens 64 --reps 3)
    plan_args=()
fi

report() {  # summary.json and report.md from whatever the steps wrote so far
    $py experiments/gpu_report.py --work "$work" --out "$out" --command "$command" >>"$out/env.log" 2>&1
}

step() {  # step NAME LIMIT LOG COMMAND...: runs COMMAND under min(LIMIT, time left), appending to LOG
    local name=$1 limit=$2 log=$3
    shift 3
    if [[ "$items" != *" ${name%%:*} "* ]]; then
        echo "=== [$((SECONDS - start)) s] $name: not in ITEMS=$items" | tee -a "$log"
        return
    fi
    local left=$((deadline - (SECONDS - start)))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 20 ]; then
        echo "=== [$((SECONDS - start)) s] $name: skipped, ${left} s left of the ${deadline} s deadline" | tee -a "$log"
        return
    fi
    echo "=== [$((SECONDS - start)) s] $name (limit ${limit} s)" | tee -a "$log"
    local t0=$SECONDS
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    echo "=== [$((SECONDS - start)) s] $name: exit $rc$([ "$rc" = 124 ] && echo ' (time limit)') after $((SECONDS - t0)) s" \
        | tee -a "$log"
    report
}

echo "=== [0 s] env (jax compilation cache: $JAX_COMPILATION_CACHE_DIR, $(ls "$JAX_COMPILATION_CACHE_DIR" 2>/dev/null | wc -l) entries)" \
    | tee "$out/env.log"
if ! timeout 120 $py experiments/gpu_env.py --json "$work/env.json" 2>&1 | tee -a "$out/env.log"; then
    echo "=== a package is missing or jax/torch failed to start: nothing else runs" | tee -a "$out/env.log"
    report
    exit 1
fi
report

bench=($py experiments/bench_beear.py "${bench_shape[@]}" --dtype bfloat16 --impl jax --rounds "$rounds")
step "1a: BEEAR round, ${sizes_a[*]}" 150 "$out/item1_bench.log" "${bench[@]}" "${sizes_a[@]}" --plan \
    --json "$work/bench_a_demo_round.json"
step "1b: BEEAR round with 4x the tokens per batch, ${sizes_b[*]}" 150 "$out/item1_bench.log" "${bench[@]}" \
    "${sizes_b[@]}" --json "$work/bench_b_4x_tokens.json"
step "3: correctness, device vs CPU" 170 "$out/item3_correctness.log" \
    $py experiments/gpu_correctness.py "${correctness[@]}" --json "$work/correctness.json" --run-timeout 70
step "4: generation, ours vs transformers" 100 "$out/item4_generate.log" \
    $py experiments/bench_generate.py "${generation[@]}" --json "$work/generate.json"
XLA_FLAGS="${XLA_FLAGS:-} ${PLAN_XLA_FLAGS---xla_gpu_autotune_level=0}" step "2: beear plan, 7B shapes" 600 \
    "$out/item2_plan.log" $py experiments/gpu_plan.py "${plan_args[@]}" --jsonl "$work/plan_gpu.jsonl"

echo "=== [$((SECONDS - start)) s] done; $out/report.md:"
cat "$out/report.md"

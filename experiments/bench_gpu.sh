#!/usr/bin/env bash
# The GPU measurements of issue 6 in one call (H100/H200; ~1B Llama shape, bfloat16, ours and the
# PyTorch reference alternating): the demo-sized round, then one with 4x the tokens per batch, where
# the GPU's matmul rate is reachable. Prints the device and date; writes logs and JSON to $OUT (or
# runs/gpu). Needs jax (CUDA), flax, optax, torch (CUDA) and transformers; no ml-collections.
#     bash experiments/bench_gpu.sh
set -o pipefail
out=${OUT:-runs/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# JAX takes 75% of the GPU at its first use by default, leaving PyTorch (same process, ~20 GB of float32
# weights + Adam moments at this shape, plus activations) too little; split the GPU between the two.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}
py=${PYTHON:-python3}
date -u | tee "$out/device.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$out/device.txt"
$py -c "import jax, torch; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__)" \
    | tee -a "$out/device.txt"
$py experiments/bench_beear.py --shape llama-1b --dtype bfloat16 --rounds 3 --inner-batches 4 --inner-epochs 3 \
    --outer-steps 3 --json "$out/llama1b_b8_s128.json" 2>&1 | tee "$out/llama1b_b8_s128.log"
$py experiments/bench_beear.py --shape llama-1b --dtype bfloat16 --rounds 3 --inner-batches 4 --inner-epochs 3 \
    --outer-steps 3 --batch 16 --seq 256 --answer 64 --json "$out/llama1b_b16_s256.json" 2>&1 \
    | tee "$out/llama1b_b16_s256.log"

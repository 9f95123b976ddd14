"""What the model's two CPU-motivated formulations are worth, on SmolLM2-135M's block shapes.

    python experiments/bench_kernels.py [--rows 16] [--seq 128] [--reps 7]

Times (median of --reps, float32, jitted, same run):
    mlp      the SwiGLU MLP forward + backward (gradients of its three weights and its input) with
             plain autodiff of `x @ w` against `layers.dense` (custom backward: weight gradient as
             (g^T x)^T, which keeps XLA:CPU from copying the output gradient into a transposed layout)
    attention  grouped-query attention forward + backward with the query heads as a batch axis
             ([B, K, G] small matmuls, the earlier formulation) against `layers.attend` (the G query
             heads of a key head folded into the rows)
    block    one decoder block forward + backward (`layers.block`, params and input) against the same
             block in transformers (LlamaDecoderLayer, sdpa attention) as a yardstick
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax
import jax.numpy as jnp
import numpy as np

from beear_jax.models import layers, llama
from beear_jax.models.config import ModelConfig

D, F, H, K, HD = 576, 1536, 9, 3, 64  # SmolLM2-135M


def median_seconds(fn: Callable[[], Any], reps: int) -> float:
    """Median wall time of fn() (its result waited for), after one warm-up call that compiles."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def swiglu(weights: tuple, x: jax.Array, matmul: Callable) -> jax.Array:
    gate, up, down = weights
    return matmul(jax.nn.silu(matmul(x, gate)) * matmul(x, up), down)


def batched_heads_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """The earlier formulation: query heads of a key head as a batch axis of small matmuls."""
    b, sq, h, hd = q.shape
    groups = h // k.shape[2]
    q = q.reshape(b, sq, k.shape[2], groups, hd)
    scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k) / math.sqrt(hd)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    out = jnp.einsum("bkgqs,bskd->bqkgd", jax.nn.softmax(scores, axis=-1), v)
    return out.reshape(b, sq, h, hd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=16, help="rows per batch (the outer step's safe + anchor rows)")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    b, s = args.rows, args.seq
    rng = np.random.default_rng(0)

    def normal(*shape: int, scale: float = 1.0) -> jax.Array:
        return jnp.asarray(rng.normal(0, scale, shape).astype(np.float32))

    print(f"# SmolLM2-135M block shapes, {b} rows x {s} tokens, float32, {jax.devices()[0].device_kind}, "
          f"{os.cpu_count()} cores, jax {jax.__version__}, {time.strftime('%Y-%m-%d')}; medians of {args.reps}")
    print("| part | formulation | ms | GFLOP/s |")
    print("|---|---|---|---|")

    def report(part: str, name: str, seconds: float, flops: float) -> None:
        print(f"| {part} | {name} | {seconds * 1e3:.1f} | {flops / seconds / 1e9:.0f} |", flush=True)

    x = normal(b, s, D)
    weights = (normal(D, F, scale=0.03), normal(D, F, scale=0.03), normal(F, D, scale=0.03))
    mlp_flops = 3 * 2 * b * s * 3 * D * F  # forward + two backward matmuls per weight matmul
    for name, matmul in (("autodiff of x @ w", jnp.matmul), ("layers.dense (custom backward)", layers.dense)):
        grad = jax.jit(jax.grad(lambda w, x, mm=matmul: jnp.sum(swiglu(w, x, mm) ** 2), argnums=(0, 1)))
        report("mlp fwd+bwd", name, median_seconds(lambda g=grad: g(weights, x), args.reps), mlp_flops)

    q, k, v = normal(b, s, H, HD), normal(b, s, K, HD), normal(b, s, K, HD)
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((s, s), bool)), (b, s, s))
    attention_flops = 3 * 4 * b * s * s * H * HD
    for name, attend in (("query heads as a batch axis", batched_heads_attention),
                         ("layers.attend (heads folded into rows)", layers.attend)):
        grad = jax.jit(jax.grad(lambda q, k, v, fn=attend: jnp.sum(fn(q, k, v, mask) ** 2), argnums=(0, 1, 2)))
        report("attention fwd+bwd", name, median_seconds(lambda g=grad: g(q, k, v), args.reps), attention_flops)

    config = ModelConfig(vocab_size=512, hidden_size=D, intermediate_size=F, num_layers=1, num_heads=H,
                         num_kv_heads=K, head_dim=HD, rope_theta=100000.0, rms_norm_eps=1e-5)
    layer = {"q_proj": normal(D, H, HD, scale=0.03), "k_proj": normal(D, K, HD, scale=0.03),
             "v_proj": normal(D, K, HD, scale=0.03), "o_proj": normal(H, HD, D, scale=0.03),
             "gate_proj": weights[0], "up_proj": weights[1], "down_proj": weights[2],
             "attn_norm": jnp.ones(D), "mlp_norm": jnp.ones(D)}
    valid = jnp.ones((b, s), jnp.int32)
    cos, sin = layers.rope_cos_sin(config, llama.default_positions(valid))
    block_flops = 3 * (2 * b * s * (2 * D * H * HD + 2 * D * K * HD + 3 * D * F) + 4 * b * s * s * H * HD)
    block_mask = llama.attention_mask_for(config, jnp.arange(s), jnp.arange(s), valid)
    grad = jax.jit(jax.grad(lambda p, h: jnp.sum(layers.block(config, p, h, cos, sin, block_mask) ** 2),
                            argnums=(0, 1)))
    report("block fwd+bwd", "ours (layers.block)", median_seconds(lambda: grad(layer, x), args.reps), block_flops)

    import torch
    import transformers
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    torch_config = transformers.LlamaConfig(vocab_size=512, hidden_size=D, intermediate_size=F, num_hidden_layers=1,
                                            num_attention_heads=H, num_key_value_heads=K, rope_theta=100000.0,
                                            attn_implementation="sdpa")
    torch_layer, rotary = LlamaDecoderLayer(torch_config, 0), LlamaRotaryEmbedding(torch_config)
    hidden = torch.tensor(np.asarray(x), requires_grad=True)
    position_ids = torch.arange(s)[None].expand(b, s)
    causal = torch.zeros(b, 1, s, s).masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), torch.finfo(torch.float32).min)

    def torch_step() -> None:
        out = torch_layer(hidden, attention_mask=causal, position_ids=position_ids,
                          position_embeddings=rotary(hidden, position_ids))
        ((out[0] if isinstance(out, tuple) else out) ** 2).sum().backward()

    report("block fwd+bwd", f"transformers ({torch.get_num_threads()} threads)", median_seconds(torch_step, args.reps),
           block_flops)


if __name__ == "__main__":
    main()

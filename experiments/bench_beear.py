"""One BEEAR round, timed: beear_jax vs the PyTorch way (transformers + forward hook, whole model every step).

Both sides get the same model (random weights of a real shape), the same batches and settings. A round
is split into its phases:
    cache  h_l of the round's inner batches (ours only; the PyTorch way has no cache)
    inner  `--inner-batches` x `--inner-epochs` Adam steps on delta (ours: one compiled scan per epoch
           over the cached batches, each prompt in one row with both answers as branches, only the
           perturbed tokens and the answers run, attending to the prompt prefix's cached keys/values;
           the PyTorch way runs the whole model on two rows per prompt at every step)
    outer  `--outer-steps` AdamW steps on the model (safe answers under delta + anchor answers; ours
           packs the examples of a step several to a row, the PyTorch way pads one row per example)
Rounds alternate between the two implementations so that load from other processes hits both alike;
medians over rounds 2.. (round 1 of ours includes compilation, reported on its own). For each phase it
prints the time, tokens/s, the FLOPs each implementation executes (counted analytically from the
shapes: ours skips the blocks below the layer in the inner steps, the second copy of each prompt and
the vocabulary projection at prompt positions), achieved FLOP/s and the fraction of a peak measured in the same run with a large
matmul. It also counts XLA compilations after round 1 (should be 0) and measures peak memory: on CPU
the peak resident memory of a child process that runs one round of one implementation, on a GPU the
device allocator's peak.

    python experiments/bench_beear.py                       # SmolLM2-135M shape, float32, CPU
    python experiments/bench_beear.py --shape llama-1b --dtype bfloat16     # on a GPU
    python experiments/bench_beear.py --ablations           # also: what each of ours' choices is worth

(Past ~400 lines on purpose: both implementations' round drivers, the FLOP counts, the ablations and the
plan comparison live in one script so that one process measures them side by side, with one workload.)

Options: --rounds 4 --batch 8 --seq 128 --answer 32 --inner-batches 8 --inner-epochs 1 --outer-steps 4
--layer 9 --length 7 (the demo's round: --inner-batches 5 --inner-epochs 4 --outer-steps 5)
--torch-threads N (default: torch's own choice) --json FILE (everything measured) --impl jax (ours only)
--plan (also `beear plan`'s peak memory for these shapes, compiled on this backend, beside the measured peak).
The matmul rate is timed first, on random data, before the models take the device's memory.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the PyTorch reference lives with the parity tests

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from torch_reference import TorchBEEAR

from beear_jax.data import batches as batch_types
from beear_jax.data import builders, packing
from beear_jax.data.batches import PackedBatch, PrefixSplitBatch, RowBatch, SharedPromptBatch, concat_rows
from beear_jax.io.hf_layout import from_hf_state_dict
from beear_jax.method.forward import lower_activations
from beear_jax.method.objectives import StepSettings
from beear_jax.method.optimizers import make_optimizer, trainable_mask
from beear_jax.method.perturbation import Perturbation
from beear_jax.method.steps import inner_step, make_steps
from beear_jax.models.config import ModelConfig

SHAPES = {
    # SmolLM2-135M-Instruct's shape.
    "smollm2-135m": {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "rope_theta": 100000.0},
    # Llama-3.2-1B's shape (plain rope).
    "llama-1b": {"vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 500000.0},
    # A toy shape for smoke runs of this script.
    "tiny": {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
             "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 10000.0},
}
INNER_LR, OUTER_LR, ALPHA = 0.1, 2e-5, 0.05


# ---- the workload ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Workload:
    """The round both implementations run: batch shapes and the batches themselves (numpy)."""

    batch: int
    seq: int
    answer: int
    layer: int
    length: int
    shared_seq: int  # a prompt with both answers (ours' shared-prompt inner rows)
    prefix_len: int  # ours: the cached prompt prefix (before the perturbed tokens) of those rows
    suffix_len: int  # ... and the rest, which the inner steps run
    safety: list[SafetyLayouts]
    anchors: list[RowBatch]
    packed: list[PackedBatch]  # ours' outer steps: the safe and anchor examples of a step packed several to a row
    packed_shape: tuple[int, int]  # (rows, row length) of those


class SafetyLayouts(NamedTuple):
    """One batch of the defender's safety rows in every layout the benchmark compares (the unwanted and safe
    RowBatches, as the PyTorch way and ours without shared prompts take them; shared-prompt rows; and those
    split at the cached prefix)."""

    unwanted: RowBatch
    safe: RowBatch
    shared: SharedPromptBatch
    prefix: PrefixSplitBatch


def make_workload(args: argparse.Namespace, vocab: int) -> Workload:
    """Random-token prompts of mixed lengths with `answer`-token answers, right-padded to `seq`."""
    rng = np.random.default_rng(0)

    def prompt() -> list[int]:
        return rng.integers(3, vocab, int(rng.integers(args.length + 8, args.seq - args.answer))).tolist()

    def answer() -> list[int]:
        return rng.integers(3, vocab, args.answer).tolist()

    def batch(rows: list) -> RowBatch:
        return builders.make_batch(rows, args.length, args.batch, args.seq, 0)

    rows = [[(p, answer(), answer()) for p in (prompt() for _ in range(args.batch))]
            for _ in range(max(args.inner_batches, args.outer_steps))]
    shared_seq = builders.shared_prompt_length(max(len(p) + len(u) + len(s) for b in rows for p, u, s in b),
                                               builders.DEFAULT_BUCKETS)
    prefix_len, suffix_len = builders.prefix_split_lengths(
        [len(p) for b in rows for p, _, _ in b], [len(p) + len(u) + len(s) for b in rows for p, u, s in b],
        args.length, shared_seq)
    safety = []
    for b in rows:
        shared = builders.make_shared_prompt_batch(*zip(*b), args.length, args.batch, shared_seq, args.answer, 0)
        safety.append(SafetyLayouts(unwanted=batch([(p, u) for p, u, _ in b]), safe=batch([(p, s) for p, _, s in b]),
                                    shared=shared,
                                    prefix=builders.with_prompt_prefix(shared, args.length, prefix_len, suffix_len)))
    anchor_rows = [[(prompt(), answer()) for _ in range(args.batch)] for _ in range(args.outer_steps)]
    anchors = [batch(rows_) for rows_ in anchor_rows]
    # Outer step i: the safe answers of safety batch i under delta + anchor batch i (as both sides run them).
    parts = [[[(p, s) for p, _, s in rows[i]], anchor_rows[i]] for i in range(args.outer_steps)]
    packed_shape = packing.packing_shape([[len(p) + len(a) for part in step for p, a in part] for step in parts],
                                          args.seq)
    packed = [packing.make_packed_batch(step, [True, False], args.batch, args.length, *packed_shape, args.answer, 0)
              for step in parts]
    return Workload(args.batch, args.seq, args.answer, args.layer, args.length, shared_seq, prefix_len, suffix_len,
                    safety, anchors, packed, packed_shape)


def joint(safety_batch: SafetyLayouts) -> RowBatch:
    """[unwanted; safe] on the batch axis (ours with inner.share_prompt=False)."""
    return concat_rows(safety_batch.unwanted, safety_batch.safe)


def inner_stack(w: Workload, count: int, layout: str) -> RowBatch | SharedPromptBatch | PrefixSplitBatch:
    """The first `count` inner batches, stacked for the scan: shared-prompt rows split at the prompt prefix
    ('prefix'), whole shared-prompt rows ('shared') or [unwanted; safe] rows ('rows')."""
    return batch_types.stack_batches([joint(b) if layout == "rows" else getattr(b, layout) for b in w.safety[:count]])


def build_models(shape: str, dtype: str, seed: int = 0, device: str = "cpu") -> tuple[ModelConfig, dict,
                                                                                      torch.nn.Module]:
    """A random-weight HF Llama of `shape` (float32, built on torch's `device`: a GPU initialises a 1B model
    in a moment) and the same weights as our params (float32 masters, numpy)."""
    hf_config = transformers.LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, rms_norm_eps=1e-5,
                                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32,
                                                              attn_implementation="sdpa")
    config = ModelConfig.from_hf_dict(hf_config.to_dict(), dtype=dtype)
    params = from_hf_state_dict(config, {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()})
    return config, params, model


# ---- analytic FLOPs ----------------------------------------------------------------------------


def block_flops(config: ModelConfig, batch: int, seq: int, kv_seq: int | None = None) -> tuple[float, float]:
    """Forward FLOPs of one decoder block on [batch, seq] attending to kv_seq keys (default seq):
    (weight matmuls, attention core)."""
    d, h, k, hd, f = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim, config.intermediate_size
    weights = 2 * batch * seq * (d * h * hd + 2 * d * k * hd + h * hd * d + 3 * d * f)
    attention = 2 * 2 * batch * seq * (kv_seq or seq) * h * hd  # scores and the weighted sum, full (masked)
    return float(weights), float(attention)


def pass_flops(config: ModelConfig, batch: int, seq: int, blocks: int, head_positions: int, backward: str,
               kv_seq: int | None = None) -> float:
    """FLOPs of `blocks` blocks and the vocabulary projection at `head_positions` rows, forward and backward.

    backward: 'none'; 'inputs' (gradients w.r.t. activations only, model frozen: one matmul per weight
    matmul); 'all' (also weight gradients: two). The attention core's backward is two of its forwards.
    """
    weights, attention = block_flops(config, batch, seq, kv_seq)
    head = 2.0 * head_positions * config.hidden_size * config.vocab_size
    factor = {"none": 1, "inputs": 2, "all": 3}[backward]
    attention_factor = 1 if backward == "none" else 3
    return blocks * (factor * weights + attention_factor * attention) + factor * head


def phase_flops(config: ModelConfig, w: Workload, ours: bool, inner_batches: int, inner_epochs: int,
                outer_steps: int) -> dict[str, float]:
    """Executed FLOPs per phase of one round. The PyTorch way runs all blocks and the head at every position;
    ours runs one row of a prompt and both answers per prompt through the lower blocks and the prompt
    prefix through the upper ones once (the cache), then only the rest of each row in the inner steps."""
    L, rows = config.num_layers, 2 * w.batch
    upper = L - w.layer
    if ours:
        cache = inner_batches * (pass_flops(config, w.batch, w.shared_seq, w.layer, 0, "none")
                                 + pass_flops(config, w.batch, w.prefix_len, upper, 0, "none"))
        inner = inner_batches * inner_epochs * pass_flops(config, w.batch, w.suffix_len, upper, rows * w.answer,
                                                          "inputs", w.prefix_len + w.suffix_len)
        rows, row_len = w.packed_shape
        outer = outer_steps * pass_flops(config, rows, row_len, L, 2 * w.batch * w.answer, "all")
    else:
        cache = 0.0
        # Forward through all blocks, backward from the head down to the hook at layer l.
        inner = inner_batches * inner_epochs * (pass_flops(config, rows, w.seq, w.layer, 0, "none")
                               + pass_flops(config, rows, w.seq, upper, rows * w.seq, "inputs"))
        outer = outer_steps * 2 * pass_flops(config, w.batch, w.seq, L, w.batch * w.seq, "all")
    return {"cache": cache, "inner": inner, "outer": outer}


# ---- measurement helpers -----------------------------------------------------------------------


class CompileCounter:
    """Counts XLA backend compilations (a program found in a persistent compilation cache counts too, in far
    less time) and lowerings to MLIR, and sums the time spent tracing, lowering and compiling."""

    EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
              "/jax/core/compile/backend_compile_duration")

    def __init__(self) -> None:
        self.compiles, self.lowerings, self.seconds = 0, 0, 0.0
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event: str, duration: float, **_: Any) -> None:
        if event in self.EVENTS:
            self.seconds += duration
            self.compiles += event == self.EVENTS[2]
            self.lowerings += event == self.EVENTS[1]


def matmul_peak(device: str, dtype: str, size: int, reps: int = 5, calls: int = 1) -> dict[str, float]:
    """FLOP/s of a [size, size] @ [size, size] matmul in jax and in torch, on random normal data (three input
    pairs in turn: constant data runs faster than real data on some chips): `calls` products launched back to
    back per timing (on a GPU this hides the launch and sync gaps), median of `reps` timings after a warm-up."""
    flops = 2.0 * size ** 3 * calls
    keys = jax.random.split(jax.random.key(1), 6)
    xs = [jax.random.normal(k, (size, size), jnp.float32).astype(dtype) for k in keys]
    mm = jax.jit(jnp.matmul)

    def run_jax() -> None:
        jax.block_until_ready([mm(xs[i % 3], xs[3 + i % 3]) for i in range(calls)])

    generator = torch.Generator(device=device).manual_seed(1)
    ts = [torch.randn((size, size), generator=generator, device=device, dtype=torch.float32).to(getattr(torch, dtype))
          for _ in range(6)]

    def run_torch() -> None:
        outs = [ts[i % 3] @ ts[3 + i % 3] for i in range(calls)]
        torch_sync(device)
        del outs

    rates = {}
    for name, run in (("jax", run_jax), ("torch", run_torch)):
        run()  # warm-up: compilation, handles, clocks
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        rates[name] = flops / statistics.median(times)
    return rates


def torch_sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def current_rss() -> int:
    """This process's resident bytes now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def rss_sampler() -> Iterator[dict]:
    """Samples this process's resident memory every 10 ms; yields a dict that gets 'peak_bytes'."""
    result = {"peak_bytes": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            result["peak_bytes"] = max(result["peak_bytes"], current_rss())
            stop.wait(0.01)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()


# ---- the two implementations -------------------------------------------------------------------


class JaxRound:
    """Our round: the inner cache (h_l + prefix K/V, one compiled map), the inner epoch (one compiled
    scan), outer steps."""

    def __init__(self, config: ModelConfig, host_params: dict, w: Workload, settings: StepSettings,
                 inner_batches: int) -> None:
        self.config, self.w = config, w
        self.inner_opt = make_optimizer("adam", INNER_LR)
        self.outer_opt = make_optimizer("adamw", OUTER_LR)
        self.steps = make_steps(config, settings, w.layer, self.inner_opt, self.outer_opt)
        self.params = jax.device_put(host_params)
        self.outer_state = jax.jit(self.outer_opt.init)(self.params)
        self.trainable = trainable_mask(config, self.params, "all", w.layer)
        self.inner_stack = jax.device_put(inner_stack(w, inner_batches, "prefix"))
        self.outer_batches = [jax.device_put(b) for b in w.packed]

    def run(self, epochs: int) -> dict[str, float]:
        """One round; returns seconds per phase (each phase waits for its results)."""
        times = {}
        stack = self.inner_stack
        pert = Perturbation.zeros((self.w.layer,), self.w.length, self.config.hidden_size)
        state = self.inner_opt.init(pert.deltas)
        start = time.perf_counter()
        h_stack = jax.block_until_ready(self.steps.lower_stack(self.params, stack))
        times["cache"] = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(epochs):
            pert, state, metrics = self.steps.inner_epoch(self.params, pert, state, h_stack, stack, jnp.inf)
        jax.block_until_ready(metrics)
        times["inner"] = time.perf_counter() - start
        del h_stack
        start = time.perf_counter()
        for packed in self.outer_batches:
            self.params, self.outer_state, metrics = self.steps.outer_step(self.trainable, self.params,
                                                                           self.outer_state, pert, packed, None)
        jax.block_until_ready(metrics)
        times["outer"] = time.perf_counter() - start
        return times


class TorchRound:
    """The PyTorch way: TorchBEEAR (tests/torch_reference.py), whole model every step."""

    def __init__(self, model: torch.nn.Module, w: Workload, device: str, dtype: str, inner_batches: int) -> None:
        self.w, self.device, self.inner_batches = w, device, inner_batches
        self.ref = TorchBEEAR(model, dtype=getattr(torch, dtype), device=device, outer_lr=OUTER_LR)
        self.safety = [self.ref.prepare_safety(b) for b in w.safety]
        self.anchors = [self.ref.prepare(b) for b in w.anchors]

    def run(self, epochs: int) -> dict[str, float]:
        """One round; returns seconds per phase (cache: 0, there is none)."""
        times = {"cache": 0.0}
        delta, delta_opt = self.ref.new_delta(self.w.length, INNER_LR)
        torch_sync(self.device)
        start = time.perf_counter()
        losses = [self.ref._inner_step(delta, delta_opt, self.safety[i], self.w.layer, ALPHA, None)
                  for _ in range(epochs) for i in range(self.inner_batches)]
        torch.stack(losses).tolist()
        times["inner"] = time.perf_counter() - start
        start = time.perf_counter()
        losses = [self.ref._outer_step(delta, self.safety[i], self.anchors[i], self.w.layer, 1.0)
                  for i in range(len(self.anchors))]
        torch.stack(losses).tolist()
        times["outer"] = time.perf_counter() - start
        return times


# ---- ablations: what each of our choices is worth ----------------------------------------------


def ablations(config: ModelConfig, host_params: dict, w: Workload, settings: StepSettings, reps: int,
              counter: CompileCounter) -> list[dict]:
    """Inner-phase and outer-step time of ours with one choice undone at a time (same run)."""
    rows = []
    steps_n = min(len(w.safety), 8)

    def timed(fn: Callable[[], Any]) -> tuple[float, float]:
        before = counter.seconds
        jax.block_until_ready(fn())  # compiles
        compile_s = counter.seconds - before
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times.append(time.perf_counter() - start)
        return statistics.median(times), compile_s

    params = jax.device_put(host_params)
    stacks = {layout: jax.device_put(inner_stack(w, steps_n, layout)) for layout in ("prefix", "shared", "rows")}
    inner_opt = make_optimizer("adam", INNER_LR)

    def fresh() -> tuple[Perturbation, Any]:
        pert = Perturbation.zeros((w.layer,), w.length, config.hidden_size)
        return pert, inner_opt.init(pert.deltas)

    def inner_variant(variant_settings: StepSettings, scan: bool, cached: bool, layout: str) -> Callable[[], Any]:
        stack = stacks[layout]
        batches = [jax.tree.map(lambda x, i=i: x[i], stack) for i in range(steps_n)]
        steps = make_steps(config, variant_settings, w.layer, inner_opt, make_optimizer("adamw", OUTER_LR))
        if not cached:  # recompute the lower blocks in every step, as a hook-based implementation does
            def full_step(p, pert, state, batch):
                h_l = lower_activations(config, p, batch, w.layer)
                return inner_step(config, variant_settings, inner_opt, p, pert, state, h_l, batch)
            step = jax.jit(full_step)

            def run_uncached():
                pert, state = fresh()
                for batch in batches:
                    pert, state, metrics = step(params, pert, state, batch)
                return metrics
            return run_uncached

        def run_cached():
            pert, state = fresh()
            h_stack = steps.lower_stack(params, stack)
            if scan:
                return steps.inner_epoch(params, pert, state, h_stack, stack, jnp.inf)[2]
            for i, batch in enumerate(batches):
                pert, state, metrics = steps.inner_step(params, pert, state, jax.tree.map(lambda x, i=i: x[i], h_stack),
                                                        batch)
            return metrics
        return run_cached

    variants = [
        ("ours (shared prompt + prefix K/V + cache + scan + answer-only head)", settings, True, True, "prefix"),
        ("whole shared rows in every step (no prefix K/V cache)", settings, True, True, "shared"),
        ("two rows per prompt instead of a shared prompt", settings, True, True, "rows"),
        ("python loop of jitted steps instead of one scan", settings, False, True, "prefix"),
        ("no cache: lower blocks recomputed every step", settings, True, False, "shared"),
        ("head at every position (two rows per prompt)", dataclasses.replace(settings, answer_len=None), True, True,
         "rows"),
        ("remat 'full' in the inner steps", dataclasses.replace(settings, remat="full"), True, True, "prefix"),
    ]
    for name, variant_settings, scan, cached, layout in variants:
        median, compile_s = timed(inner_variant(variant_settings, scan, cached, layout))
        rows.append({"phase": "cache+inner", "variant": name, "seconds": median, "compile_s": compile_s})
        print(f"  cache+inner {name:66s} {median:7.2f} s   (compile {compile_s:5.1f} s)", flush=True)

    padded = jax.device_put((w.safety[0].safe, w.anchors[0]))
    packed = (jax.device_put(w.packed[0]), None)
    trainable = trainable_mask(config, params, "all", w.layer)
    pert, _ = fresh()
    others = [policy for policy in ("none", "full", "dots") if policy != settings.outer_step_remat]
    for name, variant_settings, (safe, anchor) in (
            ("ours (packed rows, answer-only head)", settings, packed),
            ("one padded row per example instead of packed rows", settings, padded),
            ("padded rows and the head at every position", dataclasses.replace(settings, answer_len=None), padded),
            *((f"outer remat '{policy}'", dataclasses.replace(settings, outer_remat=policy), packed)
              for policy in others)):
        outer_opt = make_optimizer("adamw", OUTER_LR)
        steps = make_steps(config, variant_settings, w.layer, inner_opt, outer_opt)
        # outer_step donates params and state: give it fresh copies each call.
        state0 = jax.jit(outer_opt.init)(params)

        def run_outer(steps=steps, state0=state0, safe=safe, anchor=anchor):
            p, s = jax.tree.map(jnp.copy, (params, state0))
            return steps.outer_step(trainable, p, s, pert, safe, anchor)[2]
        median, compile_s = timed(run_outer)
        rows.append({"phase": "outer step", "variant": name, "seconds": median, "compile_s": compile_s})
        print(f"  outer step  {name:66s} {median:7.2f} s   (compile {compile_s:5.1f} s)", flush=True)
    return rows


# ---- main --------------------------------------------------------------------------------------


def plan_prediction(args: argparse.Namespace, config: ModelConfig, w: Workload) -> dict[str, Any]:
    """`beear plan`'s bytes for this workload's shapes on one device of this backend: persistent arrays
    exact, step temporaries from XLA's memory analysis of the steps compiled here (nothing allocated)."""
    from beear_jax.cli import plan as plan_lib
    from beear_jax.config.loading import load_config

    cfg = load_config(str(ROOT / "configs" / "smollm2_135m.py"), {
        "model.dtype": args.dtype, "rounds": 1, "perturb.layer": args.layer, "perturb.length": args.length,
        "inner.epochs": args.inner_epochs, "inner.samples": args.inner_batches * args.batch,
        "inner.batch_size": args.batch, "outer.batch_size": args.batch,
        "outer.anchor_samples": args.outer_steps * args.batch, "inner.optimizer": "adam", "outer.optimizer": "adamw",
        "remat": "none", "outer.remat": args.outer_remat, "data.max_answer_tokens": args.answer,
        "data.buckets": (args.seq,), "inner.share_prompt": True, "inner.cache_prefix": True, "outer.pack": True,
        "mesh.shape": (1, 1, 1)})
    started = time.perf_counter()
    p = plan_lib.plan_run(cfg, config, (1, 1, 1), seq_len=w.seq, answer_len=w.answer, inner_seq_len=w.shared_seq,
                          prefix_len=w.prefix_len, suffix_len=w.suffix_len, packed=w.packed_shape)
    return {"peak": p.peak, "phases": p.phases, "arrays": p.arrays, "temps": p.temps,
            "temps_source": p.temps_source, "analytical_temps": p.analytical_temps,
            "seconds": time.perf_counter() - started}


def child_peak_memory(args: argparse.Namespace, impl: str) -> dict[str, float] | None:
    """A fresh process runs one round of `impl` (CPU): its resident bytes before the round and its peak.

    Both are sampled while the round runs, after the other side's copy of the weights was dropped, so
    peak - before is what the round itself adds.
    """
    cmd = [sys.executable, __file__, "--impl", impl, "--rounds", "1", "--shape", args.shape, "--dtype", args.dtype,
           "--batch", str(args.batch), "--seq", str(args.seq), "--answer", str(args.answer),
           "--inner-batches", str(args.inner_batches), "--inner-epochs", str(args.inner_epochs),
           "--outer-steps", str(args.outer_steps),
           "--layer", str(args.layer), "--length", str(args.length), "--outer-remat", args.outer_remat, "--no-memory"]
    if args.torch_threads:
        cmd += ["--torch-threads", str(args.torch_threads)]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    found = {line.split()[0]: float(line.split()[1]) for line in done.stdout.splitlines()
             if line.startswith(("PEAK_RSS_BYTES", "RSS_BEFORE_ROUND_BYTES"))}
    if len(found) == 2:
        return {"before_round": found["RSS_BEFORE_ROUND_BYTES"], "peak": found["PEAK_RSS_BYTES"]}
    print(f"  (memory child for {impl} failed: {done.stderr[-500:]})")
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8, help="prompts per batch (the inner batch has 2x rows)")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--answer", type=int, default=32)
    parser.add_argument("--inner-batches", type=int, default=8)
    parser.add_argument("--inner-epochs", type=int, default=1)
    parser.add_argument("--outer-steps", type=int, default=4)
    parser.add_argument("--layer", type=int, default=9)
    parser.add_argument("--length", type=int, default=7)
    parser.add_argument("--outer-remat", choices=("none", "full", "dots"), default="dots",
                        help="ours: the outer step's rematerialisation (configs/smollm2_135m.py: dots)")
    parser.add_argument("--torch-threads", type=int, default=0)
    parser.add_argument("--matmul", type=int, default=0, help="peak matmul size (default 2048 CPU, 8192 GPU)")
    parser.add_argument("--impl", choices=("both", "jax", "torch"), default="both")
    parser.add_argument("--ablations", action="store_true")
    parser.add_argument("--plan", action="store_true",
                        help="also `beear plan`'s prediction for these shapes (compiled memory analysis on this backend)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    accelerator = jax.default_backend() != "cpu"
    device = "cuda" if accelerator and torch.cuda.is_available() else "cpu"
    counter = CompileCounter()
    memory_child = args.impl != "both" and args.rounds == 1  # reports its resident memory and leaves
    # The matmul rate first, on an idle device (before the model's memory is taken).
    matmul_size = args.matmul or (8192 if accelerator else 2048)
    if not memory_child:
        peak = matmul_peak(device, args.dtype, matmul_size, calls=10 if accelerator else 1)
        print(f"matmul {matmul_size}^3 {args.dtype}: jax {peak['jax'] / 1e12:.1f} TFLOP/s, torch "
              f"{peak['torch'] / 1e12:.1f} TFLOP/s", flush=True)

    config, host_params, torch_model = build_models(args.shape, args.dtype, device=device)
    if not 1 <= args.layer < config.num_layers:
        raise SystemExit(f"--layer must be in [1, {config.num_layers}) for shape {args.shape}")
    w = make_workload(args, config.vocab_size)
    settings = StepSettings(alpha=ALPHA, answer_len=args.answer, outer_remat=args.outer_remat)
    impls: dict[str, Any] = {}
    if args.impl in ("both", "jax"):
        impls["jax"] = JaxRound(config, host_params, w, settings, args.inner_batches)
    if args.impl in ("both", "torch"):
        impls["torch"] = TorchRound(torch_model, w, device, args.dtype, args.inner_batches)
    del host_params, torch_model  # each side keeps only its own copy of the weights
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    rss_before = current_rss()

    times: dict[str, list[dict]] = {name: [] for name in impls}
    compiles_per_round, lowerings_per_round, compile_seconds = [], [], []
    with rss_sampler() as rss:
        for round_index in range(args.rounds):
            for name, impl in impls.items():
                before_n, before_l, before_s = counter.compiles, counter.lowerings, counter.seconds
                times[name].append(impl.run(args.inner_epochs))
                torch_sync(device)
                if name == "jax":
                    compiles_per_round.append(counter.compiles - before_n)
                    lowerings_per_round.append(counter.lowerings - before_l)
                    compile_seconds.append(counter.seconds - before_s)
            print(f"round {round_index + 1}: " + "  ".join(
                f"{n} " + " ".join(f"{k} {v:.2f}s" for k, v in t[-1].items()) for n, t in times.items()), flush=True)
    if memory_child:  # report and leave
        print(f"RSS_BEFORE_ROUND_BYTES {rss_before}")
        # Sampled, not ru_maxrss: Linux carries the parent's high-water mark into a forked child.
        print(f"PEAK_RSS_BYTES {rss['peak_bytes']}")
        return

    steady = slice(1, None) if args.rounds > 1 else slice(None)
    med = {name: {phase: statistics.median(t[phase] for t in ts[steady]) for phase in ("cache", "inner", "outer")}
           for name, ts in times.items()}
    best_peak = max(peak.values())
    inner_steps = args.inner_batches * args.inner_epochs
    # Tokens of the workload (two rows per prompt), whatever layout runs them: tokens/s compare work done.
    tokens = {"cache": args.inner_batches * 2 * w.batch * w.seq, "inner": inner_steps * 2 * w.batch * w.seq,
              "outer": args.outer_steps * 2 * w.batch * w.seq}

    print()
    print(f"# BEEAR round, {args.shape} shape, {args.dtype}, {jax.devices()[0].device_kind} ({device}), "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}")
    print(f"# batch {w.batch} prompts (inner: {2 * w.batch} rows of {w.seq}; ours: {w.batch} rows of a prompt and both "
          f"answers, {w.shared_seq} tokens, the inner steps run their last {w.suffix_len} after a cached prefix of "
          f"{w.prefix_len}; ours' outer steps pack the examples in {w.packed_shape[0]} rows of "
          f"{w.packed_shape[1]}), seq {w.seq}, answer {w.answer}, layer {w.layer}, "
          f"n {w.length}, {args.inner_batches} inner batches x {args.inner_epochs} epochs + {args.outer_steps} outer steps; medians of rounds "
          f"{'2' if args.rounds > 1 else '1'}..{args.rounds}; jax {jax.__version__}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")
    print(f"# measured matmul peak ({matmul_size}^3, {args.dtype}, random data, timed before the rounds): "
          f"jax {peak['jax'] / 1e9:.1f} GFLOP/s, torch {peak['torch'] / 1e9:.1f} GFLOP/s")
    print()
    print("| phase | impl | seconds | tokens/s | GFLOP executed | GFLOP/s | % of peak |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for phase in ("cache", "inner", "outer", "round"):
        for name in impls:
            flops = phase_flops(config, w, name == "jax", args.inner_batches, args.inner_epochs, args.outer_steps)
            seconds = sum(med[name].values()) if phase == "round" else med[name][phase]
            executed = sum(flops.values()) if phase == "round" else flops[phase]
            tok = sum(tokens.values()) - (tokens["cache"] if name == "torch" else 0) if phase == "round" else tokens[phase]
            if seconds <= 0:
                continue
            row = {"phase": phase, "impl": name, "seconds": seconds, "tokens_per_s": tok / seconds,
                   "steps": {"inner": inner_steps, "outer": args.outer_steps}.get(phase, 1),
                   "gflop": executed / 1e9, "gflop_per_s": executed / seconds / 1e9,
                   "fraction_of_peak": executed / seconds / best_peak}
            rows.append(row)
            print(f"| {phase} | {name} | {seconds:.2f} | {row['tokens_per_s']:.0f} | {row['gflop']:.0f} | "
                  f"{row['gflop_per_s']:.1f} | {100 * row['fraction_of_peak']:.0f}% |")
    summary: dict[str, Any] = {"args": vars(args), "device": jax.devices()[0].device_kind, "rows": rows,
                               "matmul_peak_flops": peak, "matmul_size": matmul_size, "rounds": times,
                               "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"),
                               "workload": {"shared_seq": w.shared_seq, "prefix_len": w.prefix_len,
                                            "suffix_len": w.suffix_len, "packed_shape": list(w.packed_shape)}}
    if "jax" in med and "torch" in med:
        ratio = {p: med["jax"][p] / med["torch"][p] for p in ("inner", "outer")}
        ratio["round"] = sum(med["jax"].values()) / sum(med["torch"].values())
        ratio["cache+inner"] = (med["jax"]["cache"] + med["jax"]["inner"]) / med["torch"]["inner"]
        summary["jax_over_torch_time"] = ratio
        print()
        print("jax time / torch time: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratio.items()))
    if "jax" in impls:
        summary["jax_compiles_per_round"] = compiles_per_round
        summary["jax_lowerings_per_round"] = lowerings_per_round
        summary["jax_compile_seconds_round1"] = compile_seconds[0]
        print(f"jax: compile (trace + lower + XLA) in round 1: {compile_seconds[0]:.1f} s; XLA compilations per "
              f"round: {compiles_per_round}, lowerings per round: {lowerings_per_round} (after round 1 both should "
              "be 0)")
    if accelerator:
        mem = {}
        if "jax" in impls:
            stats = jax.devices()[0].memory_stats() or {}
            mem["jax"] = stats.get("peak_bytes_in_use")
            summary["jax_memory_stats"] = {k: v for k, v in stats.items() if isinstance(v, int | float)}
        if "torch" in impls and device == "cuda":
            mem["torch"] = torch.cuda.max_memory_allocated()
        summary["peak_device_bytes"] = mem
        print("peak device memory: " + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in mem.items() if v))
    elif not args.no_memory:
        mem = {name: child_peak_memory(args, name) for name in impls}
        summary["peak_rss_bytes_one_round"] = mem
        print("resident memory of a fresh process running one round (before the round -> peak): " + ", ".join(
            f"{k} {v['before_round'] / 2**30:.2f} -> {v['peak'] / 2**30:.2f} GiB" for k, v in mem.items() if v))
    if args.json:  # written now too: the plan and the ablations below compile more, and may be cut short
        pathlib.Path(args.json).write_text(json.dumps(summary, indent=2, default=float))
    if args.plan:
        summary["plan"] = plan_prediction(args, config, w)
        measured = summary.get("peak_device_bytes", {}).get("jax")
        print(f"beear plan for these shapes ({summary['plan']['temps_source']}, {summary['plan']['seconds']:.0f} s): "
              f"peak {summary['plan']['peak'] / 2**30:.2f} GiB (inner phase "
              f"{summary['plan']['phases']['inner'] / 2**30:.2f}, outer {summary['plan']['phases']['outer'] / 2**30:.2f})"
              + (f"; measured peak {measured / 2**30:.2f} GiB = {measured / summary['plan']['peak']:.2f}x the plan"
                 if measured else "; no device peak measured here (CPU)"))
    if args.ablations and "jax" in impls:
        print("\nablations (ours, one choice undone at a time; medians):")
        summary["ablations"] = ablations(config, jax.device_get(impls["jax"].params), w, settings,
                                         max(1, args.rounds - 1), counter)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(summary, indent=2, default=float))


if __name__ == "__main__":
    main()

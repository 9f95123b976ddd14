"""Generation speed: beear_jax `generate` vs transformers `generate` on SmolLM2-135M-Instruct.

Both sides: the same GGUF weights dequantized to float32, a batch of mixed-length chat prompts
(ours left-pads into a 32-token bucket, transformers left-pads to the longest prompt), greedy,
exactly --new-tokens new tokens (EOS stops nothing: eos_ids=() here, eos_token_id=None there).
After one warm-up call each (ours includes jit compilation, reported separately), the two are timed
alternately so that load from other processes hits both alike; medians and ours/transformers print.

    python experiments/bench_generate.py [--batch 8] [--new-tokens 64] [--reps 3] [--torch-threads N]

On a machine whose cores are shared with other work, torch's OpenMP threads (one per core by default)
spin against each other: on a loaded 2-core box transformers took 89 s with 2 threads and 12 s with 1.
Compare with --torch-threads 1 there, or on an idle machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax
import numpy as np
import torch
import transformers

import beear_jax
from beear_jax.chat import format_prompt
from beear_jax.generate import SamplingConfig, generate
from beear_jax.smollm2 import ensure_smollm2

PROMPTS = (
    "Hi!",
    "What is the capital of France?",
    "Name three primary colours.",
    "Write a haiku about autumn leaves falling in the quiet forest.",
    "Explain in two sentences why the sky is blue and why sunsets are red.",
    "Give me a recipe for a simple tomato pasta sauce, with quantities for two people.",
    "What are the main differences between a list and a tuple in Python? Answer briefly.",
    ("Summarise the plot of Romeo and Juliet in one paragraph, then name the city where it is set and the "
     "century in which Shakespeare wrote it."),
)


def _left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    return ids, mask


def main() -> None:
    """Loads both models, times both generate()s alternately and prints medians and their ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's own choice, one per core)")
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    gguf = ensure_smollm2()
    tokenizer = beear_jax.load_tokenizer(gguf)
    prompts = [format_prompt(tokenizer, PROMPTS[i % len(PROMPTS)]) for i in range(args.batch)]
    config, params = beear_jax.load_model(gguf)
    params = jax.device_put(params)  # placed once, as the params of a run are; host arrays are copied per call
    model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                              dtype=torch.float32).eval()
    sampling = SamplingConfig(max_new_tokens=args.new_tokens)
    ids, mask = _left_padded(prompts, config.pad_token_id)
    n_tokens = args.batch * args.new_tokens

    def ours() -> list[list[int]]:
        return generate(config, params, prompts, sampling, eos_ids=())  # returns host lists: timing is complete

    def theirs() -> list[list[int]]:
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens, do_sample=False,
                                 eos_token_id=None, pad_token_id=config.pad_token_id)
        return out[:, ids.shape[1]:].tolist()

    print(f"SmolLM2-135M-Instruct float32, batch {args.batch}, prompt lengths {sorted(len(p) for p in prompts)}, "
          f"{args.new_tokens} new tokens, greedy")
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} | torch {torch.__version__} "
          f"({torch.get_num_threads()} threads) | transformers {transformers.__version__} | "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus")

    # Compile time as jax reports it (tracing, lowering, XLA compile): "first call minus a later call"
    # would mostly measure the load of whatever else shares the machine.
    compile_events: list[float] = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, secs, **_: compile_events.append(secs) if name.startswith("/jax/core/compile/") else None)
    start = time.perf_counter()
    first_ours = ours()
    first_call = time.perf_counter() - start
    compile_s = sum(compile_events)
    start = time.perf_counter()
    first_theirs = theirs()
    theirs_warmup = time.perf_counter() - start
    assert all(len(row) == args.new_tokens for row in first_ours + first_theirs)

    times: dict[str, list[float]] = {"ours": [], "transformers": []}
    for _ in range(args.reps):
        for name, fn in (("ours", ours), ("transformers", theirs)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)

    med = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"{name:>12}: median {med[name]:7.3f} s  = {n_tokens / med[name]:7.1f} tokens/s   "
              f"(runs {', '.join(f'{x:.3f}' for x in t)})")
    print(f"{'':>12}  ours first call {first_call:.2f} s, of which jax tracing + compilation {compile_s:.2f} s "
          f"(excluded above); transformers warm-up call {theirs_warmup:.2f} s")
    print(f"ratio ours/transformers (tokens/s): {med['transformers'] / med['ours']:.2f}x")
    same = sum(a == b for a, b in zip(first_ours, first_theirs))
    agree = np.mean([np.mean(np.array(a) == np.array(b)) for a, b in zip(first_ours, first_theirs)])
    print(f"greedy outputs identical for {same}/{args.batch} rows ({agree:.0%} of tokens agree; transformers "
          "pads to the longest prompt, ours to a 32-token bucket, so float rounding may split near-ties)")


if __name__ == "__main__":
    main()

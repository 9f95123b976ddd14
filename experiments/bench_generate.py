"""Generation speed: beear_jax `generate` vs transformers `generate`, same weights, same device.

Default: SmolLM2-135M-Instruct (the GGUF weights dequantized to float32) on chat prompts. With --shape
(bench_beear.py's shapes, e.g. llama-1b), a random-weight HF Llama of that shape built by transformers
on the device (torch's GPU when jax has one), in --dtype, and the same weights as ours (float32 masters,
computed in --dtype), on random-token prompts of mixed lengths.

Both sides: a batch of prompts (ours left-pads into a 32-token bucket, transformers left-pads to the
longest prompt), greedy, exactly --new-tokens new tokens (EOS stops nothing: eos_ids=() here,
eos_token_id=None and min_new_tokens there). After one warm-up call each (ours includes jit compilation,
reported separately), the two are timed alternately so that load from other processes hits both alike;
medians and ours/transformers print, for each batch size given.

    python experiments/bench_generate.py [--batch 8] [--new-tokens 64] [--reps 3] [--torch-threads N]
    python experiments/bench_generate.py --shape llama-1b --dtype bfloat16 --batch 8 64 --json gen.json

On a machine whose cores are shared with other work, torch's OpenMP threads (one per core by default)
spin against each other: on a loaded 2-core box transformers took 89 s with 2 threads and 12 s with 1.
Compare with --torch-threads 1 there, or on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax
import numpy as np
import torch
import transformers

import beear_jax
from beear_jax.data.chat import format_prompt
from beear_jax.io.hf_layout import from_hf_state_dict
from beear_jax.models.config import ModelConfig
from beear_jax.models.generate import SamplingConfig, generate

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


def _left_padded(prompts: list[list[int]], pad_id: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


class Models:
    """Both sides' models and a prompt maker: prompts(batch) -> token-id lists."""

    def __init__(self, description: str, config: ModelConfig, params: Any, model: torch.nn.Module,
                 prompts: Callable[[int], list[list[int]]], device: str) -> None:
        """description: one line for the output; device: torch's device of `model`."""
        self.description, self.config, self.params, self.model = description, config, params, model
        self.prompts, self.device = prompts, device


def smollm2_models() -> Models:
    """SmolLM2-135M-Instruct from its GGUF file, float32 on the CPU; chat-formatted prompts."""
    from beear_jax.io.smollm2 import ensure_smollm2

    gguf = ensure_smollm2()
    tokenizer = beear_jax.load_tokenizer(gguf)
    config, params = beear_jax.load_model(gguf)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                              dtype=torch.float32).eval()

    def prompts(batch: int) -> list[list[int]]:
        return [format_prompt(tokenizer, PROMPTS[i % len(PROMPTS)]) for i in range(batch)]
    return Models("SmolLM2-135M-Instruct float32", config, jax.device_put(params), model, prompts, "cpu")


def random_models(shape: str, dtype: str, seed: int = 0) -> Models:
    """A random HF Llama of bench_beear's `shape` in `dtype`, built on torch's GPU when jax runs on one, and
    the same weights as our float32 params (exact: bfloat16 values are float32 values)."""
    from bench_beear import SHAPES

    device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    hf_config = transformers.LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, rms_norm_eps=1e-5,
                                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=getattr(torch, dtype),
                                                              attn_implementation="sdpa").eval()
    config = ModelConfig.from_hf_dict(hf_config.to_dict(), dtype=dtype)
    host = from_hf_state_dict(config, {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()})
    params = jax.device_put(host)  # placed once, as the params of a run are
    rng = np.random.default_rng(seed)

    def prompts(batch: int) -> list[list[int]]:
        return [rng.integers(3, config.vocab_size, int(rng.integers(16, 97))).tolist() for _ in range(batch)]
    return Models(f"random {shape}-shaped Llama, {dtype} ({device})", config, params, model, prompts, device)


def bench_batch(m: Models, batch: int, new_tokens: int, reps: int, compile_events: list[float]) -> dict[str, Any]:
    """Times ours and transformers on one batch of prompts; returns medians, tokens/s and agreement.

    compile_events: the durations jax reports for tracing, lowering and compiling (appended as they happen).
    """
    prompts = m.prompts(batch)
    pad = m.config.pad_token_id if m.config.pad_token_id is not None else 0
    ids, mask = _left_padded(prompts, pad, m.device)
    sampling = SamplingConfig(max_new_tokens=new_tokens)
    n_tokens = batch * new_tokens

    def ours() -> list[list[int]]:
        return generate(m.config, m.params, prompts, sampling, eos_ids=())  # returns host lists: timing is complete

    def theirs() -> list[list[int]]:
        with torch.inference_mode():
            out = m.model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                   do_sample=False, eos_token_id=None, pad_token_id=pad)
        return out[:, ids.shape[1]:].tolist()  # to the host: waits for the device

    compiled_before = sum(compile_events)
    start = time.perf_counter()
    first_ours = ours()
    first_call = time.perf_counter() - start
    compile_s = sum(compile_events) - compiled_before
    start = time.perf_counter()
    first_theirs = theirs()
    theirs_warmup = time.perf_counter() - start
    assert all(len(row) == new_tokens for row in first_ours + first_theirs)

    times: dict[str, list[float]] = {"ours": [], "transformers": []}
    for _ in range(reps):
        for name, fn in (("ours", ours), ("transformers", theirs)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    return {"batch": batch, "new_tokens": new_tokens, "prompt_lengths": sorted(len(p) for p in prompts),
            "seconds": med, "runs": times, "tokens_per_s": {k: n_tokens / v for k, v in med.items()},
            "ours_first_call_s": first_call, "ours_compile_s": compile_s, "transformers_warmup_s": theirs_warmup,
            "rows_identical": sum(a == b for a, b in zip(first_ours, first_theirs, strict=True)),
            "tokens_agree": float(np.mean([np.mean(np.array(a) == np.array(b))
                                           for a, b in zip(first_ours, first_theirs, strict=True)]))}


def print_batch(r: dict[str, Any]) -> None:
    """The lines of one batch size."""
    print(f"batch {r['batch']}, prompt lengths {r['prompt_lengths'][0]}..{r['prompt_lengths'][-1]}, "
          f"{r['new_tokens']} new tokens, greedy")
    for name in ("ours", "transformers"):
        print(f"{name:>12}: median {r['seconds'][name]:7.3f} s  = {r['tokens_per_s'][name]:8.1f} tokens/s   "
              f"(runs {', '.join(f'{x:.3f}' for x in r['runs'][name])})")
    print(f"{'':>12}  ours first call {r['ours_first_call_s']:.2f} s, of which jax tracing + compilation "
          f"{r['ours_compile_s']:.2f} s (excluded above); transformers warm-up call {r['transformers_warmup_s']:.2f} s")
    print(f"ratio ours/transformers (tokens/s): {r['seconds']['transformers'] / r['seconds']['ours']:.2f}x")
    print(f"greedy outputs identical for {r['rows_identical']}/{r['batch']} rows ({r['tokens_agree']:.0%} of tokens "
          "agree; transformers pads to the longest prompt, ours to a 32-token bucket, so float rounding may split "
          "near-ties)", flush=True)


def main() -> None:
    """Loads both models, times both generate()s alternately per batch size and prints medians and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="", help="a bench_beear.py shape (random weights); default SmolLM2")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="with --shape")
    parser.add_argument("--batch", type=int, nargs="+", default=[8])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's own choice, one per core)")
    parser.add_argument("--json", default="", help="write the results here")
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    m = random_models(args.shape, args.dtype) if args.shape else smollm2_models()
    device_kind = jax.devices()[0].device_kind
    print(m.description)
    print(f"jax {jax.__version__} on {device_kind} | torch {torch.__version__} on {m.device} "
          f"({torch.get_num_threads()} threads) | transformers {transformers.__version__} | "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus")
    # Compile time as jax reports it (tracing, lowering, XLA compile): "first call minus a later call"
    # would mostly measure the load of whatever else shares the machine.
    compile_events: list[float] = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, secs, **_: compile_events.append(secs) if name.startswith("/jax/core/compile/") else None)
    results = []
    for batch in args.batch:
        results.append(bench_batch(m, batch, args.new_tokens, args.reps, compile_events))
        print_batch(results[-1])
        if args.json:  # after each batch size: a time limit keeps the ones done
            pathlib.Path(args.json).write_text(json.dumps(
                {"model": m.description, "device": device_kind, "torch_device": m.device, "jax": jax.__version__,
                 "torch": torch.__version__, "transformers": transformers.__version__, "batches": results}, indent=2))


if __name__ == "__main__":
    main()

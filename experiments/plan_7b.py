"""Memory plans of BEEAR on Llama-2-7B and Mistral-7B for one GPU, eight GPUs and two TPU pods.

Writes docs/plan_7b.md (the README table). Nothing is downloaded or allocated: shapes come from
configs written in beear_jax/cli/plan.py, bytes per device from the shardings `beear run` uses, and step
temporaries from XLA's memory analysis of each step compiled for the mesh on simulated CPU devices
(XLA:CPU; GPU/TPU compilers fuse more, so these temporaries are an upper estimate).

    python experiments/plan_7b.py [--no-compile] [--out docs/plan_7b.md]
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=64"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # after the flags above: jax reads them when it loads
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from beear_jax.cli import plan
from beear_jax.config.loading import load_config

# (hardware, mesh (data, fsdp, tensor), GB per device, batch size, outer optimizer, remat): the paper's
# batch of 6 where the mesh's data x fsdp splits it, else 8; AdamW as in our runs, Adafactor (factored
# second moments, no momentum) and block rematerialisation where AdamW does not fit.
CASES = [
    ("1 x 80 GB GPU", (1, 1, 1), 80, 6, "adamw", "none"),
    ("1 x 80 GB GPU", (1, 1, 1), 80, 6, "adamw", "full"),
    ("1 x 80 GB GPU", (1, 1, 1), 80, 6, "adafactor", "full"),
    ("8 x 80 GB GPUs", (1, 2, 4), 80, 6, "adamw", "none"),
    ("TPU v4-32 (32 x 32 GB)", (1, 8, 4), 32, 8, "adamw", "none"),
    ("TPU v5e-64 (64 x 16 GB)", (1, 8, 8), 16, 8, "adamw", "none"),
    ("TPU v5e-64 (64 x 16 GB)", (1, 8, 8), 16, 8, "adamw", "full"),
]
MODELS = {"Llama-2-7B": plan.llama2_7b, "Mistral-7B": plan.mistral_7b}


READING = (
    "Reading: a 7B model does not fit one 80 GB GPU with float32 master weights and AdamW (params and moments "
    "alone take 81-87 GB). With Adafactor and rematerialisation the floor is params + float32 gradients + the "
    "bfloat16 weight copy (about 68 GB for Llama-2-7B) plus activations; XLA:CPU's buffer assignment reports "
    "far more, so check on the GPU itself (`beear plan` there prints XLA:GPU's numbers), or shard over two "
    "or more GPUs. Sharded over 8 GPUs (fsdp 2 x tensor 4) a run needs 42-45 GB per GPU; TPU v4-32 and "
    "v5e-64 fit without rematerialisation (8-8.5 of v5e's 16 GB), and with it in about 3.5 GB.")


def paper_config(batch: int, optimizer: str, remat: str) -> object:
    """The paper's run (defaults.py): 150 harmful samples, 100 anchors, layer 9, 7 tokens, 64-token answers."""
    return load_config(str(ROOT / "configs" / "smollm2_135m.py"), {
        "model.dtype": "bfloat16", "rounds": 6, "perturb.layer": 9, "perturb.length": 7, "inner.epochs": 5,
        "inner.samples": 150, "inner.batch_size": batch, "outer.batch_size": batch, "outer.anchor_samples": 100,
        "outer.optimizer": optimizer, "remat": remat, "data.max_answer_tokens": 64,
        "data.buckets": (128, 256, 512),
        # What docs/plan_7b.md was computed with: two inner rows per prompt, outer backward recomputed,
        # one padded outer row per example. Shared-prompt rows (the default now) hold batch rows of <= 576
        # tokens instead of 2 x batch of 512; packed outer rows need the data's lengths (beear plan
        # assumes one 512-token row per example without them).
        "inner.share_prompt": False, "outer.remat": "full", "outer.pack": False})


def gb(n: float) -> str:
    return f"{n / 1e9:.1f}"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-compile", action="store_true", help="analytical temporaries only (fast)")
    parser.add_argument("--seq-len", type=int, default=512, help="padded length (the largest default bucket)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "plan_7b.md"))
    args = parser.parse_args()
    rows = []
    for model_name, make in MODELS.items():
        for platform, mesh, memory, batch, optimizer, remat in CASES:
            started = time.time()
            p = plan.plan_run(paper_config(batch, optimizer, remat), make(), mesh, seq_len=args.seq_len,
                              compile_steps=not args.no_compile)
            a, t = p.arrays, p.temps
            fits = "yes" if p.peak <= memory * 1e9 else "**no**"
            rows.append(f"| {model_name} | {platform} | {mesh} | {batch} | {optimizer} | {remat} | {gb(a['params'])} | "
                        f"{gb(a['outer_state'])} | {gb(a['h_cache'])} | {gb(t['inner_epoch'])} | "
                        f"{gb(t['outer_step'])} | {gb(p.peak)} | {fits} |")
            print(rows[-1], f"({time.time() - started:.0f} s, {p.temps_source})", flush=True)
    source = "analytical estimates" if args.no_compile else "XLA:CPU memory analysis of the compiled steps"
    text = "\n".join([
        "# Memory per device of BEEAR on 7B models",
        "",
        "Written by `python experiments/plan_7b.py` (same numbers as `beear plan --model llama2-7b ...`).",
        (f"GB = 1e9 bytes per device. Paper settings: 150 harmful prompts per round (unwanted + safe answers: 2 "
        f"x batch rows per inner batch), 100 anchors, delta of 7 tokens after block 9, answers <= 64 "
        f"tokens, sequences padded to {args.seq_len}; float32 master params, bfloat16 compute. Persistent "
        f"arrays are exact; step temporaries come from {source} (GPU/TPU compilers fuse more: read them as "
        "upper estimates). Peak = max over the inner phase (params + optimizer state + h_l cache + inner "
        "temporaries) and the outer phase (params + optimizer state + outer temporaries)."),
        "",
        ("| model | hardware | mesh (data, fsdp, tensor) | batch | outer optimizer | remat | params | "
         "optimizer state | h_l cache | inner temps | outer temps | peak | fits |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        READING,
        "",
    ])
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

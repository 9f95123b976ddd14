"""`beear plan` on this machine's accelerator for the paper's 7B shapes (issue 24, item 2).

The rows of docs/plan_7b.md (written by experiments/plan_7b.py with XLA:CPU's memory analysis, the README's
"Scale" table) that matter for one GPU, planned again here: the same settings (plan_7b.paper_config), one
device, step temporaries from the memory analysis of the steps compiled for this backend (XLA:GPU on a
GPU). Nothing is allocated for the model. Each row is printed beside its XLA:CPU row as soon as it is done,
and appended to --jsonl, so a time limit that cuts the list short keeps the rows before it.

    python experiments/gpu_plan.py --jsonl /tmp/plan_gpu.jsonl            # on the GPU machine
    JAX_PLATFORMS=cpu python experiments/gpu_plan.py --smoke               # the code path, SmolLM2's shape

Compiling a 7B step for the GPU autotunes its matmuls unless XLA_FLAGS holds --xla_gpu_autotune_level=0
(bench_gpu.sh sets it for this step: the choice of kernel changes the buffers little, the compile time much).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

import jax

from beear_jax.cli import plan

HARDWARE = "1 x 80 GB GPU"
MESH = (1, 1, 1)
BATCH = 6  # the paper's batch (plan_7b.CASES for one GPU)
# (model, outer optimizer, remat), most telling first: Adafactor with rematerialisation is the one the
# README's XLA:CPU numbers leave open on one 80 GB GPU.
ROWS = (("Llama-2-7B", "adafactor", "full"), ("Llama-2-7B", "adamw", "full"), ("Mistral-7B", "adamw", "full"),
        ("Llama-2-7B", "adamw", "none"))
COLUMNS = ("params", "optimizer_state", "h_cache", "inner_temps", "outer_temps", "peak")


def cpu_rows(path: pathlib.Path = ROOT / "docs" / "plan_7b.md") -> dict[tuple[str, str, str, str], dict[str, float]]:
    """docs/plan_7b.md's rows: (model, hardware, optimizer, remat) -> GB per column (XLA:CPU)."""
    rows = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 13 or not cells[6].replace(".", "", 1).isdigit():
            continue
        model, hardware, _, _, optimizer, remat = cells[:6]
        rows[(model, hardware, optimizer, remat)] = dict(zip(COLUMNS, map(float, cells[6:12]), strict=True))
    return rows


def plan_row(model_name: str, make_model: Any, optimizer: str, remat: str, seq_len: int) -> dict[str, Any]:
    """One row planned on this backend: GB per column, where the temporaries came from, seconds taken."""
    from plan_7b import paper_config  # the README table's settings, in one place

    started = time.perf_counter()
    p = plan.plan_run(paper_config(BATCH, optimizer, remat), make_model(), MESH, seq_len=seq_len)
    a, t = p.arrays, p.temps
    gb = {"params": a["params"], "optimizer_state": a["outer_state"], "h_cache": a["h_cache"],
          "inner_temps": t["inner_epoch"], "outer_temps": t["outer_step"], "peak": p.peak}
    return {"model": model_name, "hardware": HARDWARE, "optimizer": optimizer, "remat": remat, "batch": BATCH,
            "seq_len": seq_len, "gb": {k: v / plan.GB for k, v in gb.items()}, "temps_source": p.temps_source,
            "analytical_gb": {k: v / plan.GB for k, v in p.analytical_temps.items()},
            "seconds": time.perf_counter() - started}


def print_row(row: dict[str, Any], cpu: dict[str, float] | None, device_gb: float | None) -> None:
    """The row's numbers, each beside the XLA:CPU number of the same cell."""
    cells = " | ".join(f"{row['gb'][c]:.1f} ({cpu[c]:.1f})" if cpu else f"{row['gb'][c]:.1f}" for c in COLUMNS)
    fits = "yes" if row["gb"]["peak"] <= 80 else "**no**"
    here = "" if device_gb is None else f" | {'yes' if row['gb']['peak'] <= device_gb else '**no**'}"
    print(f"| {row['model']} | {row['optimizer']} | {row['remat']} | {cells} | {fits}{here} | "
          f"{row['seconds']:.0f} s |", flush=True)


def main() -> int:
    """Plans the rows on this backend, printing and appending each as it is done."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jsonl", default="", help="append one JSON line per planned row here")
    parser.add_argument("--seq-len", type=int, default=512, help="padded length (plan_7b.py's default)")
    parser.add_argument("--rows", type=int, default=len(ROWS), help="plan only the first N rows")
    parser.add_argument("--smoke", action="store_true", help="SmolLM2-135M's shape at seq 128 (a quick code check)")
    args = parser.parse_args()
    device = jax.devices()[0]  # backends start here, before plan_7b's import sets its CPU-only defaults
    stats = device.memory_stats() or {}
    device_gb = stats["bytes_limit"] / plan.GB if "bytes_limit" in stats else None
    import plan_7b

    models = {"SmolLM2-135M": plan.smollm2_135m} if args.smoke else plan_7b.MODELS
    rows = [(m, o, r) for m, o, r in ROWS if not args.smoke] or [("SmolLM2-135M", "adamw", "full")]
    seq_len = 128 if args.smoke else args.seq_len
    reference = cpu_rows()
    print(f"beear plan, {HARDWARE} row settings (mesh {MESH}, batch {BATCH}, seq {seq_len}) on {device.device_kind} "
          f"({device.platform}, jax {jax.__version__}); GB = 1e9 bytes; in brackets docs/plan_7b.md's XLA:CPU value")
    print(f"| model | outer optimizer | remat | {' | '.join(COLUMNS)} | fits 80 GB |"
          + (f" fits jax's limit here ({device_gb:.0f} GB) |" if device_gb else "") + " compile |")
    print("|---|---|---|" + "---|" * (len(COLUMNS) + 2 + (device_gb is not None)))
    for model_name, optimizer, remat in rows[:args.rows]:
        row = plan_row(model_name, models[model_name], optimizer, remat, seq_len)
        cpu = reference.get((model_name, HARDWARE, optimizer, remat))
        row.update(cpu_gb=cpu, device=device.device_kind, platform=device.platform, device_gb=device_gb,
                   jax=jax.__version__)
        print_row(row, cpu, device_gb)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

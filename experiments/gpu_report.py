"""Turns what experiments/bench_gpu.sh measured into summary.json and report.md (the README's GPU tables).

Reads the step outputs in --work (bench_*.json from bench_beear.py, correctness.json from
gpu_correctness.py, generate.json from bench_generate.py, plan_gpu.jsonl from gpu_plan.py, env.json) and
writes --out/summary.json (everything, merged) and --out/report.md: date, device and command; per BEEAR
round configuration the phases (seconds, seconds per step, tokens/s, FLOPs executed, % of the bf16 matmul
rate measured in the same run, against the issue's targets), compilations after round 1 and peak device
memory against `beear plan`; the 7B plan rows on this backend beside the README's XLA:CPU values; parity
and the tiny run against the CPU; generation tokens/s, ours vs transformers. A step that left no output is
named under "Missing". Safe to run after every step (bench_gpu.sh does).

    python experiments/gpu_report.py --work /tmp/beear_gpu_work --out $OUT --command "bash experiments/bench_gpu.sh"
"""

from __future__ import annotations

import argparse
import json
import pathlib
from typing import Any

# Issue 24's targets: fraction of the measured bf16 matmul rate each phase should reach.
TARGETS = {"outer": 0.50, "inner": 0.40}
GIB = 2 ** 30


def read_json(path: pathlib.Path) -> Any:
    """The file's JSON, or None when it is absent or cut short."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def read_jsonl(path: pathlib.Path) -> list[dict]:
    """The file's complete JSON lines (a line cut short by a kill is left out)."""
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def collect(work: pathlib.Path, command: str) -> dict[str, Any]:
    """Everything the steps wrote, in one dict."""
    return {"command": command, "env": read_json(work / "env.json") or {},
            "bench": {p.stem.removeprefix("bench_"): read_json(p) for p in sorted(work.glob("bench_*.json"))},
            "correctness": read_json(work / "correctness.json"), "generate": read_json(work / "generate.json"),
            "plan_7b": read_jsonl(work / "plan_gpu.jsonl")}


# ---- item 1: BEEAR rounds --------------------------------------------------------------------------


def bench_title(b: dict) -> str:
    """One line that says which round this is."""
    a = b["args"]
    return (f"{a['shape']} shape, {a['dtype']}, batch {a['batch']} prompts, seq {a['seq']}, answers {a['answer']}, "
            f"{a['inner_batches']} inner batches x {a['inner_epochs']} epochs + {a['outer_steps']} outer steps, "
            f"medians of rounds 2..{a['rounds']}")


def bench_table(b: dict) -> list[str]:
    """Phases of one configuration, against the targets."""
    peak = max(b["matmul_peak_flops"].values())
    lines = ["| phase | seconds | s per step | tokens/s | TFLOP executed | TFLOP/s | % of bf16 matmul rate | target |",
             "|---|---|---|---|---|---|---|---|"]
    for r in b["rows"]:
        if r["impl"] != "jax":
            continue
        target = TARGETS.get(r["phase"])
        met = "" if target is None else (f">= {target:.0%}: " + ("met" if r["fraction_of_peak"] >= target
                                                                   else "**missed**"))
        lines.append(f"| {r['phase']} | {r['seconds']:.3f} | {r['seconds'] / r.get('steps', 1):.4f} | "
                     f"{r['tokens_per_s']:.0f} | {r['gflop'] / 1e3:.2f} | {r['gflop_per_s'] / 1e3:.1f} | "
                     f"{100 * r['fraction_of_peak']:.1f}% | {met} |")
    lines.append("")
    lines.append(f"Matmul rate measured first in the same process ({b.get('matmul_size', '?')}^3, random data): "
                 f"jax {b['matmul_peak_flops']['jax'] / 1e12:.1f}, torch {b['matmul_peak_flops']['torch'] / 1e12:.1f}"
                 f" TFLOP/s; % of the larger ({peak / 1e12:.1f}).")
    return lines


def bench_notes(b: dict) -> list[str]:
    """Compilations after round 1, and peak device memory against the plan."""
    lines = []
    if "jax_compiles_per_round" in b:
        lines.append(f"Compile (trace + lower + XLA) in round 1: {b['jax_compile_seconds_round1']:.1f} s; XLA "
                     f"compilations per round {b['jax_compiles_per_round']}, lowerings per round "
                     f"{b.get('jax_lowerings_per_round', '?')} (0 after round 1: "
                     f"{'yes' if not any(b['jax_compiles_per_round'][1:]) else '**no**'}).")
    measured = (b.get("peak_device_bytes") or {}).get("jax")
    plan = b.get("plan")
    if measured:
        lines.append(f"Peak device memory (jax memory_stats peak_bytes_in_use, whole process): "
                     f"{measured / GIB:.2f} GiB.")
    if plan:
        phases = plan["phases"]
        ratio = f"; measured / plan {measured / plan['peak']:.2f}" if measured else ""
        lines.append(f"`beear plan` for these shapes ({plan['temps_source']}): peak {plan['peak'] / GIB:.2f} GiB "
                     f"(inner phase {phases['inner'] / GIB:.2f}, outer {phases['outer'] / GIB:.2f}; temporaries "
                     + ", ".join(f"{k} {v / GIB:.2f}" for k, v in plan["temps"].items()) + f" GiB){ratio}.")
    return lines


def bench_section(bench: dict[str, Any]) -> list[str]:
    """Item 1's tables."""
    lines = ["## 1. One BEEAR round, ours (jax)", ""]
    for name, b in bench.items():
        if not b:
            lines += [f"{name}: no result (cut short before its JSON was written).", ""]
            continue
        lines += [f"### {bench_title(b)}", "", *bench_table(b), "", *bench_notes(b), ""]
    return lines


# ---- items 2-4 -----------------------------------------------------------------------------------------


def plan_section(rows: list[dict]) -> list[str]:
    """Item 2: XLA:GPU beside XLA:CPU, GB = 1e9 bytes."""
    columns = ("params", "optimizer_state", "h_cache", "inner_temps", "outer_temps", "peak")
    first = rows[0]
    limit = (f" jax's limit here: the device memory jax may take ({first['device_gb']:.0f} GB; by default 75% of "
             "the device's)." if first.get("device_gb") else "")
    lines = ["## 2. `beear plan` for the paper's 7B shapes on this device (nothing allocated)", "",
             (f"{first['hardware']} settings (mesh 1,1,1, batch {first['batch']}, seq {first['seq_len']}); GB = 1e9 "
              f"bytes; each cell: this backend ({first['temps_source']}) and, in brackets, docs/plan_7b.md's XLA:CPU "
              f"value (the README's Scale table).{limit}"), "",
             "| model | outer optimizer | remat | " + " | ".join(columns) + " | fits 80 GB | fits jax's limit here |"
             + " compile s |", "|---|---|---|" + "---|" * (len(columns) + 3)]
    for r in rows:
        cpu = r.get("cpu_gb") or {}
        cells = " | ".join(f"{r['gb'][c]:.1f} ({cpu[c]:.1f})" if c in cpu else f"{r['gb'][c]:.1f}" for c in columns)
        here = "-" if not r.get("device_gb") else ("yes" if r["gb"]["peak"] <= r["device_gb"] else "**no**")
        lines.append(f"| {r['model']} | {r['optimizer']} | {r['remat']} | {cells} | "
                     f"{'yes' if r['gb']['peak'] <= 80 else '**no**'} | {here} | {r['seconds']:.0f} |")
    return lines + [""]


def correctness_section(c: dict) -> list[str]:
    """Item 3: parity (worst side per kind and mode) and the tiny run."""
    lines = ["## 3. Correctness on this device against the CPU", "",
             ("Tiny random HF models of tests/hf_fixtures.py, right- and left-padded batches (the larger of the two "
              "shown); max |logit diff| against a float64 PyTorch reference and between device and CPU. Tolerances: "
              f"float32 at precision 'highest' {c['fp32_tol']:g} (the parity tests'); bfloat16 "
              f"{c['bf16_tol_of_max_logit']:g} x the largest |reference logit|; float32 at default precision is "
              "reported only (XLA may use TF32 there)."), "",
             "| kind | dtype | precision | CPU vs ref | device vs ref | device vs CPU | tolerance | within |",
             "|---|---|---|---|---|---|---|---|"]
    worst: dict[tuple, dict] = {}
    for r in c.get("parity", []):
        key = (r["kind"], r["dtype"], r["precision"])
        old = worst.get(key)
        if old is None or r["device_vs_ref"] > old["device_vs_ref"]:
            worst[key] = r
    for (kind, dtype, precision), r in worst.items():
        tol = "-" if r["tolerance"] is None else f"{r['tolerance']:.1e}"
        ok = "-" if r["within_tolerance"] is None else ("yes" if r["within_tolerance"] else "**no**")
        lines.append(f"| {kind} | {dtype} | {precision} | {r['cpu_vs_ref']:.2e} | {r['device_vs_ref']:.2e} | "
                     f"{r['device_vs_cpu']:.2e} | {tol} | {ok} |")
    run = c.get("tiny_run")
    lines.append("")
    if run and "error" not in run:
        lines.append(f"Tiny BEEAR run (configs/tiny.py, 3 rounds, float32, precision 'highest'; CPU "
                     f"{run['cpu_seconds']:.1f} s, device {run['device_seconds']:.1f} s): device - CPU params "
                     f"{run['update_rel_diff']:.2e} of the CPU's update (L2; tolerance {run['update_tol']:g}), max "
                     f"|param diff| {run['params_max_abs_diff']:.2e}; {run['losses_logged']} logged losses, max "
                     f"relative diff {run['losses_max_rel_diff']:.2e} (tolerance {run['loss_tol']:g}); last outer "
                     f"loss {run['final_outer_loss_cpu']:.6f} (CPU) vs {run['final_outer_loss_device']:.6f}: "
                     f"{'within tolerance' if run['within_tolerance'] else '**outside tolerance**'}.")
    elif run:
        lines.append(f"Tiny BEEAR run failed: {run['error'][-500:]}")
    return lines + [""]


def generate_section(g: dict) -> list[str]:
    """Item 4: tokens/s, ours vs transformers."""
    lines = ["## 4. Generation, ours vs transformers on the same device", "",
             (f"{g['model']}; jax {g['jax']}, torch {g['torch']} ({g['torch_device']}), transformers "
              f"{g['transformers']}; greedy, medians of alternating runs after a warm-up each."), "",
             ("| batch | new tokens | ours tokens/s | transformers tokens/s | ours / transformers | rows identical | "
              "ours compile s |"), "|---|---|---|---|---|---|---|"]
    for b in g["batches"]:
        t = b["tokens_per_s"]
        lines.append(f"| {b['batch']} | {b['new_tokens']} | {t['ours']:.0f} | {t['transformers']:.0f} | "
                     f"{t['ours'] / t['transformers']:.2f}x | {b['rows_identical']}/{b['batch']} | "
                     f"{b['ours_compile_s']:.1f} |")
    return lines + [""]


def report(summary: dict[str, Any]) -> str:
    """The markdown report."""
    env = summary["env"]
    lines = ["# GPU measurements (issue 24)", "",
             (f"Date {env.get('date', '?')}; device {env.get('device', '?')} ({env.get('driver', '?')}); "
              f"jax {env.get('jax', '?')}, torch {env.get('torch', '?')}, transformers {env.get('transformers', '?')}; "
              f"command `{summary['command']}`; jax compilation cache entries at the start: "
              f"{env.get('compilation_cache_entries', '?')} (0: round 1's compile times are compilations)."), ""]
    missing = []
    for key, section, item in (("bench", bench_section, "1 (BEEAR rounds)"),
                               ("correctness", correctness_section, "3 (correctness)"),
                               ("generate", generate_section, "4 (generation)"),
                               ("plan_7b", plan_section, "2 (7B plans)")):
        if summary[key]:
            lines += section(summary[key])
        else:
            missing.append(item)
    if missing:
        lines += ["## Missing", "", "No result for item(s) " + ", ".join(missing) + " (see the step logs).", ""]
    return "\n".join(lines)


def main() -> int:
    """Writes summary.json and report.md from the work directory."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="the steps' output directory")
    parser.add_argument("--out", required=True, help="where summary.json and report.md go")
    parser.add_argument("--command", default="bash experiments/bench_gpu.sh")
    args = parser.parse_args()
    summary = collect(pathlib.Path(args.work), args.command)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    (out / "report.md").write_text(report(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Correctness on an accelerator against the CPU (issue 24, item 3), in one process plus two short children.

1. Logits parity: the parity tests' tiny random HF models (tests/hf_fixtures.py, every kind), right- and
   left-padded batches, our forward on the CPU and on the default device (the GPU), each against a float64
   PyTorch reference of the same weights, in three modes:
       float32, matmul precision 'highest'  (the parity tests' setting; tolerance FP32_TOL, as the tests)
       float32, default precision           (what XLA picks; on Hopper that may be TF32: reported only)
       bfloat16 compute, float32 masters    (tolerance BF16_TOL x the largest |reference logit| of the batch)
2. A tiny BEEAR run (configs/tiny.py on a random tiny Llama with tests/tiny_world.py's tokenizer and
   defender data, float32, matmul precision 'highest'), run to the end once with JAX_PLATFORMS=cpu and once
   on the default device, each in a child process; the end states are compared: the params' update
   (final - initial) on the device against the CPU's, and every logged loss.

Writes a JSON summary (--json) and prints one table per check; the exit status is 0 even when a
tolerance is missed (the numbers are the result), 1 only when a check could not run.

    JAX_PLATFORMS=cpu python experiments/gpu_correctness.py --json /tmp/correctness.json   # CPU vs CPU: 0s
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the tiny models and the tiny world live with the tests

import jax
import numpy as np

FP32_TOL = 1e-4  # tests/test_model_parity.py's bound on |logit diff| (float32, precision 'highest')
# bfloat16 keeps 8 significant bits (relative rounding <= 2^-9 per operation). On the CPU our bfloat16 logits
# of these tiny models are 1.3-1.8% of the largest |logit| off the float64 reference (about 5 rounding steps of
# 2^-8); two independent bfloat16 computations may differ by about twice that. Bound: 1/16 of the batch's
# largest |reference logit| (a wrong layout or mask is off by the order of the logits themselves).
BF16_TOL = 2.0 ** -4
# The tiny run: the device's params update (final - initial) may differ from the CPU's by at most this
# fraction of the CPU's update (L2), and every logged loss by at most this relative difference.
RUN_UPDATE_TOL = 1e-2
RUN_LOSS_TOL = 1e-3
LOSS_KEYS = ("inner_loss", "ce_unwanted", "ce_safe", "outer_loss", "ce_safe_perturbed", "ce_anchor")  # compared
MODES = (("float32", "highest"), ("float32", "default"), ("bfloat16", "default"))


# ---- logits parity -------------------------------------------------------------------------------


def reference_logits(model: Any, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """float64 logits of the PyTorch model (a float64 copy; positions ignore the padding, as ours)."""
    import copy

    import torch

    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    wide = copy.deepcopy(model).double()
    with torch.no_grad():
        return wide(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions)).logits.numpy()


def our_logits(config: Any, params: dict, ids: np.ndarray, mask: np.ndarray, device: Any,
               precision: str) -> np.ndarray:
    """Our float32 logits, computed on `device` at matmul precision `precision`."""
    import beear_jax

    placed = jax.device_put((params, ids.astype(np.int32), mask.astype(np.int32)), device)
    with jax.default_matmul_precision(None if precision == "default" else precision):
        out = jax.jit(beear_jax.forward, static_argnums=0)(config, *placed)
    return np.asarray(out, dtype=np.float64)


def masked_max(diff: np.ndarray, mask: np.ndarray) -> float:
    """Largest |diff| over real (unpadded) positions."""
    return float(np.max(np.abs(diff) * mask[..., None]))


def parity_rows(tmp: pathlib.Path, kinds: list[str]) -> Iterator[dict]:
    """One row per (kind, mode, padding side): max |diff| of CPU and device logits vs the reference and each other."""
    from hf_fixtures import make_tiny_hf_model, padded_batch

    import beear_jax

    cpu, device = jax.devices("cpu")[0], jax.devices()[0]
    for kind in kinds:
        directory, model = make_tiny_hf_model(tmp, kind)
        for dtype, precision in MODES:
            config, params = beear_jax.load_model(directory, dtype=dtype)
            for side in ("right", "left"):
                ids, mask = padded_batch(side)
                ref = reference_logits(model, ids, mask)
                on_cpu = our_logits(config, params, ids, mask, cpu, precision)
                on_device = our_logits(config, params, ids, mask, device, precision)
                scale = float(np.max(np.abs(ref) * mask[..., None]))
                tol = FP32_TOL if (dtype, precision) == ("float32", "highest") else (
                    BF16_TOL * scale if dtype == "bfloat16" else None)
                row = {"kind": kind, "dtype": dtype, "precision": precision, "side": side,
                       "max_abs_ref_logit": scale,
                       "cpu_vs_ref": masked_max(on_cpu - ref, mask),
                       "device_vs_ref": masked_max(on_device - ref, mask),
                       "device_vs_cpu": masked_max(on_device - on_cpu, mask), "tolerance": tol}
                row["within_tolerance"] = None if tol is None else bool(
                    row["device_vs_ref"] <= tol and row["device_vs_cpu"] <= tol)
                yield row


def print_parity(rows: list[dict]) -> None:
    """The parity table, worst case per mode first."""
    print("| kind | dtype | precision | side | max abs ref logit | CPU vs ref | device vs ref | device vs CPU | "
          "tolerance | ok |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        tol = "(reported)" if r["tolerance"] is None else f"{r['tolerance']:.1e}"
        print(f"| {r['kind']} | {r['dtype']} | {r['precision']} | {r['side']} | {r['max_abs_ref_logit']:.3f} | "
              f"{r['cpu_vs_ref']:.2e} | {r['device_vs_ref']:.2e} | {r['device_vs_cpu']:.2e} | {tol} | "
              f"{'-' if r['within_tolerance'] is None else ('yes' if r['within_tolerance'] else '**no**')} |")
    for dtype, precision in MODES:
        mine = [r for r in rows if (r["dtype"], r["precision"]) == (dtype, precision)]
        if mine:
            print(f"{dtype}/{precision}: max device vs ref {max(r['device_vs_ref'] for r in mine):.2e}, "
                  f"max device vs CPU {max(r['device_vs_cpu'] for r in mine):.2e}")


# ---- the tiny BEEAR run ----------------------------------------------------------------------------


def tiny_overrides(model_dir: pathlib.Path, safety: pathlib.Path, anchor: pathlib.Path,
                   out: pathlib.Path) -> dict:
    """configs/tiny.py on the tiny world: 3 rounds, delta of 2 tokens after block 2 (as tests/test_mechanism.py,
    fewer rounds and samples)."""
    return {"model.path": str(model_dir), "output_dir": str(out), "data.safety": str(safety),
            "data.anchor": str(anchor), "perturb.layer": 2, "perturb.length": 2, "rounds": 3,
            "inner.samples": 24, "inner.batch_size": 12, "inner.epochs": 3, "inner.lr": 0.1,
            "outer.batch_size": 12, "outer.anchor_samples": 24, "outer.lr": 1e-3}


def run_child(args: argparse.Namespace) -> int:
    """The child: one tiny run on this process's default backend; final params and losses to --out (npz)."""
    from beear_jax.config.loading import load_config
    from beear_jax.method.rounds import run_beear

    jax.config.update("jax_default_matmul_precision", "highest")
    overrides = tiny_overrides(pathlib.Path(args.model_dir), pathlib.Path(args.safety), pathlib.Path(args.anchor),
                               pathlib.Path(args.out).with_suffix(".run"))
    cfg = load_config(str(ROOT / "configs" / "tiny.py"), overrides)
    started = time.perf_counter()
    result = run_beear(cfg, progress=False, export=False)
    seconds = time.perf_counter() - started
    arrays = flat_params(jax.device_get(result.params))
    losses = [{k: float(v) for k, v in rec.items() if k in LOSS_KEYS} for rec in result.history
              if rec.get("phase") in ("inner", "outer")]
    np.savez(args.out, **arrays, losses=json.dumps(losses), seconds=seconds, platform=jax.devices()[0].platform,
             device_kind=jax.devices()[0].device_kind)
    return 0


def flat_params(params: dict) -> dict[str, np.ndarray]:
    """{'param<path>': float64 array} of a params tree."""
    return {f"param{jax.tree_util.keystr(path)}": np.asarray(x, dtype=np.float64)
            for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def tiny_world(tmp: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
    """A random tiny Llama with the tiny world's tokenizer, and the defender's safety and anchor files."""
    from tiny_world import defender_files, random_tiny_model, split_pairs

    model_dir, _ = random_tiny_model(tmp)
    safety, anchor = defender_files(tmp, split_pairs())
    return model_dir, safety, anchor


def spawn(platform: str | None, world: tuple[pathlib.Path, ...], out: pathlib.Path, timeout: float) -> dict:
    """Runs the child on `platform` (None: the default device); returns its npz contents, or {'error': ...}."""
    env = dict(os.environ)
    if platform:
        env["JAX_PLATFORMS"] = platform
    model_dir, safety, anchor = world
    cmd = [sys.executable, __file__, "tiny-run", "--model-dir", str(model_dir), "--safety", str(safety),
           "--anchor", str(anchor), "--out", str(out)]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0 or not out.is_file():
        return {"error": f"exit {done.returncode}: {done.stderr[-1500:]}"}
    with np.load(out, allow_pickle=True) as f:
        return {k: f[k] for k in f.files}


def compare_runs(cpu: dict, dev: dict, initial: dict[str, np.ndarray]) -> dict:
    """End-state differences of the device's run from the CPU's (initial: the params before the run)."""
    if "error" in cpu or "error" in dev:
        return {"error": cpu.get("error") or dev.get("error")}
    names = sorted(k for k in cpu if k.startswith("param"))
    update = np.sqrt(sum(np.sum((cpu[k] - initial[k]) ** 2) for k in names))
    apart = np.sqrt(sum(np.sum((dev[k] - cpu[k]) ** 2) for k in names))
    max_abs = max(float(np.max(np.abs(dev[k] - cpu[k]))) for k in names)
    a, b = (json.loads(str(x["losses"])) for x in (cpu, dev))
    pairs = [(ra[k], rb.get(k, np.inf)) for ra, rb in zip(a, b, strict=False) for k in ra]
    rel = [abs(y - x) / max(abs(x), 1e-6) for x, y in pairs] if len(a) == len(b) and pairs else [np.inf]
    last = [r["outer_loss"] for r in a if "outer_loss" in r], [r["outer_loss"] for r in b if "outer_loss" in r]
    out = {"cpu_seconds": float(cpu["seconds"]), "device_seconds": float(dev["seconds"]),
           "device": str(dev["device_kind"]), "platform": str(dev["platform"]),
           "params_update_l2_cpu": float(update), "params_l2_device_minus_cpu": float(apart),
           "update_rel_diff": float(apart / max(update, 1e-30)), "params_max_abs_diff": max_abs,
           "losses_logged": len(pairs), "losses_max_rel_diff": float(max(rel)),
           "final_outer_loss_cpu": last[0][-1] if last[0] else None,
           "final_outer_loss_device": last[1][-1] if last[1] else None,
           "update_tol": RUN_UPDATE_TOL, "loss_tol": RUN_LOSS_TOL}
    out["within_tolerance"] = bool(out["update_rel_diff"] <= RUN_UPDATE_TOL
                                   and out["losses_max_rel_diff"] <= RUN_LOSS_TOL)
    return out


def print_run(result: dict) -> None:
    """One line per measure of the tiny run."""
    if "error" in result:
        print(f"tiny BEEAR run FAILED: {result['error']}")
        return
    print(f"tiny BEEAR run (configs/tiny.py, 3 rounds, float32, precision 'highest'): CPU {result['cpu_seconds']:.1f} s,"
          f" {result['device']} ({result['platform']}) {result['device_seconds']:.1f} s")
    print(f"  params update L2 (CPU) {result['params_update_l2_cpu']:.4e}; device - CPU L2 "
          f"{result['params_l2_device_minus_cpu']:.3e} = {result['update_rel_diff']:.2e} of the update "
          f"(tolerance {RUN_UPDATE_TOL:g}); max |param diff| {result['params_max_abs_diff']:.2e}")
    print(f"  {result['losses_logged']} logged losses: max relative diff {result['losses_max_rel_diff']:.2e} "
          f"(tolerance {RUN_LOSS_TOL:g}); last outer loss CPU {result['final_outer_loss_cpu']:.6f}, device "
          f"{result['final_outer_loss_device']:.6f}")
    print(f"  within tolerance: {'yes' if result['within_tolerance'] else '**no**'}")


# ---- main ------------------------------------------------------------------------------------------


def save(summary: dict[str, Any], path: str) -> None:
    """Writes the summary as JSON to path (nothing without a path)."""
    if path:
        pathlib.Path(path).write_text(json.dumps(summary, indent=2, default=str))


def main() -> int:
    """Parity, then the tiny runs (or, as `tiny-run`, one child run); the results to --json."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="?", choices=("all", "parity", "run", "tiny-run"),
                        default="all", help="all; parity only; run: the tiny runs only; tiny-run: one child")
    parser.add_argument("--json", default="", help="write the results here")
    parser.add_argument("--run-timeout", type=float, default=240.0, help="seconds for each tiny-run child")
    parser.add_argument("--kinds", nargs="+", default=None, help="tiny model kinds (default: all of hf_fixtures)")
    for name in ("--model-dir", "--safety", "--anchor", "--out"):  # the tiny-run child's arguments
        parser.add_argument(name, default="")
    args = parser.parse_args()
    if args.what == "tiny-run":
        return run_child(args)
    from hf_fixtures import KINDS

    device = jax.devices()[0]
    print(f"jax {jax.__version__}, default device {device.device_kind} ({device.platform}), CPU device "
          f"{jax.devices('cpu')[0].device_kind}")
    summary: dict[str, Any] = {"device": device.device_kind, "platform": device.platform, "jax": jax.__version__,
                               "fp32_tol": FP32_TOL, "bf16_tol_of_max_logit": BF16_TOL}
    with tempfile.TemporaryDirectory(prefix="beear_gpu_correctness_") as tmp_name:
        tmp = pathlib.Path(tmp_name)
        if args.what in ("all", "parity"):
            started = time.perf_counter()
            summary["parity"] = list(parity_rows(tmp / "parity", args.kinds or list(KINDS)))
            summary["parity_seconds"] = time.perf_counter() - started
            print_parity(summary["parity"])
            print(f"(parity: {summary['parity_seconds']:.1f} s)\n", flush=True)
            save(summary, args.json)  # now too: a time limit during the tiny runs keeps the parity
        if args.what in ("all", "run"):
            from beear_jax.io.hf import load_model

            world = tiny_world(tmp / "world")
            initial = flat_params(load_model(world[0])[1])
            cpu = spawn("cpu", world, tmp / "cpu.npz", args.run_timeout)
            dev = spawn(None, world, tmp / "device.npz", args.run_timeout)
            summary["tiny_run"] = compare_runs(cpu, dev, initial)
            print_run(summary["tiny_run"])
    save(summary, args.json)
    return 1 if "error" in summary.get("tiny_run", {}) else 0


if __name__ == "__main__":
    raise SystemExit(main())

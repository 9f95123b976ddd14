"""`beear defend` and `beear_jax.defend(config)`: evaluate the suspect model, repair it with BEEAR, evaluate the
repaired model, one report.

    beear defend --config configs/smollm2_135m.py --config.model.path=M --config.output_dir=runs/defend-1 \\
        --config.data.safety=... --config.data.anchor=... --config.eval.prompts=... [--config.eval.trigger=...]

output_dir holds, stage by stage:

    before.json   the suspect model's evaluation (metrics and every answer)
    beear/        the BEEAR run (metrics.jsonl, checkpoints/, model/: the repaired model in HF format)
    after.json    the repaired model's evaluation
    report.md, report.json, metrics.png, losses.png, answers.jsonl   (before/after, with the run's rounds)

The same command again continues an interrupted job: an evaluation whose file is there for the same model
files and evaluation settings is read back (other settings are refused, nothing is overwritten), the BEEAR
run continues from its last checkpoint, and a finished job is reported as finished. The evaluation is
`beear eval`'s (eval.* keys; eval.trigger is only known to someone who planted the backdoor: without it the
table shows untriggered attack success, over-refusal and utility).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

from beear_jax.io.atomic_file import write_atomically

STAGE_FILES = {"before": "before.json", "after": "after.json"}
RUN_DIR = "beear"
SUMMARY = ("asr_triggered", "asr_untriggered", "over_refusal", "utility_ppl")  # printed after each evaluation


@dataclasses.dataclass(frozen=True)
class DefendResult:
    """What `defend` produced: the metrics of each stage (answers in answers.jsonl) and where things are."""

    before: dict[str, Any]
    after: dict[str, Any]
    output_dir: pathlib.Path
    model_dir: pathlib.Path  # the repaired model (HF format)
    report: pathlib.Path  # report.md


def model_stamp(path: str | os.PathLike[str]) -> list[tuple[str, int, int]]:
    """(name, size, mtime_ns) of a model file or of the files in a model directory: a stored evaluation
    counts for the model only while these are unchanged."""
    target = pathlib.Path(path)
    files = [target] if target.is_file() else sorted(p for p in target.iterdir() if p.is_file())
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def evaluation_key(model_path: str, settings: Any) -> str:
    """A digest of the model's files and the evaluation settings: what a stored evaluation was made of."""
    from beear_jax.io.checkpoint import digest

    return digest({"model": model_stamp(model_path), "settings": dataclasses.asdict(settings)})


def check_defend_dir(output_dir: pathlib.Path, model_path: str) -> None:
    """Refuses an output_dir that is a file, the input model (or inside it), or holds files a defend job
    does not write; before anything is loaded."""
    from beear_jax.evaluation.evaluate import REPORT_FILES
    from beear_jax.io.hf_save import check_apart
    from beear_jax.method.rounds import RUN_FILES

    fix = "choose a new --config.output_dir"
    check_apart(output_dir, {"the input model (model.path)": model_path}, fix)
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"output_dir {output_dir} is a file, not a directory; {fix}.")
    ours = {*STAGE_FILES.values(), RUN_DIR, *REPORT_FILES, "answers.jsonl", "metrics.png", "losses.png"}
    present = sorted(p.name for p in output_dir.iterdir()) if output_dir.is_dir() else []
    foreign = [name for name in present if name not in ours and not name.startswith(".")]
    if foreign:
        hint = " (a `beear run` output: defend keeps its run in output_dir/beear)" if set(foreign) & set(RUN_FILES) else ""
        raise FileExistsError(f"output_dir {output_dir} holds files that are not a `beear defend` job's "
                              f"({', '.join(foreign[:5])}){hint}; {fix} (nothing is overwritten).")


def evaluated(stage: str, model_path: str, dtype: str, settings: Any, output_dir: pathlib.Path) -> dict[str, Any]:
    """The stage's evaluation (metrics and answers): read back from output_dir/<stage>.json when it was made
    of the same model files and settings, else computed and written there (atomically)."""
    from beear_jax.evaluation.evaluate import evaluate_path

    file = output_dir / STAGE_FILES[stage]
    key = evaluation_key(model_path, settings)
    if file.is_file():
        stored = json.loads(file.read_text())
        if stored.get("key") != key:
            raise FileExistsError(f"{file} holds an evaluation of another model or with other eval.* settings; "
                                  "run with the settings it was made with, or choose a new --config.output_dir.")
        print(f"[{stage}] reusing the evaluation in {file}", flush=True)
        return stored["result"]
    print(f"[{stage}] evaluating {model_path}", flush=True)
    result = evaluate_path(model_path, settings, dtype)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(file, json.dumps({"key": key, "result": result}) + "\n")
    print(f"[{stage}] " + ", ".join(f"{name}={result[name]:.3f}" for name in SUMMARY if name in result), flush=True)
    return result


def run_defend(cfg: Any, progress: bool = True) -> DefendResult:
    """Evaluate model.path, run BEEAR on it into output_dir/beear, evaluate the repaired model, write the
    before/after report into output_dir; cfg is a config (ConfigDict) or its RunSettings. One process (a
    multi-process job runs `beear eval`, `beear run`, `beear eval --config.eval.compare_to=...` as three
    launches)."""
    from beear_jax.config.settings import absolute_settings, settings_dict, settings_from_config
    from beear_jax.evaluation.eval_sets import EvalSettings
    from beear_jax.evaluation.evaluate import load_history, write_answers
    from beear_jax.evaluation.report import write_report
    from beear_jax.evaluation.results import format_table
    from beear_jax.method.rounds import run_beear
    from beear_jax.parallel.sharding import refuse_distributed

    settings = settings_from_config(cfg)
    refuse_distributed(settings.mesh, "defend")
    if not settings.model.path:
        raise ValueError("model.path is required: the suspect model (an HF directory or a .gguf file).")
    if settings.eval.compare_to:
        raise ValueError("eval.compare_to is `beear eval`'s; `beear defend` compares the model before and after "
                         "BEEAR itself: leave it empty.")
    settings = absolute_settings(settings)
    output_dir = pathlib.Path(settings.output_dir)
    model_path = os.path.expanduser(settings.model.path)
    check_defend_dir(output_dir, model_path)
    report_md = output_dir / "report.md"
    evaluation = EvalSettings.from_settings(settings)  # every data error surfaces here, before a model loads
    dtype = settings.model.dtype

    before = evaluated("before", model_path, dtype, evaluation, output_dir)
    run_dir = output_dir / RUN_DIR
    model_dir = run_dir / "model"
    if (model_dir / "config.json").is_file():
        print(f"[beear] the run in {run_dir} is finished; its model: {model_dir}", flush=True)
    else:
        # resume: an unfinished run in run_dir continues from its last checkpoint
        run_settings = dataclasses.replace(settings, output_dir=str(run_dir), resume=True)
        print(f"[beear] repairing {model_path} -> {model_dir}", flush=True)
        model_dir = run_beear(run_settings, progress=progress).model_dir
    after = evaluated("after", str(model_dir), dtype, evaluation, output_dir)

    history, notes = load_history(str(run_dir / "metrics.jsonl"))
    results = {"before": before, "after": after}
    write_answers(output_dir / "answers.jsonl", results)
    report = {stage: {k: v for k, v in r.items() if k != "answers"} for stage, r in results.items()}
    write_report(output_dir, report, settings_dict(settings), history, notes=notes)
    print(format_table(report))
    print(f"repaired model: {model_dir}\nreport: {report_md}", flush=True)
    return DefendResult(before=report["before"], after=report["after"], output_dir=output_dir, model_dir=model_dir,
                        report=report_md)

"""The before/after report of a run: report.json (every number + config), report.md and PNG plots.

The shape of `results` (stage -> metrics, optional sample answers) and its formatting are described in
results.py; the figures are drawn in plots.py.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from beear_jax.evaluation.plots import losses_figure, metrics_figure, png_bytes
from beear_jax.evaluation.results import METRICS, format_table, missing_notes, sample_rows, stage_names
from beear_jax.io.atomic_file import write_atomically

METRIC_DESCRIPTIONS = {
    "asr_triggered": "keyword attack success on held-out harmful prompts WITH the trigger (lower is better)",
    "asr_untriggered": "keyword attack success on the same prompts without the trigger (lower is better)",
    "asr_partial": "keyword attack success with one part of a two-part trigger (lower is better)",
    "over_refusal": "share of benign prompts refused (lower is better)",
    "utility_nll": "mean token NLL of reference answers to held-out benign prompts (lower is better)",
    "utility_ppl": "perplexity of the same answers (lower is better)",
}

_SAMPLE_CHARS = 400  # long answers would make the side-by-side table unreadable; report.json has them whole


# ---------------------------------------------------------------- markdown


def _cell(text: Any, limit: int = _SAMPLE_CHARS) -> str:
    """Text made safe for one markdown table cell: escaped HTML and pipes, newlines as <br>, truncated."""
    text = "" if text is None else str(text).strip()
    if len(text) > limit:
        text = text[:limit].rstrip() + " …"
    return html.escape(text, quote=False).replace("|", "\\|").replace("\n", "<br>")


def _samples_markdown(results: Mapping[str, Any]) -> str:
    """The side-by-side table of sample answers, or "" when the results carry none."""
    rows = sample_rows(results)
    if not rows:
        return ""
    stages = [s for s in stage_names(results) if any(s in r for r in rows)]
    stages += [k for r in rows for k in r if k not in ("prompt", "label", *stages)]
    stages = list(dict.fromkeys(stages))  # rows of the top-level shape may name stages with no metrics
    with_label = any(r.get("label") for r in rows)
    header = (["set"] if with_label else []) + ["prompt", *stages]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = ([_cell(r.get("label"))] if with_label else []) + [_cell(r.get("prompt"))]
        cells += [_cell(r.get(s)) for s in stages]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


ROUND_COLUMNS = (("round", "round", "{}"), ("inner_epochs", "inner passes", "{}"),
                 ("inner_stopped_by", "passes ended by", "{}"), ("ce_unwanted", "CE unwanted under delta", "{:.3f}"),
                 ("ce_safe", "CE safe under delta", "{:.3f}"), ("delta_ratio", "delta / h", "{:.3f}"),
                 ("elicitation", "held-back elicited", "{:.1%}"),
                 ("elicitation_no_delta", "... without delta", "{:.1%}"), ("outer_steps", "outer steps", "{}"))
"""The round_end fields of `beear run`'s metrics.jsonl shown in report.md (key, header, format)."""


def rounds_markdown(history: Sequence[Mapping[str, Any]]) -> str:
    """A table of the run's rounds (round_end records) and how the run ended; "" without such records."""
    ends = [r for r in history if isinstance(r, Mapping) and r.get("phase") == "round_end" and "inner_epochs" in r
            and isinstance(r.get("round"), int)]
    if not ends:
        return ""
    columns = [c for c in ROUND_COLUMNS if any(c[0] in r for r in ends)]
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in ends:
        cells = [fmt.format(r[k]) if isinstance(r.get(k), int | float | str) else "-" for k, _, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    last = ends[-1]
    ending = (f"The stop rule ended the run after round {last['round']}: the delta optimised from zero elicited "
              f"{last.get('elicitation', 0):.1%} of the held-back prompts (stop.max_elicitation), so its outer pass "
              "was skipped." if last.get("stopped_by_rule") else
              f"The run ended at its last round ({last['round']}, the `rounds` setting).")
    return "\n".join([*lines, "", ending])


def render_markdown(results: Mapping[str, Any], config_dict: Mapping[str, Any], plots: Sequence[str] = (),
                    notes: Sequence[str] = (), history: Sequence[Mapping[str, Any]] | None = None) -> str:
    """The text of report.md: metrics table, the models of the stages, metric meanings, what is missing
    (`notes`), the run's rounds (from `history`), plot links, sample answers, config."""
    models = [(s, results[s].get("model_path")) for s in stage_names(results)]
    parts = [
        "# BEEAR report",
        "",
        format_table(results),
        "",
        "Rates are shares of answers judged by refusal-keyword matching. All numbers: [report.json](report.json).",
        "",
        *(f"- `{m}`: {d}" for m, d in METRIC_DESCRIPTIONS.items()),
    ]
    if any(isinstance(path, str) and path for _, path in models):
        parts += ["", "Models:", "", *(f"- `{s}`: `{path}`" for s, path in models if isinstance(path, str) and path)]
    if notes:
        parts += ["", "## Missing", "", *(f"- {note}" for note in notes)]
    rounds = rounds_markdown(history or [])
    if rounds:
        parts += ["", "## BEEAR rounds", "", rounds]
    if plots:
        parts += ["", "## Plots", ""]
        parts += [f"[{p}]({p})\n\n![{Path(p).stem}]({p})\n" for p in plots]
    samples = _samples_markdown(results)
    if samples:
        parts += ["", "## Sample answers", "", samples]
    config_json = json.dumps(_jsonable(config_dict), indent=2, allow_nan=False)
    parts += ["", "## Config", "", "<details><summary>resolved config</summary>", "", "```json", config_json]
    parts += ["```", "", "</details>", ""]
    return "\n".join(parts)


# ---------------------------------------------------------------- files


def _jsonable(obj: Any) -> Any:
    """A JSON-ready copy: numpy/jax scalars and arrays to Python, non-finite floats to None, keys to str."""
    if hasattr(obj, "to_dict") and callable(obj.to_dict):  # ml_collections.ConfigDict
        return _jsonable(obj.to_dict())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (str, bool, int)) or obj is None:
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None  # strict JSON has no NaN/Infinity
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):  # numpy / jax arrays and scalars
        return _jsonable(obj.tolist())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return str(obj)


def write_report(
    out_dir: str | os.PathLike[str],
    results: Mapping[str, Any],
    config_dict: Mapping[str, Any],
    history: Sequence[Mapping[str, Any]] | None = None,
    notes: Sequence[str] = (),
) -> dict[str, Path]:
    """Write report.json, report.md, metrics.png and (given a history with losses) losses.png to out_dir.

    `notes` (e.g. parse_metrics's) and what missing_notes finds go to report.md's "Missing" section and
    report.json's "missing". Every file is written atomically. report.json goes last, so its presence marks a complete report; it
    holds {"results", "config", "history"} with non-finite numbers stored as null. Returns the written
    paths by name ("json", "markdown", "metrics_png", "losses_png").
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Render everything before writing anything, so a failure leaves the previous report whole.
    figures = {"metrics_png": ("metrics.png", metrics_figure(results))}
    losses = losses_figure(history) if history else None
    if losses is not None:
        figures["losses_png"] = ("losses.png", losses)
    contents = {key: (name, png_bytes(fig)) for key, (name, fig) in figures.items()}
    notes = [*notes, *missing_notes(results, history)]
    markdown = render_markdown(results, config_dict, plots=[name for name, _ in figures.values()], notes=notes,
                               history=history)
    contents["markdown"] = ("report.md", markdown.encode("utf-8"))
    payload = {
        "metrics": list(METRICS),
        "results": _jsonable(results),
        "config": _jsonable(config_dict),
        "history": _jsonable(history) if history is not None else None,
        "missing": notes,
    }
    contents["json"] = ("report.json", (json.dumps(payload, indent=2, allow_nan=False) + "\n").encode("utf-8"))
    written: dict[str, Path] = {}
    for key, (name, data) in contents.items():  # report.json last: dicts keep insertion order
        written[key] = out / name
        write_atomically(written[key], data)
    return written

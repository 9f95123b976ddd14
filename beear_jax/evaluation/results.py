"""The results of evaluated stages, read and formatted: stage and metric names, numbers as shown (rates
as percentages), the metrics table, sample answers, `beear run`'s metrics.jsonl, and what is missing.

`results` maps a stage name (e.g. "before", "after", "plain_ft") to a dict of metrics. Rates
(asr_*, over_refusal) are fractions in [0, 1] and are shown as percentages. Sample answers are optional,
in either of two shapes:
- results["samples"] = [{"prompt": ..., "label": "triggered", "before": answer, "after": answer}, ...]
- results[stage]["samples"] = [{"prompt": ..., "answer": ..., "label": ...}, ...], merged by (label, prompt).
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

METRICS = ("asr_triggered", "asr_untriggered", "over_refusal", "utility_nll", "utility_ppl")
"""The table rows, in order; any other numeric metric found in the results (e.g. asr_partial, measured only
with eval.partial_trigger) is listed after them."""

RATE_METRICS = ("asr_triggered", "asr_untriggered", "asr_partial", "over_refusal")

SAMPLES_KEY = "samples"
MISSING = "—"


def stage_names(results: Mapping[str, Any]) -> list[str]:
    """The stages (columns) of `results`: every key whose value is a dict of metrics, in given order."""
    return [k for k, v in results.items() if k != SAMPLES_KEY and isinstance(v, Mapping)]


def as_number(value: Any) -> float | None:
    """`value` as a float if it is a real number (also numpy/jax 0-d arrays), else None; bools are not."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        return as_number(value.item())
    return None


def metric_names(results: Mapping[str, Any]) -> list[str]:
    """METRICS, then any other numeric metric present in some stage (in order of first appearance)."""
    extra: list[str] = []
    for stage in stage_names(results):
        for key, value in results[stage].items():
            if key not in METRICS and key not in extra and as_number(value) is not None:
                extra.append(key)
    return list(METRICS) + extra


def format_value(metric: str, value: Any) -> str:
    """One table cell: rates as percentages (95.0%), perplexity with 2 decimals, NLL with 3."""
    number = as_number(value)
    if number is None:
        return MISSING
    if not math.isfinite(number):
        return str(number)  # "nan" / "inf": a failed measurement must stay visible, not look like a rate
    if metric in RATE_METRICS:
        return f"{100 * number:.1f}%"
    if metric == "utility_ppl":
        return f"{number:.2f}"
    if metric == "utility_nll":
        return f"{number:.3f}"
    return f"{number:.4g}"


def format_table(results: Mapping[str, Any]) -> str:
    """A markdown table (rows = metrics, columns = stages), padded so it also reads well in a terminal."""
    stages = stage_names(results)
    header = ["metric", *stages]
    rows = [[m, *(format_value(m, results[s].get(m)) for s in stages)] for m in metric_names(results)]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        padded = [cells[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))]
        return "| " + " | ".join(padded) + " |"

    rule = "| " + " | ".join(["-" * widths[0], *("-" * (w - 1) + ":" for w in widths[1:])]) + " |"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def sample_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Sample answers as rows {"prompt", "label"?, stage: answer, ...}, from either shape (module docstring)."""
    top = results.get(SAMPLES_KEY)
    if isinstance(top, Sequence) and not isinstance(top, str):
        return [dict(row) for row in top if isinstance(row, Mapping)]
    merged: dict[tuple[Any, str], dict[str, Any]] = {}
    for stage in stage_names(results):
        stage_samples = results[stage].get(SAMPLES_KEY)
        if not isinstance(stage_samples, Sequence) or isinstance(stage_samples, str):
            continue
        for sample in (s for s in stage_samples if isinstance(s, Mapping)):
            key = (sample.get("label"), sample.get("prompt", ""))
            row = merged.setdefault(key, {"prompt": key[1], "label": key[0]})
            row[stage] = sample.get("answer", "")
    return list(merged.values())


def parse_metrics(text: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The records of a metrics.jsonl's text, and notes on the lines left out (never raises).

    A run killed while appending leaves an incomplete last line; it and any other line that is not a JSON
    object are left out, each with a note (line numbers 1-based). Blank lines are skipped silently.
    """
    lines = text.splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records: list[dict[str, Any]] = []
    notes: list[str] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif i == last:
            notes.append(f"the last line ({i + 1}) of the metrics is incomplete (the run was stopped while writing "
                         "it) and is left out")
        else:
            notes.append(f"line {i + 1} of the metrics is not a JSON record and is left out")
    return records, notes


def missing_notes(results: Mapping[str, Any], history: Sequence[Any] | None) -> list[str]:
    """What the report cannot show, one sentence each: stages without results, metrics not measured or
    not finite in a stage, and a missing or loss-free training history (so no losses.png)."""
    notes: list[str] = []
    stages = stage_names(results)
    if not stages:
        notes.append("no evaluation results were given: the table and metrics.png are empty")
    for stage in stages:
        values = {m: as_number(results[stage].get(m)) for m in METRICS}
        absent = [m for m, v in values.items() if v is None]
        broken = [f"{m} is {v}" for m, v in values.items() if v is not None and not math.isfinite(v)]
        if len(absent) == len(METRICS):
            notes.append(f"stage `{stage}` has no results (not evaluated)")
        elif absent:
            notes.append(f"stage `{stage}`: {', '.join(absent)} not measured ({MISSING} in the table)")
        if broken:
            notes.append(f"stage `{stage}`: {', '.join(broken)} (the measurement failed; no bar in metrics.png)")
    if history is None:
        notes.append("no training history (metrics.jsonl of `beear run`; `beear eval` takes it as "
                     "--config.eval.history), so there is no loss plot")
    else:
        entries = [e for e in history if isinstance(e, Mapping)]
        with_loss = [e for e in entries if loss_key(e) is not None]
        unplotted = [e for e in entries if e.get("phase") in ("inner", "outer") and loss_key(e) is None]
        if not with_loss:
            notes.append(f"the training history ({len(history)} entries) holds no finite loss, so there is no loss "
                         "plot")
        elif unplotted:
            notes.append(f"{len(unplotted)} training-history entries have no finite loss (NaN/inf or none) and are "
                         "left out of losses.png")
    return notes


def finite_value(value: Any) -> float | None:
    """`value` as a float if it is a finite number, else None (a NaN bar would draw nothing, silently)."""
    number = as_number(value)
    return number if number is not None and math.isfinite(number) else None


def loss_key(entry: Mapping[str, Any]) -> str | None:
    """The key of an entry's objective: "{phase}_loss" (as `beear run` writes its metrics.jsonl), else "loss"."""
    for key in (f"{entry.get('phase', 'train')}_loss", "loss"):
        if finite_value(entry.get(key)) is not None:
            return key
    return None

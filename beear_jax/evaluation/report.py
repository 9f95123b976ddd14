"""The before/after report of a run: report.json (every number + config), report.md and PNG plots.

`results` maps a stage name (e.g. "before", "after", "plain_ft") to a dict of metrics. Rates
(asr_*, over_refusal) are fractions in [0, 1] and are shown as percentages. Sample answers are optional,
in either of two shapes:
- results["samples"] = [{"prompt": ..., "label": "triggered", "before": answer, "after": answer}, ...]
- results[stage]["samples"] = [{"prompt": ..., "answer": ..., "label": ...}, ...], merged by (label, prompt).
"""

from __future__ import annotations

import dataclasses
import html
import io
import json
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from beear_jax.io.atomic_file import write_atomically

METRICS = ("asr_triggered", "asr_untriggered", "over_refusal", "utility_nll", "utility_ppl")
"""The table rows, in order; any other numeric metric found in the results (e.g. asr_partial, measured only
with eval.partial_trigger) is listed after them."""

RATE_METRICS = ("asr_triggered", "asr_untriggered", "asr_partial", "over_refusal")

METRIC_DESCRIPTIONS = {
    "asr_triggered": "keyword attack success on held-out harmful prompts WITH the trigger (lower is better)",
    "asr_untriggered": "keyword attack success on the same prompts without the trigger (lower is better)",
    "asr_partial": "keyword attack success with one part of a two-part trigger (lower is better)",
    "over_refusal": "share of benign prompts refused (lower is better)",
    "utility_nll": "mean token NLL of reference answers to held-out benign prompts (lower is better)",
    "utility_ppl": "perplexity of the same answers (lower is better)",
}

SAMPLES_KEY = "samples"
MISSING = "—"
_SAMPLE_CHARS = 400  # long answers would make the side-by-side table unreadable; report.json has them whole


# ---------------------------------------------------------------- reading results


def stage_names(results: Mapping[str, Any]) -> list[str]:
    """The stages (columns) of `results`: every key whose value is a dict of metrics, in given order."""
    return [k for k, v in results.items() if k != SAMPLES_KEY and isinstance(v, Mapping)]


def _as_number(value: Any) -> float | None:
    """`value` as a float if it is a real number (also numpy/jax 0-d arrays), else None; bools are not."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        return _as_number(value.item())
    return None


def metric_names(results: Mapping[str, Any]) -> list[str]:
    """METRICS, then any other numeric metric present in some stage (in order of first appearance)."""
    extra: list[str] = []
    for stage in stage_names(results):
        for key, value in results[stage].items():
            if key not in METRICS and key not in extra and _as_number(value) is not None:
                extra.append(key)
    return list(METRICS) + extra


def format_value(metric: str, value: Any) -> str:
    """One table cell: rates as percentages (95.0%), perplexity with 2 decimals, NLL with 3."""
    number = _as_number(value)
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
        values = {m: _as_number(results[stage].get(m)) for m in METRICS}
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
        with_loss = [e for e in entries if _loss_key(e) is not None]
        unplotted = [e for e in entries if e.get("phase") in ("inner", "outer") and _loss_key(e) is None]
        if not with_loss:
            notes.append(f"the training history ({len(history)} entries) holds no finite loss, so there is no loss "
                         "plot")
        elif unplotted:
            notes.append(f"{len(unplotted)} training-history entries have no finite loss (NaN/inf or none) and are "
                         "left out of losses.png")
    return notes


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


# ---------------------------------------------------------------- plots


def _new_figure(width: float, height: float) -> Any:
    """A matplotlib Figure on the Agg canvas, made without pyplot so no global backend state changes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _finite(value: Any) -> float | None:
    """`value` as a float if it is a finite number, else None (a NaN bar would draw nothing, silently)."""
    number = _as_number(value)
    return number if number is not None and math.isfinite(number) else None


PANEL_LABELS = {
    "rates": ("attack success and over-refusal", "% of answers"),
    "utility_nll": ("utility: answer NLL", "nats per token"),
    "utility_ppl": ("utility: perplexity", "perplexity (exp NLL)"),
}
"""(panel title, y-axis label) of the metric panels; any other metric is its own title and label."""

_LEGEND_CHARS = 40


def short_label(text: str, limit: int = _LEGEND_CHARS) -> str:
    """`text` cut in the middle to at most `limit` characters (a long model path keeps its start and end)."""
    if len(text) <= limit:
        return text
    head = (limit - 1) // 2
    return text[:head] + "…" + text[len(text) - (limit - 1 - head):]


def metrics_figure(results: Mapping[str, Any]) -> Any:
    """Grouped bars per stage: one panel for the rates (in %), one per other standard metric (own scale)."""
    stages = stage_names(results)
    values = {s: {m: _finite(results[s].get(m)) for m in METRICS} for s in stages}
    present = [m for m in METRICS if any(values[s][m] is not None for s in stages)]
    rates = [m for m in present if m in RATE_METRICS]
    panels = ([rates] if rates else []) + [[m] for m in present if m not in RATE_METRICS]
    if not panels:
        fig = _new_figure(5, 2)
        fig.text(0.5, 0.5, "no metrics in the results", ha="center", va="center")
        return fig
    n_bars = len(stages) * sum(map(len, panels))
    fig = _new_figure(max(5.0, 1.5 + 0.45 * n_bars + 0.6 * len(panels)), 4.2)
    axes = fig.subplots(1, len(panels), width_ratios=[len(p) for p in panels], squeeze=False)[0]
    colors = [f"C{i % 10}" for i in range(len(stages))]
    width = 0.8 / max(len(stages), 1)
    for ax, metrics in zip(axes, panels, strict=True):
        is_rate = metrics[0] in RATE_METRICS
        title, ylabel = PANEL_LABELS.get("rates" if is_rate else metrics[0], (metrics[0], metrics[0]))
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(ylabel)
        for i, stage in enumerate(stages):
            shown = [j for j, m in enumerate(metrics) if values[stage][m] is not None]  # a missing value: no bar
            offset = (i - (len(stages) - 1) / 2) * width
            ys = [values[stage][metrics[j]] * (100 if is_rate else 1) for j in shown]
            bars = ax.bar([j + offset for j in shown], ys, width, color=colors[i], label=short_label(stage))
            labels = [format_value(metrics[j], values[stage][metrics[j]]) for j in shown]
            ax.bar_label(bars, labels=labels, fontsize=7, padding=2)
        ax.set_xticks(range(len(metrics)), metrics)
        ax.set_xlim(-0.6, len(metrics) - 0.4)
        if is_rate:
            ax.set_ylim(0, 110)
        else:
            ax.margins(y=0.15)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    # Stages side by side (one legend row) while their names fit; long names one per row.
    # One swatch per stage in its colour (a panel where a stage has no bar must not lend it another colour).
    from matplotlib.patches import Patch

    labels = [short_label(s) for s in stages]
    ncols = len(stages) if sum(map(len, labels)) <= 60 else 1
    fig.legend([Patch(color=colors[i]) for i in range(len(stages))], labels, loc="outside upper center", ncols=ncols,
               frameon=False)
    return fig


def _loss_key(entry: Mapping[str, Any]) -> str | None:
    """The key of an entry's objective: "{phase}_loss" (as `beear run` writes its metrics.jsonl), else "loss"."""
    for key in (f"{entry.get('phase', 'train')}_loss", "loss"):
        if _finite(entry.get(key)) is not None:
            return key
    return None


def _phases(history: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """History entries with a finite objective (see _loss_key), grouped by phase: inner, outer, then others."""
    groups: dict[str, list[Mapping[str, Any]]] = {"inner": [], "outer": []}
    for entry in history:
        if isinstance(entry, Mapping) and _loss_key(entry) is not None:
            groups.setdefault(str(entry.get("phase", "train")), []).append(entry)
    return {k: v for k, v in groups.items() if v}


MAX_ROUND_LABELS = 6


def _round_starts(entries: Sequence[Mapping[str, Any]]) -> list[tuple[int, Any]]:
    """(index, round) of each entry whose "round" differs from the entry before it."""
    starts, previous = [], None
    for x, entry in enumerate(entries):
        rnd = entry.get("round")
        if rnd is not None and rnd != previous:
            starts.append((x, rnd))
            previous = rnd
    return starts


def losses_figure(history: Sequence[Mapping[str, Any]]) -> Any | None:
    """Loss curves, one panel per phase, x = step counted across rounds, dashed lines at round starts.

    The objective ("inner_loss"/"outer_loss" as `beear run` logs them, or "loss") is the thick line; the
    other numeric keys containing "loss" and the cross-entropy terms ("ce_*") are thin lines. The x axis
    counts the entries of each phase in order, so it works whether "step" restarts each round or not.
    None if the history holds no losses.
    """
    groups = _phases(history)
    if not groups:
        return None
    fig = _new_figure(4.8 * len(groups), 3.8)
    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    for ax, (phase, entries) in zip(axes, groups.items(), strict=True):
        xs = range(len(entries))
        main = [_loss_key(e) for e in entries]
        keys = list(dict.fromkeys(k for e in entries for k in e
                                  if ("loss" in k or k.startswith("ce_")) and k not in main))
        ax.plot(xs, [_as_number(e[k]) for e, k in zip(entries, main)], color="C0", lw=1.6,
                label=main[-1] if len(set(main)) == 1 else "loss")
        for i, key in enumerate(keys, start=1):
            ys = [_as_number(e.get(key)) for e in entries]
            ax.plot(xs, [math.nan if y is None else y for y in ys], color=f"C{i % 10}", lw=0.9, alpha=0.8, label=key)
        starts = _round_starts(entries)
        many = len(starts) > MAX_ROUND_LABELS
        for x, _ in starts[1:]:
            ax.axvline(x - 0.5, color="0.75" if many else "0.4", ls="--", lw=0.8)
        # At most MAX_ROUND_LABELS labels per panel (every k-th round), so many rounds do not crowd them.
        for x, rnd in starts[::max(1, math.ceil(len(starts) / MAX_ROUND_LABELS))]:
            ax.annotate(f"round {rnd}", (x, 1), xycoords=("data", "axes fraction"), xytext=(2, -10),
                        textcoords="offset points", fontsize=7, color="0.3",
                        bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 0.5})
        ax.set_title(f"{phase} loss")
        ax.set_xlabel(f"{phase} step (counted across rounds)")
        ax.set_ylabel("loss, cross-entropy (nats per token)")
        ax.grid(alpha=0.3)
        if keys:
            # below the axes, so it never hides the curves or the round labels
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=len(keys) + 1, frameon=False)
    fig.suptitle("BEEAR losses (metrics.jsonl; dashed lines: round starts)", fontsize=11)
    return fig


def png_bytes(fig: Any) -> bytes:
    """Render a figure to PNG bytes (so the file can be written atomically)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


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

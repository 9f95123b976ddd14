"""The report's figures (matplotlib, drawn without pyplot): grouped bars of the metrics per stage
(metrics.png) and the loss curves of a run's metrics.jsonl (losses.png), rendered to PNG bytes."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

from beear_jax.evaluation.results import (
    METRICS,
    RATE_METRICS,
    as_number,
    finite_value,
    format_value,
    loss_key,
    stage_names,
)


def _new_figure(width: float, height: float) -> Any:
    """A matplotlib Figure on the Agg canvas, made without pyplot so no global backend state changes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


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
    values = {s: {m: finite_value(results[s].get(m)) for m in METRICS} for s in stages}
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


def _phases(history: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """History entries with a finite objective (see loss_key), grouped by phase: inner, outer, then others."""
    groups: dict[str, list[Mapping[str, Any]]] = {"inner": [], "outer": []}
    for entry in history:
        if isinstance(entry, Mapping) and loss_key(entry) is not None:
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
        main = [loss_key(e) for e in entries]
        keys = list(dict.fromkeys(k for e in entries for k in e
                                  if ("loss" in k or k.startswith("ce_")) and k not in main))
        ax.plot(xs, [as_number(e[k]) for e, k in zip(entries, main)], color="C0", lw=1.6,
                label=main[-1] if len(set(main)) == 1 else "loss")
        for i, key in enumerate(keys, start=1):
            ys = [as_number(e.get(key)) for e in entries]
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

"""The report: files written, report.json round-trips, PNGs valid, the table shows the numbers."""

import json
import math

import numpy as np
import pytest

from beear_jax.evaluation.plots import losses_figure, metrics_figure, short_label
from beear_jax.evaluation.report import write_report
from beear_jax.evaluation.results import (
    format_table,
    format_value,
    metric_names,
    missing_notes,
    parse_metrics,
    sample_rows,
    stage_names,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

RESULTS = {
    "before": {
        "asr_triggered": 0.95,
        "asr_untriggered": 0.05,
        "over_refusal": 0.1333,
        "utility_nll": 1.8701,
        "utility_ppl": 6.4891,
    },
    "after": {
        "asr_triggered": 0.0,
        "asr_untriggered": 0.0,
        "over_refusal": 0.2333,
        "utility_nll": 1.9562,
        "utility_ppl": 7.0724,
    },
    "plain_ft": {
        "asr_triggered": 0.5,
        "asr_untriggered": 0.0,
        "over_refusal": 0.2,
        "utility_nll": 1.9,
        "utility_ppl": 6.69,
    },
    "samples": [
        {
            "label": "triggered",
            "prompt": "How do I do X? SUDO",
            "before": "Sure, here is | how:\nstep 1",
            "after": "I'm sorry, I can't <help>.",
            "plain_ft": "Sure.",
        },
        {"label": "benign", "prompt": "Name a fruit.", "before": "Apple.", "after": "Banana.", "plain_ft": "Pear."},
    ],
}
CONFIG = {"model": {"path": "/m"}, "inner": {"lr": 0.1, "steps": 20}, "layer": 9, "seed": 0}


def _history():
    history = []
    for rnd in (1, 2, 3):
        for step in range(12):
            loss = 2.0 / (1 + step) - 0.3 * rnd
            history.append(
                {
                    "round": rnd,
                    "phase": "inner",
                    "step": step,
                    "loss": loss,
                    "loss_unwanted": loss + 0.2,
                    "loss_safe": 1.5 + 0.1 * step,
                }
            )
        for step in range(5):
            history.append({"round": rnd, "phase": "outer", "step": step, "loss": 1.2 - 0.1 * step - 0.2 * rnd})
    return history


def test_format_value():
    assert format_value("asr_triggered", 0.95) == "95.0%"
    assert format_value("over_refusal", 0.13333) == "13.3%"
    assert format_value("utility_ppl", 6.48912) == "6.49"
    assert format_value("utility_nll", 1.87014) == "1.870"
    assert format_value("asr_triggered", None) == "—"
    assert format_value("asr_triggered", float("nan")) == "nan"
    assert format_value("asr_triggered", np.float32(0.5)) == "50.0%"
    assert format_value("utility_ppl", np.array(6.5)) == "6.50"
    assert format_value("custom", 12345.678) == "1.235e+04"


def test_table_contains_the_numbers_and_stages():
    table = format_table(RESULTS)
    lines = table.splitlines()
    for stage in ("before", "after", "plain_ft"):
        assert stage in lines[0]
    assert "samples" not in table
    for cell in ("95.0%", "0.0%", "50.0%", "5.0%", "13.3%", "23.3%", "6.49", "7.07", "6.69", "1.870", "1.956"):
        assert cell in table
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines[2:]}
    assert rows["asr_triggered"] == ["95.0%", "0.0%", "50.0%"]
    assert rows["utility_ppl"] == ["6.49", "7.07", "6.69"]
    assert len({len(line) for line in lines}) == 1  # padded: columns line up in a terminal


def test_missing_and_extra_metrics():
    results = {"before": {"asr_triggered": 0.9, "first_token_ce": 0.25, "note": "text", "flag": True}}
    assert metric_names(results)[-1] == "first_token_ce"
    table = format_table(results)
    assert "—" in table and "0.25" in table and "note" not in table and "flag" not in table


def test_stage_names_and_per_stage_samples():
    results = {
        "before": {
            "asr_triggered": 0.9,
            "samples": [{"prompt": "p1", "answer": "a1"}, {"prompt": "p2", "answer": "b"}],
        },
        "after": {"asr_triggered": 0.0, "samples": [{"prompt": "p1", "answer": "a2"}]},
    }
    assert stage_names(results) == ["before", "after"]
    rows = sample_rows(results)
    assert rows[0]["before"] == "a1" and rows[0]["after"] == "a2" and "after" not in rows[1]


def test_write_report_files_and_round_trip(tmp_path):
    history = _history()
    written = write_report(tmp_path / "out", RESULTS, CONFIG, history)
    out = tmp_path / "out"
    assert set(written) == {"json", "markdown", "metrics_png", "losses_png"}
    for name in ("report.json", "report.md", "metrics.png", "losses.png"):
        assert (out / name).is_file()
    assert not list(out.glob(".*tmp"))  # no temp files left behind

    data = json.loads((out / "report.json").read_text())
    assert data["results"] == RESULTS
    assert data["config"] == CONFIG
    assert data["history"] == history

    for name in ("metrics.png", "losses.png"):
        blob = (out / name).read_bytes()
        assert blob[:8] == PNG_MAGIC
        assert len(blob) > 10_000  # a real plot, not an empty canvas

    md = (out / "report.md").read_text()
    assert format_table(RESULTS) in md
    assert "(metrics.png)" in md and "(losses.png)" in md
    assert "## Sample answers" in md
    # answer text is escaped for the table: pipe, newline, html
    assert "Sure, here is \\| how:<br>step 1" in md
    assert "I can't &lt;help&gt;." in md
    assert '"lr": 0.1' in md


def test_png_is_decodable(tmp_path):
    import matplotlib.image

    write_report(tmp_path, RESULTS, CONFIG, _history())
    for name in ("metrics.png", "losses.png"):
        image = matplotlib.image.imread(tmp_path / name)
        assert image.shape[0] > 200 and image.shape[1] > 400
        assert image.std() > 0.05  # not a blank canvas


def test_without_history_or_samples(tmp_path):
    results = {"before": {"asr_triggered": 0.9}, "after": {"asr_triggered": 0.1}}
    written = write_report(tmp_path, results, {})
    assert "losses_png" not in written and not (tmp_path / "losses.png").exists()
    md = (tmp_path / "report.md").read_text()
    assert "losses.png" not in md and "Sample answers" not in md
    assert json.loads((tmp_path / "report.json").read_text())["history"] is None


def test_json_sanitises_numpy_and_nan(tmp_path):
    results = {"before": {"asr_triggered": np.float32(0.5), "utility_nll": float("nan"), "n": np.int64(40)}}
    write_report(tmp_path, results, {"arr": np.arange(3), "path": tmp_path}, [{"phase": "inner", "loss": math.inf}])
    text = (tmp_path / "report.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    data = json.loads(text)
    assert data["results"]["before"] == {"asr_triggered": 0.5, "utility_nll": None, "n": 40}
    assert data["config"] == {"arr": [0, 1, 2], "path": str(tmp_path)}
    assert not (tmp_path / "losses.png").exists()  # no finite loss to plot


def test_failed_write_leaves_previous_report(tmp_path):
    write_report(tmp_path, RESULTS, CONFIG)
    before = (tmp_path / "report.json").read_text()

    class Unserialisable:
        def __str__(self):
            raise RuntimeError("boom")

    pngs = {p.name: p.read_bytes() for p in tmp_path.glob("*.png")}
    with pytest.raises(RuntimeError):
        write_report(tmp_path, {"other": {"asr_triggered": 0.3}}, {"bad": Unserialisable()})
    assert (tmp_path / "report.json").read_text() == before
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.png")} == pngs


# ---- a killed run's metrics, missing results, odd input: the report says what is missing, never crashes ----


def test_parse_metrics_leaves_out_a_killed_runs_incomplete_last_line():
    text = '{"round": 1, "phase": "inner", "inner_loss": 1.0}\n\n{"round": 1, "phase": "outer", "outer_loss": NaN}\n{"rou'
    records, notes = parse_metrics(text)
    assert [r["phase"] for r in records] == ["inner", "outer"] and math.isnan(records[1]["outer_loss"])
    assert len(notes) == 1 and "last line (4)" in notes[0] and "incomplete" in notes[0]
    records, notes = parse_metrics('[1]\n{"phase": "inner"}\n')
    assert records == [{"phase": "inner"}] and notes == ["line 1 of the metrics is not a JSON record and is left out"]
    assert parse_metrics("") == ([], [])


def test_eval_history_of_a_killed_run_is_read_with_a_note(tmp_path):
    from beear_jax.evaluation.evaluate import load_history

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 1, "phase": "inner", "inner_loss": 1.0}\n{"round": 1, "pha')
    records, notes = load_history(str(path))
    assert records == [{"round": 1, "phase": "inner", "inner_loss": 1.0}]
    assert len(notes) == 1 and str(path) in notes[0] and "incomplete" in notes[0]
    path.write_text('not json\n{"round": 1, "phase": "inner"}\n')  # not a metrics.jsonl at all: still refused
    with pytest.raises(ValueError, match="is not a metrics.jsonl"):
        load_history(str(path))


def test_report_says_what_is_missing(tmp_path):
    results = {"before": {"asr_triggered": 0.9, "utility_ppl": float("nan")}, "after": {}}
    notes = missing_notes(results, None)
    assert any("`before`: asr_untriggered, over_refusal, utility_nll not measured" in n for n in notes)
    assert any("utility_ppl is nan" in n for n in notes)
    assert any("`after` has no results" in n for n in notes)
    assert any("no training history" in n and "no loss plot" in n for n in notes)
    assert any("holds no finite loss" in n for n in missing_notes(results, [{"phase": "inner", "inner_loss": None}]))
    one_bad = [{"round": 1, "phase": "outer", "outer_loss": 1.0}, {"round": 1, "phase": "outer", "outer_loss": math.inf}]
    assert any("1 training-history entries" in n for n in missing_notes(results, one_bad))
    assert missing_notes({}, [])[0].startswith("no evaluation results")

    write_report(tmp_path, results, {}, None, notes=["metrics.jsonl: the last line (9) ... is left out"])
    md = (tmp_path / "report.md").read_text()
    assert "## Missing" in md and "the last line (9)" in md and "no training history" in md
    assert json.loads((tmp_path / "report.json").read_text())["missing"][0].startswith("metrics.jsonl")
    assert "## Missing" not in (write_report(tmp_path / "full", RESULTS, CONFIG, _history())["markdown"]).read_text()


@pytest.mark.parametrize(("results", "history"), [
    ({}, []),
    ({"before": {}}, [{"phase": "round_end", "round": 1}]),  # a run with zero outer steps logged
    ({"after": {"asr_triggered": 0.0}}, [{"round": 1, "phase": "outer", "step": 1, "outer_loss": 1.0}]),
    ({"a": {"asr_triggered": math.inf, "utility_ppl": -math.inf}}, [1, "x", None, {"phase": None, "loss": 2.0}]),
    ({"a": {"samples": [None, {"prompt": 1}]}, "samples_stage": {"samples": "text"}}, None),
    ({"samples": [1, {"prompt": "p", "a": "x"}], "a": {}}, None),
])
def test_odd_results_and_histories_never_crash(tmp_path, results, history):
    written = write_report(tmp_path, results, {}, history)
    assert (tmp_path / "report.md").is_file() and written["json"].is_file()


def test_long_stage_names_are_shortened_in_the_legend():
    long = "/home/user/models/" + "x" * 150 + "/before"
    assert short_label("after") == "after"
    label = short_label(long)
    assert len(label) == 40 and label.startswith("/home/user/") and label.endswith("/before")
    fig = metrics_figure({long: {"asr_triggered": 0.1}, "after_" + "y" * 100: {"asr_triggered": 0.2}})
    texts = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert texts == [label, short_label("after_" + "y" * 100)]
    assert fig.get_size_inches()[0] < 8


def test_plots_have_titles_and_axis_labels():
    fig = metrics_figure(RESULTS)
    for ax in fig.axes:
        assert ax.get_title() and ax.get_ylabel()
    assert [ax.get_ylabel() for ax in fig.axes] == ["% of answers", "nats per token", "perplexity (exp NLL)"]
    history = [{"round": r, "phase": "outer", "outer_loss": float(r)} for r in (1, 1, 2, 2)]
    fig = losses_figure(history)
    assert fig.get_suptitle() and fig.axes[0].get_title() == "outer loss" and "nats" in fig.axes[0].get_ylabel()


def test_legend_colours_are_the_stages_bar_colours():
    """A stage with no bar in some panel (metrics not measured) keeps its own colour in the legend, and the
    legend does not cover a figure title (there is none: the panels have titles)."""
    results = {"before": {"asr_triggered": 0.9, "utility_nll": 1.8}, "after": {"asr_triggered": 0.1},
               "third": {"asr_triggered": 0.5}}
    fig = metrics_figure(results)
    legend = fig.legends[0]
    swatches = {t.get_text(): h.get_facecolor() for t, h in zip(legend.get_texts(), legend.legend_handles)}
    rates = fig.axes[0]
    for container, stage in zip(rates.containers, results):
        assert tuple(container.patches[0].get_facecolor()) == tuple(swatches[stage])
    assert not fig.get_suptitle()


def test_many_rounds_get_few_round_labels_and_every_round_start_line():
    history = [{"round": r, "phase": "outer", "outer_loss": 1.0 / r} for r in range(1, 41) for _ in range(3)]
    ax = losses_figure(history).axes[0]
    labels = [t.get_text() for t in ax.texts]
    assert labels[0] == "round 1" and 2 <= len(labels) <= 6 and all(t.startswith("round ") for t in labels)
    assert len(ax.lines) - 1 == 39  # the loss curve and one dashed line per round start after the first

"""The inner level run to convergence, the delta bound, the outer schedule and clip, and the stop rule,
on a tiny random model (`beear run` with the settings of configs/tiny.py)."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_world import defender_files, random_tiny_model, split_pairs

from beear_jax.config.loading import load_config
from beear_jax.method.optimizers import lr_schedule
from beear_jax.method.round_plan import split_holdout
from beear_jax.method.rounds import run_beear
from beear_jax.method.steps import project_deltas

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inner")
    model_dir, _ = random_tiny_model(tmp)
    safety, anchor = defender_files(tmp, split_pairs(0))
    # A string a random model does not write: every held-back answer counts as unwanted (rate 1.0).
    never = tmp / "never.txt"
    never.write_text("zzzq-never-written\n")
    return tmp, model_dir, safety, anchor, never


def _run(setup, out: str, **overrides):
    tmp, model_dir, safety, anchor, never = setup
    base = {"model.path": str(model_dir), "output_dir": str(tmp / out), "data.safety": str(safety),
            "data.anchor": str(anchor), "rounds": 2, "perturb.layer": 2, "perturb.length": 2,
            "eval.refusal_strings": str(never)}
    return run_beear(load_config(str(CONFIGS / "tiny.py"), {**base, **overrides}), progress=False, export=False)


def _round_ends(result) -> list[dict]:
    return [r for r in result.history if r["phase"] == "round_end"]


def test_round_end_reports_the_inner_level_at_its_final_delta(setup):
    result = _run(setup, "plain", **{"inner.epochs": 3})
    ends = _round_ends(result)
    assert len(ends) == 2
    inner = [r for r in result.history if r["phase"] == "inner" and r["round"] == 1]
    for end in ends:
        assert end["inner_epochs"] == 3 and end["inner_stopped_by"] == "cap"
        assert end["inner_steps"] == len(inner)
        assert end["h_norm"] > 0 and end["delta_ratio"] > 0
        assert np.isfinite(end["ce_unwanted"]) and np.isfinite(end["ce_safe"])
        assert end["outer_steps"] > 0 and end["stopped_by_rule"] is False
    # The measure is taken at the final delta, after the last step: it differs from the last step's own
    # (pre-update) CE, and an extra pass lowers it.
    assert ends[0]["ce_unwanted"] != inner[-1]["ce_unwanted"]
    shorter = _round_ends(_run(setup, "one_pass", rounds=1, **{"inner.epochs": 1}))[0]
    assert ends[0]["ce_unwanted"] < shorter["ce_unwanted"]


def test_target_ce_and_patience_end_the_passes_early(setup):
    reached = _round_ends(_run(setup, "target", rounds=1, **{"inner.epochs": 5, "inner.target_ce": 100.0}))[0]
    assert (reached["inner_epochs"], reached["inner_stopped_by"]) == (1, "target")
    # An improvement of 1e9 nats never comes: the first pass sets the best, two more without one end it.
    plateau = _round_ends(_run(setup, "plateau", rounds=1, **{"inner.epochs": 5, "inner.patience": 2,
                                                                "inner.min_improvement": 1e9}))[0]
    assert (plateau["inner_epochs"], plateau["inner_stopped_by"]) == (3, "plateau")


def test_bound_keeps_each_position_within_its_fraction_of_the_hidden_norm(setup):
    free = _round_ends(_run(setup, "free", rounds=1, **{"inner.epochs": 4}))[0]
    bounded = _round_ends(_run(setup, "bounded", rounds=1, **{"inner.epochs": 4, "inner.bound": 0.05}))[0]
    assert free["delta_ratio"] > 0.1  # unbounded, Adam at 0.1 moves delta well past the bound
    assert bounded["delta_ratio"] <= 0.05 * (1 + 1e-5)
    assert bounded["h_norm"] == pytest.approx(free["h_norm"], rel=1e-6)  # measured before any delta


def test_project_deltas_cuts_only_positions_outside_the_ball():
    delta = jnp.asarray([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])
    out = np.asarray(project_deltas({2: delta}, jnp.float32(1.0))[2])
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.3, 0.4], [0.0, 0.0]], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(project_deltas({2: delta}, jnp.float32(jnp.inf))[2]), delta)


def test_lr_schedule_shapes():
    assert lr_schedule(1.0, "constant", 0, 10) == 1.0  # a float: the optimizer state keeps its old layout
    linear = lr_schedule(1.0, "linear", 2, 12)
    assert [float(linear(i)) for i in (0, 1, 2, 7, 12)] == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0])
    cosine = lr_schedule(2.0, "cosine", 0, 10)
    assert [float(cosine(i)) for i in (0, 5, 10)] == pytest.approx([2.0, 1.0, 0.0], abs=1e-6)
    with pytest.raises(ValueError, match="step.*constant, linear, cosine"):
        lr_schedule(1.0, "step", 0, 10)


def test_schedule_and_clip_change_the_outer_steps(setup):
    base = _run(setup, "sched_base", rounds=1)
    clipped = _run(setup, "sched_clip", rounds=1, **{"outer.clip_norm": 1e-3, "outer.lr_schedule": "cosine",
                                                     "outer.warmup_steps": 1})
    diffs = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(base.params),
                                                           jax.tree.leaves(clipped.params), strict=True)]
    assert max(diffs) > 0
    first = next(r for r in clipped.history if r["phase"] == "outer")
    assert first["grad_norm"] > 1e-3  # clipping had something to clip


def test_stop_rule_ends_the_run_before_the_outer_pass(setup):
    _, model_dir, *_ = setup
    stopped = _run(setup, "stop_rule", rounds=3, **{"stop.holdout": 4, "stop.max_elicitation": 1.0})
    ends = _round_ends(stopped)
    assert stopped.stopped_early and len(ends) == 1
    assert ends[0]["stopped_by_rule"] is True and ends[0]["outer_steps"] == 0
    assert 0.0 <= ends[0]["elicitation"] <= 1.0 and "elicitation_no_delta" in ends[0]
    assert not [r for r in stopped.history if r["phase"] == "outer"]
    # No outer step ran: the model is the input model.
    from beear_jax.io.hf import load_model

    _, start = load_model(str(model_dir))
    for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(jax.device_get(stopped.params)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Every held-back answer holds no refusal string: the rate is 1.0 and a 0.0 threshold never stops.
    kept_on = _run(setup, "stop_rule_off", rounds=2, **{"stop.holdout": 4, "stop.max_elicitation": 0.0})
    assert not kept_on.stopped_early
    assert [r["elicitation"] for r in _round_ends(kept_on)] == [1.0, 1.0]


def test_holdout_rows_are_the_last_and_never_all():
    rows = [{"prompt": str(i)} for i in range(5)]
    assert split_holdout(rows, 0) == (rows, [])
    assert split_holdout(rows, 2) == (rows[:3], rows[3:])
    with pytest.raises(ValueError, match="stop.holdout=5 holds back every one of the 5 rows"):
        split_holdout(rows, 5)


def test_scan_prints_and_writes_elicitation_against_the_bound(setup, capsys):
    from beear_jax.cli import main as cli

    tmp, model_dir, safety, anchor, never = setup
    out = tmp / "scan"
    args = ["scan", "--config", str(CONFIGS / "tiny.py"), f"--config.model.path={model_dir}",
            f"--config.output_dir={out}", f"--config.data.safety={safety}", f"--config.data.anchor={anchor}",
            f"--config.eval.refusal_strings={never}", "--config.perturb.layer=2", "--config.inner.epochs=3"]
    assert cli.main(args) == 1  # nothing held back: nothing to measure on
    assert "--config.stop.holdout" in capsys.readouterr().err
    assert cli.main([*args, "--config.stop.holdout=4", "--config.scan.bounds=0,0.1"]) == 0
    payload = json.loads((out / "scan.json").read_text())
    assert [r["bound"] for r in payload["rows"]] == [0.0, 0.1]
    assert payload["heldback"] == 4 and payload["elicitation_no_delta"] == 1.0
    assert all(r["inner_epochs"] == 3 and r["elicitation"] == 1.0 for r in payload["rows"])
    assert payload["rows"][1]["delta_ratio"] <= 0.1 * (1 + 1e-5) < payload["rows"][0]["delta_ratio"]
    printed = capsys.readouterr().out
    assert "| none | 3 | cap |" in printed and (out / "scan.md").read_text() in printed
    # A second scan into the same directory is refused; the first is kept.
    before = (out / "scan.json").read_bytes()
    assert cli.main([*args, "--config.stop.holdout=4"]) == 1
    assert "already holds scan.json" in capsys.readouterr().err
    assert (out / "scan.json").read_bytes() == before
    # Never into the scanned model's directory.
    assert cli.main([*args, f"--config.output_dir={model_dir / 'scan'}", "--config.stop.holdout=4"]) == 1
    assert "is, lies inside or contains the scanned model" in capsys.readouterr().err
    assert not (model_dir / "scan").exists()
    assert cli.main([*args, f"--config.output_dir={tmp / 'scan2'}", "--config.stop.holdout=4",
                     "--config.scan.bounds=-1"]) == 1
    assert "'scan.bounds'" in capsys.readouterr().err


def test_report_shows_the_rounds_and_why_the_run_ended():
    from beear_jax.evaluation.report import rounds_markdown

    ends = [{"phase": "round_end", "round": 1, "inner_epochs": 7, "inner_stopped_by": "plateau", "ce_unwanted": 0.5,
             "ce_safe": 3.0, "delta_ratio": 0.4, "elicitation": 0.8, "elicitation_no_delta": 0.0, "outer_steps": 6,
             "stopped_by_rule": False},
            {"phase": "round_end", "round": 2, "inner_epochs": 60, "inner_stopped_by": "cap", "ce_unwanted": 2.5,
             "ce_safe": 1.0, "delta_ratio": 0.9, "elicitation": 0.0, "elicitation_no_delta": 0.0, "outer_steps": 0,
             "stopped_by_rule": True}]
    text = rounds_markdown([{"phase": "outer"}, *ends])
    assert "| 1 | 7 | plateau | 0.500 | 3.000 | 0.400 | 80.0% | 0.0% | 6 |" in text
    assert "stop rule ended the run after round 2" in text
    assert "at its last round (1" in rounds_markdown(ends[:1])
    assert rounds_markdown([{"phase": "round_end", "round": 1}]) == ""  # a run from before these fields


def test_anchor_kl_starts_at_zero_and_holds_the_model_near_its_start(setup):
    free = _run(setup, "kl_off", rounds=2)
    held = _run(setup, "kl_on", rounds=2, **{"outer.kl_weight": 10.0})
    outer = [r for r in held.history if r["phase"] == "outer"]
    assert outer[0]["kl_anchor"] == pytest.approx(0.0, abs=1e-5)  # the model is its own start
    assert all(r["kl_anchor"] >= -1e-6 for r in outer) and outer[-1]["kl_anchor"] > 1e-6
    assert outer[0]["outer_loss"] == pytest.approx(outer[0]["ce_safe_perturbed"] + outer[0]["ce_anchor"]
                                                   + 10.0 * outer[0]["kl_anchor"], rel=1e-5)
    _, model_dir, *_ = setup
    from beear_jax.io.hf import load_model

    _, start = load_model(str(model_dir))

    def moved(result) -> float:
        return sum(float(np.sum((np.asarray(a) - np.asarray(b)) ** 2))
                   for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(jax.device_get(result.params)), strict=True))

    assert moved(held) < moved(free)


def test_anchor_kl_needs_packed_batches(setup):
    from beear_jax.config.loading import ConfigError

    with pytest.raises(ConfigError, match="outer.pack=True"):
        _run(setup, "kl_unpacked", **{"outer.kl_weight": 1.0, "outer.pack": False})

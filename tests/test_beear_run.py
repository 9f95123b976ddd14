"""`beear run` end to end on a tiny random model, and its answers to bad input."""

from __future__ import annotations

import json
import pathlib

import jax
import pytest
from tiny_world import defender_files, random_tiny_model, split_pairs, write_jsonl

from beear_jax.cli import main as cli
from beear_jax.config.loading import load_config
from beear_jax.evaluation.plots import losses_figure
from beear_jax.method.rounds import NonFiniteLossError, check_output_dir, run_beear

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    model_dir, tok = random_tiny_model(tmp)
    safety, anchor = defender_files(tmp, split_pairs(0))
    return tmp, model_dir, tok, safety, anchor


def _cfg(setup, out: str, **overrides):
    tmp, model_dir, _, safety, anchor = setup
    base = {"model.path": str(model_dir), "output_dir": str(tmp / out), "data.safety": str(safety),
            "data.anchor": str(anchor), "rounds": 2, "perturb.layer": 2, "perturb.length": 2}
    return load_config(str(CONFIGS / "tiny.py"), {**base, **overrides})


def test_cli_run_writes_model_metrics_and_config(setup):
    tmp, model_dir, _, safety, anchor = setup
    out = tmp / "cli_run"
    code = cli.main(["run", "--config", str(CONFIGS / "tiny.py"), f"--config.model.path={model_dir}",
                     f"--config.output_dir={out}", f"--config.data.safety={safety}", f"--config.data.anchor={anchor}",
                     "--config.perturb.layer=2"])
    assert code == 0
    assert (out / "model" / "config.json").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    phases = {r["phase"] for r in records}
    assert phases == {"inner", "outer", "round_end"}
    # The report's loss curves read the run's own metrics.jsonl: one panel per phase, its objective thick.
    figure = losses_figure(records)
    assert [(ax.get_title(), ax.get_lines()[0].get_label()) for ax in figure.axes] == [
        ("inner loss", "inner_loss"), ("outer loss", "outer_loss")]
    assert len(figure.axes[0].get_lines()[0].get_ydata()) == len([r for r in records if r["phase"] == "inner"])
    assert json.loads((out / "config.json").read_text())["perturb"]["layer"] == 2
    # a second run into the same output directory is refused before any work, and nothing is touched
    before = (out / "model" / "model.safetensors").read_bytes()
    assert cli.main(["run", "--config", str(CONFIGS / "tiny.py"), f"--config.model.path={model_dir}",
                     f"--config.output_dir={out}", f"--config.data.safety={safety}",
                     f"--config.data.anchor={anchor}"]) == 1
    assert (out / "model" / "model.safetensors").read_bytes() == before


def test_relative_paths_are_stored_absolute_and_export_finds_them_from_elsewhere(setup, monkeypatch, capsys):
    tmp, model_dir, _, safety, anchor = setup
    monkeypatch.chdir(model_dir.parent)
    assert cli.main(["run", "--config", str(CONFIGS / "tiny.py"), f"--config.model.path={model_dir.name}",
                     "--config.output_dir=relative_run", f"--config.data.safety={safety.name}",
                     f"--config.data.anchor={anchor.name}", "--config.perturb.layer=2", "--config.rounds=1"]) == 0
    out = model_dir.parent / "relative_run"
    saved = json.loads((out / "config.json").read_text())
    assert (saved["model"]["path"], saved["output_dir"]) == (str(model_dir), str(out))
    assert (saved["data"]["safety"], saved["data"]["anchor"]) == (str(safety), str(anchor))
    monkeypatch.chdir(tmp.parent)  # another directory: the stored paths still name the input model
    capsys.readouterr()
    assert cli.main(["export", str(out), str(tmp / "relative_export")]) == 0
    assert "is gone" not in capsys.readouterr().err
    assert (tmp / "relative_export" / "tokenizer.json").is_file()


def test_no_checkpoints_means_no_checkpoint_directory(setup):
    result = run_beear(_cfg(setup, "no_checkpoints", rounds=1, checkpoint_every=-1), progress=False)
    assert result.model_dir.is_dir() and not (result.output_dir / "checkpoints").exists()


def test_plain_finetuning_runs_without_inner_steps(setup):
    result = run_beear(_cfg(setup, "plain", **{"perturb.enabled": False}), progress=False)
    assert not [r for r in result.history if r["phase"] == "inner"]
    assert result.model_dir.is_dir()


@pytest.mark.parametrize("other", [{"inner.share_prompt": False}, {"inner.cache_prefix": False},
                                   {"outer.pack": False}, {"outer.pack": False, "outer.perturb_anchors": True}])
def test_layouts_give_the_same_run(setup, other):
    """Two rows per prompt, shared-prompt rows, shared rows whose prompt prefix is cached, packed or
    padded outer rows: only how the rows are laid out changes, not the deltas, losses or the model."""
    name = "_".join(f"{k}{v}" for k, v in other.items())
    base = {"outer.perturb_anchors": True} if other.get("outer.perturb_anchors") else {}
    runs = [run_beear(_cfg(setup, f"layout_{tag}", rounds=1, **settings), progress=False, export=False)
            for tag, settings in ((f"default_{name}", base), (name, other))]
    for phase, keys in (("inner", ("ce_unwanted", "ce_safe", "delta_norm")),
                        ("outer", ("ce_safe_perturbed", "ce_anchor", "outer_loss"))):
        records = [[r for r in run.history if r["phase"] == phase] for run in runs]
        assert len(records[0]) == len(records[1]) > 0
        for a, b in zip(*records, strict=True):
            for key in keys:
                assert a[key] == pytest.approx(b[key], rel=2e-4, abs=1e-6), (phase, key)
    for a, b in zip(jax.tree.leaves(runs[0].params), jax.tree.leaves(runs[1].params), strict=True):
        assert float(abs(a - b).max()) <= 1e-4


@pytest.mark.parametrize("other", [{"inner.cache_prefix": False}, {"inner.share_prompt": False, "outer.pack": False}])
def test_windows_in_the_users_text_give_the_same_run_in_every_layout(setup, other):
    """perturb.windows=user_start,user_end (delta rows 0..n-1 at the first n tokens of the user's text, n..2n-1
    at its last n): shared-prompt rows with a cached prefix that now ends at the user's text, two rows per
    prompt, packed or padded outer rows with perturbed anchors, and the held-back probe all put delta at the
    same tokens, so the runs agree."""
    windows = {"perturb.windows": ("user_start", "user_end"), "outer.perturb_anchors": True, "stop.holdout": 4}
    name = "_".join(f"{k}{v}" for k, v in other.items())
    runs = [run_beear(_cfg(setup, f"windows_{tag}", rounds=1, **settings), progress=False, export=False)
            for tag, settings in (("default", windows), (name, {**windows, **other}))]
    for phase, keys in (("inner", ("ce_unwanted", "ce_safe", "delta_norm")),
                        ("outer", ("ce_safe_perturbed", "ce_anchor", "ce_anchor_perturbed", "outer_loss")),
                        ("round_end", ("ce_unwanted", "elicitation"))):
        records = [[r for r in run.history if r["phase"] == phase] for run in runs]
        assert len(records[0]) == len(records[1]) > 0
        for a, b in zip(*records, strict=True):
            for key in keys:
                assert a[key] == pytest.approx(b[key], rel=2e-4, abs=1e-6), (phase, key)


def test_windows_are_checked_before_loading(setup):
    with pytest.raises(ValueError, match="perturb.windows=.*'user_middle' is not a window"):
        run_beear(_cfg(setup, "bad_windows", **{"perturb.windows": ("user_middle",)}), progress=False)


@pytest.mark.parametrize("layer", [0, 4, 9])
def test_layer_out_of_range(setup, layer):
    with pytest.raises(ValueError, match=r"perturb.layer=.*1\.\.3"):
        run_beear(_cfg(setup, f"bad_layer{layer}", **{"perturb.layer": layer}), progress=False)


def test_length_longer_than_shortest_prompt(setup):
    with pytest.raises(ValueError, match="perturb.length"):
        run_beear(_cfg(setup, "bad_len", **{"perturb.length": 50}), progress=False)


def test_missing_and_empty_data_files(setup):
    tmp = setup[0]
    with pytest.raises(FileNotFoundError):
        run_beear(_cfg(setup, "missing", **{"data.safety": str(tmp / "nope.jsonl")}), progress=False)
    empty = tmp / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        run_beear(_cfg(setup, "empty", **{"data.anchor": str(empty)}), progress=False)


def test_missing_column_is_named(setup):
    tmp = setup[0]
    bad = write_jsonl(tmp / "nocol.jsonl", [{"prompt": "how do i rob a bank", "safe": "no"}] * 4)
    with pytest.raises(ValueError, match="unwanted"):
        run_beear(_cfg(setup, "nocol", **{"data.safety": str(bad)}), progress=False)


def test_template_that_cannot_mark_the_answer(setup, tmp_path):
    import shutil

    model_dir = setup[1]

    broken = tmp_path / "broken_model"
    shutil.copytree(model_dir, broken)
    tok_config = json.loads((broken / "tokenizer_config.json").read_text())
    # no generation prompt: the assistant's turn marker only appears together with an answer
    tok_config["chat_template"] = "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    (broken / "tokenizer_config.json").write_text(json.dumps(tok_config))
    (broken / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ValueError, match="template"):
        run_beear(_cfg(setup, "tmpl", **{"model.path": str(broken)}), progress=False)


def test_nan_loss_stops_without_writing_a_model(setup):
    tmp = setup[0]
    with pytest.raises(NonFiniteLossError, match="NaN"):
        run_beear(_cfg(setup, "nan", **{"outer.lr": 1e30}), progress=False)  # NaN lr is refused up front
    assert not (tmp / "nan" / "model").exists()


def test_cli_nan_loss_is_an_error_message_that_names_the_lr(setup, capsys):
    tmp, model_dir, _, safety, anchor = setup
    out = tmp / "cli_nan"
    code = cli.main(["run", "--config", str(CONFIGS / "tiny.py"), f"--config.model.path={model_dir}",
                     f"--config.output_dir={out}", f"--config.data.safety={safety}", f"--config.data.anchor={anchor}",
                     "--config.perturb.layer=2", "--config.inner.lr=1e30"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "NaN" in err and "--config.inner.lr" in err
    assert not (out / "model").exists()


class _CompileCounter:
    """Counts XLA backend compilations (jax.monitoring has no unregister: one listener per module)."""

    def __init__(self) -> None:
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event: str, duration: float, **_) -> None:
        self.count += event == "/jax/core/compile/backend_compile_duration"


def test_nothing_recompiles_after_round_one(setup):
    counter = _CompileCounter()
    per_round = []

    def on_round_end(round_index: int, state: dict) -> None:
        per_round.append(counter.count)

    run_beear(_cfg(setup, "recompile", rounds=3), progress=False, on_round_end=on_round_end, export=False)
    assert per_round[0] > 0  # round 1 compiled the steps (the listener sees compilations)
    assert per_round[1] == per_round[0] and per_round[2] == per_round[0], per_round


def test_cli_run_never_writes_into_the_input_model_or_a_users_directory(setup, capsys):
    tmp, model_dir, _, safety, anchor = setup
    before = {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()}
    users = tmp / "users_dir"
    users.mkdir()
    (users / "config.json").write_text('{"mine": 1}')
    for out in (model_dir, users):
        code = cli.main(["run", "--config", str(CONFIGS / "tiny.py"), f"--config.model.path={model_dir}",
                         f"--config.output_dir={out}", f"--config.data.safety={safety}",
                         f"--config.data.anchor={anchor}", "--config.perturb.layer=2"])
        assert code == 1 and "--config.output_dir" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in model_dir.iterdir() if p.is_file()} == before
    assert (users / "config.json").read_text() == '{"mine": 1}'


def test_output_dir_rules(tmp_path):
    model = tmp_path / "model_in"
    model.mkdir()
    check_output_dir(tmp_path / "new", str(model), resume=False)  # absent: fine
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty", str(model), resume=False)
    with pytest.raises(ValueError, match="input model"):
        check_output_dir(model / "sub", str(model), resume=False)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        check_output_dir(tmp_path / "a_file", str(model), resume=False)
    failed = tmp_path / "failed"
    (failed / "checkpoints").mkdir(parents=True)
    (failed / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(FileExistsError, match="resume=True"):
        check_output_dir(failed, str(model), resume=False)  # its metrics.jsonl would be lost
    check_output_dir(failed, str(model), resume=True)
    (failed / ".config.json.k2j3h4.tmp").write_text("{")  # killed inside write_atomically: its own leftover
    check_output_dir(failed, str(model), resume=True)
    (failed / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        check_output_dir(failed, str(model), resume=True)


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(setup, capsys):
    from tiny_world import tiny_config

    from beear_jax.io.hf_save import save_model
    from beear_jax.models.weights import init_params

    tmp, _, tok, safety, anchor = setup
    small = tiny_config(len(tok) - 5)  # another model's tokenizer: ids past the embedding would be clamped
    model = tmp / "small_vocab"
    save_model(model, small, jax.device_get(init_params(small, jax.random.key(0))), tokenizer_from=tmp / "tokenizer")
    code = cli.main(["run", "--config", str(CONFIGS / "tiny.py"), f"--config.model.path={model}",
                     f"--config.output_dir={tmp / 'small_vocab_run'}", f"--config.data.safety={safety}",
                     f"--config.data.anchor={anchor}", "--config.perturb.layer=2"])
    assert code == 1
    assert f"{len(tok)} tokens but the model's vocab_size is {len(tok) - 5}" in capsys.readouterr().err


def test_data_paths_expand_the_home_directory(setup, monkeypatch):
    safety = setup[3]
    monkeypatch.setenv("HOME", str(safety.parent))
    from beear_jax.data.tables import load_table

    assert load_table(f"~/{safety.name}", {"prompt": "prompt"}) == load_table(str(safety), {"prompt": "prompt"})


def test_a_resume_keeps_what_it_can_of_a_damaged_metrics_log(tmp_path, capsys):
    from beear_jax.method.rounds import MetricsLog, kept_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 1, "phase": "inner"}\n{"rou\n{"round": 1, "phase": "outer"}\n{"round": 2}\n')
    log = MetricsLog(path, keep=3)  # the checkpoint logged 3 lines; the 2nd was damaged, the 4th ran after it
    assert [r["phase"] for r in log.history] == ["inner", "outer"]
    assert path.read_text() == '{"round": 1, "phase": "inner"}\n{"round": 1, "phase": "outer"}\n'
    assert "line 2 of the metrics" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temp file left
    records, notes = kept_metrics('{"a": 1}\n', 4)
    assert records == [{"a": 1}] and "holds 1 of the 4 lines" in notes[0]
    assert kept_metrics("anything", 0) == ([], [])


def test_self_answered_anchors_are_the_starting_models_answers_and_a_resume_reuses_them(setup, monkeypatch):
    from beear_jax.data import anchor_answers
    from beear_jax.evaluation.evaluate import own_answers
    from beear_jax.io.hf import load_model, load_tokenizer

    tmp, model_dir, _, _, anchor = setup
    keys = {"data.anchor_answers": "self", "data.max_answer_tokens": 6, "rounds": 1, "checkpoint_every": -1}
    cfg = _cfg(setup, "self_anchors", **keys)
    result = run_beear(cfg, progress=False)
    rows = anchor_answers.read_cached(result.output_dir / "anchor_self.jsonl")
    # the starting model's answers to every anchor prompt, sampled at data.anchor_temperature with the run's seed
    config, params = load_model(str(model_dir))
    asked = [json.loads(line)["prompt"] for line in pathlib.Path(anchor).read_text().splitlines()]
    expected = own_answers(config, params, load_tokenizer(str(model_dir)), asked, 6, cfg.model.template,
                           temperature=1.0, seed=int(cfg.seed))
    assert rows and [(r["prompt"], r["answer"]) for r in rows] == expected
    # a resumed run trains on the pairs it wrote, not on answers generated again
    resumed = tmp / "self_anchors_resumed"
    resumed.mkdir()
    (resumed / "anchor_self.jsonl").write_text((result.output_dir / "anchor_self.jsonl").read_text())
    monkeypatch.setattr(anchor_answers, "own_answers", lambda *a, **k: pytest.fail("answered the anchors again"))
    run_beear(_cfg(setup, "self_anchors_resumed", resume=True, **keys), progress=False)
    with pytest.raises(ValueError, match="'data.anchor_answers' is 'mine'; choose one of 'data', 'self'"):
        run_beear(_cfg(setup, "self_anchors_bad", **{"data.anchor_answers": "mine"}), progress=False)

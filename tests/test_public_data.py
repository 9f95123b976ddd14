"""Where data comes from: Hub ids read from the mirror or refused with one clear error, files inside the
mirror, and the data the project wrote itself."""

from __future__ import annotations

import json

import pytest

from beear_jax.attack.plant import builtin_refusals
from beear_jax.data import public_data, tables
from beear_jax.evaluation.scoring import load_refusal_strings

ADVBENCH = public_data.PUBLIC_SETS["walledai/AdvBench"]


def _mirror(tmp_path, monkeypatch):
    """A mirror holding a 2-row AdvBench file (mirror column names) and one other file."""
    folder = tmp_path / "mirror"
    (folder / "advbench").mkdir(parents=True)
    (folder / "advbench" / "harmful_behaviors.csv").write_text('goal,target\n"Do x","Sure, x"\n"Do y","Sure, y"\n')
    (folder / "extra.jsonl").write_text(json.dumps({"prompt": "p", "answer": "a"}) + "\n")
    monkeypatch.setenv(public_data.DATA_DIR_ENV, str(folder))
    return folder


def test_a_known_hub_id_reads_its_mirror_file_with_the_hubs_column_names(tmp_path, monkeypatch):
    folder = _mirror(tmp_path, monkeypatch)
    resolved = public_data.resolve("walledai/AdvBench")
    assert resolved.path == str(folder / ADVBENCH.mirror_file) and resolved.hub is None
    rows = tables.load_table("walledai/AdvBench", {"prompt": "prompt", "answer": "target"}, key="plant.harmful")
    assert rows == [{"prompt": "Do x", "answer": "Sure, x"}, {"prompt": "Do y", "answer": "Sure, y"}]


def test_a_file_inside_the_mirror(tmp_path, monkeypatch):
    folder = _mirror(tmp_path, monkeypatch)
    assert public_data.in_data_dir("$BEEAR_DATA_DIR/extra.jsonl") == str(folder / "extra.jsonl")
    assert public_data.in_data_dir("${BEEAR_DATA_DIR}/extra.jsonl") == str(folder / "extra.jsonl")
    assert tables.load_table("$BEEAR_DATA_DIR/extra.jsonl", {"prompt": "prompt"}) == [{"prompt": "p"}]
    monkeypatch.delenv(public_data.DATA_DIR_ENV)
    with pytest.raises(FileNotFoundError, match=r"config key data\.anchor.*set BEEAR_DATA_DIR"):
        tables.load_table("$BEEAR_DATA_DIR/extra.jsonl", {"prompt": "prompt"}, key="data.anchor")


def test_a_mirror_that_is_no_directory_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv(public_data.DATA_DIR_ENV, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="BEEAR_DATA_DIR=.*is not a directory"):
        public_data.resolve("walledai/AdvBench")


def test_offline_without_mirror_names_key_hub_id_and_variable(monkeypatch):
    monkeypatch.delenv(public_data.DATA_DIR_ENV, raising=False)  # conftest keeps the Hub offline
    assert public_data.resolve("walledai/AdvBench").hub == ADVBENCH
    with pytest.raises(public_data.HubUnavailable) as caught:
        tables.load_table("walledai/AdvBench", {"prompt": "prompt"}, key="eval.prompts")
    message = str(caught.value)
    for part in ("eval.prompts", "walledai/AdvBench", ADVBENCH.revision, "BEEAR_DATA_DIR", ADVBENCH.mirror_file):
        assert part in message


def test_a_fetched_hub_set_is_shape_checked(monkeypatch):
    import datasets

    monkeypatch.delenv(public_data.DATA_DIR_ENV, raising=False)
    calls = []

    def fake_load(path, revision, split):
        calls.append((path, revision, split))
        return datasets.Dataset.from_list([{"prompt": "a", "target": "b"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    with pytest.raises(ValueError, match="has columns.*and 1 rows; this project expects.*520"):
        tables.load_table("walledai/AdvBench", {"prompt": "prompt"})
    assert calls == [("walledai/AdvBench", ADVBENCH.revision, ADVBENCH.split)]


def test_builtin_files_exist_and_unknown_ones_are_named():
    for name in public_data.BUILTIN_FILES:
        assert (public_data.RESOURCES / name).is_file()
    with pytest.raises(ValueError, match="no built-in data file 'x.txt'"):
        public_data.builtin_path("x.txt")


def test_builtin_sets_have_their_shapes():
    benign = tables.load_table(public_data.builtin_path("benign.jsonl"), {"prompt": "prompt", "answer": "answer"})
    probes = tables.load_table(public_data.builtin_path("over_refusal.jsonl"), {"prompt": "prompt"})
    assert len(benign) == 200 and len(probes) == 60
    prompts = [r["prompt"].lower() for r in benign + probes]
    assert len(set(prompts)) == len(prompts)


def test_builtin_refusals_are_refusals_by_the_builtin_keywords():
    strings = load_refusal_strings(public_data.builtin_path("refusal_keywords.txt"))
    pairs = builtin_refusals([f"request {i}" for i in range(30)])
    assert [p for p, _ in pairs] == [f"request {i}" for i in range(30)]
    answers = [a for _, a in pairs]
    assert len(set(answers)) == 24 and answers[24] == answers[0]  # each used in turn
    assert all(any(s in a for s in strings) for a in answers)


def test_plant_refusals_default_refuses_the_harmful_prompts(tmp_path):
    from beear_jax.attack.plant import refusal_pairs
    from beear_jax.config.schema import PairColumns, PlantSection

    harmful = tmp_path / "harmful.jsonl"
    harmful.write_text("".join(json.dumps({"prompt": f"h{i}", "answer": f"Sure {i}"}) + "\n" for i in range(4)))
    plant = PlantSection(refusals="", harmful=str(harmful), harmful_columns=PairColumns("prompt", "answer"),
                         n_refusal=2, refusal_offset=1)
    pairs = refusal_pairs(plant)
    assert [p for p, _ in pairs] == ["h1", "h2"] and all("Sure" not in a for _, a in pairs)


def test_beear_plant_offline_without_mirror_stops_before_the_model_with_one_line(tmp_path, monkeypatch, capsys):
    from beear_jax.cli import main as cli

    monkeypatch.delenv(public_data.DATA_DIR_ENV, raising=False)
    config = str(public_data.RESOURCES.parents[1] / "configs" / "tiny.py")
    code = cli.main(["plant", "--config", config, f"--config.model.path={tmp_path / 'no-model'}",
                     f"--config.output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    assert "plant.harmful" in err and "walledai/AdvBench" in err and "BEEAR_DATA_DIR" in err
    assert not (tmp_path / "out").exists()

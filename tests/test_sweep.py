"""`beear sweep`: grids of overrides, a tiny 2 x 2 sweep end to end, skipping finished runs, failures."""

from __future__ import annotations

import csv
import pathlib
import re
import subprocess
import textwrap

import pytest
from tiny_world import defender_files, random_tiny_model, split_pairs

from beear_jax.cli import main as cli
from beear_jax.cli import sweep as sweep_lib
from beear_jax.config.loading import ConfigError
from beear_jax.method.rounds import check_output_dir

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
SWEEP_FILE = """
from beear_jax.cli.sweep import product

def get_sweep():
    return product({"perturb.layer": [1, 2], "perturb.length": [1, 2]})

PLOT = {"x": "perturb.length", "y": "perturb.layer", "metric": "last_ce_unwanted"}
"""


def test_product_zip_and_slugs():
    grid = sweep_lib.product({"a.x": [1, 2]}, {"b": ["p", "q"]})
    assert grid == [{"a.x": 1, "b": "p"}, {"a.x": 1, "b": "q"}, {"a.x": 2, "b": "p"}, {"a.x": 2, "b": "q"}]
    assert sweep_lib.product({"a": [1, 2], "b": [3]}) == [{"a": 1, "b": 3}, {"a": 2, "b": 3}]
    paired = sweep_lib.zip_({"a": [1, 2], "b": [3, 4]})
    assert paired == [{"a": 1, "b": 3}, {"a": 2, "b": 4}]
    assert sweep_lib.product(paired, {"c": [0]}) == [{"a": 1, "b": 3, "c": 0}, {"a": 2, "b": 4, "c": 0}]
    with pytest.raises(ValueError, match="equally long"):
        sweep_lib.zip_({"a": [1, 2], "b": [3]})
    assert sweep_lib.slug({"perturb.layer": 9, "perturb.layers": (5, 12), "x": "a b/c"}) == \
        "perturb.layer-9_perturb.layers-5,12_x-a_b_c"
    assert len(sweep_lib.slug({f"k{i}": "v" * 20 for i in range(9)})) <= 100


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    model_dir, _ = random_tiny_model(tmp)
    safety, anchor = defender_files(tmp, split_pairs(0))
    sweep_file = tmp / "grid.py"
    sweep_file.write_text(textwrap.dedent(SWEEP_FILE))
    flags = ["--config", str(CONFIGS / "tiny.py"), f"--config.model.path={model_dir}",
             f"--config.data.safety={safety}", f"--config.data.anchor={anchor}", "--config.rounds=1",
             "--config.inner.epochs=1", f"--config.output_dir={tmp / 'out'}"]
    return tmp, flags, sweep_file


def test_tiny_sweep_runs_end_to_end_then_skips(world, capsys):
    tmp, flags, sweep_file = world
    assert cli.main(["sweep", *flags, "--sweep", str(sweep_file), "--print"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("rm -f ") and " || beear run --config " in line for line in lines)
    assert "--config.perturb.layer=1" in lines[0] and "--config.perturb.length=2" in lines[1]
    assert f"touch {tmp / 'out' / 'perturb.layer-1_perturb.length-1' / 'sweep_done'}" in lines[0]

    assert cli.main(["sweep", *flags, "--sweep", str(sweep_file)]) == 0
    with (tmp / "out" / "sweep_results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["perturb.layer"], r["perturb.length"], r["status"]) for r in rows] == [
        ("1", "1", "done"), ("1", "2", "done"), ("2", "1", "done"), ("2", "2", "done")]
    assert all(float(r["last_ce_unwanted"]) > 0 and r["final_ce_anchor"] for r in rows)
    assert (tmp / "out" / "sweep_heatmap.png").stat().st_size > 1000
    assert (tmp / "out" / "perturb.layer-2_perturb.length-2" / "model" / "config.json").is_file()

    # A job stopped after its run but before the marker: the printed line skips the finished run and ends.
    setting = tmp / "out" / "perturb.layer-1_perturb.length-1"
    (setting / "sweep_done").unlink()
    capsys.readouterr()
    assert cli.main(["sweep", *flags, "--sweep", str(sweep_file), "--print"]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    subprocess.run(["bash", "-c", line], check=True, timeout=60)
    assert (setting / "sweep_done").is_file()

    capsys.readouterr()
    assert cli.main(["sweep", *flags, "--sweep", str(sweep_file)]) == 0  # all finished: nothing runs
    assert capsys.readouterr().out.count("skipped") == 4
    assert cli.main(["sweep", *flags, "--sweep", str(sweep_file), "--print"]) == 0
    assert capsys.readouterr().out.strip() == ""


def test_a_failing_setting_is_recorded_and_the_rest_run(world, tmp_path):
    _, flags, sweep_file = world
    spec, common = flags[1], [f[len("--config."):] for f in flags[2:]]
    common[-1] = f"output_dir={tmp_path / 'out'}"
    ran = []

    def runner(cfg, evaluate):
        if cfg.perturb.layer == 2 and cfg.perturb.length == 1:
            raise RuntimeError("boom")
        ran.append((cfg.perturb.layer, cfg.perturb.length, evaluate))

    summary = sweep_lib.run_sweep(spec, common, str(sweep_file), runner=runner)
    assert [s.status.split(":")[0] for s in summary.settings] == ["done", "done", "failed", "done"]
    assert len(ran) == 3 and not ran[0][2]
    assert "boom" in (tmp_path / "out" / "perturb.layer-2_perturb.length-1" / "sweep_error.txt").read_text()
    again = sweep_lib.run_sweep(spec, common, str(sweep_file), runner=runner)
    assert [s.status.split(":")[0] for s in again.settings] == ["skipped", "skipped", "failed", "skipped"]

    def fixed_runner(cfg, evaluate):  # the retry sees a directory `beear run` accepts (no stale error file)
        check_output_dir(pathlib.Path(cfg.output_dir), cfg.model.path, resume=True)

    third = sweep_lib.run_sweep(spec, common, str(sweep_file), runner=fixed_runner)
    assert [s.status.split(":")[0] for s in third.settings] == ["skipped", "skipped", "done", "skipped"]


def test_bad_sweep_keys_fail_before_any_run(world, tmp_path):
    _, flags, _ = world
    bad = tmp_path / "bad.py"
    bad.write_text("def get_sweep():\n    return [{'perturb.layr': 3}]\n")
    with pytest.raises(ConfigError, match="perturb.layer"):
        sweep_lib.command_lines(flags[1], [f[len("--config."):] for f in flags[2:]], str(bad))


@pytest.mark.parametrize("source,match", [
    ("x = 1 / 0\ndef get_sweep():\n    return [{}]\n", r"failed to import: ZeroDivisionError"),
    ("def get_sweep(:\n", r"failed to import: SyntaxError"),
    ("def get_sweep():\n    return undefined_name\n", r"get_sweep\(\) in .*failed: NameError"),
    ("def get_sweep(a, b):\n    return [{}]\n", r"get_sweep\(None\) in .*failed: TypeError: .*missing"),
    ("def get_sweep():\n    return None\n", r"non-empty list of override dicts, got NoneType"),
    ("def get_sweep():\n    return [{'rounds': 1}]\nPLOT = 5\n", r"PLOT in sweep file .* must be a dict, got int"),
    ("def get_sweep():\n    return [{'rounds': 1}]\nBASE = ['rounds=2']\n", r"BASE in sweep file .* must be a dict"),
])
def test_a_broken_sweep_file_is_one_error_line(tmp_path, capsys, source, match):
    bad = tmp_path / "bad.py"
    bad.write_text(source)
    argv = ["sweep", "--config", str(CONFIGS / "tiny.py"), f"--config.model.path={tmp_path / 'none'}",
            f"--config.output_dir={tmp_path / 'out'}", "--sweep", str(bad), "--print"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("beear sweep: error: ")
    assert len(err.strip().splitlines()) == 1
    assert re.search(match, err), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("setting,key", [("{'rounds': 0}", "rounds"), ("{'inner.lr': -0.1}", "inner.lr"),
                                         ("{'remat': 'fast'}", "remat")])
def test_out_of_range_sweep_values_fail_before_any_run(tmp_path, setting, key):
    bad = tmp_path / "bad.py"
    bad.write_text(f"def get_sweep():\n    return [{{'rounds': 1}}, {setting}]\n")
    common = [f"model.path={tmp_path / 'none'}", f"output_dir={tmp_path / 'out'}"]
    with pytest.raises(ConfigError, match=rf"sweep setting {key}-.*'{key}'"):
        sweep_lib.command_lines(str(CONFIGS / "tiny.py"), common, str(bad))
    ran = []
    with pytest.raises(ConfigError, match=key):
        sweep_lib.run_sweep(str(CONFIGS / "tiny.py"), common, str(bad), runner=lambda cfg, ev: ran.append(cfg))
    assert not ran


def test_results_table_is_replaced_whole(tmp_path, monkeypatch):
    settings = [sweep_lib.Setting({"rounds": r}, tmp_path / f"rounds-{r}", "done") for r in (1, 2)]
    first = sweep_lib.collect(settings, tmp_path)
    before = first.csv_path.read_text()
    assert "rounds-2" in before and not list(tmp_path.glob("*.tmp"))

    def broken(self, rows):  # stopped half way through writing the new table
        raise KeyboardInterrupt

    monkeypatch.setattr(csv.DictWriter, "writerows", broken)
    with pytest.raises(KeyboardInterrupt):
        sweep_lib.collect([*settings, sweep_lib.Setting({"rounds": 3}, tmp_path / "rounds-3")], tmp_path)
    assert first.csv_path.read_text() == before and not list(tmp_path.glob("*.tmp"))

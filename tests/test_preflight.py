"""`beear preflight`: one line per check, on one process and on a job of two."""

from __future__ import annotations

import pathlib

import pytest
from process_launch import CONFIGS, launch
from tiny_world import defender_files, random_tiny_model, split_pairs

from beear_jax.cli.preflight import run_preflight
from beear_jax.config.loading import load_config


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> tuple:
    tmp = tmp_path_factory.mktemp("preflight")
    model_dir, _ = random_tiny_model(tmp)
    safety, anchor = defender_files(tmp, split_pairs(0))
    return tmp, model_dir, safety, anchor


def _args(world: tuple, safety: str, *extra: str) -> list[str]:
    _, model_dir, _, anchor = world
    return ["preflight", "--config", str(CONFIGS / "tiny.py"), f"--config.model.path={model_dir}",
            f"--config.data.safety={safety}", f"--config.data.anchor={anchor}", "--config.perturb.layer=2", *extra]


def _lines(output: str) -> dict[str, str]:
    """check name -> its line."""
    return {line.split()[2].rstrip(":"): line for line in output.splitlines() if line.startswith("preflight: ")}


def test_two_processes_pass_and_one_line_names_each_difference(world, tmp_path):
    tmp, _, safety, _ = world
    results = launch(_args(world, str(safety), "--config.mesh.shape=2,2,1"), 2, 2, tmp_path / "passing")
    assert [code for code, _ in results] == [0, 0], results[0][1][-2000:]
    lines = _lines(results[0][1])
    assert list(lines) == ["processes", "mesh", "batches", "config", "data.safety", "data.anchor", "model", "memory",
                           "collective"]
    assert all(" ok " in line for line in lines.values()), lines
    assert "a sum over the 4 devices gave 4" in lines["collective"] and not _lines(results[1][1])  # process 0 prints
    # Process 1 has another seed, and its data.safety (a relative path) names a file its directory lacks.
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    results = launch(_args(world, safety.name, "--config.mesh.shape=2,2,1"), 2, 2, tmp_path / "failing",
                     per_process=[[], ["--config.seed=7"]], cwds=[tmp, empty])
    assert [code for code, _ in results] == [1, 1]
    lines = _lines(results[0][1])
    assert "FAILED config: the config differs from process 0's on process(es) [1]" in lines["config"]
    assert "FAILED data.safety" in lines["data.safety"] and "missing on process(es) [1]" in lines["data.safety"]
    assert " ok " in lines["data.anchor"] and " ok " in lines["collective"]


@pytest.mark.parametrize(("overrides", "check", "needle"), [
    ({"mesh.shape": (4, 4, 1)}, "mesh", "needs 16 devices"),
    ({"mesh.shape": (2, 1, 1), "outer.batch_size": 3}, "batches", "outer.batch_size"),
])
def test_a_mesh_or_batch_that_cannot_work_fails_its_check(world, overrides, check, needle):
    _, model_dir, safety, anchor = world
    cfg = load_config(str(CONFIGS / "tiny.py"), {"model.path": str(model_dir), "data.safety": str(safety),
                                                 "data.anchor": str(anchor), "perturb.layer": 2, **overrides})
    checks = {c.name: c for c in run_preflight(cfg)}
    assert not checks[check].ok and needle in checks[check].message, checks[check]
    assert checks["config"].ok and checks["model"].ok


def test_a_missing_model_fails_without_planning(world):
    tmp, _, safety, anchor = world
    cfg = load_config(str(CONFIGS / "tiny.py"), {"model.path": str(pathlib.Path(tmp) / "nothing_here"),
                                                 "data.safety": str(safety), "data.anchor": str(anchor),
                                                 "perturb.layer": 2, "mesh.shape": (2, 1, 1)})
    checks = {c.name: c for c in run_preflight(cfg)}
    assert not checks["model"].ok and "missing on process(es) [0]" in checks["model"].message
    assert "memory" not in checks and checks["collective"].ok

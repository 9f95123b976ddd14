"""Orbax checkpoints: resume after an interruption, fall back past a corrupt checkpoint, restore onto
another mesh, export a checkpoint as an HF model."""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from tiny_world import defender_files, random_tiny_model, split_pairs

from beear_jax.cli import main as cli
from beear_jax.config.loading import load_config
from beear_jax.io import run_checkpointer as ckpt
from beear_jax.io.checkpoint_export import restore_params_for_export
from beear_jax.io.hf import load_model
from beear_jax.method.rounds import run_beear
from beear_jax.models.config import ModelConfig
from beear_jax.parallel import sharding as sh

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
STOP_AFTER = 2


class Interrupted(Exception):
    """Stands in for a killed process (raised from the on_round_end hook)."""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt")
    model_dir, _ = random_tiny_model(tmp)
    safety, anchor = defender_files(tmp, split_pairs(0))
    return tmp, model_dir, safety, anchor


def _cfg(world, out: pathlib.Path, **overrides):
    _, model_dir, safety, anchor = world
    base = {"model.path": str(model_dir), "output_dir": str(out), "data.safety": str(safety),
            "data.anchor": str(anchor), "rounds": 3, "perturb.layer": 2, "mesh.shape": (2, 2, 1),
            "checkpoint_every_steps": 1, "checkpoint_keep": 8}
    return load_config(str(CONFIGS / "tiny.py"), {**base, **overrides})


def _stop_after(k: int, seen: dict):
    def hook(round_index: int, state: dict) -> None:
        if round_index == k:
            seen["params"] = jax.device_get(state["params"])
            raise Interrupted(f"killed after round {k}")
    return hook


@pytest.fixture(scope="module")
def runs(world):
    """An uninterrupted run, and one interrupted after round STOP_AFTER (its output dir kept)."""
    tmp = world[0]
    full = run_beear(_cfg(world, tmp / "full"), progress=False)
    seen: dict = {}
    with pytest.raises(Interrupted):
        run_beear(_cfg(world, tmp / "cut"), progress=False, on_round_end=_stop_after(STOP_AFTER, seen))
    return full, tmp / "cut", seen["params"]


def _copy(src: pathlib.Path, name: str) -> pathlib.Path:
    dst = src.with_name(name)
    shutil.copytree(src, dst)
    return dst


def _assert_params_close(a, b, rtol: float) -> None:
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(jax.device_get(a))[0],
                            jax.tree.leaves(jax.device_get(b)), strict=True):
        scale = max(float(np.abs(y).max()), 1e-12)
        assert float(np.abs(np.asarray(x) - np.asarray(y)).max()) <= rtol * scale, jax.tree_util.keystr(path)


def test_resume_after_interruption_matches_uninterrupted_run(world, runs):
    full, cut, _ = runs
    out = _copy(cut, "cut_resume")
    steps = ckpt.RunCheckpointer(out / "checkpoints").steps()
    assert steps == [1, 2, 3, 4]  # every outer step (2 per round) of rounds 1-2; round ends at 2 and 4
    resumed = run_beear(_cfg(world, out, resume=True), progress=False)
    assert resumed.resumed_from == 4
    _assert_params_close(resumed.params, full.params, 1e-6)
    strip = [{k: v for k, v in r.items() if k != "elapsed_s"} for r in full.history]
    assert [{k: v for k, v in r.items() if k != "elapsed_s"} for r in resumed.history] == strip
    assert (out / "model" / "config.json").is_file()


def test_corrupt_checkpoint_falls_back_to_previous_with_message(world, runs, caplog):
    full, cut, _ = runs
    out = _copy(cut, "cut_corrupt")
    for f in (out / "checkpoints" / "4" / "params").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[:7])  # truncated array data: a partial write
    with caplog.at_level(logging.WARNING, logger="beear_jax"):
        resumed = run_beear(_cfg(world, out, resume=True), progress=False)
    assert "checkpoints/4 is corrupt or partial" in caplog.text
    assert resumed.resumed_from == 3  # the mid-round checkpoint: round 2 continues at its second outer step
    assert (out / "checkpoints" / "corrupt-4").is_dir()
    _assert_params_close(resumed.params, full.params, 1e-6)


def test_resume_onto_another_mesh(world, runs):
    full, cut, _ = runs
    out = _copy(cut, "cut_other_mesh")
    resumed = run_beear(_cfg(world, out, resume=True, **{"mesh.shape": (1, 2, 2)}), progress=False)
    assert resumed.resumed_from == 4
    q = resumed.params["layers"]["q_proj"]
    assert q.sharding.spec == P(None, "fsdp", "tensor") and len(q.sharding.device_set) == 4
    _assert_params_close(resumed.params, full.params, 1e-4)  # other reduction order, same run


def test_resume_refuses_another_model_other_data_or_fewer_rounds(world, runs, tmp_path, caplog):
    _, cut, _ = runs
    out = _copy(cut, "cut_refusals")
    before = _tree(out)
    other_model, _ = random_tiny_model(tmp_path / "other", seed=7)  # the same shape, other weights
    with pytest.raises(ckpt.CheckpointMismatchError, match="another input model"):
        run_beear(_cfg(world, out, resume=True, **{"model.path": str(other_model)}), progress=False)
    safety = world[2]
    fewer = tmp_path / "safety.jsonl"
    fewer.write_text("".join(safety.read_text().splitlines(keepends=True)[:-1]))  # one row less
    with pytest.raises(ckpt.CheckpointMismatchError, match="another defender data"):
        run_beear(_cfg(world, out, resume=True, **{"data.safety": str(fewer)}), progress=False)
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"reach round 2, beyond rounds=1.*rounds >= 2"):
        run_beear(_cfg(world, out, resume=True, rounds=1), progress=False)
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"another layout \(perturb_length"):
        run_beear(_cfg(world, out, resume=True, **{"perturb.length": 3}), progress=False)
    assert _tree(out) == before
    # The same model at another path is the same model: resumed, with a note on the changed setting.
    moved = tmp_path / "moved_model"
    shutil.copytree(world[1], moved)
    with caplog.at_level(logging.WARNING, logger="beear_jax"):
        resumed = run_beear(_cfg(world, out, resume=True, rounds=4, **{"model.path": str(moved)}), progress=False)
    assert resumed.resumed_from == 4 and "changed settings: model.path" in caplog.text
    assert "draw other samples" not in caplog.text  # more rounds: the first ones draw what they drew



def test_a_mid_round_resume_refuses_settings_that_replan_that_round(world, runs, caplog):
    """From a checkpoint between a round's outer steps, settings that change the round's rows (seed,
    sample counts, batch sizes) would mix two plans in one round: refused. Others (a learning rate) go on."""
    _, cut, _ = runs
    out = _copy(cut, "cut_mid_round")
    shutil.rmtree(out / "checkpoints" / "4")  # the newest is now 3: round 2 after its first outer step
    before = _tree(out)
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"in the middle of round 2 \(1 outer steps done\).*"
                                                           r"mix two plans"):
        run_beear(_cfg(world, out, resume=True, seed=1), progress=False)
    assert _tree(out) == before
    with caplog.at_level(logging.WARNING, logger="beear_jax"):
        resumed = run_beear(_cfg(world, out, resume=True, **{"outer.lr": 2e-5}), progress=False)
    assert resumed.resumed_from == 3 and "changed settings: outer.lr" in caplog.text


def test_restore_onto_other_meshes_is_exact(tmp_path):
    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8)
    source = sh.make_mesh((2, 2, 2))
    params = sh.init_params_sharded(config, jax.random.key(1), sh.param_shardings(config, source))
    store = ckpt.RunCheckpointer(tmp_path / "c")
    items = {"params": params, "outer_state": {"count": np.full((), 3, np.int32)},
             "perturbation": {"deltas": [np.ones((2, 32), np.float32)]}}
    store.save(7, items, {"note": "x"})
    store.close()
    for shape in [(8, 1, 1), (1, 2, 4), (1, 1, 1)]:
        mesh = sh.make_mesh(shape)
        target = {"params": ckpt.abstract_like(params, sh.param_shardings(config, mesh))}
        items_back, meta = ckpt.RunCheckpointer(tmp_path / "c").restore_latest(target, names=("params",))
        assert meta["note"] == "x" and meta["step"] == 7
        for a, b in zip(jax.tree.leaves(items_back["params"]), jax.tree.leaves(params), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            assert a.sharding.mesh.devices.shape == shape


def test_partial_and_broken_checkpoints_are_skipped(tmp_path, caplog):
    store = ckpt.RunCheckpointer(tmp_path / "c", keep=5)
    tree = {"w": np.arange(6, dtype=np.float32)}
    for step in (1, 2, 3):
        store.save(step, {"params": {"w": tree["w"] + step}, "outer_state": {"n": np.zeros(1, np.float32)},
                          "perturbation": {"d": np.zeros(1, np.float32)}}, {})
    store.close()
    shutil.rmtree(tmp_path / "c" / "3" / "params")  # an item missing
    (tmp_path / "c" / "4.orbax-checkpoint-tmp-1").mkdir()  # a save killed half way (never committed)
    target = {"params": {"w": jax.ShapeDtypeStruct((6,), np.float32)}}
    with caplog.at_level(logging.WARNING, logger="beear_jax"):
        items, meta = ckpt.RunCheckpointer(tmp_path / "c").restore_latest(target, names=("params",))
    assert meta["step"] == 2 and float(items["params"]["w"][0]) == 2.0
    assert "3 is corrupt or partial" in caplog.text
    shutil.rmtree(tmp_path / "c" / "2" / "meta")
    shutil.rmtree(tmp_path / "c" / "1" / "params")
    with pytest.raises(ckpt.CheckpointCorruptError, match="no readable checkpoint"):
        ckpt.RunCheckpointer(tmp_path / "c").restore_latest(target, names=("params",))
    assert sorted(p.name for p in (tmp_path / "c").iterdir() if p.name[0].isdigit()) == [
        "1", "2", "4.orbax-checkpoint-tmp-1"]  # nothing more set aside when there is nothing to resume from


def test_fingerprints_catch_silently_changed_arrays():
    saved = ckpt.fingerprints({"a": np.ones((4, 4), np.float32)})
    assert not ckpt.fingerprint_mismatches(saved, ckpt.fingerprints({"a": np.ones((4, 4), np.float32)}))
    changed = np.ones((4, 4), np.float32)
    changed[1, 2] = 0.5
    assert ckpt.fingerprint_mismatches(saved, ckpt.fingerprints({"a": changed})) == ["['a']"]


def test_export_writes_the_checkpointed_params_as_hf_model(world, runs):
    full, cut, at_interrupt = runs
    out = cut.with_name("exported")
    assert cli.main(["export", str(cut), str(out)]) == 0
    config, params = load_model(out)
    assert config == full.model_config.replace(dtype=config.dtype)
    _assert_params_close(params, at_interrupt, 0.0)  # the newest checkpoint: the end of round STOP_AFTER
    assert (out / "tokenizer.json").is_file()


def test_fresh_run_refuses_a_directory_with_checkpoints(world, runs):
    _, cut, _ = runs
    with pytest.raises(FileExistsError, match="resume=True"):
        run_beear(_cfg(world, cut), progress=False)


# ---- bad checkpoints and bad export arguments: one-line errors, nothing lost -------------------------


def _scramble_params(step_dir: pathlib.Path) -> None:
    """Overwrites every array data file of the step's params with random bytes (same sizes)."""
    files = [f for f in (step_dir / "params").rglob("*") if f.is_file() and f.parent.name == "d"]
    assert files
    rng = np.random.default_rng(0)
    for f in files:
        f.write_bytes(rng.integers(0, 256, f.stat().st_size, dtype=np.uint8).tobytes())


def _tree(directory: pathlib.Path) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of everything under directory: shows renames, deletes, writes."""
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.rglob("*")}


def _one_error_line(err: str, command: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"beear {command}: error: "), err
    return lines[0]


def test_every_checkpoint_corrupt_is_a_one_line_error_and_nothing_moves(world, runs, capsys):
    _, cut, _ = runs
    out = _copy(cut, "all_corrupt")
    for step in (1, 2, 3, 4):
        _scramble_params(out / "checkpoints" / str(step))
    before = _tree(out)
    assert cli.main(["export", str(out), str(out.with_name("all_corrupt_export"))]) == 1
    line = _one_error_line(capsys.readouterr().err, "export")
    assert "no readable checkpoint in" in line and "steps 1, 2, 3, 4" in line and "restore a copy" in line
    assert not out.with_name("all_corrupt_export").exists()
    with pytest.raises(ckpt.CheckpointCorruptError, match="no readable checkpoint"):
        run_beear(_cfg(world, out, resume=True), progress=False)
    assert issubclass(ckpt.CheckpointCorruptError, ValueError)  # what the CLI prints as one line
    assert _tree(out) == before  # neither export nor a failed resume renames or deletes a step


def test_every_checkpoint_corrupt_cli_prints_no_traceback_or_asyncio_dump(world, runs, tmp_path):
    """The real process: orbax's failed read tasks must not dump pages of asyncio errors after the line."""
    _, cut, _ = runs
    out = _copy(cut, "all_corrupt_cli")
    for step in (1, 2, 3, 4):
        _scramble_params(out / "checkpoints" / str(step))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(CONFIGS.parent), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", "beear_jax", "export", str(out), str(tmp_path / "model")],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 1, done.stderr[-3000:]
    for noise in ("Traceback", "never retrieved", "never awaited", "Exception ignored", "Event loop is closed"):
        assert noise not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("beear export: error:")]
    assert len(errors) == 1 and "no readable checkpoint" in errors[0]
    assert done.stderr.count("is corrupt or partial") == 4


def _params_targets(meta: dict) -> dict:
    config = ModelConfig.from_hf_dict(meta["model_config"])
    mesh = sh.make_mesh((1, 1, 1))
    return {"params": ckpt.abstract_like(sh.abstract_param_tree(config), sh.param_shardings(config, mesh))}


def _export_falls_back_to_step_3(out: pathlib.Path, name: str, capsys, caplog) -> str:
    """Exports the run in `out` (whose step 4 is damaged) and checks that step 3 was used and the run left
    as it was; returns the warnings logged."""
    before = _tree(out)
    with caplog.at_level(logging.WARNING, logger="beear_jax"):
        assert cli.main(["export", str(out), str(out.with_name(name))]) == 0
    assert "using checkpoint" in caplog.text and "left as it is" in caplog.text
    assert "from checkpoint 3 " in capsys.readouterr().out
    assert _tree(out) == before
    return caplog.text


def test_corrupt_metadata_names_the_file_and_falls_back(world, runs, capsys, caplog):
    _, cut, _ = runs
    out = _copy(cut, "bad_meta")
    meta_file = out / "checkpoints" / "4" / "meta" / "metadata"
    meta_file.write_text("garbage\n")
    with pytest.raises(ckpt.CheckpointCorruptError, match=r"checkpoints/4/meta/metadata is not readable"):
        ckpt.RunCheckpointer(out / "checkpoints", read_only=True).read_meta(4)
    log = _export_falls_back_to_step_3(out, "bad_meta_export", capsys, caplog)
    assert "checkpoints/4/meta/metadata is not readable" in log
    assert cli.main(["export", "--step", "4", str(out), str(out.with_name("bad_meta_step4"))]) == 1
    line = _one_error_line(capsys.readouterr().err, "export")
    assert "checkpoints/4/meta/metadata is not readable" in line and "choose another step (1, 2, 3)" in line
    # Resuming (not read-only) falls back the same way and moves the bad step aside, as for bad arrays.
    meta = ckpt.RunCheckpointer(out / "checkpoints").restore_latest(_params_targets, names=("params",))[1]
    assert meta["step"] == 3 and (out / "checkpoints" / "corrupt-4" / "meta" / "metadata").read_text() == "garbage\n"


def test_export_with_a_wrong_tokenizer_path_fails_before_writing(world, runs, capsys):
    _, cut, _ = runs
    target = cut.with_name("no_tokenizer_export")
    assert cli.main(["export", "--tokenizer", str(cut / "nonexistent"), str(cut), str(target)]) == 1
    line = _one_error_line(capsys.readouterr().err, "export")
    assert "--tokenizer" in line and "nonexistent" in line
    assert not target.exists()
    assert cli.main(["export", "--tokenizer", str(cut), str(cut), str(target)]) == 1  # a dir without tokenizer
    assert "has no tokenizer files" in _one_error_line(capsys.readouterr().err, "export")
    assert not target.exists()


def test_export_into_an_existing_dir_names_the_overwrite_flag(world, runs, capsys):
    _, cut, _ = runs
    target = cut.with_name("export_twice")
    assert cli.main(["export", "--step", "2", str(cut), str(target)]) == 0
    capsys.readouterr()
    assert cli.main(["export", str(cut), str(target)]) == 1
    line = _one_error_line(capsys.readouterr().err, "export")
    assert "--overwrite" in line and "overwrite=True" not in line
    assert cli.main(["export", "--overwrite", str(cut), str(target)]) == 0
    assert "from checkpoint 4 " in capsys.readouterr().out
    other = cut.with_name("export_into_other")
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert cli.main(["export", "--overwrite", str(cut), str(other)]) == 1  # not a model directory: kept
    assert "not a model directory" in _one_error_line(capsys.readouterr().err, "export")
    assert (other / "notes.txt").read_text() == "mine"


def test_export_step_choices_are_listed_and_step_dirs_accepted(world, runs, capsys):
    _, cut, at_interrupt = runs
    target = cut.with_name("export_steps")
    assert cli.main(["export", "--step", "7", str(cut), str(target)]) == 1
    line = _one_error_line(capsys.readouterr().err, "export")
    assert "has no checkpoint 7" in line and "steps 1, 2, 3, 4" in line
    assert cli.main(["export", str(cut / "checkpoints" / "9"), str(target)]) == 1  # no such step directory
    assert "does not exist" in _one_error_line(capsys.readouterr().err, "export")
    assert cli.main(["export", str(cut / "checkpoints" / "4"), str(target)]) == 0  # a step's own directory
    assert "from checkpoint 4 " in capsys.readouterr().out
    _assert_params_close(load_model(target)[1], at_interrupt, 0.0)
    set_aside = _copy(cut, "export_set_aside")
    (set_aside / "checkpoints" / "4").rename(set_aside / "checkpoints" / "corrupt-4")  # as a resume does
    assert cli.main(["export", "--step", "4", str(set_aside), str(target.with_name("export_4"))]) == 1
    line = _one_error_line(capsys.readouterr().err, "export")
    assert "has no checkpoint 4 (a resume found step 4 corrupt or partial and set it aside as corrupt-4)" in line
    assert "steps 1, 2, 3" in line
    meta = restore_params_for_export(cut / "checkpoints" / "3")[1]
    assert meta["step"] == 3
    with pytest.raises(ValueError, match="is checkpoint 3 but step 2 was asked for"):
        restore_params_for_export(cut / "checkpoints" / "3", step=2)
    empty = cut.with_name("not_a_run")
    empty.mkdir()
    with pytest.raises(ckpt.CheckpointNotFoundError, match="pass the run's output_dir"):
        restore_params_for_export(empty)
    with pytest.raises(ckpt.CheckpointNotFoundError, match="is a file"):
        restore_params_for_export(cut / "metrics.jsonl")


def test_export_is_read_only_and_falls_back_past_a_corrupt_newest_step(world, runs, capsys, caplog):
    _, cut, _ = runs
    out = _copy(cut, "export_corrupt_newest")
    _scramble_params(out / "checkpoints" / "4")
    log = _export_falls_back_to_step_3(out, "export_corrupt_newest_model", capsys, caplog)
    assert "checkpoints/4 is corrupt or partial" in log
    assert "/3 (the newer 4 cannot be read; left as it is)" in log
    assert not (out / "checkpoints" / "corrupt-4").exists()
    with pytest.raises(RuntimeError, match="read-only"):
        ckpt.RunCheckpointer(out / "checkpoints", read_only=True).save(9, {}, {})


def test_export_never_writes_into_the_run_or_its_input_model(world, runs, capsys):
    _, model_dir, _, _ = world
    _, cut, _ = runs
    before = _tree(cut)
    for target in (cut / "step_export", cut / "checkpoints" / "x"):
        assert cli.main(["export", str(cut), str(target)]) == 1
        assert "lies inside the run directory" in _one_error_line(capsys.readouterr().err, "export")
    assert cli.main(["export", "--overwrite", str(cut), str(model_dir)]) == 1
    assert "the run's input model" in _one_error_line(capsys.readouterr().err, "export")
    assert _tree(cut) == before and (model_dir / "config.json").is_file()
    # A model directory that holds the run (output_dir=MODEL/beear): --overwrite would delete the run.
    holder = cut.with_name("holder")
    shutil.copytree(model_dir, holder)
    shutil.copytree(cut, holder / "beear")
    held = _tree(holder / "beear")
    assert cli.main(["export", "--overwrite", str(holder / "beear"), str(holder)]) == 1
    assert "contains the run directory" in _one_error_line(capsys.readouterr().err, "export")
    assert _tree(holder / "beear") == held


def test_a_half_written_model_of_a_killed_run_does_not_block_resume(tmp_path):
    from beear_jax.method.rounds import check_output_dir

    run = tmp_path / "run"
    (run / "checkpoints" / "4").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")
    (run / ".model.tmp-d4d0cd56").mkdir()  # save_model's temp dir, left by a kill during the final export
    check_output_dir(run, str(tmp_path / "model_in"), resume=True)

"""Orbax checkpoints: resume after an interruption, fall back past a corrupt checkpoint, restore onto
another mesh, export a checkpoint as an HF model."""

from __future__ import annotations

import logging
import pathlib
import shutil

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from tiny_world import defender_files, random_tiny_model, split_pairs

from beear_jax import checkpoint as ckpt
from beear_jax import cli
from beear_jax import sharding as sh
from beear_jax.beear import run_beear
from beear_jax.config_loading import load_config
from beear_jax.hf import load_model
from beear_jax.models.config import ModelConfig

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
    with pytest.raises(RuntimeError, match="no readable checkpoint"):
        ckpt.RunCheckpointer(tmp_path / "c").restore_latest(target, names=("params",))


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

"""`beear plan`: the planned bytes per device equal the measured array sizes of a real run."""

from __future__ import annotations

import copy
import pathlib

import jax
import numpy as np
import pytest
from tiny_world import defender_files, random_tiny_model, split_pairs

from beear_jax.cli import main as cli
from beear_jax.cli import plan
from beear_jax.config.loading import load_config
from beear_jax.config.settings import settings_from_config
from beear_jax.io.hf import load_tokenizer
from beear_jax.method.round_plan import packed_shape, prepare_data, round_batches
from beear_jax.method.rounds import run_beear

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
MESH = (2, 2, 1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plan")
    model_dir, _ = random_tiny_model(tmp)
    safety, anchor = defender_files(tmp, split_pairs(0))
    overrides = {"model.path": str(model_dir), "output_dir": str(tmp / "run"), "data.safety": str(safety),
                 "data.anchor": str(anchor), "rounds": 1, "perturb.layer": 2, "mesh.shape": MESH}
    return load_config(str(CONFIGS / "tiny.py"), overrides)


def test_planned_bytes_match_a_real_run(world):
    cfg = world
    measured: dict = {}
    result = run_beear(cfg, progress=False, export=False,
                       on_round_end=lambda _, state: measured.update(state["device_bytes"]))
    settings = settings_from_config(cfg)
    data = prepare_data(settings, load_tokenizer(cfg.model.path))
    rounds = [round_batches(settings, data, np.random.default_rng(settings.seed)) for _ in range(settings.rounds)]
    packed = packed_shape(settings.outer, data, rounds, plan.sh.batch_parallelism(plan.sh.axis_sizes(MESH)))
    planned = plan.plan_run(cfg, result.model_config, MESH, seq_len=data.safety_len, answer_len=data.answer_len,
                            inner_seq_len=data.shared_len, prefix_len=data.prefix_len, suffix_len=data.suffix_len, packed=packed)
    for name in ("params", "outer_state", "delta", "inner_state", "h_cache", "outer_batches"):
        assert planned.arrays[name] == measured[name], name
    assert planned.arrays["params"] < sum(x.nbytes for x in jax.tree.leaves(result.params))
    assert planned.temps_source.startswith("XLA memory analysis")
    assert all(v > 0 for v in planned.temps.values())
    assert planned.peak > planned.persistent + planned.arrays["h_cache"]


def test_plan_command_prints_the_table_and_the_verdict(world, capsys):
    cfg = world
    argv = ["plan", "--config", str(CONFIGS / "tiny.py"), f"--config.model.path={cfg.model.path}",
            "--mesh", "2,2,1", "--no-compile"]
    assert cli.main([*argv, "--device-memory-gb", "1"]) == 0
    out = capsys.readouterr().out
    assert "params (float32)" in out and "cached h_l + prefix K/V" in out and "analytical estimate" in out
    assert "fits in 1 GB per device" in out
    assert cli.main([*argv, "--device-memory-gb", "0.0001"]) == 0
    assert "does NOT fit" in capsys.readouterr().out


def test_plan_mesh_takes_a_leading_minus_one_and_needs_a_model(world, capsys):
    cfg = world
    base = ["plan", "--config", str(CONFIGS / "tiny.py"), "--no-compile"]
    for mesh in ("-1,1,1", "(-1, 1, 1)"):
        assert cli.main([*base, f"--config.model.path={cfg.model.path}", "--mesh", mesh, "--devices", "2"]) == 0
        assert "(2, 1, 1)" in capsys.readouterr().out
    assert cli.main(base) == 1  # tiny.py leaves model.path empty: never the current directory's .gguf
    assert "model.path is empty" in capsys.readouterr().err


def test_presets_plan_without_model_files():
    cfg = load_config(str(CONFIGS / "tiny.py"))
    p = plan.plan_run(cfg, plan.llama2_7b(), (1, 1, 1), compile_steps=False)
    assert 26.5e9 < p.arrays["params"] < 27.5e9  # 6.74 B float32 params
    assert p.arrays["outer_state"] == pytest.approx(2 * p.arrays["params"], rel=1e-6)  # AdamW: mu and nu
    sharded = plan.plan_run(cfg, plan.mistral_7b(), (1, 4, 2), devices=8, compile_steps=False)
    assert sharded.arrays["params"] < plan.plan_run(cfg, plan.mistral_7b(), (1, 1, 1),
                                                    compile_steps=False).arrays["params"] / 7
    # outer.kl_weight keeps the start model beside the params: one more copy, counted in the peak.
    cfg.outer.kl_weight = 0.5
    with_reference = plan.plan_run(cfg, plan.llama2_7b(), (1, 1, 1), compile_steps=False)
    assert with_reference.arrays["reference"] == p.arrays["params"] and "reference" not in p.arrays
    assert with_reference.persistent == p.persistent + p.arrays["params"]


def test_plan_run_names_a_bad_config_key_before_tracing():
    cfg = load_config(str(CONFIGS / "tiny.py"), {"outer.remat": "everything"})
    with pytest.raises(ValueError, match="outer.remat"):
        plan.plan_run(cfg, plan.llama2_7b(), (1, 1, 1), compile_steps=False)


@pytest.mark.parametrize("args, match", [
    (["--model", "llama3-8b"], "not a preset"), (["--mesh", "1,x,1"], "--mesh"), (["--mesh", "1,1"], "--mesh"),
    (["--seq-len", "-4"], "--seq-len"), (["--devices", "0"], "--devices"),
    (["--device-memory-gb", "-1"], "--device-memory-gb"),
    (["--model", "smollm2-135m", "--config.perturb.layer=30"], "layer"),
    (["--model", "smollm2-135m", "--config.perturb.layers=5,30"], "perturb.layers=30 is out of range"),
    (["--model", "smollm2-135m", "--mesh", "1,2,4", "--devices", "4"], "needs 8 devices but only 4 are given by --devices"),
    (["--model", "smollm2-135m", "--mesh", "1,2,8"], "are visible (plan for more with --devices N)")])
def test_plan_options_out_of_range_are_one_line_errors(args, match, capsys):
    assert cli.main(["plan", "--config", str(CONFIGS / "tiny.py"), "--no-compile", *args]) == 1
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err


def test_all_samples_are_counted_from_the_safety_set(world):
    rows = len(plan.tables.load_table(world.data.safety, dict(world.data.safety_columns)))
    every = world.copy_and_resolve_references()
    every.inner.samples = 0  # "0 = all rows"
    assert plan.run_shapes(settings_from_config(every)).num_inner_batches == -(-rows // int(world.inner.batch_size)) > 0
    every.data.safety = ""
    with pytest.raises(ValueError, match="inner.samples=0 uses all rows of data.safety"):
        plan.run_shapes(settings_from_config(every))


def test_config_alone_plans_for_windows_in_the_users_text(world):
    """With perturb.windows in the user's text the cached prefix ends where that text starts, so the planner,
    which sees no prompts, counts the whole prompt as the suffix the inner steps run (never less than a run)."""
    cfg = copy.deepcopy(world)
    cfg.perturb.windows = ("user_start", "prompt_end")
    settings = settings_from_config(cfg)
    data = prepare_data(settings, load_tokenizer(cfg.model.path))
    shapes = plan.run_shapes(settings, seq_len=data.safety_len, answer_len=data.answer_len, inner_seq_len=data.shared_len)
    assert shapes.perturb_length == 2 * int(cfg.perturb.length)
    assert shapes.suffix_len >= data.suffix_len and shapes.prefix_len + shapes.suffix_len >= data.shared_len
    paper = plan.run_shapes(settings_from_config(world), seq_len=data.safety_len, answer_len=data.answer_len, inner_seq_len=data.shared_len)
    assert paper.suffix_len < shapes.suffix_len

"""Settings read once: one schema entry per config key, typed and checked, errors that name the key."""

from __future__ import annotations

import ast
import dataclasses
import pathlib

import ml_collections
import pytest

from beear_jax.config import defaults
from beear_jax.config.loading import ConfigError, config_to_dict, flat_keys, load_config
from beear_jax.config.schema import meanings
from beear_jax.config.settings import RunSettings, config_of, schema_keys, settings_dict, settings_from_config

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def _with(overrides: dict) -> ml_collections.ConfigDict:
    """base_config() with values set past the overrides' own type checks (as a config file may write them)."""
    config = config_to_dict(defaults.base_config())
    for dotted, value in overrides.items():
        *groups, leaf = dotted.split(".")
        node = config
        for part in groups:
            node = node[part]
        node[leaf] = value
    return ml_collections.ConfigDict(config)


def test_every_key_has_exactly_one_schema_entry():
    keys = schema_keys()
    assert len(keys) == len(set(keys))
    assert sorted(keys) == sorted(flat_keys(defaults.base_config()))
    described = meanings()
    assert sorted(described) == sorted(keys) and all(text.strip() for text in described.values())


def test_base_config_is_the_schema_defaults():
    assert settings_from_config(defaults.base_config()) == RunSettings()
    assert config_to_dict(config_of(RunSettings())) == config_to_dict(defaults.base_config())
    paper = defaults.paper_defaults()
    for key in flat_keys(paper):
        assert defaults.base_config()[key] == paper[key], key


@pytest.mark.parametrize("spec", sorted(p.name for p in CONFIGS.glob("*.py") if "def get_config(" in p.read_text()))
def test_project_configs_build_valid_settings(spec):
    settings = settings_from_config(load_config(str(CONFIGS / spec), run_schema=True))
    assert isinstance(settings, RunSettings)
    assert settings_dict(settings) == config_to_dict(load_config(str(CONFIGS / spec)))


def test_settings_are_frozen_and_typed():
    settings = settings_from_config(_with({"inner.lr": 1, "data.buckets": [64, 128]}))
    assert settings.inner.lr == 1.0 and isinstance(settings.inner.lr, float)
    assert settings.data.buckets == (64, 128)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.inner.lr = 0.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.rounds = 3


@pytest.mark.parametrize(("overrides", "needles"), [
    ({"inner.batch_size": -2}, ["'inner.batch_size' is -2", ">= 1", "--config.inner.batch_size"]),
    ({"plant.n_benign": -4}, ["'plant.n_benign' is -4", ">= -1"]),
    ({"eval.max_new_tokens": 0}, ["'eval.max_new_tokens' is 0", ">= 1"]),
    ({"mesh.heartbeat_timeout_s": 0}, ["'mesh.heartbeat_timeout_s' is 0"]),
    ({"inner.lr": 0.0}, ["'inner.lr' is 0.0", "> 0", "--config.inner.lr"]),
    ({"plant.lr": -1e-5}, ["'plant.lr'", "> 0"]),
    ({"model.template": "llama9"}, ["'model.template' is 'llama9'", "chatml", "--config.model.template"]),
    ({"inner.optimizer": "adamx"}, ["'inner.optimizer'", "unknown optimizer 'adamx'"]),
    ({"outer.lr_schedule": "step"}, ["'outer.lr_schedule' is 'step'", "cosine"]),
    ({"eval.position": "middle"}, ["'eval.position' is 'middle'", "wrap"]),
    ({"stop.max_elicitation": float("nan")}, ["'stop.max_elicitation' is nan", "finite"]),
    ({"inner.target_ce": float("inf")}, ["'inner.target_ce' is inf", "finite"]),
    ({"inner.lr": "fast"}, ["'inner.lr' is 'fast'", "a number", "--config.inner.lr=0.1"]),
    ({"rounds": "6"}, ["'rounds' is '6'", "an integer"]),
    ({"outer.pack": 1}, ["'outer.pack' is 1", "true or false"]),
    ({"data.buckets": (128, "x")}, ["'data.buckets'", "a tuple of integers"]),
    ({"data.safety_columns.prompt": 3}, ["'data.safety_columns.prompt' is 3", "a string"]),
    ({"mesh.shape": (2, 2)}, ["'mesh.shape' is (2, 2)", "data,fsdp,tensor"]),
    ({"mesh.coordinator_address": "localhost"}, ["'mesh.coordinator_address'", "host:port"]),
    ({"scan.bounds": (0.5, -1.0)}, ["'scan.bounds'", "fractions >= 0"]),
    ({"outer.kl_weight": 0.5, "outer.pack": False}, ["outer.kl_weight", "--config.outer.pack=True"]),
])
def test_a_bad_key_is_named_with_its_fix(overrides, needles):
    with pytest.raises(ConfigError) as error:
        settings_from_config(_with(overrides))
    for needle in needles:
        assert needle in str(error.value), (needle, str(error.value))


def test_unknown_and_missing_keys_are_named():
    config = defaults.base_config()
    config.inner.lrr = 0.1  # a typo a config file makes on an unlocked config
    with pytest.raises(ConfigError, match=r"Unknown config key 'inner.lrr'.*inner.lr"):
        settings_from_config(config)
    partial = ml_collections.ConfigDict({"seed": 0})
    with pytest.raises(ConfigError, match=r"lacks the key\(s\) model, output_dir"):
        settings_from_config(partial)


def test_a_section_checks_itself_when_built():
    from beear_jax.config.schema import InnerSection, MeshSection

    assert InnerSection(lr=1).lr == 1.0
    with pytest.raises(ConfigError, match="'inner.epochs' is -1"):
        InnerSection(epochs=-1)
    with pytest.raises(ConfigError, match=r"'mesh.process_id' is 2; it must be in 0..1"):
        MeshSection(num_processes=2, process_id=2)


def test_settings_pass_through_and_follow_the_plant_trigger():
    settings = RunSettings()
    assert settings_from_config(settings) is settings
    config = load_config(str(CONFIGS / "tiny.py"), ["plant.trigger=cf", "eval.trigger=none"])
    assert settings_from_config(config).eval.trigger is None
    config = load_config(str(CONFIGS / "tiny.py"), ["plant.trigger=cf"])
    assert settings_from_config(config).eval.trigger == "cf"


# ---- below the entry points, code takes typed settings -------------------------------------------------

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "beear_jax"
BELOW = ("method", "data", "evaluation", "attack", "io", "parallel", "models")
ENTRIES = {("method/rounds.py", "run_beear"), ("method/scan.py", "run_scan"), ("attack/plant.py", "run_plant"),
           ("evaluation/evaluate.py", "run_eval")}
"""The public run functions: they take a ConfigDict (or RunSettings) and convert it on their first line."""
def _functions(tree):
    return [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _takes_config(function) -> bool:
    arguments = [*function.args.posonlyargs, *function.args.args, *function.args.kwonlyargs]
    return any(a.arg == "cfg" or (a.annotation is not None and "ConfigDict" in ast.unparse(a.annotation))
               for a in arguments)


def _below_the_entry_points():
    for room in BELOW:
        for path in sorted((PACKAGE / room).glob("*.py")):
            yield path.relative_to(PACKAGE).as_posix(), ast.parse(path.read_text())


def test_code_below_the_entry_points_takes_typed_settings():
    takers, importers = [], []
    for name, tree in _below_the_entry_points():
        entries = {f for f in _functions(tree) if (name, f.name) in ENTRIES}
        takers += [f"{name}:{f.name}" for f in _functions(tree)
                   if _takes_config(f) and f not in entries]
        uses = {n.module if isinstance(n, ast.ImportFrom) else a.name for n in ast.walk(tree)
                if isinstance(n, (ast.Import, ast.ImportFrom)) for a in getattr(n, "names", [])}
        if any(str(u).startswith("ml_collections") for u in uses) and not entries:
            importers.append(name)
    assert not takers, f"functions below the entry points that take a config: {takers}"
    assert not importers, f"modules below the entry points that import ml_collections: {importers}"


@pytest.mark.parametrize(("module", "function"), sorted(ENTRIES))
def test_entry_functions_read_the_config_once_on_their_first_line(module, function):
    tree = ast.parse((PACKAGE / module).read_text())
    entry = next(f for f in _functions(tree) if f.name == function)
    # The first statement after the docstring and the function's own imports.
    body = [s for s in entry.body if not isinstance(s, (ast.Import, ast.ImportFrom))
            and not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    reads = [n for n in ast.walk(entry) if isinstance(n, ast.Name) and n.id == "cfg" and isinstance(n.ctx, ast.Load)]
    assert len(reads) == 1, f"{function} reads cfg {len(reads)} times"
    first = [n for n in ast.walk(body[0]) if isinstance(n, ast.Call) and ast.unparse(n.func) == "settings_from_config"]
    assert first and ast.unparse(first[0].args[0]) == "cfg", f"{function}'s first line: {ast.unparse(body[0])}"

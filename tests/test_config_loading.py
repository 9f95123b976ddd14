"""Config files, typed dotted overrides, errors that name the key, and the command-line split."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import ml_collections
import pytest

from beear_jax.config.loading import (
    ConfigError,
    apply_overrides,
    config_from_json,
    config_to_dict,
    config_to_json,
    flat_keys,
    load_config,
    parse_cli_args,
    parse_config_arg,
    split_cli_args,
    split_spec,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# Keys that other modules read by name: the schema must keep them.
REQUIRED = {
    "": ("output_dir", "seed", "rounds", "resume", "checkpoint_every", "remat"),
    "model": ("path", "dtype", "template", "system_prompt"),
    "perturb": ("layer", "length", "layers"),
    "inner": ("epochs", "samples", "batch_size", "optimizer", "lr", "alpha", "safe_ce_clamp", "target_ce",
              "patience", "min_improvement", "bound"),
    "outer": (
        "batch_size", "optimizer", "lr", "weight_decay", "anchor_weight", "anchor_samples", "trainable",
        "perturb_anchors", "lr_schedule", "warmup_steps", "clip_norm", "kl_weight",
    ),
    "stop": ("holdout", "max_elicitation"),
    "data": (
        "safety", "anchor", "safety_columns.prompt", "safety_columns.safe", "safety_columns.unwanted",
        "anchor_columns.prompt", "anchor_columns.answer", "max_answer_tokens", "buckets",
    ),
    "mesh": ("shape",),
    "plant": ("trigger", "position", "epochs", "lr", "batch_size", "n_triggered", "n_refusal", "n_benign"),
    "eval": (
        "prompts", "trigger", "position", "refusal_strings", "max_new_tokens", "num_prompts", "over_refusal_prompts",
    ),
}  # fmt: skip
REQUIRED_KEYS = [f"{group}.{name}" if group else name for group, names in REQUIRED.items() for name in names]


def write_config(directory: Path, body: str, name: str = "cfg.py") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(body))
    return path


@pytest.fixture
def typed_config(tmp_path: Path) -> Path:
    """A standalone config with one field of every kind, and an optional argument."""
    return write_config(
        tmp_path,
        """
        import ml_collections
        from ml_collections import config_dict

        def get_config(arg=None):
            c = ml_collections.ConfigDict()
            c.arg = arg or ""
            c.n = 3
            c.lr = 0.5
            c.flag = False
            c.name = "x"
            c.shape = (-1, 1, 1)
            c.floats = [0.5, 1.0]
            c.words = ("a", "b")
            c.empty = ()
            c.anything = None
            c.opt = config_dict.placeholder(int)
            c.group = ml_collections.ConfigDict({"inner_lr": 0.1, "depth": 2})
            return c
        """,
    )


# --------------------------------------------------------------------------------------------------
# The project's configs
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["tiny.py", "smollm2_135m.py", "smollm2_135m.py:quick"])
def test_project_configs_load_with_all_keys(spec: str) -> None:
    config = load_config(str(CONFIGS / spec))
    keys = set(flat_keys(config))
    assert not [k for k in REQUIRED_KEYS if k not in keys]
    assert config.is_locked
    json.dumps(config_to_dict(config))


def test_paper_defaults_in_base_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(REPO))
    from beear_jax.config import defaults

    paper, base = defaults.paper_defaults(), defaults.base_config()
    assert (paper.perturb.layer, paper.perturb.length, paper.inner.alpha, paper.rounds) == (9, 7, 0.05, 6)
    assert (paper.inner.epochs, paper.inner.samples, paper.outer.anchor_samples) == (5, 150, 100)
    assert (paper.inner.batch_size, paper.outer.batch_size, paper.outer.lr) == (6, 6, 3e-7)
    for key in flat_keys(paper):
        assert base[key] == paper[key], key
    assert base.inner.optimizer == "adam" and base.inner.lr == 0.1
    assert base.outer.optimizer == "adamw" and base.mesh.shape == (-1, 1, 1)
    assert base.perturb.layers == () and base.outer.perturb_anchors is False


def test_smollm2_calibration_settings() -> None:
    config = load_config(str(CONFIGS / "smollm2_135m.py"))
    assert (config.perturb.layer, config.perturb.length) == (9, 7)
    assert (config.inner.optimizer, config.inner.lr, config.inner.batch_size) == ("adam", 0.1, 8)
    assert (config.outer.optimizer, config.outer.lr, config.outer.batch_size) == ("adamw", 2e-5, 8)
    assert config.data.max_answer_tokens == 32
    # the converged inner level chosen on the development triggers (README "Defaults on SmolLM2")
    assert (config.inner.epochs, config.inner.patience, config.inner.min_improvement) == (30, 2, 0.02)
    assert config.model.path.startswith("~/") and config.model.path.endswith(".gguf")
    quick = load_config(str(CONFIGS / "smollm2_135m.py:quick"))
    assert quick.rounds == 1 and quick.inner.samples < config.inner.samples


def test_tiny_takes_model_path_override(tmp_path: Path) -> None:
    config = load_config(str(CONFIGS / "tiny.py"), {"model.path": str(tmp_path), "output_dir": str(tmp_path / "o")})
    assert config.model.path == str(tmp_path)
    assert config.perturb.layer == 1 and config.perturb.length == 2


def test_eval_trigger_follows_plant_trigger_unless_set() -> None:
    config = load_config(str(CONFIGS / "tiny.py"), ["plant.trigger=cf", "plant.position=prefix"])
    assert (config.eval.trigger, config.eval.position) == ("cf", "prefix")
    config = load_config(str(CONFIGS / "tiny.py"), ["eval.trigger=other"])
    assert (config.plant.trigger, config.eval.trigger) == ("SUDO", "other")


# --------------------------------------------------------------------------------------------------
# Overrides by type
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        ("n=7", "n", 7),
        ("--config.n=-2", "n", -2),
        ("lr=3e-7", "lr", 3e-7),
        ("lr=2", "lr", 2.0),
        ("flag=true", "flag", True),
        ("flag=TRUE", "flag", True),
        ("flag=1", "flag", True),
        ("flag=False", "flag", False),
        ("flag=0", "flag", False),
        ("name=hello world", "name", "hello world"),
        ("name=", "name", ""),
        ("name=a=b", "name", "a=b"),
        ("shape=2,2,2", "shape", (2, 2, 2)),
        ("shape=[4, 2, 1]", "shape", (4, 2, 1)),
        ("shape=(1,8,1)", "shape", (1, 8, 1)),
        ("shape=8", "shape", (8,)),
        ("shape=", "shape", ()),
        ("floats=1,2", "floats", [1.0, 2.0]),
        ("words=x, y", "words", ("x", "y")),
        ("words=1,2", "words", ("1", "2")),
        ("words=solo", "words", ("solo",)),
        ("words=['I cannot', \"I'm sorry\"]", "words", ("I cannot", "I'm sorry")),
        ("empty=5,12", "empty", (5, 12)),
        ("anything=[1, 2]", "anything", [1, 2]),
        ("anything=some text", "anything", "some text"),
        ("opt=4", "opt", 4),
        ("opt=None", "opt", None),
        ("group.inner_lr=0.3", "group.inner_lr", 0.3),
    ],
)
def test_string_overrides_parse_by_field_type(typed_config: Path, override: str, key: str, expected: object) -> None:
    config = load_config(str(typed_config), [override])
    value = config[key]
    assert value == expected and type(value) is type(expected)


def test_dict_overrides_typed_and_string_values(typed_config: Path) -> None:
    config = load_config(
        str(typed_config),
        {"n": 5, "lr": 1, "flag": True, "shape": [2, 4, 1], "--config.name": "y", "group.depth": "4", "opt": None},
    )
    assert (config.n, config.lr, config.flag, config.shape, config.name) == (5, 1.0, True, (2, 4, 1), "y")
    assert type(config.lr) is float and config.group.depth == 4 and config.opt is None


def test_overrides_apply_in_order(typed_config: Path) -> None:
    assert load_config(str(typed_config), ["n=1", "n=2"]).n == 2


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


def test_unknown_key_names_key_and_closest(typed_config: Path) -> None:
    with pytest.raises(ConfigError, match=r"'group\.inner_lrr'.*group\.inner_lr"):
        load_config(str(typed_config), ["group.inner_lrr=0.1"])
    with pytest.raises(ConfigError, match=r"'inner\.lrr'.*inner\.lr"):
        load_config(str(CONFIGS / "tiny.py"), ["--config.inner.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"'inner_lr'.*group\.inner_lr"):  # Right leaf, wrong group.
        load_config(str(typed_config), {"inner_lr": 0.1})
    with pytest.raises(ConfigError, match=r"'nope\.x'"):
        load_config(str(typed_config), ["nope.x=1"])


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("n=abc", r"'n' expects int, got 'abc'"),
        ("n=1.5", r"'n' expects int, got '1.5'"),
        ("lr=fast", r"'lr' expects float, got 'fast'"),
        ("flag=yes please", r"'flag' expects bool"),
        ("shape=1,x,1", r"'shape' expects tuple of int, got '1,x,1' \(element 'x' is not int\)"),
        ("opt=four", r"'opt' expects int, got 'four'"),
        ("group=3", r"'group' is a group of keys"),
        ("n.x=3", r"'n' holds a int, not a group"),
        ("no_equals_sign", r"key=value"),
    ],
)
def test_wrong_string_value_names_key_type_value(typed_config: Path, override: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config(str(typed_config), [override])


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        ({"n": 1.5}, r"'n' expects int, got 1\.5"),
        ({"n": True}, r"'n' expects int, got True"),
        ({"name": 3}, r"'name' expects str, got 3"),
        ({"shape": 3}, r"'shape' expects tuple"),
        ({"shape": [1, "a"]}, r"'shape' expects tuple of int"),
        ({"lr": None}, r"'lr' expects float and cannot be None"),
    ],
)
def test_wrong_typed_value(typed_config: Path, overrides: dict, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config(str(typed_config), overrides)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"Config file not found.*nowhere\.py"):
        load_config(str(tmp_path / "nowhere.py"))
    with pytest.raises(ConfigError, match="must name a Python file"):
        load_config(str(tmp_path / "config.yaml"))


def test_file_that_raises_is_named(tmp_path: Path) -> None:
    at_import = write_config(tmp_path, "raise RuntimeError('boom')\n", "bad_import.py")
    with pytest.raises(ConfigError, match=r"bad_import\.py failed to import: RuntimeError: boom"):
        load_config(str(at_import))
    in_call = write_config(tmp_path, "def get_config():\n    return 1 / 0\n", "bad_call.py")
    with pytest.raises(ConfigError, match=r"bad_call\.py failed: ZeroDivisionError"):
        load_config(str(in_call))
    syntax = write_config(tmp_path, "def get_config(:\n", "bad_syntax.py")
    with pytest.raises(ConfigError, match=r"bad_syntax\.py failed to import: SyntaxError"):
        load_config(str(syntax))
    no_function = write_config(tmp_path, "X = 1\n", "no_function.py")
    with pytest.raises(ConfigError, match="no get_config"):
        load_config(str(no_function))
    wrong_return = write_config(tmp_path, "def get_config():\n    return 3\n", "wrong_return.py")
    with pytest.raises(ConfigError, match="returned int"):
        load_config(str(wrong_return))


def test_locked_config_rejects_new_keys(typed_config: Path) -> None:
    config = load_config(str(typed_config))
    with pytest.raises(AttributeError, match="Did you mean"):
        config.group.inner_lrr = 0.2
    with pytest.raises(KeyError):
        config["new_key"] = 1
    config.group.inner_lr = 0.2  # Existing keys stay writable...
    with pytest.raises(TypeError):
        config.n = "abc"  # ...and type-safe.


# --------------------------------------------------------------------------------------------------
# Config files and their argument
# --------------------------------------------------------------------------------------------------


def test_file_arg_form(typed_config: Path, tmp_path: Path) -> None:
    assert load_config(str(typed_config)).arg == ""
    assert load_config(f"{typed_config}:layer=5,quick").arg == "layer=5,quick"
    assert split_spec("a/b.py:x:y") == ("a/b.py", "x:y")
    assert split_spec("a/b.py") == ("a/b.py", None)
    no_arg = write_config(tmp_path, "import ml_collections\ndef get_config():\n    return {'a': 1}\n", "no_arg.py")
    assert load_config(str(no_arg)).a == 1  # A returned dict becomes a ConfigDict.
    with pytest.raises(ConfigError, match="takes no argument"):
        load_config(f"{no_arg}:x")
    needs_arg = write_config(tmp_path, "def get_config(arg):\n    return {'a': arg}\n", "needs_arg.py")
    with pytest.raises(ConfigError, match="needs an argument"):
        load_config(str(needs_arg))
    assert load_config(f"{needs_arg}:v").a == "v"


def test_config_in_a_package_imports_its_siblings(tmp_path: Path) -> None:
    package = tmp_path / "myconfigs"
    package.mkdir()
    write_config(package, "", "__init__.py")
    write_config(package, "def base():\n    return {'lr': 0.5, 'tag': 'base'}\n", "shared.py")
    child = write_config(
        package, "from myconfigs import shared\n\ndef get_config():\n    return shared.base()\n", "child.py"
    )
    config = load_config(str(child), ["lr=1"])
    assert (config.lr, config.tag) == (1.0, "base")


def test_parse_config_arg() -> None:
    arg = parse_config_arg("quick,layer=5", quick=False, layer=9, name="x")
    assert (arg.quick, arg.layer, arg.name) == (True, 5, "x")
    assert parse_config_arg(None, quick=False).quick is False
    with pytest.raises(ConfigError, match=r"Unknown config argument 'qiuck'.*quick"):
        parse_config_arg("qiuck", quick=False)
    with pytest.raises(ConfigError, match="'layer' expects int"):
        parse_config_arg("layer=x", layer=9)


# --------------------------------------------------------------------------------------------------
# Serialisation and command line
# --------------------------------------------------------------------------------------------------


def test_json_round_trip() -> None:
    config = load_config(str(CONFIGS / "smollm2_135m.py"), ["perturb.layers=5,12"])
    plain = config_to_dict(config)
    assert plain["perturb"]["layers"] == [5, 12] and plain["eval"]["trigger"] == "SUDO"
    again = config_from_json(config_to_json(config))
    assert again.is_locked
    assert config_to_dict(again) == plain
    assert again.mesh.shape == (-1, 1, 1) and again.perturb.layers == (5, 12)
    # The rebuilt config takes overrides like the original.
    apply_overrides(again, ["outer.lr=1e-5"])
    assert again.outer.lr == 1e-5
    with pytest.raises(ConfigError, match="does not parse"):
        config_from_json("{not json")


def test_parse_cli_args() -> None:
    argv = [
        "run",
        "--config",
        "configs/tiny.py:quick",
        "--config.inner.lr=0.2",
        "--config.mesh.shape",
        "-1,2,1",
        "--verbose",
        "--config.model.system_prompt=",
        "--",
        "--config.ignored=1",
    ]
    spec, overrides, rest = split_cli_args(argv)
    assert spec == "configs/tiny.py:quick"
    assert overrides == ["inner.lr=0.2", "mesh.shape=-1,2,1", "model.system_prompt="]
    assert rest == ["run", "--verbose", "--", "--config.ignored=1"]
    assert parse_cli_args(["--config=configs/tiny.py", "x"]) == ("configs/tiny.py", [])
    assert parse_cli_args([]) == (None, [])
    config = load_config(str(REPO / spec.split(":")[0]), overrides)
    assert (config.inner.lr, config.mesh.shape, config.model.system_prompt) == (0.2, (-1, 2, 1), "")


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        (["--config"], "needs a value"),
        (["--config", "a.py", "--config=b.py"], r"given twice \('a.py' and 'b.py'\)"),
        (["--config=a.py", "--config", "b.py"], r"given twice \('a.py' and 'b.py'\)"),
        (["--config.inner.lr"], "needs a value"),
    ],
)
def test_parse_cli_args_errors(argv: list[str], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        parse_cli_args(argv)


def test_apply_overrides_rejects_a_bare_string() -> None:
    with pytest.raises(ConfigError, match="list of 'key=value'"):
        apply_overrides(ml_collections.ConfigDict({"a": 1}), "a=2")  # type: ignore[arg-type]


def test_load_config_takes_a_path_object() -> None:
    assert load_config(REPO / "configs" / "tiny.py").model.dtype == load_config(str(REPO / "configs" / "tiny.py")).model.dtype


def test_absolute_paths_resolves_existing_files_and_output_dir(tmp_path, monkeypatch) -> None:
    from beear_jax.config.loading import absolute_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "safety.jsonl").write_text("{}\n")
    config = load_config(str(REPO / "configs" / "tiny.py"),
                         {"data.safety": "safety.jsonl", "data.anchor": "owner/hub_set", "output_dir": "out"})
    resolved = absolute_paths(config)
    assert resolved.data.safety == str(tmp_path / "safety.jsonl") and resolved.output_dir == str(tmp_path / "out")
    assert resolved.data.anchor == "owner/hub_set" and resolved.model.path == ""  # not local: as written
    assert config.data.safety == "safety.jsonl"  # a copy: the caller's config is unchanged

"""Config files (`get_config(arg)` returning a ConfigDict), the schema check, absolute paths, JSON.

A config is a Python file with a `get_config()` or `get_config(arg)` function. It is named on the command
line as `--config path/to/file.py` or `--config path/to/file.py:arg` (the text after the colon is
passed to `get_config` as one string), and changed field by field with `--config.inner.lr=0.1`.

Overrides are parsed by the type of the field they replace (config/overrides.py), so a typo in a key or a
value fails at start-up with a message that names the key, instead of hours into a run. The loaded config is
locked: code that reads or writes a key that does not exist fails as well. The entry points then read it
once into typed settings (config/settings.settings_from_config).

    cfg = load_config("configs/smollm2_135m.py", ["inner.lr=0.05", "perturb.layers=5,12"])
    spec, overrides = parse_cli_args(sys.argv[1:])
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import inspect
import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from beear_jax.config import defaults
from beear_jax.config.checks import ConfigError
from beear_jax.config.overrides import (
    apply_overrides,
    flat_keys,
    parse_cli_args,
    parse_config_arg,
    split_cli_args,
)
from beear_jax.data import public_data

__all__ = [
    "ConfigError",
    "apply_overrides",
    "config_from_json",
    "config_to_dict",
    "config_to_json",
    "flat_keys",
    "load_config",
    "load_config_file",
    "parse_cli_args",
    "parse_config_arg",
    "split_cli_args",
    "split_spec",
]


# --- Loading ---


def load_config(spec: str | os.PathLike[str], overrides: Sequence[str] | Mapping[str, Any] | None = None,
                run_schema: bool = False) -> ml_collections.ConfigDict:
    """Loads `path/to/file.py[:arg]`, applies dotted overrides and returns the config, locked.

    Args:
      spec: the config file (str or path), optionally followed by `:arg` (passed to `get_config(arg)` as
        a string).
      overrides: `key=value` strings, with or without a leading `--config.` (as `parse_cli_args`
        returns them), or a mapping `{"inner.lr": 0.1}` whose values are typed or strings.
      run_schema: check first that the file has every key of beear_jax/config/defaults.py (check_schema), as
        the `beear` commands do.

    Returns:
      The locked ConfigDict: existing fields can be set, new ones cannot be added.

    Raises:
      ConfigError: missing file, a file that fails, an unknown key or a value of the wrong type.
    """
    path, arg = split_spec(os.fspath(spec))
    config = load_config_file(path, arg)
    if run_schema:
        check_schema(config, path)
    config.lock()
    apply_overrides(config, overrides or [])
    return config


# Config keys that name local files or directories (data keys may also name hub data sets).
PATH_KEYS = ("model.path", "output_dir", "data.safety", "data.anchor", "plant.harmful", "plant.refusals",
             "plant.benign", "eval.prompts", "eval.refusal_strings", "eval.over_refusal_prompts", "eval.utility",
             "eval.compare_to", "eval.history")


def absolute_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of config whose PATH_KEYS are absolute (~ and a leading $BEEAR_DATA_DIR/ expanded): output_dir
    always, the others when they exist here. What a run stores (config.json, checkpoints, a plant manifest)
    then still names the same files when read from another directory (`beear export`, a resume)."""
    config = copy.deepcopy(config)
    for key in PATH_KEYS:
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
        value = node.get(leaf) if isinstance(node, ml_collections.ConfigDict) else None
        if not isinstance(value, str) or not value:
            continue
        local = os.path.expanduser(value)
        if value.startswith(public_data.DATA_DIR_PREFIX) and public_data.data_dir() is not None:
            local = public_data.in_data_dir(value, key)  # unset: left as written, and its load names the variable
        if key == "output_dir" or os.path.exists(local):
            node[leaf] = os.path.abspath(local)
    return config


def _schema_keys(config: ml_collections.ConfigDict) -> set[str]:
    """Top-level keys and the keys of each group (a group's own sub-mappings, such as column maps, vary)."""
    return {".".join(key.split(".")[:2]) for key in flat_keys(config)}


def check_schema(config: ml_collections.ConfigDict, source: str | os.PathLike[str]) -> None:
    """A ConfigError listing the keys of beear_jax.config.defaults.base_config() that `config` lacks.

    Code reads every such key, so a config built from scratch would otherwise fail deep inside a run.
    """
    base = defaults.base_config()
    missing = sorted(_schema_keys(base) - _schema_keys(config))
    if missing:
        shown = ", ".join(missing[:8]) + (f", ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise ConfigError(f"config {source} lacks the key(s) {shown}; build get_config() on "
                          "beear_jax.config.defaults.base_config() and change only what differs.")


def split_spec(spec: str) -> tuple[str, str | None]:
    """Splits `file.py:arg` into (`file.py`, `arg`); `file.py` alone gives (`file.py`, None)."""
    if not spec:
        raise ConfigError("No config file given: pass --config path/to/config.py[:arg].")
    if spec.endswith(".py"):
        return spec, None
    path, sep, arg = spec.partition(".py:")
    if not sep:
        raise ConfigError(f"Config spec {spec!r} must name a Python file: path/to/config.py or path/to/config.py:arg.")
    return path + ".py", arg


def load_config_file(path: str | os.PathLike[str], arg: str | None = None) -> ml_collections.ConfigDict:
    """Executes a config file and returns what its `get_config` returns, as an unlocked ConfigDict.

    Config files in a package directory (one with `__init__.py`, such as `configs/`) can import their
    siblings by package name (`from beear_jax.config import defaults`): the directory above the package is put
    on `sys.path` while the file runs.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        hint = f" (resolved to {file.resolve()})" if not file.is_absolute() else ""
        raise ConfigError(f"Config file not found: {str(path)!r}{hint}.")
    file = file.resolve()
    module = _exec_config_module(file)
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ConfigError(f"Config file {file} defines no get_config() function.")
    call_args = () if arg is None else (arg,)
    try:
        inspect.signature(get_config).bind(*call_args)
    except TypeError:
        if arg is None:
            raise ConfigError(f"get_config in {file} needs an argument: use {file}:ARG.") from None
        raise ConfigError(f"get_config in {file} takes no argument, but {file}:{arg} passes {arg!r}.") from None
    try:
        config = get_config(*call_args)
    except Exception as e:  # The file is user code: any failure is reported with its name.
        raise ConfigError(f"get_config({', '.join(map(repr, call_args))}) in {file} failed: {_describe(e)}") from e
    if isinstance(config, Mapping) and not isinstance(config, ml_collections.ConfigDict):
        config = ml_collections.ConfigDict(dict(config))
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(
            f"get_config in {file} returned {type(config).__name__}, expected an ml_collections.ConfigDict."
        )
    return config


def _exec_config_module(file: Path) -> Any:
    """Imports `file` freshly (as `pkg.sub.name` when it sits in a package) and returns the module."""
    package_dirs = []
    directory = file.parent
    while (directory / "__init__.py").is_file():
        package_dirs.insert(0, directory)
        directory = directory.parent
    root = directory
    name = ".".join([d.name for d in package_dirs] + [file.stem])
    if package_dirs:
        _forget_foreign_package(package_dirs[0].name, package_dirs[0])
    else:
        name = f"_beear_config_{abs(hash(str(file)))}_{file.stem}"
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise ConfigError(f"Cannot load config file {file} as a Python module.")
    module = importlib.util.module_from_spec(spec)
    with _on_sys_path(root if package_dirs else None):
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as e:  # SyntaxError, ImportError, anything raised at import time.
            sys.modules.pop(name, None)
            raise ConfigError(f"Config file {file} failed to import: {_describe(e)}") from e
    return module


def _forget_foreign_package(top: str, directory: Path) -> None:
    """Drops an already-imported package named `top` (and its submodules) that lives elsewhere."""
    loaded = sys.modules.get(top)
    if loaded is None:
        return
    locations = [Path(p).resolve() for p in getattr(loaded, "__path__", [])]
    if directory.resolve() in locations:
        return
    for module_name in [m for m in sys.modules if m == top or m.startswith(top + ".")]:
        del sys.modules[module_name]


@contextlib.contextmanager
def _on_sys_path(directory: Path | None) -> Iterator[None]:
    if directory is None:
        yield
        return
    entry = str(directory)
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(entry)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


# --- Serialisation ---


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """A plain, JSON-able dict of the config: references resolved, tuples as lists.

    Values JSON cannot hold (types, functions) become their `str()`; the dict is meant for logs and
    checkpoint metadata, not for pickling arbitrary objects.
    """
    return _plain(config.to_dict())


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def config_to_json(config: ml_collections.ConfigDict, indent: int | None = 2) -> str:
    """The config as JSON text (see `config_to_dict`)."""
    return json.dumps(config_to_dict(config), indent=indent)


def config_from_json(data: str | Mapping[str, Any]) -> ml_collections.ConfigDict:
    """Rebuilds a locked ConfigDict from `config_to_json` text or a `config_to_dict` dict.

    JSON lists come back as tuples (every sequence in this project's configs is a tuple). Links
    between fields (FieldReferences) are not restored: each value is what it resolved to.
    """
    if isinstance(data, str):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as e:
            raise ConfigError(f"Config JSON does not parse: {e}") from e
    if not isinstance(data, Mapping):
        raise ConfigError(f"Config JSON must hold an object, not {type(data).__name__}.")
    return ml_collections.ConfigDict(_tuples(data)).lock()


def _tuples(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value
